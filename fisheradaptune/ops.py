"""Typed Python entry points of the ``torch.ops.fisheradaptune`` operators.

Each function validates what only Python knows (the layout), allocates the outputs and calls
the registered op; the C++ side validates every tensor argument before it writes anything.
Every op has a pure-PyTorch twin of the same name in :mod:`fisheradaptune.reference`. The fake
kernels (for torch.compile and meta tensors, with the same argument checks) live in
:mod:`fisheradaptune._fake`, registered when this module is imported.

Mutation, said the same way everywhere: an op whose name ends in ``_`` always writes into its
first argument(s) in place; an op that writes into an argument only on request
(``update_reference=``) says so in a "Mutates:" line of its docstring. Every other argument is
read only.
"""
from __future__ import annotations

import operator
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _fake  # noqa: F401  (registers the fake kernels)
from .groups import GroupLayout

__all__ = ["fisher_accumulate_", "js_drift", "js_mass_totals", "js_mass_partial", "per_sample_grad_sq_",
           "token_prune_merge"]

_ops = torch.ops.fisheradaptune


def _count(op: str, arg: str, v) -> int:
    """An int argument as an int: a float or bool is refused rather than truncated (``r=2.7``
    would otherwise merge 2 tokens without a word). SymInts pass, for dynamic shapes."""
    if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool):
        return v
    try:
        if isinstance(v, bool):
            raise TypeError
        return operator.index(v)  # numpy integers and other index-like values
    except TypeError:
        raise TypeError(f"fisheradaptune.{op}: argument '{arg}': expected an int, got "
                        f"{type(v).__name__} {v!r}") from None


def _segments(layout: Optional[GroupLayout], tensors: Sequence[Optional[Tensor]], arg: str,
              required: bool = False):
    if layout is None and not required:
        return None, 0
    if not isinstance(layout, GroupLayout):
        raise TypeError(f"argument 'layout': expected a GroupLayout, got {type(layout).__name__}")
    layout.check_tensors(tensors, arg=arg)
    # Kernels plan their work on the host, so the CPU copy is the one to pass (no sync).
    return layout.segments, layout.num_groups


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


def js_drift(
    current: Sequence[Tensor],
    reference: Sequence[Tensor],
    layout: GroupLayout,
    *,
    drift_mode: str = "mass",
    bins: int = 64,
    lower_q: float = 0.01,
    upper_q: float = 0.99,
    min_log_range: float = 1e-3,
    base: str = "e",
    update_reference: Optional[float] = None,
) -> Tensor:
    """Jensen-Shannon distance between two Fisher snapshots, per group (docs/methods.md section 3).

    Mutates: ``reference`` only when ``update_reference`` is given (after scoring).

    ``JSD(p, q) = sqrt(0.5 KL(p||m) + 0.5 KL(q||m))``, ``m = (p + q) / 2``, in nats (range
    ``[0, sqrt(ln 2)]``) or, with ``base="2"``, bits (range ``[0, 1]``).

    ``drift_mode``:
        ``"mass"``: ``p_i = |F_i| / sum |F|`` over the group's elements. Exact, no binning.
        ``"histogram"``: the paper's: ``log10(|x| + 1e-12)`` of both snapshots, ``bins`` equal
        bins between the ``lower_q`` and ``upper_q`` quantiles (numpy's linear interpolation)
        of the union of both snapshots' values in the group, widened to ``min_log_range`` if
        narrower; values outside dropped; ``1e-12`` added to every bin; normalised. Near-
        constant groups (norms, biases) collapse onto the ``min_log_range`` floor, where noise
        drives the distance towards its maximum; a larger floor avoids that. The range is never
        empty: when ``min_log_range`` is below half an ulp of ``lo`` (e.g. ``1e-17`` with
        values near 10, ``lo ~ 1``), ``lo + min_log_range`` rounds back to ``lo``, and ``hi``
        is then the next float64 above ``lo`` (values equal to ``lo`` fall in the first bin,
        values equal to ``hi`` in the last), on both backends and in
        :func:`fisheradaptune.reference.js_drift`.

    A group whose Fisher sums to 0 on either side has distance 0. Fisher values are taken by
    magnitude. ``current`` and ``reference`` share shapes and one floating dtype (float32, or
    float64 on CPU).

    Args:
        update_reference: if given as ``rho`` in [0, 1], also sets
            ``reference = rho * reference + (1 - rho) * current`` (every element of every tensor)
            after scoring, in the same call. Outside [0, 1] (or NaN) is a ``ValueError``. With an
            update, no ``reference`` tensor may share memory with another one (the same tensor
            twice included) or with any ``current`` tensor (a ``ValueError`` naming the later
            argument, raised before anything is written): the update runs in parallel chunks
            that would race with the scoring and with each other. Without an update nothing is
            written and any sharing is fine.

    Returns:
        float32 ``[layout.num_groups]`` on the tensors' device.
    """
    current = list(current)
    reference = list(reference)
    segments, num_groups = _segments(layout, current, "current", required=True)
    if base not in ("e", "2"):
        raise ValueError(f"argument 'base': expected \"e\" or \"2\", got {base!r}")
    return _ops.js_drift(current, reference, segments, num_groups, drift_mode, int(bins),
                         float(lower_q), float(upper_q), float(min_log_range), base == "2",
                         None if update_reference is None else float(update_reference))


def js_mass_totals(current: Sequence[Tensor], reference: Sequence[Tensor],
                   layout: GroupLayout) -> Tensor:
    """Per group, ``sum |current|`` and ``sum |reference|`` over the elements given: float64
    ``[2, layout.num_groups]``. The first half of :func:`js_drift`'s ``"mass"`` mode.

    With :func:`js_mass_partial` it scores a group whose elements are spread over several
    tensors or processes (FSDP shards): both results add over any split of the elements, so
    sum (all-reduce) the totals, pass them to :func:`js_mass_partial`, sum its results, and
    ``sqrt`` gives the distance (see Note [Sharded drift] in csrc/drift_math.h and
    :func:`fisheradaptune.distributed.js_drift`).
    """
    current, reference = list(current), list(reference)
    segments, num_groups = _segments(layout, current, "current", required=True)
    return _ops.js_mass_totals(current, reference, segments, num_groups)


def js_mass_partial(current: Sequence[Tensor], reference: Sequence[Tensor], layout: GroupLayout,
                    totals: Tensor, *, update_reference: Optional[float] = None) -> Tensor:
    """Per group, the sum of the JS^2 terms (nats) of the elements given, float64
    ``[layout.num_groups]``, with ``p = |current| / totals[0]`` and
    ``q = |reference| / totals[1]``; a group with a zero total gives 0. The second half of
    :func:`js_drift`'s ``"mass"`` mode: with ``totals = js_mass_totals(...)`` over the same
    tensors, ``sqrt`` of the result is ``js_drift(..., drift_mode="mass")``.

    Mutates: ``reference`` only when ``update_reference`` is given (as :func:`js_drift`).

    Args:
        totals: float64 ``[2, layout.num_groups]`` on the tensors' device, typically
            :func:`js_mass_totals` summed over shards.
        update_reference: as in :func:`js_drift`: ``reference = rho * reference +
            (1 - rho) * current`` after scoring, in the same pass; ``rho`` in [0, 1], and with
            an update no ``reference`` tensor may share memory with another one, with any
            ``current`` tensor or with ``totals`` (``ValueError``, nothing written).
    """
    current, reference = list(current), list(reference)
    segments, num_groups = _segments(layout, current, "current", required=True)
    if not isinstance(totals, Tensor):
        raise TypeError(f"argument 'totals': expected a Tensor, got {type(totals).__name__}")
    return _ops.js_mass_partial(current, reference, segments, num_groups, totals,
                                None if update_reference is None else float(update_reference))


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


# ---------------------------------------------------------------------------------------------
# Token prune-merge (docs/methods.md section 6; Note [Token prune-merge] in csrc/tokens.h)


def token_prune_merge(
    x: Tensor,
    scores: Tensor,
    keep: int,
    *,
    num_protected: int = 1,
    sizes: Optional[Tensor] = None,
    normalize: bool = True,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Keep the ``keep`` highest-scoring tokens and fuse the others into one token.

    Args:
        x: tokens ``[B, N, C]``, float32, bfloat16, float16 or float64.
        scores: ``[B, N - num_protected]``, one per non-protected token, of ``x``'s dtype or
            float32 (e.g. the CLS attention row).
        keep: how many non-protected tokens to keep, ``0 <= keep <= N - num_protected``.
        num_protected: leading tokens that are always kept, first and unchanged (CLS,
            distillation, register tokens); ``0 <= num_protected < N``.
        sizes: float32 ``[B, N]``, how many original tokens each token stands for (default:
            ones).
        normalize: fused token ``sum_i w_i x_i / sum_i w_i`` (TR-PTS, default) or the plain
            ``sum_i w_i x_i`` (EViT), with ``w_i = scores_i * sizes_i`` over the fused tokens.
            When normalising and ``sum_i w_i == 0`` the fused token is zeros, with zero
            gradients, also when a fused token holds inf or NaN: a token whose coefficient
            (``w_i / W``, or ``w_i`` unnormalised) is exactly 0 adds nothing, its non-finite
            values read as 0 (in the forward and in the score gradients). So an unnormalised
            fuse whose weights are all 0 is zeros too (weights that cancel to ``W == 0`` are
            not special there). Note [Zero coefficients] in csrc/tokens.h.

    Returns:
        ``(out, kept_index, out_sizes)``: ``out [B, num_protected + keep + 1, C]`` holds the
        protected tokens, the kept tokens in their original order, then the fused token (no
        fused token when ``keep == N - num_protected``); ``kept_index`` int64 ``[B, keep]``
        indexes the non-protected tokens (increasing); ``out_sizes`` float32 ``[B, rows]``, the
        fused token's size being the sum of the sizes it absorbed.

    ``N`` is at most ``2**31 - 1`` (token indices are int32 in both kernels; a ``ValueError``
    naming ``x`` otherwise, on CPU and CUDA alike).

    Selection picks the highest scores, ties to the lower index (NaN above every number). The
    op is deterministic and differentiable in ``x`` and ``scores`` (kept tokens' scores get a
    zero gradient: the selection is piecewise constant). Accumulation is in float32 (float64
    for float64 inputs).
    """
    return _ops.token_prune_merge(x, scores, sizes,
                                  _count("token_prune_merge", "num_protected", num_protected),
                                  _count("token_prune_merge", "keep", keep), bool(normalize))


def _token_prune_merge_setup(ctx, inputs, output):
    x, scores, sizes, num_protected, keep, normalize = inputs
    ctx.save_for_backward(x, scores, sizes, output[1])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.num_protected = num_protected
    ctx.normalize = normalize
    ctx.has_sizes = sizes is not None


def _prune_merge_rows(x, scores, sizes, kept_index, num_protected, normalize):
    """The op's output rows as a differentiable composition, given the selection it made
    (``kept_index``; the selection is piecewise constant). Used only to differentiate the
    backward again: accumulation in float32 (float64 for float64 ``x``), the zero-coefficient
    rule of Note [Zero coefficients] in csrc/tokens.h."""
    b, n, c = x.shape
    p, keep = num_protected, kept_index.shape[1]
    m = n - p
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    cand = x[:, p:]
    rows = [x[:, :p], cand.gather(1, kept_index.unsqueeze(-1).expand(b, keep, c))]
    if keep < m:
        fused_mask = torch.ones(b, m, dtype=torch.bool, device=x.device)
        fused_mask.scatter_(1, kept_index, False)
        merged = torch.arange(m, device=x.device).expand(b, m)[fused_mask].view(b, m - keep)
        xm = cand.gather(1, merged.unsqueeze(-1).expand(b, m - keep, c)).to(acc)
        cand_sizes = sizes[:, p:] if sizes is not None else torch.ones(b, m, device=x.device)
        w = scores.gather(1, merged).to(acc) * cand_sizes.gather(1, merged).to(acc)
        coef = w
        if normalize:
            total = w.sum(1, keepdim=True)
            zero = total == 0
            coef = torch.where(zero, torch.zeros_like(w),
                               w / torch.where(zero, torch.ones_like(total), total))
        taken = (coef != 0).unsqueeze(-1) | torch.isfinite(xm)
        xm = torch.where(taken, xm, torch.zeros_like(xm))
        rows.append((coef.unsqueeze(-1) * xm).sum(1).to(x.dtype).unsqueeze(1))
    return torch.cat(rows, 1)


def _token_prune_merge_backward(ctx, grad_out, grad_kept, grad_sizes):
    x, scores, sizes, kept_index = ctx.saved_tensors
    if not ctx.has_sizes:
        sizes = None
    if torch.is_grad_enabled():
        # A graph is being built through this backward (create_graph=True: gradient
        # penalties, Hessian-vector products): differentiate a composition of the forward at
        # the same selection, so that second and higher derivatives are right, not zero.
        wanted = [t for t, need in ((x, ctx.needs_input_grad[0]),
                                    (scores, ctx.needs_input_grad[1])) if need]
        out = _prune_merge_rows(x, scores, sizes, kept_index, ctx.num_protected, ctx.normalize)
        got = list(torch.autograd.grad(out, wanted, grad_out, create_graph=True,
                                       allow_unused=True))
        grads = []
        for t, need in ((x, ctx.needs_input_grad[0]), (scores, ctx.needs_input_grad[1])):
            g = got.pop(0) if need else None
            grads.append(torch.zeros_like(t) if need and g is None else g)
        return grads[0], grads[1], None, None, None, None
    grad_x, grad_scores = _ops.token_prune_merge_backward(
        grad_out.contiguous(), x, scores, sizes, kept_index, ctx.num_protected, ctx.normalize)
    return grad_x, grad_scores, None, None, None, None


torch.library.register_autograd("fisheradaptune::token_prune_merge", _token_prune_merge_backward,
                                setup_context=_token_prune_merge_setup)


# ---------------------------------------------------------------------------------------------
# ToMe bipartite merging (docs/methods.md section 7; Note [Bipartite merge] in csrc/bipartite.h)

__all__.append("bipartite_merge")


def bipartite_merge(
    x: Tensor,
    metric: Tensor,
    r: int,
    *,
    num_protected: int = 1,
    sizes: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Merge the ``r`` most redundant tokens into their most similar partner (ToMe).

    The tokens after the first ``num_protected`` are split alternately into sets A (the 0th,
    2nd, ... of them) and B (the 1st, 3rd, ...). Every A token finds its most similar B token by
    cosine similarity of ``metric``; the ``r`` A tokens whose best similarity is highest merge
    into their B token by the size-weighted mean ``(s_b x_b + sum s_a x_a) / (s_b + sum s_a)``,
    and sizes add. Ties go to the lower index, NaN similarities rank above every number, so the
    choice is deterministic.

    Args:
        x: tokens ``[B, N, C]``, float32, bfloat16, float16 or float64.
        metric: ``[B, N, D]``, any of those dtypes: what similarity is measured on (ToMe: the
            block's attention keys averaged over heads). Similarities are computed in float32
            (float64 for a float64 metric); a zero row is similar to nothing (0), a row with
            inf or NaN matches as NaN.
        r: how many tokens to merge away, ``0 <= r <= (N - num_protected) // 2``.
        num_protected: leading tokens that never merge (CLS, distillation, register tokens),
            ``0 <= num_protected <= N``.
        sizes: float32 ``[B, N]``, how many original tokens each stands for (default: ones).
            A merged row of total size 0 is zeros; sizes are not checked to be positive.

    Returns:
        ``(out, out_sizes, dest_index)``: ``out [B, N - r, C]`` holds the protected tokens, the
        A tokens that did not merge (in order), then the B tokens (in order); ``out_sizes``
        float32 ``[B, N - r]``; ``dest_index`` int64 ``[B, N]``, the out row of every input
        token (to track sources, unmerge with ``out.gather``, or draw which patches merged).

    Differentiable in ``x``: a token's gradient is its weight in its out row times that row's
    gradient. The matching is a discrete choice and passes no gradient to ``metric`` (as in
    ToMe, where the keys get their gradient through attention only). A row that absorbed
    nothing is a bitwise copy. Deterministic (no float atomics); accumulation is in float32
    (float64 for float64 ``x``).
    """
    return _ops.bipartite_merge(x, metric, sizes, _count("bipartite_merge", "num_protected",
                                                         num_protected),
                                _count("bipartite_merge", "r", r))


def _bipartite_merge_setup(ctx, inputs, output):
    x, metric, sizes, num_protected, r = inputs
    ctx.save_for_backward(sizes, output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.has_sizes = sizes is not None


def _bipartite_merge_coef(sizes, dest_index, rows, dtype):
    """Each input token's weight in its out row (the merge is linear in ``x``): 1 for a row
    that absorbed nothing, ``s / sum s`` over the row otherwise, 0 in a row of total size 0."""
    b, n = dest_index.shape
    s = torch.ones(b, n, dtype=dtype, device=dest_index.device) if sizes is None \
        else sizes.to(dtype)
    total = torch.zeros(b, rows, dtype=dtype, device=s.device).scatter_add(1, dest_index, s)
    count = torch.zeros(b, rows, dtype=dtype, device=s.device).scatter_add(
        1, dest_index, torch.ones_like(s))
    w_row, n_row = total.gather(1, dest_index), count.gather(1, dest_index)
    safe = torch.where(w_row != 0, w_row, torch.ones_like(w_row))
    return torch.where(n_row == 1, torch.ones_like(s),
                       torch.where(w_row != 0, s / safe, torch.zeros_like(s)))


def _bipartite_merge_backward(ctx, grad_out, grad_sizes, grad_dest):
    sizes, dest_index = ctx.saved_tensors
    sizes = sizes if ctx.has_sizes else None
    if torch.is_grad_enabled():
        # A graph is being built through this backward (create_graph=True): the gradient of x
        # is linear in grad_out (a weighted gather), written with differentiable ops so that
        # higher derivatives are right, not zero. It does not depend on x.
        b, n = dest_index.shape
        acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
        coef = _bipartite_merge_coef(sizes, dest_index, grad_out.shape[1], acc).unsqueeze(-1)
        g = grad_out.to(acc).gather(1, dest_index.unsqueeze(-1).expand(b, n, grad_out.shape[2]))
        grad_x = torch.where(coef != 0, coef * g, torch.zeros_like(g)).to(grad_out.dtype)
        return grad_x, None, None, None, None
    grad_x = _ops.bipartite_merge_backward(grad_out.contiguous(), sizes, dest_index)
    return grad_x, None, None, None, None


torch.library.register_autograd("fisheradaptune::bipartite_merge", _bipartite_merge_backward,
                                setup_context=_bipartite_merge_setup)


# ---------------------------------------------------------------------------------------------
# sampled_grad (TR-PTS compact training; Note [Sampled gradient] in csrc/sparse.h)

__all__.append("sampled_grad")


def sampled_grad(grad_out: Tensor, x: Tensor, index: Tensor) -> Tensor:
    """Sampled weight gradient (SDDMM) of a Linear layer with a row-balanced index.

    ``out[i, c] = sum_t grad_out[t, i] * x[t, index[i, c]]`` for ``grad_out [T, out]``,
    ``x [T, in]`` (same dtype: float32, bfloat16, float16 or float64) and ``index`` int64
    ``[out, C]`` with values in ``[0, in)``: the entries of ``grad_out.T @ x`` that the index
    picks, without forming the dense gradient. Returns float32 ``[out, C]`` (float64 for float64
    inputs). Bitwise deterministic.

    The same contract on CPU and CUDA: an index value outside ``[0, in)`` is a ``ValueError``
    naming ``index`` (so with ``in == 0`` only ``C == 0`` is accepted); repeated columns in a
    row are allowed; ``T == 0`` gives zeros. On CUDA the range check reads the index's minimum
    and maximum back to the host, a synchronisation made once per index tensor and version (an
    in-place write to the index forces a new check): the static index of
    :class:`fisheradaptune.selection.SparseLinear` is checked once, not at every backward. The
    op cannot be captured in a CUDA graph (a clear error).
    """
    return _ops.sampled_grad.default(grad_out, x, index)


def _sampled_grad_setup(ctx, inputs, output):
    grad_out, x, index = inputs
    ctx.save_for_backward(grad_out, x, index)


def _sampled_grad_backward(ctx, grad):
    # out[i, c] = sum_t grad_out[t, i] * x[t, index[i, c]] is bilinear. With the incoming
    # gradient scattered (added: a row may repeat a column) into a dense [out, in] matrix G,
    # d grad_out = x G^T and d x = grad_out G. Written with differentiable ops, so a graph
    # built through this backward (create_graph=True) is differentiated again correctly.
    grad_out, x, index = ctx.saved_tensors
    dense = grad.new_zeros(index.shape[0], x.shape[1]).scatter_add(1, index, grad)
    d_grad_out = d_x = None
    if ctx.needs_input_grad[0]:
        d_grad_out = (x.to(grad.dtype) @ dense.T).to(grad_out.dtype)
    if ctx.needs_input_grad[1]:
        d_x = (grad_out.to(grad.dtype) @ dense).to(x.dtype)
    return d_grad_out, d_x, None


torch.library.register_autograd("fisheradaptune::sampled_grad", _sampled_grad_backward,
                                setup_context=_sampled_grad_setup)
