"""Freezing mechanics of FisherAdapTune: what a frozen group does to tensors, gradients and
optimizer state (docs/methods.md section 4, "Applying a freeze").

- a tensor whose groups are all frozen is *released*: ``requires_grad_(False)``, ``grad =
  None``, its optimizer state dropped (its Fisher and reference buffers are the caller's to
  free), so backward skips its weight gradient and the memory is returned;
- in a partially frozen tensor, frozen ranges get zero gradients (in place) as soon as backward
  accumulates them (a post-accumulate-grad hook, so gradient clipping, logging and
  ``GradScaler.unscale_`` between ``backward`` and ``step`` see zeros there) and again at the
  step, their optimizer state is zeroed at the freeze, and their values are restored bit for
  bit after the wrapped optimizer's step, so no optimizer (weight decay, momentum, fused
  kernels) can move them.
"""
from __future__ import annotations

import weakref
from functools import partial as _bind
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor

from ..distributed.sharding import is_dtensor, local
from ..groups import GroupLayout

__all__ = ["Freezer", "PartialFreeze"]


class Freezer:
    """The frozen set of a FisherAdapTune's groups, and its effect on the tensors.

    Args:
        params: the tracked parameters (global tensors, or FSDP2 DTensors).
        layout: groups over ``params`` (global coordinates).
        mask_layout: the same groups in the coordinates of what this rank updates (its FSDP2
            shard, or the whole tensor).
        optimizer: the wrapped optimizer, whose state is released or zeroed.

    Attributes:
        frozen: bool ``[G]``; ``frozen_at``: int64 ``[G]``, the step of each freeze (-1: never);
        released: indices of tensors frozen whole; partial: the :class:`PartialFreeze` of the
        others.
    """

    def __init__(self, params: List[Tensor], layout: GroupLayout, mask_layout: GroupLayout,
                 optimizer: torch.optim.Optimizer):
        self.params = params
        self.layout = layout
        self.optimizer = optimizer
        G = layout.num_groups
        self.frozen = torch.zeros(G, dtype=torch.bool)
        self.frozen_at = torch.full((G,), -1, dtype=torch.int64)
        self.released: set = set()
        self.tensor_groups = [layout.groups_of(i) for i in range(len(params))]
        self.group_segments = [layout.segments_of(g) for g in range(G)]
        self.mask_segments = [mask_layout.segments_of(g) for g in range(G)]
        self.partial = PartialFreeze(params, {})
        self._hooks: List[Any] = []

    def freeze(self, groups: Tensor, step: int) -> List[int]:
        """Freeze ``groups`` (bool mask; frozen ones are ignored) from ``step`` on. Returns
        the tensors newly frozen whole (released here). Everything that can fail is built
        before any state changes."""
        new = groups & ~self.frozen
        if not bool(new.any()):
            return []
        plan = self._plan(self.frozen | new)
        self.frozen |= new
        self.frozen_at[new] = step
        return self._apply(plan)

    def thaw(self, groups: Tensor) -> List[int]:
        """Make frozen ``groups`` trainable again. Returns the released tensors brought back
        (``requires_grad`` again; their optimizer state restarts from scratch)."""
        mask = groups & self.frozen
        if not bool(mask.any()):
            return []
        plan = self._plan(self.frozen & ~mask)
        self.frozen &= ~mask
        self.frozen_at[mask] = -1
        back = [i for i in sorted(self.released) if any(mask[g] for g in self.tensor_groups[i])]
        for i in back:
            self.params[i].requires_grad_(True)
            self.released.discard(i)
        self._apply(plan)
        return back

    def frozen_mask(self, i: int) -> Tensor:
        """Bool tensor shaped like this rank's part of parameter ``i``: True where frozen."""
        part = local(self.params[i])
        mask = torch.zeros(part.numel(), dtype=torch.bool, device=part.device)
        for g in self.tensor_groups[i]:
            if self.frozen[g]:
                for t, b, e in self.mask_segments[g]:
                    if t == i:
                        mask[b:e] = True
        return mask.view(part.shape)

    def whole_frozen(self, frozen: Tensor) -> List[int]:
        """The tensors that the frozen set ``frozen`` freezes whole (sorted indices)."""
        out = []
        for i, p in enumerate(self.params):
            covered = sum(e - b for g in self.tensor_groups[i] if frozen[g]
                          for t, b, e in self.group_segments[g] if t == i)
            if covered and covered == p.numel():
                out.append(i)
        return out

    def _plan(self, frozen: Tensor):
        """For the frozen set ``frozen``: the tensors frozen whole and the partial freeze."""
        ranges: Dict[int, List[Tuple[int, int]]] = {}
        whole = self.whole_frozen(frozen)
        for i, p in enumerate(self.params):
            frozen_groups = [g for g in self.tensor_groups[i] if frozen[g]]
            if frozen_groups and i not in whole:
                # In this rank's coordinates (its shard of the tensor under FSDP2).
                local_ranges = sorted((b, e) for g in frozen_groups
                                      for t, b, e in self.mask_segments[g] if t == i)
                if local_ranges:
                    ranges[i] = merge_ranges(local_ranges)
        return whole, ranges, PartialFreeze(self.params, ranges)

    def _apply(self, plan) -> List[int]:
        """Release tensors newly frozen whole, zero the optimizer state of frozen ranges and
        install the partial freeze of ``plan`` (from :meth:`_plan`)."""
        whole, ranges, partial = plan
        newly_whole = [i for i in whole if i not in self.released]
        state = self.optimizer.state
        for i in newly_whole:
            p = self.params[i]
            p.requires_grad_(False)
            p.grad = None
            state.pop(p, None)
            self.released.add(i)
        for i, rs in ranges.items():
            # Zero the optimizer state of frozen ranges: momentum must not carry over.
            p = self.params[i]
            for v in state.get(p, {}).values():
                if isinstance(v, Tensor) and v.shape == p.shape:
                    v = local(v)
                    if v.is_contiguous():
                        flat = v.view(-1)
                        for b, e in rs:
                            flat[b:e].zero_()
                    else:  # e.g. Adam moments of a channels_last weight (preserve_format)
                        v.masked_fill_(_range_mask(v.shape, rs, v.device), 0)
        self.partial = partial
        self._install_hooks()
        return newly_whole

    def _install_hooks(self) -> None:
        """One post-accumulate-grad hook per partially frozen tensor, which zeroes its frozen
        ranges right after backward accumulates into ``.grad`` (every micro-batch under
        gradient accumulation; under DDP before the reducer reads the gradient, so the
        averaged gradient is zero there too). Rebuilt at every change of the frozen set.

        Sharded (FSDP2) parameters get none: FSDP2 assigns their gradients after its
        reduce-scatter, without accumulating into them; ``step`` and ``mask_frozen_grads``
        mask those."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        # A weak reference: a hook left on a parameter must not keep a discarded wrapper alive
        # (it then does nothing).
        ref = weakref.ref(self)
        for i in self.partial.index:
            p = self.params[i]
            if not is_dtensor(p):
                self._hooks.append(p.register_post_accumulate_grad_hook(_bind(_mask_hook, ref, i)))

    def __getstate__(self) -> Dict[str, Any]:
        # Hook handles belong to these parameters; a copy installs hooks on its own.
        state = self.__dict__.copy()
        state["_hooks"] = []
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._install_hooks()


def _mask_hook(ref: "weakref.ref[Freezer]", i: int, param: Tensor) -> None:
    freezer = ref()
    if freezer is not None and freezer.params[i] is param:
        freezer.partial.mask_grad(i)


def _range_mask(shape: torch.Size, ranges: List[Tuple[int, int]], device) -> Tensor:
    """Bool tensor of ``shape``: True at the flat (row-major) offsets in ``ranges``."""
    flat = torch.zeros(shape.numel(), dtype=torch.bool, device=device)
    for b, e in ranges:
        flat[b:e] = True
    return flat.view(shape)


class PartialFreeze:
    """The frozen element ranges of partially frozen tensors, with a preallocated save buffer.

    Ranges are flat offsets in row-major (logical) order. For a contiguous tensor they are
    views: per step two ``_foreach_copy_`` calls and one ``_foreach_zero_``, no allocation
    beyond the views. A tensor with other strides (``channels_last``, a transposed view) gets
    a bool mask of its shape instead (``masked_fill_`` / ``masked_select`` /
    ``masked_scatter_``, which follow any strides; the save allocates once per step).
    """

    def __init__(self, params: List[Tensor], ranges: Dict[int, List[Tuple[int, int]]]):
        self.ranges = {i: r for i, r in ranges.items() if r}
        self.params = params
        self.index = sorted(self.ranges)
        self.param_views: List[Tensor] = []
        self.buffer_views: List[Tensor] = []
        self.masks: Dict[int, Tensor] = {}    # non-contiguous tensors: frozen elements
        self.saved: Dict[int, Tensor] = {}
        self._build()

    def _build(self) -> None:
        self.param_views.clear()
        self.buffer_views.clear()
        self.masks.clear()
        offsets: Dict[Tuple[torch.device, torch.dtype], int] = {}
        sizes: Dict[Tuple[torch.device, torch.dtype], int] = {}
        strided = []
        for i in self.index:
            p = local(self.params[i])
            if not p.is_contiguous():
                strided.append(i)
                self.masks[i] = _range_mask(p.shape, self.ranges[i], p.device)
                continue
            key = (p.device, p.dtype)
            sizes[key] = sizes.get(key, 0) + sum(e - b for b, e in self.ranges[i])
        self.buffers = {k: torch.empty(n, dtype=k[1], device=k[0]) for k, n in sizes.items()}
        self._ptrs = []
        for i in self.index:
            p = local(self.params[i])
            self._ptrs.append((p.data_ptr(), p.stride()))
            if i in self.masks:
                continue
            flat = p.detach().view(-1)
            key = (p.device, p.dtype)
            for b, e in self.ranges[i]:
                o = offsets.get(key, 0)
                self.param_views.append(flat[b:e])
                self.buffer_views.append(self.buffers[key][o:o + e - b])
                offsets[key] = o + e - b

    def _fresh(self) -> None:
        # A user may replace a parameter's storage (e.g. model.to(), load_state_dict(assign),
        # model.to(memory_format=...)): then the cached views would point at the old storage.
        now = [(local(self.params[i]).data_ptr(), local(self.params[i]).stride())
               for i in self.index]
        if now != self._ptrs:
            self._build()

    def mask_grads(self) -> None:
        """Zero the frozen ranges of every partially frozen tensor's ``.grad``, in place."""
        views: List[Tensor] = []
        for i in self.index:
            self._mask(i, views)
        if views:
            torch._foreach_zero_(views)

    def mask_grad(self, i: int) -> None:
        """Zero the frozen ranges of tensor ``i``'s ``.grad`` (no-op if it is not partial)."""
        if i not in self.ranges:
            return
        views: List[Tensor] = []
        self._mask(i, views)
        if views:
            torch._foreach_zero_(views)

    def _mask(self, i: int, views: List[Tensor]) -> None:
        g = local(self.params[i].grad)
        if g is None:
            return
        if not g.is_contiguous():
            # In place whatever the strides (a DTensor's local shard cannot be swapped for
            # another tensor).
            mask = self.masks.get(i)
            if mask is None or mask.shape != g.shape:
                mask = _range_mask(g.shape, self.ranges[i], g.device)
            g.masked_fill_(mask, 0)
            return
        flat = g.view(-1)
        views.extend(flat[b:e] for b, e in self.ranges[i])

    def save(self) -> None:
        # Saved every step rather than once at the freeze: a user who loads weights into the
        # model later (model.load_state_dict copies in place) must not see them overwritten by
        # values captured before.
        self._fresh()
        if self.param_views:
            torch._foreach_copy_(self.buffer_views, self.param_views)
        for i, mask in self.masks.items():
            self.saved[i] = local(self.params[i]).detach().masked_select(mask)

    def restore(self) -> None:
        if self.param_views:
            torch._foreach_copy_(self.param_views, self.buffer_views)
        for i, mask in self.masks.items():
            local(self.params[i]).detach().masked_scatter_(mask, self.saved[i])


def merge_ranges(ranges: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    out: List[List[int]] = []
    for b, e in ranges:
        if out and out[-1][1] == b:
            out[-1][1] = e
        else:
            out.append([b, e])
    return [(b, e) for b, e in out]
