"""Which optimizers FisherAdapTune accepts (docs/methods.md section 4, "Supported optimizers").

A freeze is exact only when the wrapped optimizer keeps to a contract the wrapper cannot check
from outside:

1. it updates every element from that element's gradient and state only (elementwise), so
   zeroed gradients and zeroed state in frozen ranges change nothing for the active elements;
2. it does not move a parameter whose ``.grad`` is None (how tensors frozen whole are skipped);
3. its per-parameter state tensors are scalars or shaped like the parameter (zeroed on frozen
   ranges at a freeze, checked on ``load_state_dict``).

The ``torch.optim`` classes below were verified to keep it, with every variant that runs on the
CPU (tests/adaptune/test_adaptune_optimizer_sweep.py enumerates ``torch.optim``). The classes in
:data:`REFUSED` break it and are never accepted. Any other optimizer (a subclass, a third-party
one, a ``torch.optim`` class added after this list) is refused unless the caller passes
``allow_unverified_optimizer=True``, asserting the contract above.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

__all__ = ["VERIFIED", "REFUSED", "check_supported"]

#: Exact classes verified to keep the contract (subclasses may override ``step``: unverified).
VERIFIED: Tuple[type, ...] = tuple(getattr(torch.optim, n) for n in (
    "SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Rprop", "Adagrad",
    "Adadelta", "ASGD"))

#: torch.optim classes that break the contract, by name (some torch versions lack some), with
#: the reason; refused even with ``allow_unverified_optimizer=True``, subclasses included.
REFUSED: Dict[str, str] = {
    "LBFGS": "it steps every parameter along a direction built from its curvature history, "
             "so tensors frozen whole (no gradient) still move, and it keeps that history under "
             "its first parameter, which a freeze would discard",
    "Adafactor": "its second moment is factored over rows and columns, so the zero gradients "
                 "of frozen slabs change the steps of the active elements",
    "Muon": "it orthogonalises each weight's whole update matrix, so frozen rows change the "
            "steps of the active ones",
    "SparseAdam": "it needs sparse gradients, which the Fisher estimate and the freezing do "
                  "not handle",
}


def _name(cls: type) -> str:
    if getattr(torch.optim, cls.__name__, None) is cls:
        return f"torch.optim.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _names(classes) -> str:
    return ", ".join(_name(c) for c in classes)


def check_supported(optimizer: torch.optim.Optimizer, allow_unverified: bool = False,
                    arg: str = "optimizer") -> None:
    """Raise ``ValueError`` naming ``arg`` and the optimizer's class unless FisherAdapTune can
    freeze exactly under it (see the module docstring)."""
    cls = type(optimizer)
    for name, reason in REFUSED.items():
        refused = getattr(torch.optim, name, None)
        if refused is not None and isinstance(optimizer, refused):
            raise ValueError(f"argument '{arg}': {_name(cls)} is not supported by "
                             f"FisherAdapTune: {reason}. Supported: "
                             f"{_names(VERIFIED)}")
    for gi, group in enumerate(optimizer.param_groups):
        if group.get("differentiable", False):
            # The restore of frozen values after the step is not part of the autograd graph
            # that differentiable=True builds through the update.
            raise ValueError(f"argument '{arg}': param_groups[{gi}] has differentiable=True, "
                             "which FisherAdapTune does not support (its restore of frozen "
                             "values is not differentiable)")
    if cls in VERIFIED or allow_unverified:
        return
    raise ValueError(
        f"argument '{arg}': {_name(cls)} is not a verified optimizer. "
        f"Supported: {_names(VERIFIED)}. To use another, pass allow_unverified_optimizer=True, "
        "asserting that it updates each element from its own gradient and state only, leaves "
        "parameters whose .grad is None untouched, and keeps only scalar or parameter-shaped "
        "state (docs/methods.md section 4)")
