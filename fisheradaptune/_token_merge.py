"""ToMe token merging inside timm and torchvision ViTs (docs/methods.md section 7); public as
:func:`fisheradaptune.vit.token_merge`.

Each merging block runs as ``attention -> merge -> MLP``: after the attention residual, the
``r`` most redundant tokens merge into their most similar partner
(:func:`fisheradaptune.ops.bipartite_merge`, similarity on the block's attention keys averaged
over heads), so the MLP, and every later block, runs on fewer tokens. With proportional
attention, each block after the first merge adds ``log(size)`` of every key to its attention
logits, through the ``attn_mask`` of ``scaled_dot_product_attention``, so a token standing for
``s`` patches weighs as ``s`` copies and attention stays a fused kernel.

What each family's block does (and why):

- timm ``Block``: its own ``attn`` module runs, with the bias as ``attn_mask`` (timm's fused and
  manual paths both take it); the keys are read from the output of ``attn.qkv``, whose
  ``forward`` is wrapped for that (no second K projection). The rest of the block
  (``ls1``/``drop_path1``, ``norm2``, ``mlp``, ``ls2``/``drop_path2``) is called as timm does.
- torchvision ``EncoderBlock``: ``nn.MultiheadAttention``'s own call would need the bias as a
  materialised ``[B * heads, N, N]`` mask, so the attention is computed from its packed
  ``in_proj`` / ``out_proj`` with ``scaled_dot_product_attention`` and a ``[B, 1, 1, N]`` bias.
- A block that merges nothing and sees no sizes yet runs its own, unpatched ``forward``.
"""
from __future__ import annotations

import inspect
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from . import _vit_base as _vit

__all__ = ["token_merge", "TokenMergeHandle"]

RArg = Union[int, Sequence[int]]
_SCHEDULES = ("constant", "decreasing")
_TIMM_BLOCK = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_TV_BLOCK = ("ln_1", "self_attention", "dropout", "ln_2", "mlp")


def _err(arg: str, msg: str, cls=ValueError):
    return cls(f"fisheradaptune.vit.token_merge: argument '{arg}': {msg}")


# ---------------------------------------------------------------------------------------------
# Per family: the block in two halves, attention (returning the metric) and MLP


def _check_timm(model: nn.Module, blocks: List[nn.Module]) -> None:
    pool = getattr(model, "global_pool", "token")
    if getattr(model, "attn_pool", None) is not None or pool not in _vit._SUPPORTED_POOLS:
        raise _err("model", f"global_pool {pool!r} is not supported (expected one of "
                   f"{_vit._SUPPORTED_POOLS})")
    for i, b in enumerate(blocks):
        missing = [a for a in _TIMM_BLOCK if not hasattr(b, a)]
        attn = getattr(b, "attn", None)
        qkv = getattr(attn, "qkv", None)
        if missing or not isinstance(qkv, nn.Linear) or \
                "attn_mask" not in inspect.signature(attn.forward).parameters:
            raise _err("model", f"block {i} ({type(b).__name__}) is not timm's pre-norm Block "
                       "with an Attention that takes attn_mask (missing "
                       f"{missing or ['attn.qkv / attn_mask']}); token_merge supports timm "
                       "VisionTransformer / DeiT blocks")
        if qkv.out_features != 3 * attn.num_heads * getattr(attn, "head_dim", qkv.in_features // attn.num_heads):
            raise _err("model", f"block {i}: attn.qkv does not pack q, k and v of "
                       f"{attn.num_heads} heads")


def _check_torchvision(model: nn.Module, blocks: List[nn.Module]) -> None:
    for i, b in enumerate(blocks):
        mha = getattr(b, "self_attention", None)
        if any(not hasattr(b, a) for a in _TV_BLOCK) or not getattr(mha, "batch_first", False) \
                or getattr(mha, "in_proj_weight", None) is None:
            raise _err("model", f"block {i} is not torchvision's EncoderBlock with a batch-first "
                       "nn.MultiheadAttention and a packed in_proj_weight")


class _QkvCapture:
    """timm ``attn.qkv.forward``, keeping its output for the metric (read once, then dropped)."""

    def __init__(self, linear: nn.Linear, inner=None):
        self.linear, self.inner, self.out = linear, inner, None

    def __call__(self, x):
        self.out = _vit._original(self.linear, "forward", self.inner)(x)
        return self.out


def _attend_timm(block: nn.Module, x: Tensor, bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    attn = block.attn
    capture = attn.qkv.__dict__["forward"]
    y = attn(block.norm1(x), attn_mask=bias)
    qkv, capture.out = capture.out, None
    b, n, _ = qkv.shape
    k = qkv.reshape(b, n, 3, attn.num_heads, -1)[:, :, 1]
    return x + block.drop_path1(block.ls1(y)), k.mean(2)


def _attend_torchvision(block: nn.Module, x: Tensor,
                        bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    mha = block.self_attention
    h = block.ln_1(x)
    b, n, c = h.shape
    qkv = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).reshape(b, n, 3, mha.num_heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if bias is not None:
        bias = bias.to(q.dtype)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                       dropout_p=mha.dropout if mha.training else 0.0)
    y = mha.out_proj(y.transpose(1, 2).reshape(b, n, c))
    return x + block.dropout(y), k.mean(1)


def _mlp_timm(block: nn.Module, x: Tensor) -> Tensor:
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _mlp_torchvision(block: nn.Module, x: Tensor) -> Tensor:
    return x + block.mlp(block.ln_2(x))


def _prepare_timm(handle: "TokenMergeHandle", block: nn.Module) -> None:
    """Wrap ``attn.qkv.forward`` so that _attend_timm can read the keys."""
    qkv = block.attn.qkv
    handle._set(qkv, "forward", _QkvCapture(qkv, qkv.__dict__.get("forward")))


def _prepare_nothing(handle: "TokenMergeHandle", block: nn.Module) -> None:
    """torchvision's attention is recomputed by _attend_torchvision: nothing to wrap."""


# Per family: check the model, prepare a patched block, its attention half, its MLP half.
_PARTS = {"timm": (_check_timm, _prepare_timm, _attend_timm, _mlp_timm),
          "torchvision": (_check_torchvision, _prepare_nothing, _attend_torchvision,
                          _mlp_torchvision)}


# ---------------------------------------------------------------------------------------------
# The handle


class TokenMergeHandle(_vit._Patch):
    """What :func:`token_merge` changed, and the per-forward state. ``remove()`` undoes it.

    Attributes:
        r: tokens merged away at each block (a tuple over all blocks; clamped at run time to
            ``(N - P) // 2`` of the tokens the block sees).
        layers: the blocks that merge (``r > 0``).
        num_protected: leading tokens that never merge.
        proportional_attention: whether attention adds ``log(size)`` of each key.
        sizes: float32 ``[B, N]`` token sizes after the last block of the last forward (``None``
            before one, or when nothing merged).
        record: set it to True to keep, after each forward, ``patch_rows``: int64 ``[B, N0]``,
            the final token row of every input token (class and patches), e.g. to draw which
            patches merged.
    """

    api = "token_merge"

    def __init__(self, model: nn.Module, family: _vit._Family, r: Tuple[int, ...],
                 num_protected: int, proportional_attention: bool):
        super().__init__(model, family, tuple(i for i, v in enumerate(r) if v > 0),
                         num_protected)
        self.r = r
        self.proportional_attention = bool(proportional_attention)
        self.patch_rows: Optional[Tensor] = None
        _, self._prepare, self._attend, self._mlp = _PARTS[family.name]

    def _clear(self) -> None:
        self.patch_rows = None

    def _block(self, i: int, block: nn.Module, x: Tensor, forward) -> Tensor:
        b, n, _ = x.shape
        sizes, recompute = self._sizes_in(i, x)
        if sizes is not None and (sizes.shape[0] != b or sizes.shape[1] != n):
            sizes = None  # left from another input: this forward has merged nothing yet
        r = min(self.r[i], max(n - self.num_protected, 0) // 2)
        prop = self.proportional_attention and sizes is not None
        if r == 0 and not prop:
            return forward(x)
        # [B, 1, 1, N]: broadcast over heads and queries, so SDPA keeps its fused kernels.
        bias = sizes.log()[:, None, None, :].to(x.dtype) if prop else None
        x, metric = self._attend(block, x, bias)
        if r > 0:
            x, out_sizes, dest = ops.bipartite_merge(x, metric, r, num_protected=self.num_protected,
                                                     sizes=sizes)
            if not recompute:
                self.sizes = out_sizes
                if self.record:
                    rows = self.patch_rows
                    if rows is None or rows.shape[0] != b:
                        rows = torch.arange(n, device=x.device).expand(b, n)
                    self.patch_rows = dest.gather(1, rows)
        return self._mlp(block, x)

    def _install(self, blocks: Sequence[nn.Module]) -> None:
        # Blocks from the first merging one on: the later ones need proportional attention.
        first = self.layers[0] if self.layers else len(blocks)
        last = len(blocks) if self.proportional_attention else (self.layers[-1] + 1 if self.layers else 0)
        for i in range(first, last):
            block = blocks[i]
            self._prepare(self, block)
            self._set(block, "forward", _MergingForward(self, i, block, block.__dict__.get("forward")))
        self._install_common(blocks)

    def __repr__(self) -> str:
        return (f"TokenMergeHandle({self.family.name}, r={self.r}, "
                f"num_protected={self.num_protected}, "
                f"proportional_attention={self.proportional_attention})")


class _MergingForward(_vit._PatchedForward):
    """A patched block's ``forward``: the block in two halves with a merge between them."""

    mask_message = (
        "fisheradaptune.vit.token_merge: a patched block received an attention mask; merging "
        "changes the number of tokens, so a mask over the input tokens cannot apply after the "
        "first merge. Call the model without attn_mask, or unpatch it")

    def __call__(self, x, *args, **kwargs):
        fwd = self._wrapped(args, kwargs)
        return self.handle._block(self.index, self.block, x, lambda t: fwd(t, *args, **kwargs))


# ---------------------------------------------------------------------------------------------
# Public API


def _per_block(r: RArg, depth: int, layers: Optional[Sequence[int]], schedule: str) -> Tuple[int, ...]:
    if schedule not in _SCHEDULES:
        raise _err("schedule", f"expected one of {_SCHEDULES}, got {schedule!r}")
    if isinstance(r, bool) or not isinstance(r, (int, list, tuple)):
        raise _err("r", f"expected an int or a list of ints per block, got {type(r).__name__}",
                   TypeError)
    if not isinstance(r, int):
        if layers is not None or schedule != "constant":
            raise _err("r", "a per-block list already says where and how much to merge: "
                       "give it without layers or schedule")
        values = list(r)
        if len(values) != depth:
            raise _err("r", f"expected one value per block ({depth}), got {len(values)}")
    else:
        chosen = range(depth) if layers is None else layers
        try:
            chosen = sorted({int(i) for i in chosen})
        except (TypeError, ValueError):
            raise _err("layers", f"expected block indices, got {layers!r}", TypeError) from None
        if any(not 0 <= i < depth for i in chosen):
            raise _err("layers", f"expected block indices in [0, {depth}), got {tuple(layers)}")
        values = [0] * depth
        k = len(chosen)
        for j, i in enumerate(chosen):
            # decreasing: from 2r at the first chosen block linearly to 0 at the last, the same
            # total as a constant r (docs/methods.md section 7).
            values[i] = r if schedule == "constant" or k == 1 else round(2 * r * (1 - j / (k - 1)))
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise _err("r", f"expected ints >= 0, got {r!r}")
    return tuple(values)


def token_merge(model: nn.Module, r: RArg = 16, *, layers: Optional[Sequence[int]] = None,
                proportional_attention: bool = True, num_protected: Union[int, str] = "auto",
                schedule: str = "constant") -> TokenMergeHandle:
    """Merge ``r`` tokens per block (ToMe) inside a timm or torchvision ViT, without training.

    Args:
        model: a timm ``VisionTransformer`` / DeiT (pre-norm ``Block``; ``global_pool``
            ``"token"``, ``"avg"`` or ``""``; with or without a class token) or a torchvision
            ``VisionTransformer``.
        r: tokens merged away in each chosen block (clamped to half the mergeable tokens the
            block sees), or a list with one value per block.
        layers: the blocks that merge (default: all), for an int ``r``.
        proportional_attention: add ``log(size)`` of each key to the attention logits in every
            block after the first merge (ToMe's proportional attention).
        num_protected: leading tokens that never merge; ``"auto"`` = timm's
            ``num_prefix_tokens`` (class, distillation, register tokens), 1 for torchvision.
        schedule: ``"constant"`` (``r`` at every chosen block) or ``"decreasing"`` (from ``2r``
            at the first chosen block linearly to 0 at the last: the same total, merged early).

    Returns:
        A :class:`TokenMergeHandle`; ``handle.remove()`` or :func:`fisheradaptune.vit.unpatch`
        restores the model bitwise. A model carries one patch at a time: ``prune_merge`` and
        ``token_merge`` cannot be combined on one model (the second call is refused).

    Token sizes are carried to the head: timm's ``"avg"`` pooling becomes the size-weighted
    mean; class-token heads need nothing. Works under ``torch.compile``, autocast, gradient
    checkpointing and ``deepcopy`` (the copy carries its own patch).
    """
    existing = model.__dict__.get(_vit._ATTR)
    if existing is not None:
        raise _err("model", f"already patched by fisheradaptune.vit.{existing.api} (one patch "
                   "per model: prune_merge and token_merge cannot be combined); call "
                   "fisheradaptune.vit.unpatch(model) first")
    family = _vit._family(model, "token_merge")
    if family.name not in _PARTS:
        raise _err("model", f"token_merge supports timm and torchvision ViTs, got a "
                   f"{family.name} model ({type(model).__name__}); use prune_merge there")
    blocks = family.blocks(model)
    _PARTS[family.name][0](model, blocks)
    per_block = _per_block(r, len(blocks), layers, schedule)
    if num_protected == "auto":
        num_protected = family.num_protected(model)
    if isinstance(num_protected, bool) or not isinstance(num_protected, int) or num_protected < 0:
        raise _err("num_protected", f"expected \"auto\" or an int >= 0, got {num_protected!r}")
    handle = TokenMergeHandle(model, family, per_block, num_protected, proportional_attention)
    handle._install(blocks)
    return handle
