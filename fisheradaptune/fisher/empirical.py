"""EmpiricalFisher: ``F <- decay * F + scale * g**2`` from ``.grad``, one fused op per step
(docs/methods.md section 1, ``empirical``)."""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from ..groups import GroupLayout
from .base import Estimator, check_decay, default_scale, register_estimator

__all__ = ["EmpiricalFisher", "FISHER_DTYPES"]

#: The Fisher buffer dtypes the ops write (Note [bfloat16 state], csrc/common/state.h).
FISHER_DTYPES = (torch.float32, torch.bfloat16)


@register_estimator("empirical")
class EmpiricalFisher(Estimator):
    """Empirical diagonal Fisher of ``params``: ``F <- decay * F + scale * grad**2`` per step.

    Args:
        params: the tensors to track (their ``.grad`` is read by :meth:`update`).
        layout: a :class:`GroupLayout` over ``params``; :meth:`update` then also returns the
            per-group sums of the updated Fisher.
        decay: EMA decay ``beta`` in [0, 1].
        scale: weight of the new squared gradient; default ``1 - decay`` (``1`` when
            ``decay == 1``, giving a plain running sum).
        dtype: the buffers' dtype, ``torch.float32`` (default) or ``torch.bfloat16`` (half
            the memory; the op computes in float32 and rounds once to bfloat16 on store,
            docs/methods.md "Fisher buffers in bfloat16").

    Buffers are allocated at the first update. :meth:`release` frees the buffer of a
    tensor that will never be tracked again (e.g. frozen whole).
    """

    supports_sharding = True  # elementwise: a shard's Fisher needs only that shard's gradient

    def __init__(self, params: Sequence[Tensor], layout: Optional[GroupLayout] = None, *,
                 model: Optional[nn.Module] = None, decay: float = 0.9,
                 scale: Optional[float] = None, dtype: torch.dtype = torch.float32):
        if dtype not in FISHER_DTYPES:
            raise ValueError(f"argument 'dtype': expected torch.float32 or torch.bfloat16, got "
                             f"{dtype!r}")
        self.dtype = dtype
        self.params = list(params)
        self.decay = check_decay(decay)
        self.scale = default_scale(self.decay) if scale is None else float(scale)
        if layout is not None:
            layout.check_tensors(self.params, arg="params")
        self.layout = layout
        self.fisher: List[Optional[Tensor]] = [None] * len(self.params)
        self._released: set = set()
        self._active_layout: Optional[GroupLayout] = layout
        self._active = list(range(len(self.params)))
        self.steps = 0

    def _buffer(self, i: int) -> Tensor:
        if self.fisher[i] is None:
            p = self.params[i]
            self.fisher[i] = torch.zeros(p.shape, dtype=self.dtype, device=p.device)
        return self.fisher[i]

    def active(self) -> List[int]:
        """Indices of the tensors still tracked (a copy)."""
        return list(self._active)

    def _released_changed(self) -> None:
        # Derived once per release/restore rather than on every update.
        self._active = [i for i in range(len(self.params)) if i not in self._released]
        if self.layout is not None:
            self._active_layout = self.layout.subset(self._active)

    def update(self, grads: Optional[Sequence[Optional[Tensor]]] = None, *,
               grad_scale: float = 1.0) -> Tuple[Optional[Tensor], Tensor]:
        """Fold the current gradients in (``params[i].grad`` when ``grads`` is None), divided
        by ``grad_scale``. Returns ``(group_sums, nonfinite)`` (see the op)."""
        idx = self._active
        if grads is None:
            grads = [p.grad for p in self.params]
        fisher = [self._buffer(i) for i in idx]
        scale = self.scale if grad_scale == 1.0 else self.scale / float(grad_scale) ** 2
        sums, bad = ops.fisher_accumulate_(fisher, [grads[i] for i in idx], decay=self.decay,
                                           scale=scale, layout=self._active_layout)
        self.steps += 1
        return sums, bad

    def snapshot(self) -> List[Optional[Tensor]]:
        """The current Fisher of each tracked tensor (``None`` once released)."""
        return [None if i in self._released else self._buffer(i) for i in range(len(self.params))]

    def release(self, indices: Iterable[int]) -> None:
        """Stop tracking the tensors at ``indices`` and free their buffers."""
        for i in indices:
            self._released.add(int(i))
            self.fisher[int(i)] = None
        self._released_changed()

    def restore(self, indices: Iterable[int]) -> None:
        """Track released tensors again, from a zero Fisher."""
        for i in indices:
            self._released.discard(int(i))
        self._released_changed()

    def buffers(self) -> List[Optional[Tensor]]:
        return list(self.fisher)

    def load_buffers(self, buffers: Sequence[Optional[Tensor]]) -> None:
        for i, f in enumerate(buffers):
            if f is not None and i not in self._released:
                self._buffer(i).copy_(f)

    def state_dict(self) -> dict:
        return {"released": sorted(self._released), "steps": self.steps,
                "decay": self.decay, "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.restore(list(self._released))
        self.release(state["released"])
        self.steps = int(state["steps"])
