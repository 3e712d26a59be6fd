"""JS drift over tensors sharded across ranks: every rank gets the unsharded distance
(docs/methods.md section 3, "Sharded drift")."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .. import ops
from ..groups import GroupLayout
from . import comm
from .sharding import Sharding

__all__ = ["js_drift"]


def js_drift(current: Sequence[Tensor], reference: Sequence[Tensor], layout: GroupLayout,
             sharding: Optional[Sharding], *, drift_mode: str = "mass",
             update_reference: Optional[float] = None, base: str = "e",
             global_layout: Optional[GroupLayout] = None, tensors: Optional[Sequence[int]] = None,
             **kwargs) -> Tensor:
    """:func:`fisheradaptune.ops.js_drift` over tensors sharded across ranks; every rank gets
    the distance of the unsharded tensors.

    ``current``/``reference`` are this rank's local parts and ``layout`` the local layout
    (:func:`local_layout`). ``"mass"`` (exact, cheap): per-group totals are all-reduced, then
    each rank sums JS^2 terms of its elements against the global totals, and those sums are
    all-reduced (two all-reduces of ``2G`` and ``G`` doubles). ``"histogram"`` needs exact
    quantiles of each group's union of values, so it all-gathers the full snapshots
    (``global_layout`` and the tracked-tensor indices ``tensors`` are then required), one set
    of tensors linked by shared groups at a time: a single tensor for slab and per-tensor
    layouts, a module's tensors for ``per_module``. That set's full float32 snapshots are held
    transiently on every rank; "mass" gathers nothing.
    """
    if sharding is None:
        return ops.js_drift(current, reference, layout, drift_mode=drift_mode, base=base,
                            update_reference=update_reference, **kwargs)
    if drift_mode == "mass":  # histogram-only kwargs are ignored, as ops.js_drift does
        totals = comm.all_reduce_(ops.js_mass_totals(current, reference, layout), sharding.group)
        js = comm.all_reduce_(ops.js_mass_partial(current, reference, layout, totals,
                                                  update_reference=update_reference),
                              sharding.group)
        out = js.clamp_min(0.0)
        if base == "2":
            out = out / math.log(2.0)
        out = out.sqrt()
        scored = (totals[0] > 0) & (totals[1] > 0)
        return torch.where(scored, out, torch.zeros_like(out)).float()
    if global_layout is None or tensors is None:
        raise ValueError("distributed.js_drift: drift_mode \"histogram\" needs global_layout and tensors")
    # One set of tensors linked by shared groups at a time (a single tensor for slab and
    # per-tensor layouts), so only that set is ever gathered; every group lies in one set.
    out = None
    for part in _linked_tensors(global_layout):
        full_c = [comm.full_tensor(sharding.to_global(tensors[k], current[k])) for k in part]
        full_r = [comm.full_tensor(sharding.to_global(tensors[k], reference[k])) for k in part]
        d = ops.js_drift(full_c, full_r, global_layout.subset(part), drift_mode=drift_mode, base=base,
                         update_reference=update_reference, **kwargs)
        out = d if out is None else out + d  # groups outside `part` score exactly 0 here
        if update_reference is not None:
            for k, fr in zip(part, full_r):
                reference[k].copy_(sharding.to_local(tensors[k], fr))
    if out is None:
        device = current[0].device if current else torch.device("cpu")
        out = torch.zeros(global_layout.num_groups, dtype=torch.float32, device=device)
    return out


def _linked_tensors(layout: GroupLayout) -> List[List[int]]:
    """The tensors of ``layout`` in sets such that every group's elements lie in one set (the
    connected components of the tensor-group relation), each in tensor order."""
    parent = list(range(layout.num_tensors))

    def root(t: int) -> int:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t
    first: Dict[int, int] = {}
    for t, b, e, g in layout.segments.tolist():
        if g in first:
            parent[root(t)] = root(first[g])
        else:
            first[g] = t
    sets: Dict[int, List[int]] = {}
    for t in range(layout.num_tensors):
        sets.setdefault(root(t), []).append(t)
    return list(sets.values())
