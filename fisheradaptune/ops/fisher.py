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

    Non-finite handling: an element whose update would not be finite (a NaN or Inf gradient,
    or a finite one whose square overflows) is skipped, keeping its Fisher entry, and counted.

    ``decay`` and ``scale`` must be finite numbers in ``[0, 3.4028e38]`` (float32's range: the
    kernels multiply in float32; the same range for float64 state): a negative, NaN, Inf or
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

    Returns:
        ``nonfinite``: a 0-d int64 tensor on the Fisher's device counting the skipped Fisher
        elements (at most ``out * in``), a tensor so that reading it is the caller's choice of
        when to synchronise (as :func:`fisher_accumulate_`'s).
    """
    if x.dim() == 2 and grad_out.dim() == 2:
        x, grad_out = x.unsqueeze(1), grad_out.unsqueeze(1)
    nonfinite = torch.zeros((), dtype=torch.int64, device=fisher.device)
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
