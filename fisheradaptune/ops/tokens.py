"""The token family: ``token_prune_merge`` (EViT / TR-PTS pruning with one fused token,
docs/methods.md section 6) and ``bipartite_merge`` (ToMe, section 7), with their
``*_backward`` ops.

Each op's Python story in one place: the typed wrapper, the fake kernel (the C++ checks, from
:mod:`._checks`) and the autograd formula. The forward ops are differentiable: their backward
calls the ``*_backward`` op, except when a graph is being built through it
(``create_graph=True``), where a differentiable composition runs instead, so that second and
higher derivatives are right, not zero; the ``*_backward`` ops themselves have no derivative
and refuse inputs that require grad (Note [No derivative] in :mod:`._library`). Nothing is
written in place.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _checks, _library
from ._library import OPS as _ops, count as _count

__all__ = ["token_prune_merge", "bipartite_merge"]


# ---------------------------------------------------------------------------------------------
# Token prune-merge (docs/methods.md section 6; Note [Token prune-merge] in csrc/tokens/token_prune_merge.h)


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
            not special there). Note [Zero coefficients] in csrc/tokens/token_prune_merge.h.

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


@torch.library.register_fake("fisheradaptune::token_prune_merge")
def _token_prune_merge_fake(x: Tensor, scores: Tensor, sizes: Optional[Tensor],
                            num_protected: int, keep: int,
                            normalize: bool) -> Tuple[Tensor, Tensor, Tensor]:
    rows = _checks.validate_token_prune_merge(x, scores, sizes, num_protected, keep, normalize)
    b, c = x.shape[0], x.shape[2]
    return (x.new_empty(b, rows, c), x.new_empty(b, keep, dtype=torch.int64),
            x.new_empty(b, rows, dtype=torch.float32))


@torch.library.register_fake("fisheradaptune::token_prune_merge_backward")
def _token_prune_merge_backward_fake(grad_out: Tensor, x: Tensor, scores: Tensor,
                                     sizes: Optional[Tensor], kept_index: Tensor,
                                     num_protected: int, normalize: bool) -> Tuple[Tensor, Tensor]:
    _checks.validate_token_prune_merge_backward(grad_out, x, scores, sizes, kept_index,
                                                num_protected, normalize)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(scores, memory_format=torch.contiguous_format))


_library.register_not_differentiable("token_prune_merge_backward")


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
    rule of Note [Zero coefficients] in csrc/tokens/token_prune_merge.h."""
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
# ToMe bipartite merging (docs/methods.md section 7; Note [Bipartite merge] in csrc/tokens/bipartite_merge.h)


def bipartite_merge(
    x: Tensor,
    metric: Tensor,
    r: int,
    *,
    num_protected: int = 1,
    sizes: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Merge the ``r`` most redundant tokens into their most similar partner (ToMe).

    ToMe's partition: all ``N`` tokens are split by position into set A (positions 0, 2, 4, ...)
    and set B (positions 1, 3, 5, ...); a protected token (position ``< num_protected``) in A is
    never a source, one in B never a destination. Every non-protected A token finds its most
    similar non-protected B token by cosine similarity of ``metric``; the ``r`` A tokens whose
    best similarity is highest merge into their B token by the size-weighted mean
    ``(s_b x_b + sum s_a x_a) / (s_b + sum s_a)``, and sizes add. Ties go to the lower index,
    NaN similarities rank above every number, so the choice is deterministic.

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
        ``(out, out_sizes, dest_index)``: ``out [B, N - r, C]`` holds the protected tokens (in
        order), the non-protected A tokens that did not merge (in order), then the non-protected
        B tokens (in order); ``out_sizes``
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


@torch.library.register_fake("fisheradaptune::bipartite_merge")
def _bipartite_merge_fake(x: Tensor, metric: Tensor, sizes: Optional[Tensor], num_protected: int,
                          r: int) -> Tuple[Tensor, Tensor, Tensor]:
    _checks.validate_bipartite_merge(x, metric, sizes, num_protected, r)
    b, n, c = x.shape
    rows = n - r
    return (x.new_empty(b, rows, c), x.new_empty(b, rows, dtype=torch.float32),
            x.new_empty(b, n, dtype=torch.int64))


@torch.library.register_fake("fisheradaptune::bipartite_merge_backward")
def _bipartite_merge_backward_fake(grad_out: Tensor, sizes: Optional[Tensor],
                                   dest_index: Tensor) -> Tensor:
    _checks.validate_bipartite_merge_backward(grad_out, sizes, dest_index)
    return grad_out.new_empty(grad_out.shape[0], dest_index.shape[1], grad_out.shape[2])


_library.register_not_differentiable("bipartite_merge_backward")


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
# Fallback kernels (pure PyTorch, the same contract as the compiled ones)
#
# Each kernel takes exactly its schema's arguments (csrc/schemas.cpp), runs the checks of
# :mod:`._checks` plus the data checks the C++ makes on the CPU (kept_index, dest_index), and
# computes what Note [Token prune-merge] (csrc/tokens.h) and Note [Bipartite merge]
# (csrc/bipartite.h) say, vectorised over the batch and the tokens:
#
# - selections by `beats` (csrc/common/simd.h): NaN above every number, then the higher value, ties
#   to the lower index. Two stable sorts (value, then NaN first) give that total order on every
#   device; -0.0 is turned into +0.0 first, as `beats` compares values (a radix sort would not);
# - weights, W and coefficients in float64 (Note [Merge weights]); products c * x in the opmath
#   type A (float32, float64 for float64), formed in float64 where c is 0 or not finite in A;
#   a coefficient of exactly 0 adds nothing (Note [Zero coefficients]);
# - bipartite_merge's rows and totals as per-row sums in increasing token order: the tokens
#   are sorted by out row (a stable sort) and summed by ``torch.segment_reduce``, a per-segment
#   reduction (sequential on the CPU, no atomics anywhere), so the results are deterministic on
#   the CPU and CUDA alike. No scatter at all: counts and places come from sorts and binary
#   searches (``torch.searchsorted``), rows from ``index_select``.
#
# The token similarities of bipartite_merge are float64 matrix products of the unit vectors
# (computed in metric's opmath type as the C++ does), rounded to that type: the exact dot product
# up to one rounding, whatever the BLAS or a TF32 setting (the C++ sums in the opmath type, so a
# near-tie may resolve differently, as between the CPU and CUDA kernels; exact ties stay ties).


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """at::opmath_type: float64 for float64, float32 for float32, bfloat16 and float16."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block() -> int:
    """The CPU kernels' accumulation block (kBlock, csrc/common/plan.h)."""
    return _library.BLOCK


def _maybe_any(mask: Tensor) -> bool:
    """Whether ``mask`` has a True, read on the CPU only: on other devices the answer is
    "maybe" (True), so that no kernel waits for the device; the caller's work is then done for
    nothing in the rare case, never skipped wrongly."""
    return bool(mask.any()) if mask.device.type == "cpu" else True


def _beats_order(values: Tensor) -> Tensor:
    """The permutation of ``values``' last dimension in `beats` order: NaN first (in index
    order), then the values from the highest, ties to the lower index."""
    nan = torch.isnan(values)
    key = torch.where(nan, torch.zeros_like(values), values) + 0.0  # -0.0 ties +0.0
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    nan_first = torch.sort(nan.gather(-1, order).to(torch.uint8), dim=-1, descending=True,
                           stable=True).indices
    return order.gather(-1, nan_first)


def _blocked_dot(x: Tensor, y: Tensor) -> Tensor:
    """blocked_dot (csrc/common/simd.h) over the last dimension: products and sums in x's dtype
    (the opmath type) within blocks of :func:`_block` elements, blocks added in float64."""
    prod = x * y
    n, block = prod.shape[-1], _block()
    if n <= block:
        return prod.sum(-1)
    prod = torch.nn.functional.pad(prod, (0, (-n) % block))
    return prod.unflatten(-1, (-1, block)).sum(-1).double().sum(-1).to(prod.dtype)


def _weighted(coef: Tensor, xs: Tensor, acc: torch.dtype) -> Tensor:
    """The terms ``coef[..., j] * xs[..., j, :]`` of a merged row, in ``acc`` (axpy_coef,
    csrc/common/simd.h): a float64 coefficient that is a finite nonzero ``acc`` value is applied
    in ``acc``, any other nonzero one in float64 (Note [Merge weights]); a zero coefficient
    gives a zero term, whatever x holds (Note [Zero coefficients])."""
    c = coef.to(acc).unsqueeze(-1)
    terms = c * xs.to(acc)
    if acc != torch.float64:
        slow = (coef != 0) & ((c.squeeze(-1) == 0) | ~torch.isfinite(c.squeeze(-1)))
        if _maybe_any(slow):
            exact = (coef.unsqueeze(-1) * xs.double()).to(acc)
            terms = torch.where(slow.unsqueeze(-1), exact, terms)
    weightless = coef == 0
    if not _maybe_any(weightless):
        return terms
    return torch.where(weightless.unsqueeze(-1), torch.zeros((), dtype=acc, device=terms.device),
                       terms)


def _scaled(coef: Tensor, g: Tensor, acc: torch.dtype, dtype: torch.dtype) -> Tensor:
    """``coef[..., j] * g[..., j, :]`` rounded to ``dtype`` (scale_coef, csrc/common/simd.h): in
    ``acc`` when the coefficient is 0 (so 0 * inf is NaN, as the reference's gradient) or a
    finite nonzero ``acc`` value, in float64 otherwise (Note [Merge weights])."""
    c = coef.to(acc).unsqueeze(-1)
    out = (c * g.to(acc)).to(dtype)
    if acc != torch.float64:
        slow = (coef != 0) & ((c.squeeze(-1) == 0) | ~torch.isfinite(c.squeeze(-1)))
        if _maybe_any(slow):
            exact = (coef.unsqueeze(-1) * g.double()).to(acc).to(dtype)
            out = torch.where(slow.unsqueeze(-1), exact, out)
    return out


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _gather_rows(t: Tensor, index: Tensor) -> Tensor:
    """``t[b, index[b, k], :]`` as ``[B, K, C]``, bitwise (memcpy, as the C++ copies rows):
    whole rows selected through an integer view, which is both faster than ``gather`` with
    an expanded index and exact (torch's CPU gather rewrote a bfloat16 NaN's payload)."""
    b, n, c = t.shape
    flat = (index + n * torch.arange(b, device=index.device).unsqueeze(1)).reshape(-1)
    rows = t.view(_BITS[t.element_size()]).reshape(b * n, c).index_select(0, flat)
    return rows.view(t.dtype).view(*index.shape, c)


def _first_bad(bad: Tensor) -> Tuple[int, int]:
    """``(row, column)`` of the first True of a 2-D mask, in row-major order (the C++ loops')."""
    flat = int(bad.flatten().nonzero()[0])
    return divmod(flat, bad.shape[1])


def _token_prune_merge_fallback(x: Tensor, scores: Tensor, sizes: Optional[Tensor],
                                num_protected: int, keep: int,
                                normalize: bool) -> Tuple[Tensor, Tensor, Tensor]:
    _checks.validate_token_prune_merge(x, scores, sizes, num_protected, keep, normalize)
    b, n, c = x.shape
    p, m = num_protected, n - num_protected
    acc = _opmath(x.dtype)
    order = _beats_order(scores.to(acc))  # scores in A, as the C++ compares them
    kept = order[:, :keep].sort(dim=1).values
    merged = order[:, keep:].sort(dim=1).values
    cand = x[:, p:]
    cand_sizes = (sizes[:, p:] if sizes is not None
                  else torch.ones(b, m, dtype=torch.float32, device=x.device))
    rows = [x[:, :p], _gather_rows(cand, kept)]
    out_sizes = [sizes[:, :p] if sizes is not None
                 else torch.ones(b, p, dtype=torch.float32, device=x.device),
                 cand_sizes.gather(1, kept)]
    if keep < m:
        xm = _gather_rows(cand, merged)
        sm = cand_sizes.gather(1, merged).double()
        w = scores.gather(1, merged).to(acc).double() * sm  # Note [Merge weights]
        coef = w
        if normalize:
            total = w.sum(1, keepdim=True)
            coef = torch.where(total != 0, w / total, torch.zeros_like(w))
        fused = _weighted(coef, xm, acc).sum(1)
        rows.append(fused.to(x.dtype).unsqueeze(1))
        out_sizes.append(sm.sum(1, keepdim=True).float())
    return torch.cat(rows, 1), kept, torch.cat(out_sizes, 1)


def _token_prune_merge_backward_fallback(grad_out: Tensor, x: Tensor, scores: Tensor,
                                         sizes: Optional[Tensor], kept_index: Tensor,
                                         num_protected: int,
                                         normalize: bool) -> Tuple[Tensor, Tensor]:
    op = "token_prune_merge_backward"
    _checks.validate_token_prune_merge_backward(grad_out, x, scores, sizes, kept_index,
                                                num_protected, normalize)
    b, n, c = x.shape
    p, m, keep = num_protected, n - num_protected, kept_index.shape[1]
    rows = p + keep + (1 if keep < m else 0)
    if x.device.type == "cpu" and kept_index.numel():
        # The CPU kernel's data check; on CUDA (as there) out-of-range values are ignored.
        prev = torch.cat([torch.full_like(kept_index[:, :1], -1), kept_index[:, :-1]], 1)
        bad = (kept_index <= prev) | (kept_index >= m)
        if bool(bad.any()):
            i, j = _first_bad(bad)
            _checks._check_value(False, op, "kept_index", "expected strictly increasing indices "
                                 "in [0, ", m, ") per row, got ", int(kept_index[i, j]), " at [",
                                 i, ", ", j, "]")
    acc = _opmath(x.dtype)
    # row_of[b, i]: the out row of candidate i (P + its place in kept_index), -1 when merged;
    # found by binary search in the increasing kept_index (on CUDA, where it is not checked,
    # other values only ever select rows in range).
    cand = torch.arange(m, device=x.device).expand(b, m).contiguous()
    place = torch.searchsorted(kept_index.contiguous(), cand)
    hit = (kept_index.gather(1, place.clamp(max=keep - 1)) == cand if keep
           else torch.zeros_like(cand, dtype=torch.bool))
    row_of = torch.where(hit, p + place, -1)
    merged = ~hit
    size = (sizes[:, p:].double() if sizes is not None
            else torch.ones(b, m, dtype=torch.float64, device=x.device))
    zero64 = torch.zeros((), dtype=torch.float64, device=x.device)
    w = torch.where(merged, scores.to(acc).double() * size, zero64)  # Note [Merge weights]
    total = w.sum(1, keepdim=True)
    coef = w
    if normalize:
        coef = torch.where(total != 0, w / total, zero64)
    g_fused = grad_out[:, rows - 1].unsqueeze(1).expand(b, m, c)
    copied = _gather_rows(grad_out, row_of.clamp(min=0))
    grad_cand = torch.where(merged.unsqueeze(-1), _scaled(coef, g_fused, acc, x.dtype), copied)
    grad_x = torch.cat([grad_out[:, :p], grad_cand], 1)
    # Score gradients. Note [Zero coefficients]: a weightless token's dot runs over its finite
    # values only, and fused . g skips it.
    xc = x[:, p:].to(acc)
    weightless = merged & (coef == 0)  # (a kept token's dot is not used)
    if _maybe_any(weightless):
        xc = torch.where(weightless.unsqueeze(-1) & ~torch.isfinite(xc),
                         torch.zeros((), dtype=acc, device=x.device), xc)
    dots = _blocked_dot(xc, g_fused.to(acc)).double()
    if normalize:
        fg = torch.where(merged & (coef != 0), coef * dots, zero64).sum(1, keepdim=True)
        d = torch.where(total != 0, size * (dots - fg) / total, zero64)
    else:
        d = size * dots
    grad_scores = torch.where(merged, d, zero64).to(acc).to(scores.dtype)
    return grad_x, grad_scores


def _unit_rows(metric: Tensor) -> Tensor:
    """normalise (csrc/cpu/bipartite.cpp) per row, in metric's opmath type: scaled by the
    largest magnitude, then by 1 / sqrt of the blocked sum of squares; zero rows stay zero,
    rows with inf or NaN become NaN."""
    v = metric.to(_opmath(metric.dtype))
    if v.shape[-1] == 0:
        return v
    top = v.abs().amax(-1, keepdim=True)
    bad = ~torch.isfinite(v).all(-1, keepdim=True)
    scaled = top > 0
    v = v / torch.where(scaled, top, torch.ones_like(top))
    inv = 1.0 / torch.sqrt(_blocked_dot(v, v)).unsqueeze(-1)
    v = torch.where(scaled, v * inv, v)
    return torch.where(bad, torch.full_like(v, float("nan")), v)


def _row_sums(dest: Tensor, values: Tensor, rows: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Per out row, the sum of ``values`` ([B, N] or [B, N, C]) over the tokens whose out row
    ``dest`` names, in increasing token order (row_totals, csrc/cpu/bipartite.cpp), with the
    sources' counts and the stable sort that groups them: ``(sums, counts, order)``. Every
    ``dest`` value is in ``[0, rows)``."""
    b, n = dest.shape
    grouped_dest, order = torch.sort(dest, dim=1, stable=True)
    # counts by binary search in the sorted rows: tokens before row d + 1 minus before row d
    edges = torch.arange(rows + 1, device=dest.device).expand(b, rows + 1).contiguous()
    before = torch.searchsorted(grouped_dest.contiguous(), edges)
    counts = before[:, 1:] - before[:, :-1]
    grouped = values.gather(1, order) if values.dim() == 2 else _gather_rows(values, order)
    sums = torch.segment_reduce(grouped, "sum", lengths=counts, axis=1)
    return sums, counts, order


def _bipartite_coef(dest: Tensor, sizes: Optional[Tensor], rows: int) -> Tuple[Tensor, ...]:
    """Every token's coefficient in its out row (coefficient, csrc/cpu/bipartite.cpp): 1 for
    a row's sole source, s_i / W otherwise, 0 when W == 0; with the rows' totals W (float64),
    the sources' counts, and the sort grouping the tokens by row."""
    b, n = dest.shape
    s = (sizes.double() if sizes is not None
         else torch.ones(b, n, dtype=torch.float64, device=dest.device))
    total, counts, order = _row_sums(dest, s, rows)
    w_tok, single = total.gather(1, dest), counts.gather(1, dest) == 1
    zero = torch.zeros((), dtype=torch.float64, device=dest.device)
    coef = torch.where(single, torch.ones_like(s),
                       torch.where(w_tok != 0, s / torch.where(w_tok != 0, w_tok, 1.0), zero))
    return coef, total, counts, order


def _bipartite_merge_fallback(x: Tensor, metric: Tensor, sizes: Optional[Tensor],
                              num_protected: int, r: int) -> Tuple[Tensor, Tensor, Tensor]:
    _checks.validate_bipartite_merge(x, metric, sizes, num_protected, r)
    b, n, c = x.shape
    p, rows = num_protected, n - r
    # Note [Bipartite merge]: sources A' = even positions >= P, destinations B' = odd ones.
    a0, b0 = p + (p & 1), p + 1 - (p & 1)
    na, nb = max(0, (n - a0 + 1) // 2), max(0, (n - b0 + 1) // 2)
    dev = x.device
    if b == 0 or n == 0:
        return (x.new_empty(b, rows, c), x.new_empty(b, rows, dtype=torch.float32),
                x.new_empty(b, n, dtype=torch.int64))
    merged = torch.zeros(b, na, dtype=torch.bool, device=dev)
    match = torch.zeros(b, na, dtype=torch.int64, device=dev)
    if r > 0:
        unit = _unit_rows(metric)
        sim = torch.bmm(unit[:, a0::2].double(), unit[:, b0::2].double().transpose(1, 2))
        sim = sim.to(unit.dtype)  # [B, |A|, |B|], compared in metric's opmath type
        # Each A token's best B token: the first NaN, else the first maximum.
        key = torch.where(torch.isnan(sim), torch.full_like(sim, float("inf")), sim)
        top = key.amax(-1, keepdim=True)
        j = torch.arange(nb, device=dev)
        match = torch.where(key == top, j, nb).amin(-1)
        best = sim.gather(-1, match.unsqueeze(-1)).squeeze(-1)
        rank = torch.sort(_beats_order(best), dim=1).indices  # the inverse permutation
        merged = rank < r
    first_b = p + na - r
    dest = torch.empty(b, n, dtype=torch.int64, device=dev)
    dest[:, :p] = torch.arange(p, device=dev)
    kept_row = p + torch.cumsum((~merged).long(), 1) - 1
    dest[:, a0::2] = torch.where(merged, first_b + match, kept_row)
    dest[:, b0::2] = first_b + torch.arange(nb, device=dev)
    acc = _opmath(x.dtype)
    coef, total, counts, order = _bipartite_coef(dest, sizes, rows)
    summed, _, _ = _row_sums(dest, _weighted(coef, x, acc), rows)
    # A row of one source is that token, copied bitwise.
    first = order.gather(1, torch.cumsum(counts, 1) - counts)
    copied = _gather_rows(x, first)
    out = torch.where((counts == 1).unsqueeze(-1), copied, summed.to(x.dtype))
    return out, total.float(), dest


def _bipartite_merge_backward_fallback(grad_out: Tensor, sizes: Optional[Tensor],
                                       dest_index: Tensor) -> Tensor:
    op = "bipartite_merge_backward"
    _checks.validate_bipartite_merge_backward(grad_out, sizes, dest_index)
    b, rows, c = grad_out.shape
    n = dest_index.shape[1]
    inside = (dest_index >= 0) & (dest_index < rows)
    if dest_index.device.type == "cpu" and dest_index.numel() and not bool(inside.all()):
        i, t = _first_bad(~inside)
        _checks._check_value(False, op, "dest_index", "expected values in [0, ", rows,
                             ") (the out rows), got ", int(dest_index[i, t]), " at [", i, ", ",
                             t, "]")
    if b == 0 or n == 0:
        return grad_out.new_empty(b, n, c)
    # On CUDA (as there) a token whose dest_index is out of range is left out of the counts and
    # totals (it goes to an extra row) and gets a zero gradient.
    dest = torch.where(inside, dest_index, rows)
    coef, _, counts, _ = _bipartite_coef(dest, sizes, rows + 1)
    g = _gather_rows(torch.cat([grad_out, grad_out.new_zeros(b, 1, c)], 1), dest)
    acc = _opmath(grad_out.dtype)
    single = (counts.gather(1, dest) == 1).unsqueeze(-1)
    grad_x = torch.where(single, g, _scaled(coef, g, acc, grad_out.dtype))
    if not _maybe_any(~inside):
        return grad_x
    return torch.where(inside.unsqueeze(-1), grad_x, torch.zeros((), dtype=grad_x.dtype,
                                                                 device=grad_x.device))


#: Every op of the family, its fallback kernel (registered by :mod:`._library` where the
#: compiled library is not in use).
FALLBACK_KERNELS = {
    "token_prune_merge": _token_prune_merge_fallback,
    "token_prune_merge_backward": _token_prune_merge_backward_fallback,
    "bipartite_merge": _bipartite_merge_fallback,
    "bipartite_merge_backward": _bipartite_merge_backward_fallback,
}
