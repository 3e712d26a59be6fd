"""ToMe token merging inside the registered ViT families whose layout provides the two block
halves (docs/methods.md section 7); public as :func:`fisheradaptune.vit.token_merge`.

Each merging block runs as ``attention -> merge -> MLP``: after the attention residual, the
``r`` most redundant tokens merge into their most similar partner
(:func:`fisheradaptune.ops.bipartite_merge`, similarity on the block's attention keys averaged
over heads), so the MLP, and every later block, runs on fewer tokens. With proportional
attention, each block after the first merge adds ``log(size)`` of every key to its attention
logits, through the ``attn_mask`` of ``scaled_dot_product_attention``, so a token standing for
``s`` patches weighs as ``s`` copies and attention stays a fused kernel. How each library's
block is split in two is written in its layout (``_timm.py``, ``_torchvision.py``,
``_transformers.py``). A block that
merges nothing and sees no sizes yet runs its own, unpatched ``forward``. Token sizes travel with
the token tensors (``_state.py``), never on the model.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import ops
from ._layout import refusal
from ._patch import Patch, PatchedForward, in_backward
from ._prune_merge import check_unpatched, protected_count
from ._registry import Match, match
from ._state import TokenState

RArg = Union[int, Sequence[int]]
SCHEDULES = ("constant", "decreasing")


def _err(arg: str, msg: str, cls=ValueError):
    return refusal("token_merge", arg, msg, cls)


class TokenMergeHandle(Patch):
    """What :func:`token_merge` changed. ``remove()`` undoes it.

    Attributes:
        family: the matched :class:`~fisheradaptune.vit.Family`.
        r: tokens merged away at each block (a tuple over all blocks; clamped at run time to
            ``(N - P) // 2`` of the tokens the block sees).
        layers: the blocks that merge (``r > 0``).
        num_protected: leading tokens that never merge.
        proportional_attention: whether attention adds ``log(size)`` of each key.
        sizes: float32 ``[B, N]`` token sizes after the last merging block of the most recent
            forward (for inspection; ``None`` before one, or when nothing merged).
        record: set it to True to keep, after each forward, ``patch_rows``: int64 ``[B, N0]``,
            the final token row of every input token (class and patches), e.g. to draw which
            patches merged.
    """

    api = "token_merge"

    def __init__(self, model: nn.Module, m: Match, r: Tuple[int, ...], num_protected: int,
                 proportional_attention: bool):
        super().__init__(model, m, tuple(i for i, v in enumerate(r) if v > 0), num_protected)
        self.r = r
        self.proportional_attention = bool(proportional_attention)
        self.patch_rows: Optional[Tensor] = None

    def _block(self, i: int, block: nn.Module, x: Tensor, fwd: PatchedForward, args,
               kwargs) -> Tensor:
        b, n, _ = x.shape
        state = self._state_in(i, x)
        sizes = state.sizes
        r = min(self.r[i], max(n - self.num_protected, 0) // 2)
        prop = self.proportional_attention and sizes is not None
        if r == 0 and not prop:
            y = fwd.run(x, args, kwargs)
            self._state_out(y, state)
            return y
        # [B, 1, 1, N]: broadcast over heads and queries, so SDPA keeps its fused kernels.
        bias = sizes.log()[:, None, None, :].to(x.dtype) if prop else None
        merged = {}

        def halves(x: Tensor) -> Tensor:
            x, metric = self.layout.attend(block, x, bias)
            if r > 0:
                x, merged["sizes"], merged["dest"] = ops.bipartite_merge(
                    x, metric, r, num_protected=self.num_protected, sizes=sizes)
            return self.layout.mlp(block, x)

        # A library that checkpoints inside the block's class forward (transformers) gets the
        # same recomputation for the merging path; the sizes and dest of a recomputation are
        # those of the forward (the same inputs).
        checkpoint = self.layout.checkpoint(block)
        y = halves(x) if checkpoint is None else checkpoint(halves, x)
        if r > 0:
            out_sizes, dest = merged["sizes"], merged["dest"]
            rows = None
            if self.record:
                rows = state.rows
                if rows is None:
                    rows = torch.arange(n, device=x.device).expand(b, n)
                rows = dest.gather(1, rows)
            state = TokenState(out_sizes, rows)
            if not in_backward():  # a checkpoint recomputation is not a new forward
                self.sizes = out_sizes
                if rows is not None:
                    self.patch_rows = rows
        self._state_out(y, state)
        return y

    def __repr__(self) -> str:
        return (f"TokenMergeHandle({self.family.name}, r={self.r}, "
                f"num_protected={self.num_protected}, "
                f"proportional_attention={self.proportional_attention})")


# ---------------------------------------------------------------------------------------------
# Public API


def decreasing(r: int, k: int) -> Tuple[int, ...]:
    """``k`` merge counts falling linearly from ``2r`` to 0 whose total is exactly ``r * k``:
    the ramp ``2r (k - 1 - j) / (k - 1)`` (which sums to ``r * k``) rounded by largest
    remainders, in integers: every value rounded down, then the ones with the largest
    fractional parts (ties to the earlier block) rounded up until the total is reached. Each
    count is within 1 of the ramp, the counts never increase, and the last is 0."""
    if k == 1:
        return (r,)
    den = k - 1
    nums = [2 * r * (k - 1 - j) for j in range(k)]
    counts = [n // den for n in nums]
    extra = r * k - sum(counts)
    for j in sorted(range(k), key=lambda j: (-(nums[j] % den), j))[:extra]:
        counts[j] += 1
    return tuple(counts)


def _per_block(r: RArg, depth: int, layers: Optional[Sequence[int]],
               schedule: str) -> Tuple[int, ...]:
    if schedule not in SCHEDULES:
        raise _err("schedule", f"expected one of {SCHEDULES}, got {schedule!r}")
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
        if r < 0:
            raise _err("r", f"expected ints >= 0, got {r!r}")
        values = [0] * depth
        counts = [r] * len(chosen) if schedule == "constant" or not chosen else \
            decreasing(r, len(chosen))
        for i, v in zip(chosen, counts):
            values[i] = v
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise _err("r", f"expected ints >= 0, got {r!r}")
    return tuple(values)


def token_merge(model: nn.Module, r: RArg = 16, *, layers: Optional[Sequence[int]] = None,
                proportional_attention: bool = True, num_protected: Union[int, str] = "auto",
                schedule: str = "constant") -> TokenMergeHandle:
    """Merge ``r`` tokens per block (ToMe) inside a ViT of a registered family, without training.

    Args:
        model: a model of a family in :func:`fisheradaptune.vit.families` serving
            ``token_merge``: timm ``VisionTransformer`` (``global_pool`` ``"token"``, ``"avg"``
            or ``""``; with or without a class token; register tokens) and
            ``VisionTransformerDistilled``, torchvision ``VisionTransformer``, the demo's
            ``TinyViT``; transformers ``ViTModel`` / ``ViTForImageClassification``,
            ``DeiTModel`` / ``DeiTForImageClassification(WithTeacher)``, ``ViTMSNModel`` /
            ``ViTMSNForImageClassification``, ``ASTModel`` / ``ASTForAudioClassification``,
            ``Dinov2Model``, ``Dinov2WithRegistersModel``, ``CLIPVisionModel`` /
            ``CLIPVisionModelWithProjection`` (eager or sdpa attention). Any other class is
            refused, naming it and the supported families.
        r: tokens merged away in each chosen block (clamped to half the mergeable tokens the
            block sees), or a list with one value per block.
        layers: the blocks that merge (default: all), for an int ``r``.
        proportional_attention: add ``log(size)`` of each key to the attention logits in every
            block after the first merge (ToMe's proportional attention).
        num_protected: leading tokens that never merge; ``"auto"`` = the model's prefix tokens
            (class, distillation, register tokens). Fewer than those is refused.
        schedule: ``"constant"`` (``r`` at every chosen block) or ``"decreasing"`` (from ``2r``
            at the first chosen block linearly to 0 at the last, rounded so that the total is
            exactly ``r`` times the number of chosen blocks).

    Returns:
        A :class:`TokenMergeHandle`; ``handle.remove()`` or :func:`fisheradaptune.vit.unpatch`
        restores the model bitwise. A model carries one patch at a time: ``prune_merge`` and
        ``token_merge`` cannot be combined on one model (the second call is refused).

    Token sizes are carried to the head: an average pool becomes the size-weighted mean;
    class-token heads need nothing. Works under ``torch.compile``, autocast, gradient
    checkpointing and ``deepcopy`` (the copy carries its own patch). The clamp to half the
    mergeable tokens can make the total merged smaller than ``sum(r)`` on short sequences.
    """
    check_unpatched(model, "token_merge")
    m = match(model, "token_merge")
    m.layout.check_token_merge(m.blocks, "token_merge")
    per_block = _per_block(r, len(m.blocks), layers, schedule)
    p = protected_count(m, num_protected, "token_merge")
    handle = TokenMergeHandle(model, m, per_block, p, proportional_attention)
    layers_ = handle.layers
    first = layers_[0] if layers_ else len(m.blocks)
    for i in range(first, len(m.blocks)):
        m.layout.prepare(handle, m.blocks[i])
    handle._install_blocks(m.blocks, first, PatchedForward)
    return handle
