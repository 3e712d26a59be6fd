"""ViT hooks: EViT / TR-PTS token prune-merge inside timm, torchvision and transformers Vision
Transformers (here), and ToMe token merging (:func:`token_merge`, written in
``fisheradaptune/_token_merge.py``); both on the families and patch base of
``fisheradaptune/_vit_base.py``.

    handle = fisheradaptune.vit.prune_merge(model, keep=0.7, layers=(3, 6, 9))
    ...
    fisheradaptune.vit.unpatch(model)        # or handle.remove()

After each chosen block (docs/methods.md section 6), the non-protected tokens are scored by the block's CLS
attention row, the ``ceil(keep * (N - P))`` best are kept in their original order and the rest
are fused into one token appended at the end (:func:`fisheradaptune.ops.token_prune_merge`).

How it works (and what it changes in the model):

- Each chosen block's ``forward`` is wrapped by an instance attribute (the class is untouched):
  the block runs as before, main attention included (timm's fused SDPA path, torchvision's
  ``nn.MultiheadAttention`` fast path, transformers' ``eager`` or ``sdpa`` attention), then its
  output is pruned and merged.
- CLS attention row: ``mean_h softmax(q_cls K^T * scale)`` over all tokens, from the block's own
  weights on its normed input: ``q`` for the class token only and ``K`` for all tokens (timm:
  rows of ``attn.qkv`` plus ``attn.q_norm`` / ``attn.k_norm``; torchvision: rows of
  ``self_attention.in_proj_weight``; transformers: ``attention.q_proj`` / ``k_proj``). This
  is one extra K projection per patched block (about ``C**2`` multiply-adds per token, ~8% of a
  block; ~2% of a ViT-B with three patched blocks), chosen over capturing K from inside the
  attention with hooks, which would depend on each library's internals (and, in transformers,
  on which attention implementation runs: sdpa returns no weights). Only a
  ``[B, heads, 1, N]`` logit row is formed; the ``N x N`` attention is never materialised.
  Scores are computed in float32 (also under autocast).
- Token sizes (how many patches each token stands for) are carried from block to block on the
  handle: a forward pre-hook on the first block resets them, each patched block reads and
  replaces them. ``handle.sizes`` holds the last forward's sizes.
- timm ``global_pool="avg"``: the pooled token must be the size-weighted mean
  ``sum_i s_i x_i / sum_i s_i``. ``forward_head`` is wrapped to rescale the pooled tokens by
  ``s_i * n / sum(s)`` before timm's own pooling, whose plain mean then is that weighted mean
  (fc_norm and head unchanged). ``"token"`` pooling needs nothing. Other pools are refused.
- Protected tokens (``num_protected="auto"``): timm's ``num_prefix_tokens`` (class,
  distillation and register tokens), 1 for torchvision and transformers. They are never pruned
  or merged.
- transformers: the model is called without ``attention_mask`` and with the ``eager`` or
  ``sdpa`` attention implementation (others, such as ``flex_attention``, pass every layer a mask
  over the input tokens, so they are refused at patch time). Its heads read the class token
  (``ViTForImageClassification``, ``ViTModel``'s pooler); ``last_hidden_state`` and
  ``hidden_states`` hold the reduced tokens. ``ViTForMaskedImageModeling``, whose decoder
  needs every patch, is refused.
- ``keep`` is a fraction in [0, 1] of the current non-protected tokens, or a schedule
  ``keep(step) -> fraction`` (EViT's warm-up): call ``handle.set_step(step)`` from the training
  loop (the schedule is evaluated there, outside the model's forward). ``keep`` giving all
  tokens at a block leaves that block's output untouched.
- ``torch.compile``: the op has fake kernels and a registered autograd, the wrappers are plain
  Python and the per-forward state is an attribute store on the handle, all of which dynamo
  traces. The token count is a shape, so each distinct keep fraction compiles its own graph:
  prefer a constant ``keep`` (or a schedule with few distinct values) under compile.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import ops
from ._vit_base import _ATTR, _Family, _Patch, _PatchedForward, _family

__all__ = ["prune_merge", "token_merge", "unpatch", "handle_of", "sparse_layers",
           "PruneMergeHandle", "TokenMergeHandle", "cls_attention"]

KeepArg = Union[float, Callable[[int], float]]


def cls_attention(model: nn.Module, block: nn.Module, x: Tensor) -> Tensor:
    """The CLS attention row of ``block`` on its input ``x``: ``mean_h softmax(q_cls K^T /
    sqrt(d))`` over all tokens, float32 ``[B, N]`` (docs/methods.md section 6, step 1)."""
    return _family(model).cls_logits(block, x).softmax(-1).mean(1)


# ---------------------------------------------------------------------------------------------
# The handle


class PruneMergeHandle(_Patch):
    """What :func:`prune_merge` changed, and the per-forward state. ``remove()`` undoes it.

    Attributes:
        layers: the patched block indices.
        num_protected: leading tokens never pruned.
        keep_fraction: the fraction in use (the schedule's value at ``step``).
        step: the step last given to :meth:`set_step` (0 at first).
        sizes: float32 ``[B, N]`` token sizes after the last patched block of the last forward
            (``None`` before one).
    """

    api = "prune_merge"

    def __init__(self, model: nn.Module, family: _Family, keep: KeepArg, layers: Tuple[int, ...],
                 normalize: bool, num_protected: int, detach_scores: bool):
        super().__init__(model, family, layers, num_protected)
        self.normalize = bool(normalize)
        self.detach_scores = bool(detach_scores)
        self._schedule = keep if callable(keep) else None
        self.keep_fraction = 1.0
        self.step = 0
        # Opt-in (for inspection, e.g. plotting which patches survive): with record=True, each
        # forward leaves in `kept_patches` the original patch index of every non-protected token
        # still present at the end, [B, tokens], -1 for fused tokens.
        self.kept_patches: Optional[Tensor] = None
        if self._schedule is None:
            self.keep_fraction = _check_fraction(keep, "keep")
        else:
            self.set_step(0)

    # -- schedule ---------------------------------------------------------------------------

    def set_step(self, step: int) -> float:
        """Sets the step of a ``keep`` schedule; returns the keep fraction now in use."""
        self.step = int(step)
        if self._schedule is not None:
            self.keep_fraction = _check_fraction(self._schedule(self.step), "keep(step)")
        return self.keep_fraction

    def keep_count(self, candidates: int) -> int:
        """Tokens kept out of ``candidates`` non-protected ones: ``ceil(keep * candidates)``."""
        k = math.ceil(self.keep_fraction * candidates - 1e-9)
        return min(max(k, 0), candidates)

    # -- forward pieces -----------------------------------------------------------------------

    def _clear(self) -> None:
        self.kept_patches = None

    def _reduce(self, i: int, block: nn.Module, x_in: Tensor, y: Tensor) -> Tensor:
        b, n, _ = y.shape
        p = self.num_protected
        if n <= p:
            return y
        keep = self.keep_count(n - p)
        if keep >= n - p:
            return y
        sizes, recompute = self._sizes_in(i, x_in)
        scores = self.family.cls_logits(block, x_in).softmax(-1).mean(1)[:, p:]
        if self.detach_scores:
            scores = scores.detach()
        if sizes is not None and (sizes.shape[0] != b or sizes.shape[1] != n):
            sizes = None
        out, kept, out_sizes = ops.token_prune_merge(y, scores.float(), keep, num_protected=p,
                                                     sizes=sizes, normalize=self.normalize)
        if recompute:
            return out
        self.sizes = out_sizes
        if self.record:
            origin = self.kept_patches
            if origin is None or origin.shape != (b, n - p):
                origin = torch.arange(n - p, device=y.device).expand(b, n - p)
            survivors = origin.gather(1, kept)
            fused = survivors.new_full((b, out.shape[1] - p - keep), -1)
            self.kept_patches = torch.cat([survivors, fused], dim=1)
        return out

    def _install(self, blocks: Sequence[nn.Module]) -> None:
        for i in self.layers:
            block = blocks[i]
            self._set(block, "forward", _ReducingForward(self, i, block, block.__dict__.get("forward")))
        self._install_common(blocks)

    def __repr__(self) -> str:
        keep = f"schedule(step={self.step}) -> {self.keep_fraction:g}" if self._schedule else \
            f"{self.keep_fraction:g}"
        return (f"PruneMergeHandle({self.family.name}, keep={keep}, layers={self.layers}, "
                f"num_protected={self.num_protected}, normalize={self.normalize}, "
                f"detach_scores={self.detach_scores})")


class _ReducingForward(_PatchedForward):
    """A patched block's ``forward``: the block as before, then prune-merge of its output."""

    mask_message = (
        "fisheradaptune.vit.prune_merge: a patched block received an attention mask (given to "
        "the model, or built for every call by a transformers attention implementation such as "
        "flex_attention); token reduction changes the number of tokens after this block, so a "
        "mask over the input tokens cannot apply to the next ones. Call the model without "
        "attn_mask / attention_mask (transformers: with eager or sdpa attention), or unpatch it")

    def __call__(self, x, *args, **kwargs):
        fwd = self._wrapped(args, kwargs)
        return self.handle._reduce(self.index, self.block, x, fwd(x, *args, **kwargs))


def _check_fraction(v, where: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"fisheradaptune.vit.prune_merge: argument '{where}': expected a number "
                        f"in [0, 1] or a callable of the step, got {type(v).__name__}") from None
    if not (0.0 <= f <= 1.0):
        raise ValueError(f"fisheradaptune.vit.prune_merge: argument '{where}': expected a "
                         f"fraction in [0, 1], got {f}")
    return f


# ---------------------------------------------------------------------------------------------
# Public API


def sparse_layers(model: nn.Module, selection, count: int = 3) -> Tuple[int, ...]:
    """TR-PTS "sparse insertion" (docs/methods.md section 6): the ``count`` blocks holding the fewest
    selected parameters of ``selection`` (a :class:`fisheradaptune.selection.Selection`), ties
    to the earlier block. The last block is never chosen: reducing tokens after it saves no
    block computation."""
    if not (isinstance(count, int) and count >= 1):
        raise ValueError(f"fisheradaptune.vit.sparse_layers: argument 'count': expected an int >= 1, "
                         f"got {count!r}")
    index = getattr(selection, "index", None)
    if not isinstance(index, dict):
        raise TypeError("fisheradaptune.vit.sparse_layers: argument 'selection': expected a "
                        f"fisheradaptune.selection.Selection, got {type(selection).__name__}")
    blocks = _family(model).blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    prefixes = [names[id(b)] + "." for b in blocks]
    selected = [0] * len(blocks)
    for module, idx in index.items():
        for i, prefix in enumerate(prefixes):
            if module.startswith(prefix):
                selected[i] += idx.numel()
    candidates = list(range(len(blocks) - 1))
    if count > len(candidates):
        raise ValueError(f"fisheradaptune.vit.sparse_layers: argument 'count': the model has "
                         f"{len(candidates)} blocks before its last, got {count}")
    return tuple(sorted(sorted(candidates, key=lambda i: (selected[i], i))[:count]))


def prune_merge(model: nn.Module, keep: KeepArg = 0.7,
                layers: Union[Sequence[int], str] = (3, 6, 9), *, normalize: bool = True,
                num_protected: Union[int, str] = "auto", detach_scores: bool = False,
                selection=None, sparse_count: int = 3) -> PruneMergeHandle:
    """Prune and merge tokens after the blocks ``layers`` of a timm, torchvision or
    transformers ViT.

    Args:
        model: a timm ``VisionTransformer`` (also ``fisheradaptune.demo.models.TinyViT``), a
            torchvision ``VisionTransformer``, or a transformers ``ViTModel`` /
            ``ViTForImageClassification`` (eager or sdpa attention).
        keep: fraction of the current non-protected tokens kept at each chosen block
            (``ceil(keep * (N - P))``), or a callable ``step -> fraction`` advanced with
            ``handle.set_step``.
        layers: indices of the blocks after which tokens are reduced (EViT: 3, 6, 9 of 12),
            or ``"sparse"``: the ``sparse_count`` blocks with the fewest parameters selected by
            ``selection`` (TR-PTS; see :func:`sparse_layers`).
        normalize: fused token ``sum w x / sum w`` (default) or EViT's plain ``sum w x``.
        num_protected: leading tokens never pruned; ``"auto"`` = timm's
            ``num_prefix_tokens`` (class + distillation + register tokens), 1 for torchvision
            and transformers.
        detach_scores: stop gradients through the attention scores into q and k.

    Returns:
        A :class:`PruneMergeHandle`; ``handle.remove()`` or :func:`unpatch` undoes the patch.
    """
    existing = model.__dict__.get(_ATTR)
    if existing is not None:
        raise ValueError(f"fisheradaptune.vit.prune_merge: argument 'model': already patched by "
                         f"fisheradaptune.vit.{existing.api} (one patch per model: prune_merge "
                         "and token_merge cannot be combined); call "
                         "fisheradaptune.vit.unpatch(model) first")
    family = _family(model)
    blocks = family.blocks(model)
    if isinstance(layers, str):
        if layers != "sparse":
            raise ValueError("fisheradaptune.vit.prune_merge: argument 'layers': expected block "
                             f"indices or \"sparse\", got {layers!r}")
        if selection is None:
            raise ValueError("fisheradaptune.vit.prune_merge: argument 'selection': "
                             "layers=\"sparse\" needs the TR-PTS selection")
        layers = sparse_layers(model, selection, sparse_count)
    try:
        idx = tuple(sorted({int(i) for i in layers}))
    except (TypeError, ValueError):
        raise TypeError("fisheradaptune.vit.prune_merge: argument 'layers': expected a tuple of "
                        f"block indices, got {layers!r}") from None
    if any(not 0 <= i < len(blocks) for i in idx):
        raise ValueError("fisheradaptune.vit.prune_merge: argument 'layers': expected block "
                         f"indices in [0, {len(blocks)}), got {tuple(layers)}")
    if num_protected == "auto":
        num_protected = family.num_protected(model)
    if isinstance(num_protected, bool) or not isinstance(num_protected, int) or num_protected < 0:
        raise ValueError("fisheradaptune.vit.prune_merge: argument 'num_protected': expected "
                         f"\"auto\" or an int >= 0, got {num_protected!r}")
    family.check(model)
    handle = PruneMergeHandle(model, family, keep, idx, normalize, num_protected, detach_scores)
    handle._install(blocks)
    return handle


def handle_of(model: nn.Module) -> Optional[_Patch]:
    """The handle patching ``model`` (a :class:`PruneMergeHandle` or a
    :class:`TokenMergeHandle`), or None."""
    return model.__dict__.get(_ATTR)


def unpatch(model: nn.Module) -> None:
    """Undoes :func:`prune_merge` or :func:`token_merge` on ``model``, restoring it exactly."""
    handle = model.__dict__.get(_ATTR)
    if handle is None:
        raise ValueError("fisheradaptune.vit.unpatch: argument 'model': not patched by "
                         "fisheradaptune.vit.prune_merge or token_merge")
    handle.remove()


# ToMe lives in its own module, built on the families and the patch base above.
from ._token_merge import TokenMergeHandle, token_merge  # noqa: E402
