"""FisherAdapTune's checkpoint payloads: one for ``torch.save`` (``state_dict``) and one for
``torch.distributed.checkpoint`` (per-tensor buffers keyed by parameter name, DTensors when
sharded, so DCP writes each shard once and can reshard).

Both hold the same things: step, frozen set, drift statistics, policy state, estimator state
and its per-tensor buffers, and the drift references. Loading checks every part before it
changes anything.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ..distributed import checkpoint
from ..distributed.sharding import is_dtensor, local

if TYPE_CHECKING:  # pragma: no cover
    from .optimizer import FisherAdapTune

__all__ = ["state_dict", "load_state_dict", "check_state_dict", "check_inner_state_dict",
           "distributed_state_dict", "distributed_template", "load_distributed_state_dict",
           "FORMAT"]

#: Version of the payload. 2 added ``format``, ``drift_mode``, ``layout`` and ``policy_type``;
#: a payload without them (format 1) is refused: the checks they allow cannot be made.
#: ``fisher_dtype`` ("float32" or "bfloat16") was added within format 2: a payload without it
#: was saved before the option existed, with float32 buffers, and is read as "float32".
FORMAT = 2

_META_KEYS = ("format", "names", "group_names", "layout", "drift_mode", "policy_type", "step",
              "frozen", "frozen_at", "estimator_kind", "estimator", "tracker", "policy",
              "nonfinite", "shards")

_ARG = "argument 'state_dict'"


def layout_key(opt: "FisherAdapTune") -> str:
    """A digest of the group layout: tensor names and shapes, group names and segments."""
    lay = opt.layout
    h = hashlib.sha256()
    h.update(repr((lay.tensor_names, [tuple(s) for s in lay.shapes], lay.names)).encode())
    h.update(lay.segments.numpy().tobytes())
    return h.hexdigest()[:16]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _policy_type(opt: "FisherAdapTune") -> str:
    cls = type(opt.policy)
    return f"{cls.__module__}.{cls.__qualname__}"


def _meta(opt: "FisherAdapTune") -> Dict[str, Any]:
    """Everything but the per-tensor buffers."""
    return {
        "format": FORMAT,
        "names": list(opt.names),
        "group_names": list(opt.layout.names),
        "layout": layout_key(opt),
        "drift_mode": opt.drift_mode,
        "fisher_dtype": _dtype_name(opt.fisher_dtype),
        "policy_type": _policy_type(opt),
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


# ---------------------------------------------------------------------------------- checks
# Everything a payload holds is checked here, before anything changes; applying it (_apply)
# then cannot fail on the payload's account.

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_tensor(v: Any, what: str, dtype: torch.dtype, shape) -> None:
    if not isinstance(v, Tensor) or v.dtype != dtype or tuple(v.shape) != tuple(shape):
        got = (f"{v.dtype} of shape {list(v.shape)}" if isinstance(v, Tensor)
               else type(v).__name__)
        raise ValueError(f"{_ARG}: '{what}' must be a {dtype} tensor of shape {list(shape)}, got "
                         f"{got}")


def _check_identity(opt: "FisherAdapTune", meta: Any) -> None:
    """Keys, format, and what the payload was saved under (same tensors, layout, drift mode,
    policy type and estimator)."""
    if not isinstance(meta, dict):
        raise ValueError(f"{_ARG}: not a FisherAdapTune state (expected a dict, got "
                         f"{type(meta).__name__})")
    if "format" not in meta and "step" in meta and "frozen" in meta:
        raise ValueError(f"{_ARG}: saved by an earlier version of fisheradaptune (no 'format' "
                         "entry), which did not record the drift mode, the group layout and the "
                         f"policy type; this version (format {FORMAT}) refuses it rather than "
                         "resume under settings it cannot check")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{_ARG}: not a FisherAdapTune state (expected keys {list(_META_KEYS)}, "
                         f"missing {missing}); it may come from another version")
    if meta["format"] != FORMAT:
        raise ValueError(f"{_ARG}: payload format {meta['format']!r}, this version reads format "
                         f"{FORMAT}")
    if list(meta["names"]) != opt.names:
        raise ValueError(f"{_ARG}: saved by a FisherAdapTune tracking other parameters "
                         f"({len(meta['names'])} tensors, first {list(meta['names'])[:2]}); this "
                         f"one tracks {len(opt.names)} (first {opt.names[:2]})")
    if list(meta["group_names"]) != list(opt.layout.names) or meta["layout"] != layout_key(opt):
        raise ValueError(f"{_ARG}: saved with group layout {meta['layout']!r} "
                         f"({len(meta['group_names'])} groups), this wrapper has "
                         f"{layout_key(opt)!r} ({opt.layout.num_groups} groups); build the "
                         "wrapper with the groups it was saved with")
    if meta["drift_mode"] != opt.drift_mode:
        raise ValueError(f"{_ARG}: saved with drift_mode={meta['drift_mode']!r}, this wrapper "
                         f"has drift_mode={opt.drift_mode!r}")
    saved = meta.get("fisher_dtype", "float32")  # absent: saved before the option, float32
    if saved != _dtype_name(opt.fisher_dtype):
        # Refused rather than converted: a conversion would change the buffers' precision
        # behind the user's back (and float32 -> bfloat16 is lossy).
        raise ValueError(f"{_ARG}: saved with fisher_dtype=torch.{saved}, this wrapper has "
                         f"fisher_dtype=torch.{_dtype_name(opt.fisher_dtype)}; build the "
                         "wrapper with the fisher_dtype it was saved with")
    if meta["policy_type"] != _policy_type(opt):
        raise ValueError(f"{_ARG}: saved with policy {meta['policy_type']}, this wrapper has "
                         f"{_policy_type(opt)}")
    if meta["estimator_kind"] != type(opt.estimator).__name__:
        raise ValueError(f"{_ARG}: saved with estimator {meta['estimator_kind']}, this wrapper "
                         f"uses {type(opt.estimator).__name__}")


def _check_like(saved: Any, live: Any, what: str) -> None:
    """``saved`` has the structure of ``live`` (a state dict of the same object): the same
    dict keys, list lengths where entries are structured, tensor dtypes and shapes, number
    kinds. ``None`` in ``live`` (state not created yet) accepts a tensor, a number or None."""
    if isinstance(live, dict):
        if not isinstance(saved, dict) or set(saved) != set(live):
            have = sorted(map(str, saved)) if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(f"{_ARG}: '{what}' has keys {have}, expected "
                             f"{sorted(map(str, live))}")
        for k in live:
            _check_like(saved[k], live[k], f"{what}.{k}")
    elif isinstance(live, (list, tuple)):
        if not isinstance(saved, (list, tuple)):
            raise ValueError(f"{_ARG}: '{what}' must be a list, got {type(saved).__name__}")
        if any(isinstance(v, (dict, list, tuple, Tensor)) for v in live):
            if len(saved) != len(live):
                raise ValueError(f"{_ARG}: '{what}' has {len(saved)} entries, expected "
                                 f"{len(live)}")
            for j, (a, b) in enumerate(zip(saved, live)):
                _check_like(a, b, f"{what}[{j}]")
        elif not all(_is_int(v) for v in saved) and all(_is_int(v) for v in live):
            raise ValueError(f"{_ARG}: '{what}' must hold integers")
    elif isinstance(live, Tensor):
        _check_tensor(saved, what, live.dtype, live.shape)
        if saved.is_floating_point() and not bool(torch.isfinite(saved).all()):
            raise ValueError(f"{_ARG}: '{what}' holds non-finite values")
    elif live is None:
        if not (saved is None or isinstance(saved, (Tensor, int, float))):
            raise ValueError(f"{_ARG}: '{what}' must be a tensor, a number or None, got "
                             f"{type(saved).__name__}")
    elif isinstance(live, bool):
        if not isinstance(saved, bool):
            raise ValueError(f"{_ARG}: '{what}' must be a bool, got {saved!r}")
    elif _is_int(live):
        if not _is_int(saved):
            raise ValueError(f"{_ARG}: '{what}' must be an integer, got {saved!r}")
    elif isinstance(live, float):
        if not (isinstance(saved, (int, float)) and not isinstance(saved, bool)):
            raise ValueError(f"{_ARG}: '{what}' must be a number, got {saved!r}")
    elif type(saved) is not type(live):
        raise ValueError(f"{_ARG}: '{what}' must be a {type(live).__name__}, got "
                         f"{type(saved).__name__}")


def _check_buffer(opt: "FisherAdapTune", i: int, value: Optional[Tensor], full: bool,
                  what: str) -> None:
    if value is None or is_dtensor(value):
        return
    want = opt.params[i].shape if full else opt.part(i, opt.params[i].detach()).shape
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise ValueError(f"{_ARG}: the {what} of {opt.names[i]!r} must be a floating-point "
                         f"tensor, got {type(value).__name__}")
    if value.shape != want:
        raise ValueError(f"{_ARG}: the {what} of {opt.names[i]!r} has shape "
                         f"{tuple(value.shape)}, expected {tuple(want)}")
    if (value.dtype == torch.bfloat16) != (opt.fisher_dtype == torch.bfloat16):
        # The drift ops want current and reference in one dtype.
        raise ValueError(f"{_ARG}: the {what} of {opt.names[i]!r} is {value.dtype}, this "
                         f"wrapper keeps its buffers in {opt.fisher_dtype}")
    if not bool(torch.isfinite(value).all()):
        # A NaN Fisher or reference scores drift 0: the group would look settled and freeze.
        raise ValueError(f"{_ARG}: the {what} of {opt.names[i]!r} holds non-finite values")


_SAVED = object()


def check_state_dict(opt: "FisherAdapTune", meta: Any, buffers: Optional[Sequence] = None,
                     references: Optional[Sequence] = None, shards: Any = _SAVED) -> None:
    """Raise ``ValueError`` unless ``meta`` (and the per-tensor ``buffers`` and
    ``references``, when given) can be loaded into ``opt`` as they are. Changes nothing.

    ``shards``: which parts of the tensors the buffers hold (a :func:`shard_key`); by default
    the ones ``meta`` was saved with. A distributed checkpoint passes this rank's (DCP
    reshards)."""
    _check_identity(opt, meta)
    G, n = opt.layout.num_groups, len(opt.params)
    step = meta["step"]
    if not (_is_int(step) and step >= 0):
        raise ValueError(f"{_ARG}: 'step' must be an integer >= 0, got {step!r}")
    _check_tensor(meta["frozen"], "frozen", torch.bool, (G,))
    _check_tensor(meta["frozen_at"], "frozen_at", torch.int64, (G,))
    frozen, at = meta["frozen"], meta["frozen_at"]
    if bool((at[~frozen] != -1).any()) or bool(((at[frozen] < 0) | (at[frozen] > step)).any()):
        raise ValueError(f"{_ARG}: 'frozen_at' must be -1 for active groups and in [0, step="
                         f"{step}] for frozen ones")
    nonfinite = meta["nonfinite"]
    if not (_is_int(nonfinite) and nonfinite >= 0):
        raise ValueError(f"{_ARG}: 'nonfinite' must be an integer >= 0, got {nonfinite!r}")
    opt.tracker.check_state_dict(meta["tracker"])
    opt.policy.check_state_dict(meta["policy"], G)
    live = opt.estimator.state_dict()
    _check_like(meta["estimator"], live, "estimator")
    whole = opt.freezer.whole_frozen(frozen)
    if isinstance(live, dict) and "released" in live and \
            sorted(meta["estimator"]["released"]) != whole:
        raise ValueError(f"{_ARG}: the estimator's released tensors "
                         f"{sorted(meta['estimator']['released'])} contradict 'frozen' (which "
                         f"freezes tensors {whole} whole)")
    shards = meta["shards"] if shards is _SAVED else shards
    ours = shard_key(opt)
    if shards is not None and shards != ours:
        # Shards pair only with the same rank of the same world: anything else would silently
        # match rows with the wrong ones.
        mine = "unsharded" if ours is None else f"rank {ours['rank']} of {ours['world']}"
        raise ValueError(
            f"{_ARG}: holds the Fisher shards of rank {shards.get('rank')} of "
            f"{shards.get('world')}, this wrapper is {mine}. Load each rank's own state_dict, "
            "or checkpoint with fisheradaptune.distributed.save / load (which reshards)")
    for what, values in (("buffer", buffers), ("reference", references)):
        if values is None:
            continue
        if not isinstance(values, (list, tuple)) or len(values) != n:
            have = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise ValueError(f"{_ARG}: holds {have} {what}s, this wrapper tracks {n} tensors")
        for i, v in enumerate(values):
            _check_buffer(opt, i, v, shards is None, what)


def check_inner_state_dict(optimizer: torch.optim.Optimizer, inner: Dict[str, Any]) -> None:
    """Check the wrapped optimizer's state dict beyond what ``Optimizer.load_state_dict``
    checks: every parameter id appears once, state is keyed by those ids, and every state
    tensor is a scalar or shaped like its parameter (the supported optimizers' contract)."""
    pos = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in inner["param_groups"] for i in g.get("params", ())]
    if sorted(ids) != sorted(set(ids)) or not all(_is_int(i) for i in ids):
        raise ValueError(f"{_ARG}: its optimizer param_groups list parameter ids {ids}, "
                         "expected distinct integers")
    by_id = dict(zip(ids, pos))
    state = inner["state"]
    if not isinstance(state, dict):
        raise ValueError(f"{_ARG}: its optimizer 'state' must be a dict, got "
                         f"{type(state).__name__}")
    for k, entry in state.items():
        if k not in by_id:
            raise ValueError(f"{_ARG}: its optimizer state has an entry for parameter id {k!r}, "
                             f"which no param group lists")
        if not isinstance(entry, dict):
            raise ValueError(f"{_ARG}: its optimizer state of parameter {k} must be a dict, got "
                             f"{type(entry).__name__}")
        shape = tuple(local(by_id[k]).shape)
        for name, v in entry.items():
            if isinstance(v, Tensor) and v.dim() > 0 and tuple(local(v).shape) != shape \
                    and tuple(v.shape) != tuple(by_id[k].shape):
                raise ValueError(f"{_ARG}: its optimizer state '{name}' of parameter {k} has "
                                 f"shape {tuple(v.shape)}, the parameter {shape}")


# ---------------------------------------------------------------------------------- applying

def _adopt(opt: "FisherAdapTune", i: int, value: Optional[Tensor], full: bool) -> Optional[Tensor]:
    """A checked buffer of tensor ``i`` as this rank's part of it: a DTensor is resharded, a
    ``full`` (global-shaped) buffer sliced, and a shard kept."""
    if value is None:
        return None
    if is_dtensor(value):
        return value.full_tensor() if opt.sharding is None else opt.sharding.to_local(i, value)
    return opt.part(i, value) if full else value


def _apply(opt: "FisherAdapTune", meta: dict, buffers: List[Optional[Tensor]],
           references: List[Optional[Tensor]], shards: Optional[dict]) -> None:
    """Restore from a checked ``meta`` and per-tensor buffers, which hold the parts of the
    tensors that ``shards`` names (a :func:`shard_key`)."""
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


def check_payload(opt: "FisherAdapTune", meta: Any) -> None:
    """:func:`check_state_dict` for what :func:`state_dict` returned."""
    _check_identity(opt, meta)
    if "buffers" not in meta or "references" not in meta:
        raise ValueError(f"{_ARG}: its FisherAdapTune state has no 'buffers' or 'references' "
                         "(a distributed checkpoint? use fisheradaptune.distributed.load)")
    check_state_dict(opt, meta, meta["buffers"], meta["references"])


def load_state_dict(opt: "FisherAdapTune", meta: Any, checked: bool = False) -> None:
    """Restore what :func:`state_dict` returned (checked first unless ``checked``)."""
    if not checked:
        check_payload(opt, meta)
    _apply(opt, meta, list(meta["buffers"]), list(meta["references"]), meta["shards"])


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
    check_state_dict(opt, meta, shards=shard_key(opt))
    opt.set_frozen(meta["frozen"])

    def zeros(flags):
        out = {}
        for i, present in enumerate(flags):
            if present:
                part = opt.part(i, opt.params[i].detach())
                out[opt.names[i]] = opt.to_global(
                    i, torch.zeros(part.shape, dtype=opt.fisher_dtype, device=part.device))
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
    fisher, refs = buffers(state["buffers"]), buffers(state["reference"])
    check_state_dict(opt, meta, fisher, refs, shards=shard_key(opt))
    _apply(opt, meta, fisher, refs, shard_key(opt))
