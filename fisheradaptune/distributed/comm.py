"""Every collective fisheradaptune issues goes through here.

One place decides which process group a model's ranks share, where a tensor must live for a
collective (NCCL takes CUDA tensors only: CPU tensors occur with FSDP2's CPU offload; gloo is
given CPU tensors), and how a decision is made identical on every rank. Without an initialised
multi-rank process group every function is a no-op returning its input.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["initialized", "world_size", "group_of", "comm_device", "all_reduce_", "broadcast_",
           "agreed", "full_tensor", "redistribute"]


def initialized() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size(group: Any = None) -> int:
    """Ranks in ``group`` (default: the world); 1 without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def group_of(model: Optional[nn.Module]) -> Any:
    """The ranks that train ``model`` together: a DDP model's own process group, else the
    world (``None``)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.process_group
    return None


def comm_device(group: Any, device: torch.device) -> torch.device:
    """Where a tensor on ``device`` must be for a collective on ``group``."""
    if dist.get_backend(group) == "nccl":
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(t: Tensor, group: Any = None) -> Tensor:
    """Sum ``t`` in place over ``group`` (moved to the collective's device and back if needed)."""
    if world_size(group) == 1:
        return t
    dev = comm_device(group, t.device)
    if dev == t.device:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    else:
        moved = t.to(dev)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=group)
        t.copy_(moved)
    return t


def broadcast_(t: Tensor, group: Any = None) -> Tensor:
    """Overwrite ``t`` in place with the first rank of ``group``'s copy."""
    if world_size(group) == 1:
        return t
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dev = comm_device(group, t.device)
    if dev == t.device:
        dist.broadcast(t, src=src, group=group)
    else:
        moved = t.to(dev)
        dist.broadcast(moved, src=src, group=group)
        t.copy_(moved)
    return t


def agreed(decision: Tensor, group: Any = None) -> Tensor:
    """``decision`` (a bool mask) as the first rank of ``group`` made it, on every rank.

    Ranks that see the same all-reduced statistics compute the same decision; broadcasting it
    anyway (a few bytes, at decision steps only) makes agreement a guarantee rather than a
    consequence of bitwise-identical arithmetic everywhere.
    """
    if world_size(group) == 1:
        return decision
    flags = decision.to(torch.uint8)
    return broadcast_(flags, group).to("cpu", torch.bool)


def full_tensor(t: Any) -> Tensor:
    """The whole of a DTensor (an all-gather over its mesh)."""
    return t.full_tensor()


def redistribute(t: Any, mesh: Any, placements: tuple) -> Any:
    """A DTensor moved to ``placements`` on ``mesh`` (a collective when they differ)."""
    return t if tuple(t.placements) == tuple(placements) else t.redistribute(mesh, placements)
