"""The Fisher family: ``fisher_accumulate_`` and ``per_sample_grad_sq_``, the statistics
FisherAdapTune accumulates (docs/methods.md sections 1 and 2).

Each op's Python story in one place: the typed wrapper (validates what only Python knows, the
layout; allocates the outputs; calls the registered op), the fake kernel (the C++ checks, from
:mod:`._checks`), the ``ADInplaceOrView`` kernel that makes the in-place writes visible to
autograd (Note [In-place writes] in :mod:`._library`) and the ``Autograd`` kernel of a statistic
(Note [No derivative] there). Both ops write into their first argument(s) in place (their names
end in ``_``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _checks, _library
from ._library import OPS as _ops, segments as _segments
from ..groups import GroupLayout

__all__ = ["fisher_accumulate_", "per_sample_grad_sq_"]


# ---------------------------------------------------------------------------------------------
# fisher_accumulate_


def fisher_accumulate_(
    fisher: Sequence[Tensor],
    grads: Sequence[Optional[Tensor]],
    *,
    decay: float,
    scale: float,
    layout: Optional[GroupLayout] = None,
) -> Tuple[Optional[Tensor], Tensor]:
    """In place, for every i: ``fisher[i] = decay * fisher[i] + scale * grads[i] ** 2``.

    Mutates: every ``fisher[i]`` (always).

    One fused pass over all tensors. ``fisher`` tensors are float32 (float64 on CPU) and
    contiguous; ``grads`` are float32, bfloat16 or float16 with matching shapes, or ``None`` to
    leave that tensor untouched. Empty tensors and lists are fine.

    bfloat16 ``fisher`` tensors (any device; FisherAdapTune's ``fisher_dtype=torch.bfloat16``)
    are read widened to float32, updated with exactly the float32 arithmetic, and rounded once
    to bfloat16 (round to nearest even) on store; ``group_sums`` add the stored values in float32
    blocks and float64, as for float32 state.

    Non-finite handling: an element whose update would not be finite (a NaN or Inf gradient,
    or a finite one whose square overflows) is skipped, keeping its Fisher entry, and counted.
    The test is on the value as it would be stored: for bfloat16 state, an update finite in
    float32 that rounds to Inf in bfloat16 (``>= 3.3961e38`` in magnitude) is skipped and counted
    too.

    ``decay`` and ``scale`` must be finite numbers in ``[0, 3.4028e38]`` (float32's range: the
    kernels multiply in float32; the same range for float64 and bfloat16 state): a negative, NaN, Inf or
    larger value (``1e308``) is a ``ValueError`` naming the argument, raised before anything is
    written.

    Aliasing: no two ``fisher`` tensors may share memory (the same tensor twice included), nor
    may a ``fisher`` tensor share memory with any ``grads`` tensor read in place (a contiguous
    one; a non-contiguous gradient is copied first): the update runs in parallel chunks that
    would race. Such a call is a ``ValueError`` naming the later of the two arguments, raised
    before anything is written. Tensors of one storage that do not overlap (views of a flat
    buffer) are fine.

    Returns:
        ``(group_sums, nonfinite)``: ``group_sums`` is float32 ``[layout.num_groups]`` holding
        the sum of each group's Fisher after the update (tensors whose gradient is ``None``
        contribute their current Fisher), or ``None`` without a layout. ``nonfinite`` is a 0-d
        int64 tensor on the Fisher's device counting skipped elements; it is a tensor, not an
        int, so that reading it is the caller's choice of when to synchronise.

    Both are deterministic: the same inputs give bitwise the same outputs on a given device,
    whatever the number of threads.
    """
    fisher = list(fisher)
    grads = list(grads)
    segments, num_groups = _segments(layout, fisher, "fisher")
    device = fisher[0].device if fisher else torch.device("cpu")
    group_sums = torch.empty(num_groups, dtype=torch.float32, device=device)
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)
    _ops.fisher_accumulate_(fisher, grads, float(decay), float(scale), segments, group_sums,
                            nonfinite)
    return (group_sums if layout is not None else None), nonfinite


@torch.library.register_fake("fisheradaptune::fisher_accumulate_")
def _fisher_accumulate_fake(fisher: List[Tensor], grads: List[Optional[Tensor]], decay: float,
                            scale: float, segments: Optional[Tensor], group_sums: Tensor,
                            nonfinite: Tensor) -> None:
    _checks.validate_fisher_accumulate(fisher, grads, decay, scale, segments, group_sums,
                                       nonfinite)


@_library.impl("fisher_accumulate_", "ADInplaceOrView")
def _fisher_accumulate_inplace(fisher, grads, decay, scale, segments, group_sums, nonfinite):
    targets = _library.tensors(fisher)
    _library.check_leaves("fisher_accumulate_", targets, "fisher")
    with _library.below_inplace():
        _ops.fisher_accumulate_(fisher, grads, decay, scale, segments, group_sums, nonfinite)
    _library.bump(targets + [group_sums, nonfinite])


_library.register_statistic("fisher_accumulate_")


# ---------------------------------------------------------------------------------------------
# per_sample_grad_sq_


def per_sample_grad_sq_(fisher: Tensor, x: Tensor, grad_out: Tensor, *,
                        scale: float = 1.0) -> Tensor:
    """Per-sample Fisher of a Linear weight: ``fisher += scale * sum_n (grad_out[n]^T x[n])**2``.

    Mutates: ``fisher`` (always).

    ``x`` is the layer input ``[N, T, in]`` and ``grad_out`` the gradient of the loss with
    respect to the layer output ``[N, T, out]`` (2-D ``[N, features]`` inputs are read as
    ``T = 1``); ``fisher`` is ``[out, in]``, float32 (float64 on CPU). Per-sample gradients are
    formed one tile of samples at a time, each tile by one batched GEMM, so memory stays bounded
    and the cost is about one extra weight-gradient GEMM. Samples are accumulated in order
    (deterministic). To get the per-sample Fisher ``(1/N) sum_n g_n**2``, pass ``scale=1/N``; note that a
    ``grad_out`` taken from a mean-reduced loss carries an extra ``1/N`` per sample.

    Non-finite handling, as :func:`fisher_accumulate_`: an element whose update over the whole
    call, ``fisher + scale * sum_n g_n**2``, would not be finite (a NaN or Inf in ``x`` or
    ``grad_out``, or squares that overflow the Fisher's dtype) is skipped, keeping the value it
    had before the call, and counted. The tiling does not change which elements are skipped
    (the sum of squares is carried across tiles and the Fisher written once), and the sum of
    squares is in the Fisher's dtype: a sum that overflows it is skipped even when a small
    ``scale`` would have brought it back into range. A call with no samples or no tokens
    updates and counts nothing.

    ``scale`` must be a finite number in ``[0, 3.4028e38]`` (float32's range), and ``fisher``
    must not share memory with ``x`` or ``grad_out``; otherwise a ``ValueError`` naming the
    argument is raised before anything is written.

    Precision: the per-sample GEMMs run in full IEEE fp32 whatever
    ``torch.set_float32_matmul_precision`` says (no TF32 on CUDA, no bfloat16 on CPU): this
    function sets the float32 matmul precision to ``"highest"`` for the call and restores the
    caller's settings afterwards (process-global while it runs). A raw
    ``torch.ops.fisheradaptune.per_sample_grad_sq_`` call follows the caller's matmul precision.

    Returns:
        ``nonfinite``: a 0-d int64 tensor on the Fisher's device counting the skipped Fisher
        elements (at most ``out * in``), a tensor so that reading it is the caller's choice of
        when to synchronise (as :func:`fisher_accumulate_`'s).
    """
    if x.dim() == 2 and grad_out.dim() == 2:
        x, grad_out = x.unsqueeze(1), grad_out.unsqueeze(1)
    nonfinite = torch.zeros((), dtype=torch.int64, device=fisher.device)
    # Note [Full fp32 per-sample GEMM]: the op's GEMM follows the process's float32 matmul
    # precision, which only Python can set.
    with _library.full_fp32_matmul():
        _ops.per_sample_grad_sq_(fisher, x, grad_out, float(scale), nonfinite)
    return nonfinite


@torch.library.register_fake("fisheradaptune::per_sample_grad_sq_")
def _per_sample_grad_sq_fake(fisher: Tensor, x: Tensor, grad_out: Tensor, scale: float,
                             nonfinite: Tensor) -> None:
    _checks.validate_per_sample_grad_sq(fisher, x, grad_out, scale, nonfinite)


@_library.impl("per_sample_grad_sq_", "ADInplaceOrView")
def _per_sample_grad_sq_inplace(fisher, x, grad_out, scale, nonfinite):
    _library.check_leaves("per_sample_grad_sq_", [fisher], "fisher")
    with _library.below_inplace():
        _ops.per_sample_grad_sq_(fisher, x, grad_out, scale, nonfinite)
    _library.bump([fisher, nonfinite])


_library.register_statistic("per_sample_grad_sq_")


# ---------------------------------------------------------------------------------------------
# Fallback kernels (pure PyTorch, the same contract as the compiled ones)
#
# Registered for the CPU and CUDA keys only when the compiled library is not in use
# (_library.register_fallbacks). Each takes the schema's arguments in order, checks them with
# the C++'s checks and messages (_checks.validate_<op>, then the data: the layout's rows) before
# writing anything, and writes its outputs in place.

# Per-sample gradient elements per tile (csrc/fisher/per_sample_grad_sq_cpu.cpp, csrc/fisher/per_sample_grad_sq_cuda.cu): the
# same tiling, so the batched GEMMs are those of the compiled op.
_TILE_ELEMS = {"cpu": 1 << 22, "cuda": 1 << 26}


def _write_finite(target: Tensor, updated: Tensor) -> Tensor:
    """Note [Skipping] (csrc/fisher/fisher_accumulate_cpu.cpp): write ``updated`` into ``target`` in place where
    it is finite (the C++'s ``|u| <= max``, false for NaN and Inf), keep ``target`` elsewhere,
    and return how many were skipped (a 0-d int64 tensor: no synchronisation)."""
    ok = updated.abs() <= torch.finfo(updated.dtype).max
    torch.where(ok, updated.to(target.dtype), target, out=target)
    return ok.numel() - torch.count_nonzero(ok)


def _segment_sum(values: Tensor) -> Tensor:
    """A segment's partial as the C++ forms it (cpu/fisher.cpp): sums of BLOCK elements in the
    state's dtype (blocks start at the segment's first element, and chunk boundaries fall on
    block boundaries), added in float64. A 0-d float64 tensor. bfloat16 state is summed in
    float32 (its compute type, Note [bfloat16 state], csrc/common/state.h)."""
    if values.dtype == torch.bfloat16:
        values = values.float()
    n = values.numel()
    full = n - n % _library.BLOCK
    total = values[:full].view(-1, _library.BLOCK).sum(1).to(torch.float64).sum()
    if full < n:
        total = total + values[full:].sum().to(torch.float64)
    return total


def _fisher_accumulate_fallback(fisher: List[Tensor], grads: List[Optional[Tensor]],
                                decay: float, scale: float, segments: Optional[Tensor],
                                group_sums: Tensor, nonfinite: Tensor) -> None:
    """fisher_accumulate_ in PyTorch ops.

    Each element's update is spelled as the C++ spells it, ``(decay * F) + ((scale * g) * g)``
    in the state's dtype with the gradient cast to it first and every operation rounded
    separately (the C++ is compiled without floating-point contraction), so the updated Fisher
    is bitwise the compiled op's. A group's sum adds per-segment partials (block sums of BLOCK
    elements in the state's dtype, added in float64: the C++'s blocks) in plan order, in
    float64, and rounds once to float32: equal to the compiled op's to rounding (within a block
    the C++ adds in vector lanes, torch in its own order), and deterministic.
    bfloat16 state is computed in float32 and rounded once to bfloat16 (Note [bfloat16 state],
    csrc/common/state.h); the skip test is on the rounded value.
    With a layout on CUDA the partials are read back to the host (one synchronisation)."""
    op = "fisher_accumulate_"
    if nonfinite.device.type == "cuda":
        _library.check_not_capturing(op, "it uploads a per-call chunk table from a pinned host "
                                     "buffer", nonfinite.device)
    _checks.validate_fisher_accumulate(fisher, grads, decay, scale, segments, group_sums,
                                       nonfinite)
    num_groups = group_sums.numel()
    rows = ([] if segments is None else
            _library.read_segments(op, "segments", segments, [f.numel() for f in fisher],
                                   num_groups))
    # Nothing has been written so far; every check has passed.
    grouped = {t for t, _, _, _ in rows}
    skipped = torch.zeros((), dtype=torch.int64, device=nonfinite.device)
    current: List[Optional[Tensor]] = [None] * len(fisher)  # the Fisher after the update, flat
    for i, (f, g) in enumerate(zip(fisher, grads)):
        flat = f.view(-1)
        if g is None or f.numel() == 0:
            current[i] = flat if i in grouped else None
            continue
        compute = torch.float32 if f.dtype == torch.bfloat16 else f.dtype
        gv = g.reshape(-1).to(compute)
        square = torch.mul(gv, scale).mul_(gv)
        updated = torch.mul(flat.to(compute), decay).add_(square)
        skipped += _write_finite(flat, updated.to(f.dtype))
        current[i] = flat
    nonfinite.fill_(skipped)
    if num_groups == 0:
        return
    partials = [_segment_sum(current[t][begin:end]) for t, begin, end, _ in rows]
    values = torch.stack(partials).tolist() if partials else []
    sums = [0.0] * num_groups
    for (_, _, _, group), value in zip(rows, values):
        sums[group] += value  # plan order within each group, in double
    group_sums.copy_(torch.tensor(sums, dtype=torch.float64).to(torch.float32))


def _per_sample_grad_sq_fallback(fisher: Tensor, x: Tensor, grad_out: Tensor, scale: float,
                                 nonfinite: Tensor) -> None:
    """per_sample_grad_sq_ in PyTorch ops (Note [Skipping in per_sample_grad_sq_],
    csrc/fisher/per_sample_grad_sq.cpp): the samples in tiles, each tile's per-sample gradients by one batched
    GEMM in full fp32 (the compiled op's tiling and precision), their squares added to a
    running sum in sample order (rounded separately, as the CPU kernel does), then one update
    ``F + scale * r`` with the skip rule. On the CPU the result is that of the compiled op
    bitwise whenever the BLAS gives the same tiles; on CUDA, whose kernel fuses the square and
    the sum, to rounding."""
    _checks.validate_per_sample_grad_sq(fisher, x, grad_out, scale, nonfinite)
    nonfinite.zero_()  # the op overwrites the count, also when there is no work
    n, out, inp = x.shape[0], fisher.shape[0], fisher.shape[1]
    if n == 0 or fisher.numel() == 0 or x.shape[1] == 0:
        return
    step = min(max(_TILE_ELEMS.get(fisher.device.type, 1 << 22) // (out * inp), 1), n)
    acc = fisher.dtype
    r = torch.zeros_like(fisher)
    with _library.full_fp32_matmul():
        for n0 in range(0, n, step):
            b = min(step, n - n0)
            tile = torch.bmm(grad_out.narrow(0, n0, b).transpose(1, 2).to(acc),
                             x.narrow(0, n0, b).to(acc))
            tile.mul_(tile)
            for k in range(b):
                r.add_(tile[k])
    nonfinite.fill_(_write_finite(fisher, r.mul_(scale).add_(fisher)))


#: The family's fallback kernels, by op name (registered by ops/__init__.py when needed).
FALLBACK_KERNELS = {
    "fisher_accumulate_": _fisher_accumulate_fallback,
    "per_sample_grad_sq_": _per_sample_grad_sq_fallback,
}
