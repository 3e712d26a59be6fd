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
