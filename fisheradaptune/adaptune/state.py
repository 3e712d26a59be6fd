"""FisherAdapTune's checkpoint payloads: one for ``torch.save`` (``state_dict``) and one for
``torch.distributed.checkpoint`` (per-tensor buffers keyed by parameter name, DTensors when
sharded, so DCP writes each shard once and can reshard).

Both hold the same things: step, frozen set, drift statistics, policy state, estimator state
and its per-tensor buffers, and the drift references. Loading checks every part before it
changes anything.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
from torch import Tensor

from ..distributed import checkpoint
from ..distributed.sharding import is_dtensor, local

if TYPE_CHECKING:  # pragma: no cover
    from .optimizer import FisherAdapTune

__all__ = ["state_dict", "load_state_dict", "distributed_state_dict", "distributed_template",
           "load_distributed_state_dict"]

_META_KEYS = ("names", "group_names", "step", "frozen", "frozen_at", "estimator_kind",
              "estimator", "tracker", "policy", "nonfinite", "shards")


def _meta(opt: "FisherAdapTune") -> Dict[str, Any]:
    """Everything but the per-tensor buffers."""
    return {
        "names": list(opt.names),
        "group_names": list(opt.layout.names),
        "step": opt.step_count,
        "frozen": opt.frozen.clone(),
        "frozen_at": opt.frozen_at.clone(),
        "estimator_kind": type(opt.estimator).__name__,
        "estimator": opt.estimator.state_dict(),
        "tracker": opt.tracker.state_dict(),
        "policy": opt.policy.state_dict(),
        "nonfinite": opt.nonfinite,
        "shards": shard_key(opt),
    }


def shard_key(opt: "FisherAdapTune") -> Optional[dict]:
    """Which part of each tensor this rank's buffers hold (None: all of it)."""
    s = opt.sharding
    if s is None:
        return None
    return {"world": int(s.mesh.size()), "rank": int(s.mesh.get_local_rank()),
            "offsets": list(s.offsets)}


def _check_meta(opt: "FisherAdapTune", meta: Any) -> None:
    if not isinstance(meta, dict) or any(k not in meta for k in _META_KEYS):
        have = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise ValueError("argument 'state_dict': not a FisherAdapTune state (expected keys "
                         f"{list(_META_KEYS)}, got {have}); it may come from another version")
    if list(meta["group_names"]) != list(opt.layout.names) or list(meta["names"]) != opt.names:
        raise ValueError("argument 'state_dict': saved by a FisherAdapTune with other "
                         "parameters or groups")
    if meta["estimator_kind"] != type(opt.estimator).__name__:
        raise ValueError(f"argument 'state_dict': saved with estimator {meta['estimator_kind']}, "
                         f"this wrapper uses {type(opt.estimator).__name__}")


def _adopt(opt: "FisherAdapTune", i: int, value: Optional[Tensor], full: bool) -> Optional[Tensor]:
    """A saved buffer of tensor ``i`` as this rank's part of it: a DTensor is resharded, a
    ``full`` (global-shaped) buffer sliced, and a shard kept."""
    if value is None:
        return None
    if is_dtensor(value):
        return value.full_tensor() if opt.sharding is None else opt.sharding.to_local(i, value)
    want = opt.params[i].shape if full else opt.part(i, opt.params[i].detach()).shape
    if value.shape != want:
        raise ValueError(f"argument 'state_dict': the buffer of {opt.names[i]!r} has "
                         f"shape {tuple(value.shape)}, expected {tuple(want)}")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        # A NaN Fisher or reference scores drift 0: the group would look settled and freeze.
        raise ValueError(f"argument 'state_dict': the buffer of {opt.names[i]!r} holds "
                         "non-finite values")
    return opt.part(i, value) if full else value


def _load(opt: "FisherAdapTune", meta: dict, buffers: List[Optional[Tensor]],
          references: List[Optional[Tensor]], shards: Optional[dict]) -> None:
    """Restore from ``meta`` and the per-tensor buffers, which hold the parts of the tensors
    that ``shards`` names (a :func:`shard_key`)."""
    _check_meta(opt, meta)
    n = len(opt.params)
    if len(buffers) != n or len(references) != n:
        raise ValueError(f"argument 'state_dict': holds buffers for {len(buffers)} tensors, "
                         f"this wrapper tracks {n}")
    # Shards pair only with the same rank of the same world: anything else would silently
    # match rows with the wrong ones.
    ours = shard_key(opt)
    if shards is not None and shards != ours:
        mine = "unsharded" if ours is None else f"rank {ours['rank']} of {ours['world']}"
        raise ValueError(
            f"argument 'state_dict': holds the Fisher shards of rank {shards['rank']} "
            f"of {shards['world']}, this wrapper is {mine}. Load each rank's own "
            "state_dict, or checkpoint with fisheradaptune.distributed.save / load "
            "(which reshards)")
    buffers = [_adopt(opt, i, f, shards is None) for i, f in enumerate(buffers)]
    references = [_adopt(opt, i, r, shards is None) for i, r in enumerate(references)]
    opt.set_frozen(meta["frozen"])
    opt.freezer.frozen_at = meta["frozen_at"].clone()
    opt.step_count = int(meta["step"])
    opt.estimator.load_state_dict(meta["estimator"])
    opt.estimator.load_buffers(buffers)
    opt.references = [None if (r is None or i in opt.freezer.released) else
                      r.to(local(opt.params[i]).device).clone()
                      for i, r in enumerate(references)]
    opt.tracker.load_state_dict(meta["tracker"])
    opt.policy.load_state_dict(meta["policy"])
    opt._nonfinite = torch.tensor(int(meta["nonfinite"]), dtype=torch.int64,
                                  device=local(opt.params[0]).device)


def _clones(buffers: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
    return [None if b is None else b.clone() for b in buffers]


def state_dict(opt: "FisherAdapTune") -> Dict[str, Any]:
    """The wrapper's own state for ``torch.save`` (the wrapped optimizer's travels beside)."""
    meta = _meta(opt)
    meta["buffers"] = _clones(opt.estimator.buffers())
    meta["references"] = _clones(opt.references)
    return meta


def load_state_dict(opt: "FisherAdapTune", meta: Any) -> None:
    _check_meta(opt, meta)
    if "buffers" not in meta or "references" not in meta:
        raise ValueError("argument 'state_dict': its FisherAdapTune state has no 'buffers' "
                         "or 'references' (a distributed checkpoint? use "
                         "fisheradaptune.distributed.load)")
    _load(opt, meta, list(meta["buffers"]), list(meta["references"]), meta["shards"])


def distributed_state_dict(opt: "FisherAdapTune") -> Dict[str, Any]:
    """The wrapper's state for ``torch.distributed.checkpoint``."""
    def named(buffers):
        return {opt.names[i]: opt.to_global(i, b) for i, b in enumerate(buffers) if b is not None}
    buffers = opt.estimator.buffers()
    meta = _meta(opt)
    meta["has_buffer"] = [b is not None for b in buffers]
    meta["has_reference"] = [r is not None for r in opt.references]
    return {"meta": checkpoint.pack(meta), "buffers": named(buffers),
            "reference": named(opt.references)}


def distributed_template(opt: "FisherAdapTune", packed_meta: bytes) -> Dict[str, Any]:
    """Apply the saved frozen set, and return a template shaped like the saved
    :func:`distributed_state_dict` for DCP to fill."""
    meta = checkpoint.unpack(packed_meta)
    _check_meta(opt, meta)
    opt.set_frozen(meta["frozen"])

    def zeros(flags):
        out = {}
        for i, present in enumerate(flags):
            if present:
                part = opt.part(i, opt.params[i].detach())
                out[opt.names[i]] = opt.to_global(
                    i, torch.zeros(part.shape, dtype=torch.float32, device=part.device))
        return out
    return {"meta": b"", "buffers": zeros(meta["has_buffer"]),
            "reference": zeros(meta["has_reference"])}


def load_distributed_state_dict(opt: "FisherAdapTune", state: Dict[str, Any]) -> None:
    """Restore what :func:`distributed_state_dict` gave (after DCP filled a template)."""
    meta = checkpoint.unpack(state["meta"])

    def buffers(named):
        return [None if n not in named else opt.to_local(i, named[n])
                for i, n in enumerate(opt.names)]
    # The buffers were read into this wrapper's own template: they are its parts.
    _load(opt, meta, buffers(state["buffers"]), buffers(state["reference"]), shard_key(opt))
