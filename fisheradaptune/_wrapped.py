"""WrappedOptimizer: the ``torch.optim.Optimizer`` contract for optimizers that wrap another.

FisherAdapTune and MaskedOptimizer (and the demo's static-mask baseline) all do work around a
wrapped optimizer's step. This base owns everything they share with ``torch.optim``, so each
subclass only says what happens before and after the wrapped step:

- ``defaults``, ``state`` and ``param_groups`` *are* the wrapped optimizer's (properties, not
  copies): ``opt.param_groups is opt.optimizer.param_groups`` at all times, also after
  ``load_state_dict`` replaces them, so an LR scheduler or ``GradScaler`` attached to either
  object changes the one set the wrapped optimizer reads.
- step hooks, the profiler label and ``zero_grad`` behave as ``Optimizer``'s.
- closures: the wrapper evaluates the closure once and hands the wrapped optimizer a closure
  whose first call returns that loss; later calls (LBFGS's line search) re-evaluate it and
  run :meth:`_prepare_grads` again, so frozen or unselected entries stay masked.
- state dicts: a subclass with state of its own nests it under :attr:`_state_key` next to the
  wrapped optimizer's; loading checks both parts (:meth:`_check_state_dict`) before it changes
  anything, and something else raises a ``ValueError`` naming the problem.
- ``deepcopy`` and pickling copy the whole wrapper (``Optimizer.__getstate__`` would keep only
  the three shared attributes), minus an LR scheduler's patch of ``step``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, Optional

import torch

__all__ = ["WrappedOptimizer", "check_optimizer"]

_HOOK_DICTS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
               "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
               "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")


def check_optimizer(optimizer: Any, arg: str = "optimizer") -> None:
    """Raise ``TypeError`` naming ``arg`` unless ``optimizer`` is a torch optimizer."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"argument '{arg}': expected a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")


def _shared(name: str):
    def get(self):
        return getattr(self.optimizer, name)

    def set(self, value):  # noqa: A001  (the property setter)
        setattr(self.optimizer, name, value)
    return property(get, set, doc=f"The wrapped optimizer's ``{name}`` (the same object).")


def _check_matches(optimizer: torch.optim.Optimizer, inner: Any) -> None:
    """The checks ``Optimizer.load_state_dict`` makes, made before the wrapper changes its own
    state, so that a mismatch leaves both untouched."""
    groups = inner.get("param_groups") if isinstance(inner, dict) else None
    if not isinstance(groups, list) or "state" not in inner:
        raise ValueError("argument 'state_dict': its 'optimizer' entry is not an optimizer "
                         "state dict")
    if len(groups) != len(optimizer.param_groups) or any(
            len(g["params"]) != len(s["params"]) for g, s in zip(optimizer.param_groups, groups)):
        raise ValueError("argument 'state_dict': its optimizer state has "
                         f"{[len(s['params']) for s in groups]} parameters per group, the wrapped "
                         f"optimizer {[len(g['params']) for g in optimizer.param_groups]}")


class WrappedOptimizer(torch.optim.Optimizer):
    """Base class of optimizers that add work around another optimizer's ``step``.

    Subclasses call ``super().__init__(optimizer)`` first and override any of:

    - :meth:`_prepare_grads`: after every evaluation of the gradients (once per step without
      a closure; after each closure call with one), e.g. zero the gradients of frozen entries;
    - :meth:`_before_step` / :meth:`_after_step`: around the wrapped optimizer's step, once per
      :meth:`step`;
    - :meth:`_own_state_dict` / :meth:`_load_own_state_dict` with :attr:`_state_key` set, to
      checkpoint state of their own.
    """

    #: Key of the subclass's own state in :meth:`state_dict`; None: the state dict is the
    #: wrapped optimizer's, unchanged.
    _state_key: Optional[str] = None

    defaults = _shared("defaults")
    state = _shared("state")
    param_groups = _shared("param_groups")

    def __init__(self, optimizer: torch.optim.Optimizer):
        check_optimizer(optimizer)
        # Not Optimizer.__init__: it would build param_groups of its own.
        self.__dict__["optimizer"] = optimizer
        for name in _HOOK_DICTS:
            setattr(self, name, OrderedDict())
        self._patch_step_function()

    # ------------------------------------------------------------------ hooks for subclasses
    def _prepare_grads(self) -> None:
        """Called whenever fresh gradients are in ``.grad`` (see the class docstring)."""

    def _before_step(self) -> None:
        """Called once per step, after :meth:`_prepare_grads`, before the wrapped step."""

    def _after_step(self) -> None:
        """Called once per step, after the wrapped step."""

    def _own_state_dict(self) -> Dict[str, Any]:
        return {}

    def _check_state_dict(self, own: Dict[str, Any], inner: Dict[str, Any]) -> None:
        """Raise unless ``own`` (this wrapper's part) and ``inner`` (the wrapped optimizer's,
        already checked against its parameter groups) can both be loaded; change nothing.
        Called before :meth:`_load_own_state_dict`, which may then assume a checked ``own``."""

    def _load_own_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ torch.optim API
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """Step the wrapped optimizer, with the subclass's work before and after it.

        ``closure`` (re-evaluates the model and returns the loss) is evaluated here once and
        passed on, so optimizers that need one (LBFGS) work; see the class docstring.
        """
        if closure is None:
            self._prepare_grads()
            self._before_step()
            self.optimizer.step()
            self._after_step()
            return None
        with torch.enable_grad():
            loss = closure()
        self._prepare_grads()
        self._before_step()
        first = [True]

        def again():
            if first[0]:
                first[0] = False
                return loss
            with torch.enable_grad():
                out = closure()
            self._prepare_grads()
            return out
        self.optimizer.step(again)
        self._after_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        raise RuntimeError(f"{type(self).__name__}: add parameter groups to the wrapped "
                           "optimizer before wrapping it (what the wrapper tracks is fixed at "
                           "construction)")

    def state_dict(self) -> Dict[str, Any]:
        """The wrapped optimizer's state dict, with this wrapper's own state (if any) next to
        it under :attr:`_state_key`."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        inner = self.optimizer.state_dict()
        out = inner if self._state_key is None else {"optimizer": inner,
                                                     self._state_key: self._own_state_dict()}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, out)
            if result is not None:
                out = result
        return out

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. Everything is checked before anything changes."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"argument 'state_dict': expected a dict, got "
                            f"{type(state_dict).__name__}")
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        if self._state_key is None:
            self.optimizer.load_state_dict(state_dict)
        else:
            if self._state_key not in state_dict or "optimizer" not in state_dict:
                plain = "state" in state_dict and "param_groups" in state_dict
                raise ValueError(
                    f"argument 'state_dict': not a {type(self).__name__} state dict (expected "
                    f"keys 'optimizer' and {self._state_key!r}, got {sorted(state_dict)})"
                    + ("; it looks like a plain optimizer's: load it with "
                       "opt.optimizer.load_state_dict(...)" if plain else ""))
            _check_matches(self.optimizer, state_dict["optimizer"])
            self._check_state_dict(state_dict[self._state_key], state_dict["optimizer"])
            self._load_own_state_dict(state_dict[self._state_key])
            self.optimizer.load_state_dict(state_dict["optimizer"])
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # ------------------------------------------------------------------ copying
    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        # An LR scheduler replaces `step` on the instance with a wrapper holding a weak
        # reference to *this* optimizer; a copy must get the class's step (and a scheduler of
        # its own), not one that steps the original.
        state.pop("step", None)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.optimizer).__name__})"
