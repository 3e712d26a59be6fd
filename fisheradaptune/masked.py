"""MaskedOptimizer: train only the selected entries of a TR-PTS selection (``mode="mask"``).

Wraps any ``torch.optim`` optimizer. Per step, for each selected weight ``W`` with index
``idx [out, C]``:

1. gradient: the selected entries are gathered into a preallocated ``[out, C]`` buffer, the
   gradient is zeroed and they are scattered back, so unselected entries get a zero gradient
   (optimizer state for them stays at zero for momentum/Adam-style optimizers);
2. save: ``W`` is copied into a preallocated buffer of its shape;
3. the wrapped optimizer steps (weight decay, momentum, ... may move any entry);
4. restore: the new selected values are gathered, ``W`` is copied back from the buffer and the
   new selected values scattered into it, so unselected entries are bit-identical to their
   values before the step, whatever the optimizer did.

This is :class:`fisheradaptune.optim`'s save/step/restore for partially frozen tensors, with
a row-balanced index in place of element ranges: no allocation per step beyond the ops
themselves (buffers are built once, and again only if a weight's storage is replaced).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn

from ._wrapped import WrappedOptimizer
from .selection import Selection

__all__ = ["MaskedOptimizer"]


class _Masked:
    """One selected weight's index and preallocated buffers."""

    def __init__(self, name: str, param: Tensor, index: Tensor):
        self.name = name
        self.param = param
        self.cpu_index = index
        self._build()

    def _build(self) -> None:
        p = self.param
        self.index = self.cpu_index.to(p.device)
        self.saved = torch.empty_like(p, memory_format=torch.contiguous_format)
        self.values = torch.empty(self.index.shape, dtype=p.dtype, device=p.device)
        self.grad_values = torch.empty(self.index.shape, dtype=p.dtype, device=p.device)
        self.ptr = p.data_ptr()

    def fresh(self) -> None:
        if self.param.data_ptr() != self.ptr or self.index.device != self.param.device \
                or self.saved.dtype != self.param.dtype:
            self._build()

    def mask_grad(self) -> None:
        g = self.param.grad
        if g is None:
            return
        if self.grad_values.dtype != g.dtype or self.grad_values.device != g.device:
            self.grad_values = torch.empty(self.index.shape, dtype=g.dtype, device=g.device)
        torch.gather(g, 1, self.index, out=self.grad_values)
        g.zero_()
        g.scatter_(1, self.index, self.grad_values)


def _check_dense_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Refuse optimizers that cannot step a dense gradient: the selected weights are whole
    Linear weights whose gradients are dense (masked, not sparse)."""
    if isinstance(optimizer, torch.optim.SparseAdam):
        raise TypeError(f"argument 'optimizer': {type(optimizer).__name__} steps only sparse "
                        "gradients (nn.Embedding(sparse=True)); the selected Linear weights get "
                        "dense gradients: use torch.optim.Adam or AdamW")


class MaskedOptimizer(WrappedOptimizer):
    """Wrap ``optimizer`` so that only the selected entries of ``selection``'s weights change.

    Args:
        optimizer: any ``torch.optim`` optimizer over (some of) the parameters returned by
            ``selection.apply(model, mode="mask")``. Its ``param_groups`` and ``state`` are the
            wrapper's (the same objects), so LR schedulers keep working.
        selection: a :class:`~fisheradaptune.selection.Selection` applied in mask mode.
        model: optional; when given, the selected weights are looked up in it instead of in
            what the last ``selection.apply`` recorded.

    Parameters that are not selected weights (biases, the head) are stepped densely. The state
    dict is the wrapped optimizer's (the selection itself is saved with ``Selection.save``).

    Any ``torch.optim`` optimizer keeps the contract (unselected entries bit-identical), since
    the wrapper restores them after every step whatever the optimizer did; each one and each
    of its CPU variants (foreach, fused, maximize, ...) is checked by the optimizer sweep in
    tests/selection. ``SparseAdam`` is refused (``TypeError``): it steps sparse gradients only.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, selection: Selection,
                 model: Optional[nn.Module] = None):
        super().__init__(optimizer)
        _check_dense_optimizer(optimizer)
        if not isinstance(selection, Selection):
            raise TypeError(f"argument 'selection': expected a Selection, got "
                            f"{type(selection).__name__}")
        if model is not None:
            mods = selection._modules(model)
            weights = {n: m.weight for n, m in mods.items() if selection.c[n] > 0}
        else:
            weights = selection._weights
            if not weights:
                raise ValueError("argument 'selection': call selection.apply(model, mode='mask') "
                                 "first, or pass model=")
        self.selection = selection
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.masked: List[_Masked] = [
            _Masked(n, w, selection.index[n]) for n, w in weights.items() if id(w) in in_opt]
        for m in self.masked:
            if m.param.dim() != 2:
                raise ValueError(f"argument 'selection': {m.name!r} is not a 2-D weight")

    def _prepare_grads(self) -> None:
        for m in self.masked:
            m.fresh()
            m.mask_grad()

    def _before_step(self) -> None:
        if self.masked:
            torch._foreach_copy_([m.saved for m in self.masked], [m.param for m in self.masked])

    def _after_step(self) -> None:
        for m in self.masked:
            torch.gather(m.param, 1, m.index, out=m.values)
        if self.masked:
            torch._foreach_copy_([m.param for m in self.masked], [m.saved for m in self.masked])
        for m in self.masked:
            m.param.scatter_(1, m.index, m.values)

    def __repr__(self) -> str:
        return (f"MaskedOptimizer({type(self.optimizer).__name__}, "
                f"{len(self.masked)} masked weights)")
