"""What the optimizer wrappers (FisherAdapTune, MaskedOptimizer) share with torch.optim."""
from __future__ import annotations

from collections import OrderedDict

import torch

_HOOK_DICTS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
               "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
               "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")


def check_optimizer(optimizer) -> None:
    """Raise ``TypeError`` naming the argument unless ``optimizer`` is a torch optimizer."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("argument 'optimizer': expected a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")


def share_optimizer(wrapper: torch.optim.Optimizer, optimizer: torch.optim.Optimizer) -> None:
    """Make ``wrapper`` a ``torch.optim.Optimizer`` view of ``optimizer``.

    ``defaults``, ``state`` and ``param_groups`` are shared, not copied, so LR schedulers,
    ``GradScaler`` and users see one set of them whichever object they hold; the wrapper gets
    its own hook registries and profiled ``step``, as ``Optimizer.__init__`` would give it.
    """
    wrapper.defaults = optimizer.defaults
    wrapper.state = optimizer.state
    wrapper.param_groups = optimizer.param_groups
    for name in _HOOK_DICTS:
        setattr(wrapper, name, OrderedDict())
    wrapper._patch_step_function()
