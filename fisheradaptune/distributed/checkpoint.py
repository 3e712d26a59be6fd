"""Checkpoints with ``torch.distributed.checkpoint``: a model, its optimizer and a
FisherAdapTune's own state, sharded or not, resumable bit for bit.

Any optimizer wrapper that implements ``distributed_state_dict`` / ``distributed_template`` /
``load_distributed_state_dict`` (FisherAdapTune does) has its state saved with the rest.
"""
from __future__ import annotations

import io
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

__all__ = ["save", "load", "pack", "unpack"]


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


def _wrapper_state(optimizer) -> bool:
    """Whether ``optimizer`` checkpoints state of its own next to its wrapped optimizer's (a
    FisherAdapTune): the protocol below, so this module imports no optimizer class."""
    return all(callable(getattr(optimizer, m, None)) for m in
               ("distributed_state_dict", "distributed_template", "load_distributed_state_dict"))


def _inner(optimizer) -> torch.optim.Optimizer:
    """The optimizer that owns the parameter state (a wrapper's wrapped optimizer)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


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
    adaptune = optimizer.distributed_state_dict() if _wrapper_state(optimizer) else None
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
    adaptune = None
    if _wrapper_state(optimizer):
        head = {"adaptune": {"meta": b""}}
        dcp.load(head, checkpoint_id=checkpoint_id, **kwargs)
        adaptune = optimizer.distributed_template(head["adaptune"]["meta"])
    state = _state(model, optimizer, adaptune)
    dcp.load(state, checkpoint_id=checkpoint_id, **kwargs)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, _inner(optimizer), state["optimizer"])
    if adaptune is not None:
        optimizer.load_distributed_state_dict(state["adaptune"])


pack, unpack = _pack, _unpack
