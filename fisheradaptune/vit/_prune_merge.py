"""EViT / TR-PTS token prune-merge inside the registered ViT families (docs/methods.md
section 6); public as :func:`fisheradaptune.vit.prune_merge`.

    handle = fisheradaptune.vit.prune_merge(model, keep=0.7, layers=(3, 6, 9))
    ...
    fisheradaptune.vit.unpatch(model)        # or handle.remove()

After each chosen block, the non-protected tokens are scored by the block's class-attention
row, the ``ceil(keep * (N - P))`` best are kept in their original order and the rest are fused
into one token appended at the end (:func:`fisheradaptune.ops.token_prune_merge`).

How it works (and what it changes in the model):

- Each block from the first chosen one on gets an instance ``forward`` (the class is untouched):
  the block runs as before, main attention included (timm's fused SDPA path, torchvision's
  ``nn.MultiheadAttention`` fast path, transformers' ``eager`` or ``sdpa`` attention); a chosen
  block then prunes and merges its output. Every patched block passes the token sizes on with
  its output tensor (``_state.py``): state per forward, never on the model.
- Class-attention row: ``mean_h softmax(q_cls K^T * scale)`` over all tokens, from the block's
  own weights on its normed input (``q`` for the class token only, ``K`` for all tokens): one
  extra K projection per chosen block (~8% of a block), chosen over capturing K from inside the
  attention, which would depend on each library's internals (and, in transformers, on the
  attention implementation: sdpa returns no weights). Only a ``[B, heads, 1, N]`` logit row is
  formed, in float32.
- An average-pooling head (timm ``global_pool="avg"``) pools the size-weighted mean.
- Protected tokens: the model's prefix tokens, counted by its family (class, distillation and
  register tokens); never pruned or merged.
- ``keep`` is a fraction in [0, 1] of the current non-protected tokens, or a schedule
  ``keep(step) -> fraction`` advanced by ``handle.set_step(step)`` outside the forward.
- ``torch.compile``: the op has fake kernels and a registered autograd; the token-state lookups
  run eagerly (a graph break at each patched block). Each distinct keep fraction compiles its
  own graph.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import ops
from ._layout import refusal
from ._patch import ATTR, Patch, PatchedForward, in_backward
from ._registry import Match, match
from ._state import TokenState

KeepArg = Union[float, Callable[[int], float]]


def cls_attention(model: nn.Module, block: nn.Module, x: Tensor) -> Tensor:
    """The class-attention row of ``block`` on its input ``x``: ``mean_h softmax(q_cls K^T /
    sqrt(d))`` over all tokens, float32 ``[B, N]`` (docs/methods.md section 6, step 1).
    ``model`` must be of a family :func:`prune_merge` serves."""
    return match(model, "prune_merge").layout.cls_logits(block, x).softmax(-1).mean(1)


class PruneMergeHandle(Patch):
    """What :func:`prune_merge` changed. ``remove()`` undoes it.

    Attributes:
        family: the matched :class:`~fisheradaptune.vit.Family`.
        layers: the reducing block indices.
        num_protected: leading tokens never pruned.
        keep_fraction: the fraction in use (the schedule's value at ``step``).
        step: the step last given to :meth:`set_step` (0 at first).
        sizes: float32 ``[B, N]`` token sizes after the last reducing block of the most recent
            forward (for inspection; ``None`` before one).
        record: set it to True to keep, after each forward, ``kept_patches``: the original
            patch index of every non-protected token still present at the end, ``[B, tokens]``,
            -1 for fused tokens.
    """

    api = "prune_merge"

    def __init__(self, model: nn.Module, m: Match, keep: KeepArg, layers: Tuple[int, ...],
                 normalize: bool, num_protected: int, detach_scores: bool):
        super().__init__(model, m, layers, num_protected)
        self.normalize = bool(normalize)
        self.detach_scores = bool(detach_scores)
        self._schedule = keep if callable(keep) else None
        self._reducing = frozenset(layers)
        self.keep_fraction = 1.0
        self.step = 0
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

    # -- forward ------------------------------------------------------------------------------

    def _block(self, i: int, block: nn.Module, x: Tensor, fwd: PatchedForward, args,
               kwargs) -> Tensor:
        state = self._state_in(i, x)
        y = fwd.run(x, args, kwargs)
        if i in self._reducing:
            y, state = self._reduce(block, x, y, state)
        self._state_out(y, state)
        return y

    def _reduce(self, block: nn.Module, x_in: Tensor, y: Tensor,
                state: TokenState) -> Tuple[Tensor, TokenState]:
        b, n, _ = y.shape
        p = self.num_protected
        if n <= p:
            return y, state
        keep = self.keep_count(n - p)
        if keep >= n - p:
            return y, state
        scores = self.layout.cls_logits(block, x_in).softmax(-1).mean(1)[:, p:]
        if self.detach_scores:
            scores = scores.detach()
        out, kept, out_sizes = ops.token_prune_merge(y, scores.float(), keep, num_protected=p,
                                                     sizes=state.sizes, normalize=self.normalize)
        rows = None
        if self.record:
            origin = state.rows
            if origin is None:
                origin = torch.arange(n - p, device=y.device).expand(b, n - p)
            survivors = origin.gather(1, kept)
            fused = survivors.new_full((b, out.shape[1] - p - keep), -1)
            rows = torch.cat([survivors, fused], dim=1)
        if not in_backward():  # a checkpoint recomputation is not a new forward
            self.sizes = out_sizes
            if rows is not None:
                self.kept_patches = rows
        return out, TokenState(out_sizes, rows)

    def __repr__(self) -> str:
        keep = f"schedule(step={self.step}) -> {self.keep_fraction:g}" if self._schedule else \
            f"{self.keep_fraction:g}"
        return (f"PruneMergeHandle({self.family.name}, keep={keep}, layers={self.layers}, "
                f"num_protected={self.num_protected}, normalize={self.normalize}, "
                f"detach_scores={self.detach_scores})")


def _check_fraction(v, where: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise refusal("prune_merge", where, "expected a number in [0, 1] or a callable of the "
                      f"step, got {type(v).__name__}", TypeError) from None
    if not (0.0 <= f <= 1.0):
        raise refusal("prune_merge", where, f"expected a fraction in [0, 1], got {f}")
    return f


# ---------------------------------------------------------------------------------------------
# Public API


def sparse_layers(model: nn.Module, selection, count: int = 3) -> Tuple[int, ...]:
    """TR-PTS "sparse insertion" (docs/methods.md section 6): the ``count`` blocks holding the
    fewest selected parameters of ``selection`` (a :class:`fisheradaptune.selection.Selection`),
    ties to the earlier block. The last block is never chosen: reducing tokens after it saves no
    block computation."""
    if not (isinstance(count, int) and count >= 1):
        raise ValueError("fisheradaptune.vit.sparse_layers: argument 'count': expected an int "
                         f">= 1, got {count!r}")
    index = getattr(selection, "index", None)
    if not isinstance(index, dict):
        raise TypeError("fisheradaptune.vit.sparse_layers: argument 'selection': expected a "
                        f"fisheradaptune.selection.Selection, got {type(selection).__name__}")
    blocks = match(model, "prune_merge").blocks
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


def check_unpatched(model: nn.Module, api: str) -> None:
    """Refuses a model that already carries a patch (one per model)."""
    existing = model.__dict__.get(ATTR)
    if existing is not None:
        raise refusal(api, "model", f"already patched by fisheradaptune.vit.{existing.api} (one "
                      "patch per model: prune_merge and token_merge cannot be combined); call "
                      "fisheradaptune.vit.unpatch(model) first")


def protected_count(m: Match, num_protected: Union[int, str], api: str) -> int:
    """``num_protected`` checked against the model's prefix tokens (``"auto"``: exactly them)."""
    if num_protected == "auto":
        return m.prefix.count
    if isinstance(num_protected, bool) or not isinstance(num_protected, int) or num_protected < 0:
        raise refusal(api, "num_protected", f"expected \"auto\" or an int >= 0, got "
                      f"{num_protected!r}")
    if num_protected < m.prefix.count:
        raise refusal(api, "num_protected", f"{num_protected} would leave prefix tokens "
                      f"unprotected: {type(m.encoder).__name__} has {m.prefix.describe()}, "
                      "which its head or pool reads by position (use \"auto\")")
    return num_protected


def prune_merge(model: nn.Module, keep: KeepArg = 0.7,
                layers: Union[Sequence[int], str] = (3, 6, 9), *, normalize: bool = True,
                num_protected: Union[int, str] = "auto", detach_scores: bool = False,
                selection=None, sparse_count: int = 3) -> PruneMergeHandle:
    """Prune and merge tokens after the blocks ``layers`` of a ViT of a registered family.

    Args:
        model: a model of a family in :func:`fisheradaptune.vit.families` serving
            ``prune_merge``: timm ``VisionTransformer`` (with a class token) and
            ``VisionTransformerDistilled``, torchvision ``VisionTransformer``, transformers
            ``ViTModel`` / ``ViTForImageClassification``, ``DeiTModel`` /
            ``DeiTForImageClassification(WithTeacher)``, ``ASTModel`` /
            ``ASTForAudioClassification``, ``ViTMSNModel`` / ``ViTMSNForImageClassification``,
            ``Dinov2Model``, ``Dinov2WithRegistersModel`` (eager or sdpa attention), the demo's
            ``TinyViT``.
            Any other class is refused, naming it and the supported families.
        keep: fraction of the current non-protected tokens kept at each chosen block
            (``ceil(keep * (N - P))``), or a callable ``step -> fraction`` advanced with
            ``handle.set_step``.
        layers: indices of the blocks after which tokens are reduced (EViT: 3, 6, 9 of 12),
            or ``"sparse"``: the ``sparse_count`` blocks with the fewest parameters selected by
            ``selection`` (TR-PTS; see :func:`sparse_layers`).
        normalize: fused token ``sum w x / sum w`` (default) or EViT's plain ``sum w x``.
        num_protected: leading tokens never pruned; ``"auto"`` = the model's prefix tokens
            (class + distillation + register tokens). Fewer than those is refused.
        detach_scores: stop gradients through the attention scores into q and k.

    Returns:
        A :class:`PruneMergeHandle`; ``handle.remove()`` or :func:`unpatch` undoes the patch.
    """
    check_unpatched(model, "prune_merge")
    m = match(model, "prune_merge")
    blocks = m.blocks
    if isinstance(layers, str):
        if layers != "sparse":
            raise refusal("prune_merge", "layers", "expected block indices or \"sparse\", got "
                          f"{layers!r}")
        if selection is None:
            raise refusal("prune_merge", "selection", "layers=\"sparse\" needs the TR-PTS "
                          "selection")
        layers = sparse_layers(model, selection, sparse_count)
    try:
        idx = tuple(sorted({int(i) for i in layers}))
    except (TypeError, ValueError):
        raise refusal("prune_merge", "layers", f"expected a tuple of block indices, got "
                      f"{layers!r}", TypeError) from None
    if any(not 0 <= i < len(blocks) for i in idx):
        raise refusal("prune_merge", "layers", f"expected block indices in [0, {len(blocks)}), "
                      f"got {tuple(layers)}")
    p = protected_count(m, num_protected, "prune_merge")
    handle = PruneMergeHandle(model, m, keep, idx, normalize, p, detach_scores)
    handle._install_blocks(blocks, idx[0] if idx else len(blocks), PatchedForward)
    return handle
