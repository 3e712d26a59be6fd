"""The Estimator protocol and the registry of step-wise Fisher estimators.

FisherAdapTune drives an estimator through this interface only, so a new estimator is a
subclass plus (optionally) a registered name; the wrapper is not edited. Write one as::

    @fisheradaptune.fisher.register_estimator("my_fisher")
    class MyFisher(fisheradaptune.fisher.Estimator):
        def __init__(self, params, layout=None, *, model=None, decay=0.9): ...
        def update(self, grads, *, grad_scale=1.0): ...   # -> (group_sums or None, nonfinite)
        def snapshot(self): ...                            # -> one Fisher per tensor (float32)
        def release(self, indices): ...
        def restore(self, indices): ...

and pass ``estimator="my_fisher"`` (or the class itself) to ``FisherAdapTune``.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import Tensor, nn

from ..groups import GroupLayout

__all__ = ["Estimator", "register_estimator", "available_estimators", "make_estimator",
           "estimator_class"]


class Estimator(abc.ABC):
    """A diagonal Fisher estimate of ``params``, updated once per optimizer step.

    Constructor: ``Estimator(params, layout=None, *, model=None, decay=0.9)``, where ``params``
    are the tracked tensors (this rank's parts of them when sharded), ``layout`` a
    :class:`GroupLayout` over them, ``model`` the model (for hook-based estimators; may be
    None) and ``decay`` the EMA decay in [0, 1].

    Tensors are addressed by their index in ``params``. Released tensors (frozen whole) are
    no longer tracked: their snapshot entry is ``None`` and their memory should be freed.
    """

    #: The name it is registered under (set by :func:`register_estimator`).
    name: str = ""
    #: Whether it can run on this rank's shards of the tensors (FSDP2, DDP ``shard_state``):
    #: its update must read only the gradient elements it is given.
    supports_sharding: bool = False

    @abc.abstractmethod
    def update(self, grads: Sequence[Optional[Tensor]], *, grad_scale: float = 1.0
               ) -> Tuple[Optional[Tensor], Tensor]:
        """Fold one step's gradients in (``grads[i]`` is ``params[i]``'s, or None).

        Returns ``(group_sums, nonfinite)``: float32 per-group sums of the updated Fisher over
        ``layout`` (or None, then :meth:`group_sums` computes them from the snapshot) and a
        0-d int64 count of skipped non-finite elements (a tensor: reading it synchronises).
        """

    @abc.abstractmethod
    def snapshot(self) -> List[Optional[Tensor]]:
        """The current Fisher of every tensor (``None`` once released), shaped like it: float32
        (``EmpiricalFisher(dtype=torch.bfloat16)``: bfloat16, FisherAdapTune's
        ``fisher_dtype``). The wrapper may keep references to them until the next update."""

    @abc.abstractmethod
    def release(self, indices: Iterable[int]) -> None:
        """Stop tracking the tensors at ``indices`` and free what they hold."""

    @abc.abstractmethod
    def restore(self, indices: Iterable[int]) -> None:
        """Track released tensors again."""

    def group_sums(self, layout: GroupLayout) -> Tensor:
        """Per-group sums (float64, CPU) of the current Fisher over ``layout``."""
        snap = self.snapshot()
        out = torch.zeros(layout.num_groups, dtype=torch.float64)
        for t, b, e, g in layout.segments.tolist():
            if snap[t] is not None and e > b:
                out[g] += float(snap[t].reshape(-1)[b:e].double().sum())
        return out

    def buffers(self) -> List[Optional[Tensor]]:
        """Per-tensor state saved as tensors (sharded in distributed checkpoints), one entry
        per tracked tensor, shaped like it; ``None`` where there is none (the default)."""
        return [None] * len(getattr(self, "params", ()))

    def load_buffers(self, buffers: Sequence[Optional[Tensor]]) -> None:
        """Restore what :meth:`buffers` returned (called after :meth:`load_state_dict`)."""

    def state_dict(self) -> Dict[str, Any]:
        """Everything but :meth:`buffers`, for ``torch.save``."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        """Remove hooks and the like (called when the estimator is no longer used)."""


_REGISTRY: Dict[str, Type[Estimator]] = {}


def register_estimator(name: str) -> Callable[[Type[Estimator]], Type[Estimator]]:
    """Class decorator: make an :class:`Estimator` subclass available by ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"argument 'name': expected a non-empty string, got {name!r}")

    def register(cls: Type[Estimator]) -> Type[Estimator]:
        if not (isinstance(cls, type) and issubclass(cls, Estimator)):
            raise TypeError(f"register_estimator({name!r}): expected an Estimator subclass, got "
                            f"{cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"register_estimator: {name!r} is already registered to "
                             f"{_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return register


def available_estimators() -> Tuple[str, ...]:
    """The registered step-wise estimator names."""
    return tuple(_REGISTRY)


EstimatorSpec = Union[str, Type[Estimator]]


def estimator_class(spec: EstimatorSpec, arg: str = "estimator") -> Type[Estimator]:
    """The class a name or class ``spec`` stands for; ``ValueError``/``TypeError`` naming
    ``arg`` otherwise."""
    if isinstance(spec, str):
        if spec not in _REGISTRY:
            raise ValueError(f"argument '{arg}': expected one of {available_estimators()} or an "
                             f"Estimator subclass, got {spec!r}")
        return _REGISTRY[spec]
    if isinstance(spec, type) and issubclass(spec, Estimator):
        return spec
    raise TypeError(f"argument '{arg}': expected an estimator name or an Estimator subclass, "
                    f"got {type(spec).__name__}")


def make_estimator(spec: EstimatorSpec, params: Sequence[Tensor],
                   layout: Optional[GroupLayout], model: Optional[nn.Module],
                   decay: float, dtype: Optional[torch.dtype] = None) -> Estimator:
    """Build the estimator ``spec`` (a registered name or an Estimator subclass). ``dtype``
    (the Fisher buffers' dtype) is passed on only when given: estimators that do not take
    it are built as before."""
    extra = {} if dtype is None else {"dtype": dtype}
    est = estimator_class(spec)(params, layout, model=model, decay=decay, **extra)
    if not isinstance(est, Estimator):
        raise TypeError(f"argument 'estimator': {spec!r} built a {type(est).__name__}, not an "
                        "Estimator")
    return est


def check_decay(decay: float, arg: str = "decay") -> float:
    decay = float(decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"argument '{arg}': expected a value in [0, 1], got {decay}")
    return decay


def default_scale(decay: float) -> float:
    # decay < 1: an EMA, F <- decay F + (1 - decay) g^2. decay == 1: a plain running sum.
    return 1.0 - decay if decay < 1.0 else 1.0
