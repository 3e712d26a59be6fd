"""Autograd kernels of the ops that have no derivative: never a silent zero gradient.

An op with no kernel at the ``Autograd`` dispatch key gets PyTorch's fallback, which marks its
outputs as requiring grad when an input does and, at backward, leaves the inputs' ``.grad`` at
``None`` with only a warning: a drift used in a loss would contribute nothing, silently. Each op
below therefore gets an ``Autograd`` kernel that says what it does with inputs that require
grad, before it runs:

- **Statistics** (``fisher_accumulate_``, ``per_sample_grad_sq_``) treat their inputs as data:
  they accumulate squared gradients into a Fisher buffer, a quantity nothing differentiates
  through (under ``loss.backward(create_graph=True)`` the ``.grad`` they read requires grad).
  They run below autograd, so what they write never requires grad.
- **Distances and backward helpers** (``js_drift``, ``js_mass_totals``, ``js_mass_partial``,
  ``token_prune_merge_backward``, ``bipartite_merge_backward``) refuse, with grad mode on, an
  input that requires grad, naming the op and the argument: their derivatives are not
  implemented, and a result that would not carry one must not look as if it did. Detach the
  inputs or call them under ``torch.no_grad()``. (Higher-order gradients through the token ops
  never reach their ``*_backward`` ops: see ``ops.token_prune_merge``.)

Registered once at import (``fisheradaptune/__init__.py``), so direct ``torch.ops`` calls are
covered as well as the typed wrappers.
"""
from __future__ import annotations

from typing import Dict, Iterator, Tuple

import torch
from torch import Tensor

__all__ = ["register", "STATISTICS", "NOT_DIFFERENTIABLE"]

#: Ops whose tensor inputs are data: run below autograd, outputs never require grad.
STATISTICS: Tuple[str, ...] = ("fisher_accumulate_", "per_sample_grad_sq_")
#: Ops that refuse an input requiring grad while grad mode is on.
NOT_DIFFERENTIABLE: Tuple[str, ...] = ("js_drift", "js_mass_totals", "js_mass_partial",
                                       "token_prune_merge_backward", "bipartite_merge_backward")


def _requiring_grad(schema, args, kwargs) -> Iterator[str]:
    """Names of the read-only tensor arguments that require grad."""
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            continue  # written in place: _inplace refuses a leaf that requires grad
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        items = value if isinstance(value, (list, tuple)) else (value,)
        if any(isinstance(t, Tensor) and t.requires_grad for t in items):
            yield arg.name


def _statistic(name: str):
    op = getattr(torch.ops.fisheradaptune, name).default

    def kernel(*args, **kwargs):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args, **kwargs)
    return kernel


def _not_differentiable(name: str):
    op = getattr(torch.ops.fisheradaptune, name).default

    def kernel(*args, **kwargs):
        if torch.is_grad_enabled():
            for arg in _requiring_grad(op._schema, args, kwargs):
                raise RuntimeError(
                    f"fisheradaptune.{name}: argument '{arg}' requires grad, but {name} is not "
                    "differentiable (its result would carry no gradient); pass detached "
                    "tensors (.detach()) or call it under torch.no_grad()")
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args, **kwargs)
    return kernel


_lib = None


def register() -> None:
    """Register the Autograd kernels (idempotent)."""
    global _lib
    if _lib is not None:
        return
    lib = torch.library.Library("fisheradaptune", "IMPL")
    kernels: Dict[str, object] = {name: _statistic(name) for name in STATISTICS}
    kernels.update({name: _not_differentiable(name) for name in NOT_DIFFERENTIABLE})
    for name, kernel in kernels.items():
        lib.impl(name, kernel, "Autograd")
    _lib = lib
