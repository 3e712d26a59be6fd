"""torch.distributed support: FSDP2-sharded parameters, cross-rank reductions, checkpoints.

- :class:`Sharding` describes which part of every tracked tensor this rank holds when the
  parameters are ``fully_shard`` (FSDP2) DTensors (:func:`sharding_of`), or which part of a
  replicated DDP parameter's Fisher it keeps (:func:`row_sharding`, FisherAdapTune's
  ``shard_state``); :func:`local_layout` restricts a :class:`GroupLayout` to those parts, so
  the fused ops run on local parts unchanged.
- :func:`js_drift` scores drift over shards exactly: per-group totals and JS partial sums are
  all-reduced (Note [Sharded drift] in csrc/drift_math.h), so every rank gets the unsharded
  distance.
- :func:`agreed` makes a decision identical on every rank (rank 0's).
- :func:`save` and :func:`load` checkpoint a model and its (FisherAdapTune-wrapped) optimizer
  with ``torch.distributed.checkpoint``, sharded or not.

Supported sharding: every tracked parameter a DTensor on one 1-D device mesh, placed
``Shard(0)`` (FSDP2's default). Other placements (``Shard(1)`` from a ``shard_placement_fn``,
``Replicate()``, HSDP's 2-D meshes, tensor parallelism) are refused with an error naming the
parameter: the all-reduced sums would count replicated elements once per rank.
"""
from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import ops
from .groups import GroupLayout

__all__ = ["Sharding", "sharding_of", "row_sharding", "local", "local_layout", "js_drift",
           "agreed", "all_reduce_", "save", "load"]


@functools.lru_cache(maxsize=None)
def _dtensor_types():
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch without distributed support
        return None
    return DTensor, Shard


def is_dtensor(t: Any) -> bool:
    types = _dtensor_types()
    return types is not None and isinstance(t, types[0])


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """This rank's part of ``t``: its local tensor for a DTensor, ``t`` itself otherwise."""
    return t.to_local() if is_dtensor(t) else t


def initialized() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass(frozen=True)
class Sharding:
    """Where this rank's part of every tracked tensor lies.

    Each rank holds, of tensor ``i``, the elements ``[offsets[i], offsets[i] + numel)`` of the
    flattened global tensor, shaped ``local_shapes[i]`` (a ``Shard(0)`` DTensor's local part is
    a contiguous range of its flattened elements); the parts of all ranks tile the tensor.

    Attributes:
        mesh: the DTensors' 1-D device mesh.
        group: its process group, over which sums are all-reduced.
        offsets, local_shapes, global_shapes: per tracked tensor.
        placements: per tracked tensor, to rebuild DTensors for checkpoints.
    """

    mesh: Any
    group: Any
    offsets: Tuple[int, ...]
    local_shapes: Tuple[torch.Size, ...]
    global_shapes: Tuple[torch.Size, ...]
    placements: Tuple[tuple, ...]

    def to_local(self, i: int, value: Tensor) -> Tensor:
        """Tensor ``i``'s local part of ``value``: a DTensor's local shard (resharded to this
        tensor's placement first if needed), or a slice of a full (global-shaped) tensor."""
        if is_dtensor(value):
            if tuple(value.placements) != self.placements[i]:
                value = value.redistribute(self.mesh, self.placements[i])
            return value.to_local()
        if value.shape == self.global_shapes[i]:
            n = self.local_shapes[i].numel()
            return value.reshape(-1)[self.offsets[i]:self.offsets[i] + n].view(self.local_shapes[i])
        if value.shape == self.local_shapes[i]:
            return value
        raise ValueError(f"expected shape {tuple(self.global_shapes[i])} (global) or "
                         f"{tuple(self.local_shapes[i])} (this rank's shard), got {tuple(value.shape)}")

    def to_global(self, i: int, value: Tensor) -> Tensor:
        """Tensor ``i``'s local part ``value`` as a DTensor laid out like the parameter."""
        DTensor = _dtensor_types()[0]
        shape = self.global_shapes[i]
        return DTensor.from_local(value, self.mesh, self.placements[i], run_check=False,
                                  shape=shape, stride=_contiguous_stride(shape))


def _contiguous_stride(shape: torch.Size) -> Tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(stride))


def sharding_of(params: Sequence[Tensor], names: Optional[Sequence[str]] = None,
                arg: str = "optimizer") -> Optional[Sharding]:
    """The :class:`Sharding` of ``params``, or None if none is a DTensor.

    Raises ValueError (naming ``arg`` and the parameter) for a mix of DTensors and plain
    tensors, several meshes, a mesh with more than one dimension, or a placement other than
    ``Shard(0)``.
    """
    types = _dtensor_types()
    if types is None or not any(isinstance(p, types[0]) for p in params):
        return None
    DTensor, Shard = types
    names = list(names) if names is not None else [f"params[{i}]" for i in range(len(params))]
    mesh = None
    offsets, local_shapes, global_shapes, placements = [], [], [], []
    for name, p in zip(names, params):
        if not isinstance(p, DTensor):
            raise ValueError(f"argument '{arg}': parameter {name!r} is a plain tensor while others "
                             "are DTensors; shard every parameter of the optimizer (fully_shard "
                             "the root module too)")
        if mesh is None:
            mesh = p.device_mesh
            if mesh.ndim != 1:
                raise ValueError(f"argument '{arg}': parameter {name!r} lives on a {mesh.ndim}-D "
                                 "device mesh; FisherAdapTune supports 1-D meshes (FSDP2 without "
                                 "HSDP)")
        elif p.device_mesh != mesh:
            raise ValueError(f"argument '{arg}': parameter {name!r} is on another device mesh "
                             "than the first parameter; expected one mesh for all")
        (place,) = tuple(p.placements)
        full = p.shape
        loc = p.to_local()
        if isinstance(place, Shard) and place.dim == 0 and len(full) > 0:
            offset, shape = _row_part(full, mesh.size(), mesh.get_local_rank())
            if loc.shape != shape:
                raise ValueError(f"argument '{arg}': parameter {name!r}: local shard has shape "
                                 f"{tuple(loc.shape)}, expected {tuple(shape)} (uneven padding?)")
        else:
            raise ValueError(f"argument '{arg}': parameter {name!r} is placed {place!r}; "
                             "FisherAdapTune supports Shard(0) (FSDP2's default)")
        offsets.append(int(offset))
        local_shapes.append(loc.shape)
        global_shapes.append(full)
        placements.append(tuple(p.placements))
    return Sharding(mesh=mesh, group=mesh.get_group(), offsets=tuple(offsets),
                    local_shapes=tuple(local_shapes), global_shapes=tuple(global_shapes),
                    placements=tuple(placements))


def _row_part(shape: torch.Size, world: int, rank: int) -> Tuple[int, torch.Size]:
    """Flat offset and shape of part ``rank`` of a ``Shard(0)`` split: torch.chunk's, as
    DTensor and FSDP2 use (``ceil(rows / world)`` rows per rank, the last parts short or empty)."""
    rows = shape[0]
    per = -(-rows // world)
    start = min(rank * per, rows)
    count = max(0, min(rows, start + per) - start)
    row_numel = shape.numel() // rows if rows else 0
    return start * row_numel, torch.Size((count,) + tuple(shape[1:]))


def row_sharding(params: Sequence[Tensor], group=None) -> Optional[Sharding]:
    """A :class:`Sharding` that gives each rank of ``group`` a ``Shard(0)`` part of every
    (replicated, plain) tensor in ``params``: how FisherAdapTune splits the Fisher state under
    DDP, where every rank holds the same averaged gradients, so that each keeps and updates
    ``1/world`` of it. None with a single rank, or when a tensor is 0-d (no rows to split).
    """
    if not initialized() or dist.get_world_size(group) == 1 or any(p.dim() == 0 for p in params):
        return None
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard
    device = params[0].device if params else torch.device("cpu")
    mesh = DeviceMesh.from_group(group if group is not None else dist.group.WORLD, device.type)
    world, rank = mesh.size(), mesh.get_local_rank()
    parts = [_row_part(p.shape, world, rank) for p in params]
    return Sharding(mesh=mesh, group=mesh.get_group(), offsets=tuple(o for o, _ in parts),
                    local_shapes=tuple(s for _, s in parts),
                    global_shapes=tuple(p.shape for p in params),
                    placements=tuple((Shard(0),) for _ in params))


def local_layout(layout: GroupLayout, sharding: Optional[Sharding]) -> GroupLayout:
    """``layout`` restricted to this rank's parts of its tensors, in local coordinates.

    Group ids and names are kept, so per-group results of the local layout add up over ranks
    to those of ``layout``. Without sharding, ``layout`` itself.
    """
    if sharding is None:
        return layout
    rows = []
    for t, b, e, g in layout.segments.tolist():
        lo = sharding.offsets[t]
        hi = lo + sharding.local_shapes[t].numel()
        b2, e2 = max(b, lo), min(e, hi)
        if e2 > b2:
            rows.append((t, b2 - lo, e2 - lo, g))
    return GroupLayout(layout.tensor_names, sharding.local_shapes, layout.names,
                       torch.tensor(rows, dtype=torch.int64).reshape(-1, 4))


def _comm_device(group, device: torch.device) -> torch.device:
    """Where a tensor must be for a collective on ``group``: NCCL takes CUDA tensors only (CPU
    tensors occur with FSDP2's CPU offload), gloo is given CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(t: Tensor, sharding: Optional[Sharding]) -> Tensor:
    """Sum ``t`` in place over the shards' process group (a no-op without sharding)."""
    if sharding is not None and dist.get_world_size(sharding.group) > 1:
        dev = _comm_device(sharding.group, t.device)
        if dev == t.device:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=sharding.group)
        else:
            moved = t.to(dev)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=sharding.group)
            t.copy_(moved)
    return t


def js_drift(current: Sequence[Tensor], reference: Sequence[Tensor], layout: GroupLayout,
             sharding: Optional[Sharding], *, mode: str = "mass",
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
        return ops.js_drift(current, reference, layout, mode=mode, base=base,
                            update_reference=update_reference, **kwargs)
    if mode == "mass":  # histogram-only kwargs are ignored, as ops.js_drift does
        totals = all_reduce_(ops.js_mass_totals(current, reference, layout), sharding)
        js = all_reduce_(ops.js_mass_partial(current, reference, layout, totals,
                                             update_reference=update_reference), sharding)
        out = js.clamp_min(0.0)
        if base == "2":
            out = out / math.log(2.0)
        out = out.sqrt()
        scored = (totals[0] > 0) & (totals[1] > 0)
        return torch.where(scored, out, torch.zeros_like(out)).float()
    if global_layout is None or tensors is None:
        raise ValueError("distributed.js_drift: mode \"histogram\" needs global_layout and tensors")
    # One set of tensors linked by shared groups at a time (a single tensor for slab and
    # per-tensor layouts), so only that set is ever gathered; every group lies in one set.
    out = None
    for part in _linked_tensors(global_layout):
        full_c = [sharding.to_global(tensors[k], current[k]).full_tensor() for k in part]
        full_r = [sharding.to_global(tensors[k], reference[k]).full_tensor() for k in part]
        d = ops.js_drift(full_c, full_r, global_layout.subset(part), mode=mode, base=base,
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


def agreed(decision: Tensor, group=None) -> Tensor:
    """``decision`` (a bool mask) as the first rank of ``group`` (default: the world) made it,
    on every rank of that group.

    Ranks that see the same all-reduced statistics compute the same decision; broadcasting it
    anyway (a few bytes, at decision steps only) makes agreement a guarantee rather than a
    consequence of bitwise-identical arithmetic everywhere. Without an initialised multi-rank
    process group, ``decision`` itself.
    """
    if not initialized() or dist.get_world_size(group) == 1:
        return decision
    flags = decision.to(device=_comm_device(group, torch.device("cpu")), dtype=torch.uint8)
    dist.broadcast(flags, src=dist.get_global_rank(group, 0) if group is not None else 0,
                   group=group)
    return flags.to("cpu", torch.bool)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _pack(obj: Any) -> bytes:
    # Variable-length state (history, policy counters) travels as one opaque item: a
    # torch.distributed.checkpoint template cannot know its structure before loading it. Its
    # tensors go to the CPU: DCP keeps one rank's copy, which every rank then loads.
    buf = io.BytesIO()
    torch.save(_on_cpu(obj), buf)
    return buf.getvalue()


def _on_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def _unpack(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _inner(optimizer) -> torch.optim.Optimizer:
    from .optim import FisherAdapTune
    return optimizer.optimizer if isinstance(optimizer, FisherAdapTune) else optimizer


def _state(model: nn.Module, optimizer, adaptune: Optional[dict]) -> Dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict)
    state: Dict[str, Any] = {"model": get_model_state_dict(model),
                             "optimizer": get_optimizer_state_dict(model, _inner(optimizer))}
    if adaptune is not None:
        state["adaptune"] = adaptune
    return state


def save(checkpoint_id, model: nn.Module, optimizer, **kwargs) -> None:
    """Save ``model`` and ``optimizer`` (a FisherAdapTune or any optimizer) with
    ``torch.distributed.checkpoint.save``; call it on every rank.

    Works for plain, DDP and FSDP2 models: DCP writes sharded tensors once per shard and
    replicated ones once. A FisherAdapTune's state (Fisher, references, drift statistics,
    frozen set) is saved with it. ``kwargs`` go to ``dcp.save`` (e.g. ``storage_writer``).
    """
    import torch.distributed.checkpoint as dcp
    from .optim import FisherAdapTune
    adaptune = optimizer.distributed_state_dict() if isinstance(optimizer, FisherAdapTune) else None
    dcp.save(_state(model, optimizer, adaptune), checkpoint_id=checkpoint_id, **kwargs)


def load(checkpoint_id, model: nn.Module, optimizer, **kwargs) -> None:
    """Load what :func:`save` wrote into ``model`` and ``optimizer`` (built as at save time,
    e.g. fresh), on every rank; resharding to another world size is DCP's.

    For a FisherAdapTune, the frozen set is read first and applied (tensors frozen whole are
    released again), so that the template DCP fills has the saved structure; then model,
    optimizer and wrapper state are loaded. Training then continues with the same decisions as
    an uninterrupted run.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                         set_optimizer_state_dict)
    from .optim import FisherAdapTune
    adaptune = None
    if isinstance(optimizer, FisherAdapTune):
        head = {"adaptune": {"meta": b""}}
        dcp.load(head, checkpoint_id=checkpoint_id, **kwargs)
        adaptune = optimizer.distributed_template(head["adaptune"]["meta"])
    state = _state(model, optimizer, adaptune)
    dcp.load(state, checkpoint_id=checkpoint_id, **kwargs)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, _inner(optimizer), state["optimizer"])
    if adaptune is not None:
        optimizer.load_distributed_state_dict(state["adaptune"])
