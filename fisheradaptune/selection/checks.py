"""Validation for TR-PTS selection, one helper per concern: the configuration numbers, an index
against its layer, a saved selection against itself, and a model against what selection
supports (no peft adapters, no tied selected weights). Each raises before anything changes."""
from __future__ import annotations

import math
import numbers
from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor, nn


__all__ = ["check_budget", "check_c_min", "check_index", "check_fields", "check_state",
           "check_not_peft", "check_untied"]

FORMAT = "fisheradaptune.selection"
VERSION = 1
_STATE_KEYS = ("format", "version", "index", "c", "shapes", "config", "counts")
_CONFIG_KEYS = ("budget", "c_min", "estimator", "skip_empty", "train_bias", "train_head", "head")
_COUNT_KEYS = ("total", "bias", "head")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_budget(budget, arg: str = "budget") -> float:
    """``budget`` as a float in ``(0, 1]`` (a ``ValueError`` naming ``arg`` otherwise)."""
    try:
        b = float(budget)
    except (TypeError, ValueError):
        b = float("nan")
    if isinstance(budget, bool) or math.isnan(b) or not 0.0 < b <= 1.0:
        raise ValueError(f"argument '{arg}': expected a fraction in (0, 1], got {budget!r}")
    return b


def check_c_min(c_min, arg: str = "c_min") -> int:
    """``c_min`` as an int ``>= 1``."""
    try:
        ok = not isinstance(c_min, bool) and int(c_min) == c_min
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok or int(c_min) < 1:
        raise ValueError(f"argument '{arg}': expected an integer >= 1, got {c_min!r}")
    return int(c_min)


def check_index(index, out_f: int, in_f: int, *, arg: str = "index",
                c: Optional[int] = None, int64: bool = False) -> None:
    """``index`` is an integer tensor ``[out_f, C]`` with ``C <= in_f`` (``C == c`` when ``c``
    is given; int64 when ``int64``), values in ``[0, in_f)`` and no column twice in a row.

    A repeated column would train wrongly without an error: scattering keeps one of the two
    values while both get optimizer state, and a masked gradient counts the entry once.
    """
    if not isinstance(index, Tensor):
        raise TypeError(f"argument '{arg}': expected a Tensor, got {type(index).__name__}")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool or (
            int64 and index.dtype != torch.int64):
        want = "int64" if int64 else "an integer dtype"
        raise TypeError(f"argument '{arg}': expected {want}, got {index.dtype}")
    if index.dim() != 2 or index.shape[0] != out_f or index.shape[1] > in_f:
        raise ValueError(f"argument '{arg}': expected shape [out_features={out_f}, C] with "
                         f"0 <= C <= in_features={in_f}, got {list(index.shape)}")
    if c is not None and index.shape[1] != c:
        raise ValueError(f"argument '{arg}': {index.shape[1]} columns per row, but its count "
                         f"C_l is {c}")
    if index.numel():
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= in_f:
            raise ValueError(f"argument '{arg}': values must lie in [0, {in_f}), got "
                             f"min {lo}, max {hi}")
        srt = index.sort(dim=1).values
        dup = (srt[:, 1:] == srt[:, :-1]).any(dim=1)
        if bool(dup.any()):
            row = int(dup.nonzero()[0, 0])
            raise ValueError(f"argument '{arg}': row {row} repeats a column "
                             f"({index[row].tolist()}); each row must name distinct columns")


def check_fields(index, c, shapes, config: dict, counts, arg: str) -> None:
    """A selection's fields against one another: the same layer names everywhere, each shape
    two non-negative ints, each ``C_l`` an int in ``[0, in_features]``, each index int64
    ``[out, C_l]`` (:func:`check_index`), the configuration's types and ranges, the counts
    non-negative ints. ``arg`` prefixes the field names in messages."""
    for field, val in (("index", index), ("c", c), ("shapes", shapes), ("counts", counts)):
        if not isinstance(val, dict):
            raise ValueError(f"argument '{arg}': '{field}' must be a dict, got "
                             f"{type(val).__name__}")
    if not index:
        raise ValueError(f"argument '{arg}': 'index' names no layer")
    names = list(index)
    for field, val in (("c", c), ("shapes", shapes)):
        if set(val) != set(names):
            raise ValueError(f"argument '{arg}': '{field}' names layers {sorted(val)}, 'index' "
                             f"names {sorted(names)}")
    for n in names:
        if not isinstance(n, str):
            raise ValueError(f"argument '{arg}': layer names must be str, got {n!r}")
        shape = shapes[n]
        if not isinstance(shape, (list, tuple)) or len(shape) != 2 or not all(
                _is_int(s) and s >= 0 for s in shape):
            raise ValueError(f"argument '{arg}': shapes[{n!r}] must be two ints >= 0 "
                             f"(out_features, in_features), got {shape!r}")
        out_f, in_f = shape
        cl = c[n]
        if not _is_int(cl) or not 0 <= cl <= in_f:
            raise ValueError(f"argument '{arg}': c[{n!r}] must be an int in [0, in_features="
                             f"{in_f}], got {cl!r}")
        check_index(index[n], out_f, in_f, arg=f"{arg}: index[{n!r}]", c=cl, int64=True)
    check_budget(config.get("budget"), arg=f"{arg}: budget")
    check_c_min(config.get("c_min"), arg=f"{arg}: c_min")
    # The estimator is a record of how the Fisher was made (any str: a selection may come
    # from select_from_fisher on a Fisher of the user's own); nothing reads it.
    if not isinstance(config.get("estimator"), str):
        raise ValueError(f"argument '{arg}': estimator must be a str, got "
                         f"{config.get('estimator')!r}")
    for flag in ("skip_empty", "train_bias", "train_head"):
        if not isinstance(config.get(flag), bool):
            raise ValueError(f"argument '{arg}': {flag} must be a bool, got "
                             f"{config.get(flag)!r}")
    head = config.get("head")
    if head is not None and (not isinstance(head, str) or head in index):
        raise ValueError(f"argument '{arg}': head must be None or the name of a module that is "
                         f"not selected, got {head!r}")
    for key, v in counts.items():
        if key not in _COUNT_KEYS or not _is_int(v) or v < 0:
            raise ValueError(f"argument '{arg}': counts must map {_COUNT_KEYS} to ints >= 0, "
                             f"got {key!r}: {v!r}")


def check_state(state) -> Tuple[dict, dict]:
    """A saved selection (``Selection.state_dict()``) against itself: its keys, format and
    version, then :func:`check_fields`. Returns ``(fields, config)`` ready for the
    constructor."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError("argument 'state': not a fisheradaptune selection (no 'format': "
                         f"{FORMAT!r})")
    if state.get("version") != VERSION:
        raise ValueError(f"argument 'state': unsupported version {state.get('version')!r} "
                         f"(supported: {VERSION})")
    if set(state) != set(_STATE_KEYS):
        raise ValueError(f"argument 'state': expected the keys {sorted(_STATE_KEYS)}, got "
                         f"{sorted(state)}")
    cfg = state["config"]
    if not isinstance(cfg, dict) or set(cfg) != set(_CONFIG_KEYS):
        got = sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__
        raise ValueError(f"argument 'state': 'config' must have the keys "
                         f"{sorted(_CONFIG_KEYS)}, got {got}")
    shapes = state["shapes"]
    if isinstance(shapes, dict):
        shapes = {n: tuple(v) if isinstance(v, (list, tuple)) else v for n, v in shapes.items()}
    check_fields(state["index"], state["c"], shapes, cfg, state["counts"], arg="state")
    fields = {"index": dict(state["index"]), "c": dict(state["c"]), "shapes": shapes,
              "counts": dict(state["counts"])}
    return fields, dict(cfg)


#: Path components of the adapter layers peft inserts (LoRA and its variants).
_ADAPTER_PARTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                            "lora_magnitude_vector"})


def check_not_peft(model: nn.Module, arg: str = "model") -> None:
    """Refuse a model wrapped by peft (any module of the ``peft`` package, or an adapter
    layer's name). Selection trains entries of the pretrained weights: on a peft model it
    would freeze the adapters and train weights that peft's ``save_pretrained`` does not save,
    so the training would be lost on reload."""
    for name, m in model.named_modules():
        from_peft = type(m).__module__.split(".")[0] == "peft"
        if from_peft or any(part in _ADAPTER_PARTS for part in name.split(".")):
            where = f" (module {name!r}, a {type(m).__name__})" if name else ""
            raise ValueError(
                f"argument '{arg}': {type(model).__name__} is a peft model{where}; TR-PTS "
                "selection trains entries of the pretrained weights, which peft keeps frozen "
                "and its save_pretrained does not save, and it would freeze the adapters. "
                "Select and train on the plain model instead: before peft.get_peft_model(...), "
                "or after model.merge_and_unload()")


def check_untied(model: nn.Module, names: Iterable[str], arg: str = "model") -> None:
    """Refuse a selected module whose weight is shared with another module (tied weights, e.g.
    an ``lm_head`` tied to the input embedding, or one Linear registered under two names).
    Mask mode would mask each user's entries against the other's selection and compact mode
    would untie them, so neither keeps the shared tensor consistent."""
    holders: Dict[int, list] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(pname.rpartition(".")[0])
    mods = dict(model.named_modules(remove_duplicate=False))
    for n in names:
        w = getattr(mods.get(n), "weight", None)
        if not isinstance(w, nn.Parameter):
            continue
        others = [h for h in holders.get(id(w), []) if h != n]
        if others:
            raise ValueError(
                f"argument '{arg}': the weight of selected module {n!r} is shared with "
                f"{', '.join(repr(o) for o in others)} (tied weights); TR-PTS selects entries of "
                f"one module's weight and cannot keep a shared tensor consistent. Leave {n!r} "
                "out of `modules`, or untie the weights first (transformers: "
                "tie_word_embeddings=False; plain torch: give each module its own "
                "nn.Parameter)")
