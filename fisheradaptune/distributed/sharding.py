"""Which part of every tracked tensor this rank holds.

:class:`Sharding` describes it when the parameters are ``fully_shard`` (FSDP2) DTensors
(:func:`sharding_of`), or which part of a replicated DDP parameter's Fisher a rank keeps
(:func:`row_sharding`, FisherAdapTune's ``shard_state``); :func:`local_layout` restricts a
:class:`GroupLayout` to those parts, so the fused ops run on local parts unchanged.

Supported sharding: every tracked parameter a DTensor on one 1-D device mesh, placed
``Shard(0)`` (FSDP2's default). Other placements (``Shard(1)`` from a ``shard_placement_fn``,
``Replicate()``, HSDP's 2-D meshes, tensor parallelism) are refused with an error naming the
parameter: the all-reduced sums would count replicated elements once per rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..groups import GroupLayout
from . import comm

__all__ = ["Sharding", "sharding_of", "row_sharding", "local", "local_layout", "is_dtensor"]


try:
    from torch.distributed.tensor import DTensor as _DTensor, Shard as _Shard
except ImportError:  # torch without distributed support
    _DTensor = _Shard = None


def _dtensor_types():
    return None if _DTensor is None else (_DTensor, _Shard)


def is_dtensor(t: Any) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """This rank's part of ``t``: its local tensor for a DTensor, ``t`` itself otherwise."""
    return t.to_local() if is_dtensor(t) else t


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
            return comm.redistribute(value, self.mesh, self.placements[i]).to_local()
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
    if not comm.initialized() or comm.world_size(group) == 1 or any(p.dim() == 0 for p in params):
        return None
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard
    device = params[0].device if params else torch.device("cpu")
    import torch.distributed as dist
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
