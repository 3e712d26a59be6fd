"""select_connections: TR-PTS selection of a model's Linear connections from a Fisher over
calibration batches (docs/methods.md section 5), averaged over ranks under a process group."""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Sequence

from torch import Tensor, nn

from .. import fisher as fisher_mod
from ..adapters import find_head
from ..distributed import comm
from .algorithm import select_from_fisher
from .checks import check_budget, check_c_min, check_not_peft, check_untied
from .result import Selection

__all__ = ["select_connections"]


def _counts(model: nn.Module, linears: Dict[str, nn.Linear], head: Optional[str]) -> Dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    bias = sum(m.bias.numel() for m in linears.values() if m.bias is not None)
    head_n = 0
    if head is not None:
        head_n = sum(p.numel() for p in dict(model.named_modules())[head].parameters())
    return {"total": total, "bias": bias, "head": head_n}


def _average_across_ranks(fisher: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """Under an initialised process group, each layer's Fisher averaged over the ranks that
    train ``model``, so that every rank ranks the same values. Exact for the global Fisher
    when every rank saw as many calibration samples."""
    group = comm.group_of(model)
    world = comm.world_size(group)
    if world == 1:
        return fisher
    out = {n: comm.all_reduce_(fisher[n].clone(), group) / world
           for n in sorted(fisher)}  # one order on every rank
    return {n: out[n] for n in fisher}


def _broadcast_from_rank0(index: Dict[str, Tensor], model: nn.Module) -> None:
    """Make the first rank's selection every rank's. The ranks rank identical all-reduced
    values, so their C_l (the shapes) agree; the broadcast guarantees the indices do too."""
    group = comm.group_of(model)
    for n in sorted(index):
        comm.broadcast_(index[n], group)


def select_connections(model: nn.Module, batches: Iterable, loss_fn: Callable, *,
                       budget: float = 0.005, c_min: int = 1, estimator: str = "per_sample",
                       modules: Optional[Sequence[str]] = None, train_bias: bool = True,
                       train_head: bool = True, skip_empty: bool = False,
                       loss_reduction: str = "mean") -> Selection:
    """TR-PTS selection of ``model``'s Linear connections (docs/methods.md section 5; see the
    package doc).

    ``modules``: names of ``nn.Linear`` modules (default: every ``nn.Linear`` except the head,
    :func:`fisheradaptune.adapters.find_head`). ``loss_fn(model, batch)`` returns the scalar
    loss; ``estimator`` is one of :data:`fisheradaptune.fisher.CALIBRATION_ESTIMATORS`.
    ``budget`` is the fraction of the chosen weights' entries selected, ``c_min`` the least
    number per row (:func:`select_from_fisher`); a larger budget selects a superset.

    Refused before anything runs (``ValueError``): a peft model (its adapters would be frozen
    and the trained base weights not saved by peft: select on the plain model, before
    ``get_peft_model`` or after ``merge_and_unload()``), and a chosen module whose weight is
    shared with another module (tied weights, named both; leave it out of ``modules`` or untie).

    Distributed: under an initialised process group (e.g. a DDP-wrapped ``model`` with each
    rank calibrating on its own shard), the Fisher is averaged over ranks before the top-k and
    rank 0's indices are broadcast, so every rank trains the same connections.
    """
    budget = check_budget(budget)
    c_min = check_c_min(c_min)
    if estimator not in fisher_mod.CALIBRATION_ESTIMATORS:
        raise ValueError(f"argument 'estimator': expected one of {fisher_mod.CALIBRATION_ESTIMATORS}, "
                         f"got {estimator!r}")
    check_not_peft(model)
    head = find_head(model)
    all_mods = dict(model.named_modules())
    if modules is None:
        names = [n for n, m in all_mods.items()
                 if isinstance(m, nn.Linear) and n != head]
        if not names:
            raise ValueError("argument 'modules': the model has no nn.Linear besides the head")
    else:
        names = [modules] if isinstance(modules, str) else list(modules)
        if not names:
            raise ValueError("argument 'modules': expected at least one module name")
        for n in names:
            if n not in all_mods:
                raise ValueError(f"argument 'modules': the model has no module {n!r}")
            if not isinstance(all_mods[n], nn.Linear):
                raise ValueError(f"argument 'modules': {n!r} is a {type(all_mods[n]).__name__}, "
                                 f"expected an nn.Linear")
        if len(set(names)) != len(names):
            raise ValueError("argument 'modules': contains duplicates")
    linears = {n: all_mods[n] for n in names}
    check_untied(model, names)
    if head in linears:   # a chosen head is trained sparsely like the other chosen modules
        head = None
    with fisher_mod.calibration.weights_requiring_grad(model, linears.values()):
        fisher = fisher_mod.estimate(model, batches, loss_fn, estimator=estimator, modules=names,
                                     loss_reduction=loss_reduction)
    fisher = _average_across_ranks({n: fisher[n] for n in names}, model)
    index, c = select_from_fisher(fisher, budget, c_min, skip_empty)
    _broadcast_from_rank0(index, model)
    return Selection(index=index, c=c,
                     shapes={n: tuple(int(s) for s in m.weight.shape) for n, m in linears.items()},
                     budget=budget, c_min=c_min, estimator=estimator, skip_empty=skip_empty,
                     train_bias=bool(train_bias), train_head=bool(train_head), head=head,
                     counts=_counts(model, linears, head))
