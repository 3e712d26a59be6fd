"""The fake kernels (fisheradaptune/ops/<family>.py, checks in fisheradaptune/ops/_checks.py):
they make the C++ validation's checks, so that a meta tensor among real ones is refused by name
instead of silently doing nothing, and FakeTensor tracing (torch.compile) refuses what the eager
op refuses, with the same exception and message; a call whose tensors are all meta still returns
the right shapes.

Every op has a valid base call (``BASES``); the cases change one argument of it.
"""
from __future__ import annotations

import re
from typing import Callable, Dict

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

from helpers import assert_unchanged, devices, snapshot

_ops = torch.ops.fisheradaptune
_i64 = dict(dtype=torch.int64)


def _fisher_accumulate_(device):
    return dict(fisher=[torch.rand(6, device=device), torch.rand(2, 3, device=device)],
                grads=[torch.randn(6, device=device), torch.randn(2, 3, device=device)],
                decay=0.9, scale=0.1, segments=torch.tensor([[0, 0, 6, 0], [1, 0, 6, 1]]),
                group_sums=torch.full((2,), -1.0, device=device),
                nonfinite=torch.full((), -7, device=device, **_i64))


def _drift_lists(device):
    return dict(current=[torch.rand(6, device=device), torch.rand(2, 3, device=device)],
                reference=[torch.rand(6, device=device), torch.rand(2, 3, device=device)],
                segments=torch.tensor([[0, 0, 6, 0], [1, 0, 6, 1]]), num_groups=2)


def _js_drift(device):
    return dict(**_drift_lists(device), drift_mode="histogram", bins=8, lower_q=0.01, upper_q=0.99,
                min_log_range=1e-3, base2=False, update_reference=0.5)


def _js_mass_partial(device):
    return dict(**_drift_lists(device), totals=torch.ones(2, 2, dtype=torch.float64, device=device),
                update_reference=0.5)


def _per_sample_grad_sq_(device):
    return dict(fisher=torch.rand(3, 5, device=device), x=torch.randn(2, 4, 5, device=device),
                grad_out=torch.randn(2, 4, 3, device=device), scale=0.5,
                nonfinite=torch.zeros((), dtype=torch.int64, device=device))


def _token_prune_merge(device):
    return dict(x=torch.randn(2, 5, 3, device=device), scores=torch.rand(2, 4, device=device),
                sizes=torch.ones(2, 5, device=device), num_protected=1, keep=2, normalize=True)


def _token_prune_merge_backward(device):
    return dict(grad_out=torch.randn(2, 4, 3, device=device), x=torch.randn(2, 5, 3, device=device),
                scores=torch.rand(2, 4, device=device), sizes=torch.ones(2, 5, device=device),
                kept_index=torch.tensor([[0, 2], [1, 3]], device=device), num_protected=1,
                normalize=True)


def _bipartite_merge(device):
    return dict(x=torch.randn(2, 6, 3, device=device), metric=torch.randn(2, 6, 4, device=device),
                sizes=torch.ones(2, 6, device=device), num_protected=1, r=2)


def _bipartite_merge_backward(device):
    return dict(grad_out=torch.randn(2, 4, 3, device=device), sizes=torch.ones(2, 6, device=device),
                dest_index=torch.tensor([[0, 1, 2, 3, 2, 3], [0, 3, 1, 2, 3, 3]], device=device))


def _sampled_grad(device):
    return dict(grad_out=torch.randn(4, 3, device=device), x=torch.randn(4, 5, device=device),
                index=torch.tensor([[0, 4], [1, 1], [3, 2]], device=device))


#: Per op, a valid call as keyword arguments in schema order: ``make(device) -> dict``.
BASES: Dict[str, Callable[[str], dict]] = {
    "fisher_accumulate_": _fisher_accumulate_,
    "js_drift": _js_drift,
    "js_mass_totals": _drift_lists,
    "js_mass_partial": _js_mass_partial,
    "per_sample_grad_sq_": _per_sample_grad_sq_,
    "token_prune_merge": _token_prune_merge,
    "token_prune_merge_backward": _token_prune_merge_backward,
    "bipartite_merge": _bipartite_merge,
    "bipartite_merge_backward": _bipartite_merge_backward,
    "sampled_grad": _sampled_grad,
}


def _call(op: str, args: dict):
    return getattr(_ops, op)(*args.values())


def _tensors(args: dict):
    """Every tensor of a call (lists flattened), for snapshots."""
    out = []
    for v in args.values():
        out.extend(t for t in (v if isinstance(v, list) else [v]) if isinstance(t, torch.Tensor))
    return out


def _arg_of(message: str) -> str:
    """The argument an op's error names (``fisheradaptune.<op>: argument '<name>': ...``)."""
    found = re.match(r"fisheradaptune\.\w+: argument '([^']+)': ", message)
    assert found, f"no argument named in {message!r}"
    return found.group(1)


def _on_meta(args: dict, name: str) -> dict:
    """``args`` with the tensor ``name`` (``"fisher"``, or an item: ``"grads[1]"``) on meta."""
    args = dict(args)
    m = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", name)
    key, index = m.group(1), m.group(2)
    if index is None:
        args[key] = args[key].to("meta")
    else:
        items = list(args[key])
        items[int(index)] = items[int(index)].to("meta")
        args[key] = items
    return args


def test_every_op_has_a_valid_base_call_in_eager_and_under_fake_mode():
    """The cases below change one argument of these: each must be valid as it stands."""
    for op, make in BASES.items():
        _call(op, make("cpu"))
        mode = FakeTensorMode()
        fake = tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t,
                        make("cpu"))
        with mode:
            _call(op, fake)


def test_bases_cover_every_op():
    registered = {s.name.split("::")[1].split(".")[0] for s in torch._C._jit_get_all_schemas()
                  if s.name.startswith("fisheradaptune::")}
    assert registered == set(BASES)


# ---------------------------------------------------------------------------------------------
# (1) A meta tensor among real ones: refused by name, nothing written.

META_CASES = [
    ("fisher_accumulate_", "fisher[0]"), ("fisher_accumulate_", "fisher[1]"),
    ("fisher_accumulate_", "grads[0]"), ("fisher_accumulate_", "grads[1]"),
    ("fisher_accumulate_", "segments"), ("fisher_accumulate_", "group_sums"),
    ("fisher_accumulate_", "nonfinite"),
    *[(op, arg) for op in ("js_drift", "js_mass_totals", "js_mass_partial")
      for arg in ("current[0]", "current[1]", "reference[0]", "reference[1]", "segments")],
    ("js_mass_partial", "totals"),
    ("per_sample_grad_sq_", "fisher"), ("per_sample_grad_sq_", "x"),
    ("per_sample_grad_sq_", "grad_out"), ("per_sample_grad_sq_", "nonfinite"),
    ("token_prune_merge", "x"), ("token_prune_merge", "scores"), ("token_prune_merge", "sizes"),
    *[("token_prune_merge_backward", arg)
      for arg in ("grad_out", "x", "scores", "sizes", "kept_index")],
    *[("bipartite_merge", arg) for arg in ("x", "metric", "sizes")],
    *[("bipartite_merge_backward", arg) for arg in ("grad_out", "sizes", "dest_index")],
    ("sampled_grad", "grad_out"), ("sampled_grad", "x"), ("sampled_grad", "index"),
]


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("op, arg", META_CASES, ids=[f"{o}-{a}" for o, a in META_CASES])
def test_a_meta_tensor_among_real_ones_is_refused_by_name(device, op, arg):
    args = _on_meta(BASES[op](device), arg)
    live = [t for t in _tensors(args) if t.device.type != "meta"]
    before = snapshot(live)
    with pytest.raises(ValueError, match=rf"^fisheradaptune\.{op}: argument '{re.escape(arg)}': "
                       r"expected a (CPU )?tensor"):
        _call(op, args)
    assert_unchanged(before, live)


def test_meta_segments_among_cpu_tensors_issue_example():
    fisher = [torch.zeros(6), torch.zeros(6)]
    grads = [torch.ones(6), torch.ones(6)]
    segments = torch.tensor([[0, 0, 6, 0], [1, 0, 6, 0]], device="meta")
    sums, count = torch.empty(1), torch.zeros((), dtype=torch.int64)
    before = snapshot([fisher, grads, [sums, count]])
    with pytest.raises(ValueError, match="argument 'segments'"):
        _ops.fisher_accumulate_(fisher, grads, 0.9, 0.1, segments, sums, count)
    assert_unchanged(before, [fisher, grads, [sums, count]])


# ---------------------------------------------------------------------------------------------
# (2) Bad input: the fake kernel refuses what the C++ refuses, with the same exception and
# message. Each case: (op, change to the base call, exception, argument named).

_NAN, _INF = float("nan"), float("inf")


def _item(key: str, i: int, value: Callable) -> Callable[[dict], dict]:
    """A change of the list item ``args[key][i]`` to ``value(old)``."""
    def change(a):
        items = list(a[key])
        items[i] = value(items[i])
        return {key: items}
    return change


def _set(**kw) -> Callable[[dict], dict]:
    """A change of whole arguments: each value is a constant or ``f(old)``."""
    return lambda a: {k: (v(a[k]) if callable(v) else v) for k, v in kw.items()}


def _noncontig(t):
    """``t``'s values in a non-contiguous tensor of its shape, dtype and device."""
    if t.dim() == 2:
        return t.t().contiguous().t()
    return t.new_empty(2 * t.numel())[::2].copy_(t)


def _lists_cases(op):
    """check_drift_lists' refusals, shared by js_drift, js_mass_totals and js_mass_partial."""
    return [
        (op, _set(reference=lambda r: r[:1]), ValueError, "reference"),
        (op, _set(num_groups=-1), ValueError, "num_groups"),
        (op, _item("reference", 0, lambda t: t.half()), ValueError, "reference[0]"),
        (op, _item("reference", 1, lambda t: t.long()), ValueError, "reference[1]"),
        (op, _item("reference", 1, _noncontig), ValueError, "reference[1]"),
        (op, _item("current", 1, lambda t: t.reshape(3, 2)), ValueError, "current[1]"),
        (op, _item("current", 0, lambda t: t.double()), ValueError, "current[0]"),
        (op, lambda a: {"current": [c.double() for c in a["current"]][:1] + a["current"][1:],
                        "reference": [r.double() for r in a["reference"]][:1] + a["reference"][1:]},
         ValueError, "reference[1]", CPU),
        (op, _set(segments=lambda s: s.int()), ValueError, "segments"),
        (op, _set(segments=lambda s: s[:, :3]), ValueError, "segments"),
        (op, _set(segments=lambda s: s.flatten()), ValueError, "segments"),
    ]


#: (op, change, exception, argument, *flags). Flag ``CPU``: a case of float64 state, which other
#: devices refuse earlier (by another argument).
CPU = "cpu"
CASES = [
    # fisher_accumulate_
    ("fisher_accumulate_", _set(grads=lambda g: g[:1]), ValueError, "grads"),
    ("fisher_accumulate_", _set(decay=_NAN), ValueError, "decay"),
    ("fisher_accumulate_", _set(decay=_INF), ValueError, "decay"),
    ("fisher_accumulate_", _set(scale=-_INF), ValueError, "scale"),
    ("fisher_accumulate_", _set(scale=_NAN), ValueError, "scale"),
    ("fisher_accumulate_", _set(decay=-0.5), ValueError, "decay"),
    ("fisher_accumulate_", _set(scale=-1.0), ValueError, "scale"),
    ("fisher_accumulate_", _set(decay=1e39), ValueError, "decay"),
    ("fisher_accumulate_", _set(scale=1e300), ValueError, "scale"),
    ("fisher_accumulate_", _set(nonfinite=lambda t: t.int()), ValueError, "nonfinite"),
    ("fisher_accumulate_", _set(nonfinite=lambda t: t.new_zeros(2)), ValueError, "nonfinite"),
    ("fisher_accumulate_", _set(group_sums=lambda t: t.double()), ValueError, "group_sums"),
    ("fisher_accumulate_", _set(group_sums=lambda t: t.new_empty(2, 1)), ValueError, "group_sums"),
    ("fisher_accumulate_", _set(group_sums=_noncontig), ValueError, "group_sums"),
    ("fisher_accumulate_", _set(segments=None), ValueError, "group_sums"),
    ("fisher_accumulate_", _item("fisher", 0, lambda t: t.int()), ValueError, "fisher[0]"),
    ("fisher_accumulate_", _item("fisher", 1, lambda t: t.half()), ValueError, "fisher[1]"),
    ("fisher_accumulate_", _item("fisher", 1, _noncontig), ValueError, "fisher[1]"),
    ("fisher_accumulate_", _item("grads", 0, lambda t: t[:5]), ValueError, "grads[0]"),
    ("fisher_accumulate_", _item("grads", 1, lambda t: t.reshape(3, 2)), ValueError, "grads[1]"),
    ("fisher_accumulate_", _item("grads", 1, lambda t: t.double()), ValueError, "grads[1]"),
    ("fisher_accumulate_", _item("grads", 0, lambda t: t.bool()), ValueError, "grads[0]"),
    ("fisher_accumulate_", _set(segments=lambda s: s.int()), ValueError, "segments"),
    ("fisher_accumulate_", _set(segments=lambda s: s[:, :3]), ValueError, "segments"),
    ("fisher_accumulate_", _set(segments=lambda s: s.flatten()), ValueError, "segments"),
    # js_drift
    ("js_drift", _set(drift_mode="bogus"), ValueError, "drift_mode"),
    ("js_drift", _set(bins=1), ValueError, "bins"),
    ("js_drift", _set(bins=0), ValueError, "bins"),
    ("js_drift", _set(bins=2 ** 31), ValueError, "bins"),
    ("js_drift", _set(bins=2 ** 30 + 1, drift_mode="mass"), ValueError, "bins"),
    ("js_drift", _set(lower_q=0.5, upper_q=0.5), ValueError, "lower_q/upper_q"),
    ("js_drift", _set(lower_q=-0.1), ValueError, "lower_q/upper_q"),
    ("js_drift", _set(upper_q=1.5), ValueError, "lower_q/upper_q"),
    ("js_drift", _set(lower_q=_NAN), ValueError, "lower_q/upper_q"),
    ("js_drift", _set(min_log_range=0.0), ValueError, "min_log_range"),
    ("js_drift", _set(min_log_range=_INF), ValueError, "min_log_range"),
    ("js_drift", _set(min_log_range=_NAN), ValueError, "min_log_range"),
    ("js_drift", _set(update_reference=1.5), ValueError, "update_reference"),
    ("js_drift", _set(update_reference=-0.1), ValueError, "update_reference"),
    ("js_drift", _set(update_reference=_NAN), ValueError, "update_reference"),
    *_lists_cases("js_drift"),
    # js_mass_totals, js_mass_partial
    *_lists_cases("js_mass_totals"),
    *_lists_cases("js_mass_partial"),
    ("js_mass_partial", _set(update_reference=2.0), ValueError, "update_reference"),
    ("js_mass_partial", _set(totals=lambda t: t.float()), ValueError, "totals"),
    ("js_mass_partial", _set(totals=lambda t: t.new_ones(2, 3)), ValueError, "totals"),
    ("js_mass_partial", _set(totals=lambda t: t.new_ones(2)), ValueError, "totals"),
    # per_sample_grad_sq_
    ("per_sample_grad_sq_", _set(scale=_NAN), ValueError, "scale"),
    ("per_sample_grad_sq_", _set(scale=_INF), ValueError, "scale"),
    ("per_sample_grad_sq_", _set(scale=-1.0), ValueError, "scale"),
    ("per_sample_grad_sq_", _set(scale=1e300), ValueError, "scale"),
    ("per_sample_grad_sq_", _set(nonfinite=lambda t: t.int()), ValueError, "nonfinite"),
    ("per_sample_grad_sq_", _set(nonfinite=lambda t: t.new_zeros(2)), ValueError, "nonfinite"),
    ("per_sample_grad_sq_", _set(fisher=lambda t: t.half()), ValueError, "fisher"),
    ("per_sample_grad_sq_", _set(fisher=_noncontig), ValueError, "fisher"),
    ("per_sample_grad_sq_", _set(fisher=lambda t: t.new_zeros(5, 3)), ValueError, "fisher"),
    ("per_sample_grad_sq_", _set(x=lambda t: t[:, 0]), ValueError, "x"),
    ("per_sample_grad_sq_", _set(x=lambda t: t.long()), ValueError, "x"),
    ("per_sample_grad_sq_", _set(grad_out=lambda t: t[:, 0]), ValueError, "grad_out"),
    ("per_sample_grad_sq_", _set(grad_out=lambda t: t[:1]), ValueError, "grad_out"),
    ("per_sample_grad_sq_", _set(grad_out=lambda t: t[:, :3]), ValueError, "grad_out"),
    ("per_sample_grad_sq_", _set(grad_out=lambda t: t.half()), ValueError, "grad_out"),
    # token_prune_merge
    ("token_prune_merge", _set(x=lambda t: t[0]), ValueError, "x"),
    ("token_prune_merge", _set(x=lambda t: t.long()), ValueError, "x"),
    ("token_prune_merge", _set(num_protected=-1), ValueError, "num_protected"),
    ("token_prune_merge", _set(num_protected=5), ValueError, "num_protected"),
    ("token_prune_merge", _set(scores=lambda t: t[:, :3]), ValueError, "scores"),
    ("token_prune_merge", _set(scores=lambda t: t.double()), ValueError, "scores"),
    ("token_prune_merge", _set(sizes=lambda t: t[:, :4]), ValueError, "sizes"),
    ("token_prune_merge", _set(sizes=lambda t: t.double()), ValueError, "sizes"),
    ("token_prune_merge", _set(keep=5), ValueError, "keep"),
    ("token_prune_merge", _set(keep=-1), ValueError, "keep"),
    # bipartite_merge
    ("bipartite_merge", _set(x=lambda t: t[0]), ValueError, "x"),
    ("bipartite_merge", _set(x=lambda t: t.int()), ValueError, "x"),
    ("bipartite_merge", _set(metric=lambda t: t[:, :5]), ValueError, "metric"),
    ("bipartite_merge", _set(metric=lambda t: t[0]), ValueError, "metric"),
    ("bipartite_merge", _set(metric=lambda t: t.long()), ValueError, "metric"),
    ("bipartite_merge", _set(sizes=lambda t: t[:, :5]), ValueError, "sizes"),
    ("bipartite_merge", _set(sizes=lambda t: t.half()), ValueError, "sizes"),
    ("bipartite_merge", _set(num_protected=-1), ValueError, "num_protected"),
    ("bipartite_merge", _set(num_protected=7), ValueError, "num_protected"),
    ("bipartite_merge", _set(r=3), ValueError, "r"),
    ("bipartite_merge", _set(r=-1), ValueError, "r"),
    ("bipartite_merge", _set(num_protected=5, r=1), ValueError, "r"),
    # bipartite_merge_backward
    ("bipartite_merge_backward", _set(grad_out=lambda t: t[0]), ValueError, "grad_out"),
    ("bipartite_merge_backward", _set(grad_out=lambda t: t.long()), ValueError, "grad_out"),
    ("bipartite_merge_backward", _set(dest_index=lambda t: t.int()), ValueError, "dest_index"),
    ("bipartite_merge_backward", _set(dest_index=lambda t: t[:, :3]), ValueError, "dest_index"),
    ("bipartite_merge_backward", _set(dest_index=lambda t: t[:1]), ValueError, "dest_index"),
    ("bipartite_merge_backward", _set(sizes=lambda t: t[:, :5]), ValueError, "sizes"),
    ("bipartite_merge_backward", _set(sizes=lambda t: t.double()), ValueError, "sizes"),
    # token_prune_merge_backward
    ("token_prune_merge_backward", _set(x=lambda t: t.reshape(10, 3)), ValueError, "x"),
    ("token_prune_merge_backward", _set(num_protected=5), ValueError, "num_protected"),
    ("token_prune_merge_backward", _set(scores=lambda t: t[:1]), ValueError, "scores"),
    ("token_prune_merge_backward", _set(sizes=lambda t: t.half()), ValueError, "sizes"),
    ("token_prune_merge_backward", _set(kept_index=lambda t: t.int()), ValueError, "kept_index"),
    ("token_prune_merge_backward", _set(kept_index=lambda t: t.new_zeros(2, 5)), ValueError,
     "kept_index"),
    ("token_prune_merge_backward", _set(kept_index=lambda t: t[:1]), ValueError, "kept_index"),
    ("token_prune_merge_backward", _set(grad_out=lambda t: t.double()), ValueError, "grad_out"),
    ("token_prune_merge_backward", _set(grad_out=lambda t: t[:, :3]), ValueError, "grad_out"),
    ("token_prune_merge_backward", _set(grad_out=lambda t: t[:, :, :2]), ValueError, "grad_out"),
    # sampled_grad
    ("sampled_grad", _set(grad_out=lambda t: t[0]), ValueError, "grad_out"),
    ("sampled_grad", _set(grad_out=lambda t: t.long()), ValueError, "grad_out"),
    ("sampled_grad", _set(x=lambda t: t[:3]), ValueError, "x"),
    ("sampled_grad", _set(x=lambda t: t.double()), ValueError, "x"),
    ("sampled_grad", _set(index=lambda t: t.int()), ValueError, "index"),
    ("sampled_grad", _set(index=lambda t: t[:2]), ValueError, "index"),
    ("sampled_grad", _set(index=lambda t: t[0]), ValueError, "index"),
    ("sampled_grad", _set(x=lambda t: t.new_zeros(4, 0)), ValueError, "index"),
]


def _params():
    seen: Dict[str, int] = {}
    for op, change, exc, arg, *flags in CASES:
        key = f"{op}-{arg}"
        seen[key] = seen.get(key, 0) + 1
        yield pytest.param(op, change, exc, arg, set(flags), id=f"{key}-{seen[key]}")


def _changed(op: str, change: Callable[[dict], dict], device: str) -> dict:
    args = BASES[op](device)
    args.update(change(args))
    return args


def _error(call) -> BaseException:
    with pytest.raises(Exception) as info:
        call()
    return info.value


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("op, change, exc, arg, flags", list(_params()))
def test_fake_kernel_refuses_what_the_op_refuses(device, op, change, exc, arg, flags):
    if CPU in flags and device != "cpu":
        pytest.skip("float64 state is CPU-only")
    args = _changed(op, change, device)
    mode = FakeTensorMode()
    fake = tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, args)
    with mode:
        fake_error = _error(lambda: _call(op, fake))
    assert type(fake_error) is exc, fake_error
    assert _arg_of(str(fake_error)) == arg, fake_error
    assert str(fake_error).startswith(f"fisheradaptune.{op}: ")

    live = _tensors(args)
    before = snapshot(live)
    try:
        _call(op, args)
    except Exception as e:  # noqa: BLE001 - compared below
        real_error = e
    else:
        raise AssertionError(f"the op accepted what its fake kernel refuses: {fake_error}")
    assert type(real_error) is exc, real_error
    assert _arg_of(str(real_error)) == arg, real_error
    assert_unchanged(before, live)
    # Same words too, so that an error reads the same traced or eager.
    assert str(fake_error) == str(real_error)


COMPILE_CASES = [
    ("fisher_accumulate_", _item("grads", 1, lambda t: t.reshape(3, 2)), "grads[1]"),
    ("js_drift", _set(bins=1), "bins"),
    ("js_drift", _set(bins=2 ** 31), "bins"),
    ("sampled_grad", _set(x=lambda t: t[:3]), "x"),
]


@pytest.mark.parametrize("op, change, arg", COMPILE_CASES, ids=[c[0] for c in COMPILE_CASES])
def test_torch_compile_reports_bad_input_while_tracing(op, change, arg):
    """Dynamo wraps the fake kernel's error (a TorchRuntimeError naming it); nothing runs."""
    args = _changed(op, change, "cpu")
    live = _tensors(args)
    before = snapshot(live)
    compiled = torch.compile(lambda *a: getattr(_ops, op)(*a), backend="aot_eager",
                             fullgraph=True)
    with pytest.raises(Exception, match=rf"ValueError.*fisheradaptune\.{op}: argument "
                       rf"'{re.escape(arg)}'"):
        compiled(*args.values())
    assert_unchanged(before, live)


# ---------------------------------------------------------------------------------------------
# (3) All-meta calls (meta tracing): the outputs' shapes and dtypes of the real op.


def _meta(args: dict, segments_device: str) -> dict:
    out = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, args)
    if "segments" in args and args["segments"] is not None:
        out["segments"] = args["segments"].to(segments_device)
    return out


def _metadata(result):
    if result is None:
        return None
    if isinstance(result, torch.Tensor):
        return (tuple(result.shape), result.dtype)
    return [_metadata(r) for r in result]


@pytest.mark.parametrize("segments_device", ["cpu", "meta"])
@pytest.mark.parametrize("op", list(BASES))
def test_all_meta_call_returns_the_ops_shapes_and_dtypes(op, segments_device):
    args = BASES[op]("cpu")
    meta = _meta(args, segments_device)
    want = _metadata(_call(op, args))
    got = _call(op, meta)
    assert _metadata(got) == want
    for t in (got if isinstance(got, tuple) else [got]):
        assert t is None or t.device.type == "meta"


@pytest.mark.parametrize("op", ["js_drift", "js_mass_totals", "js_mass_partial"])
def test_all_meta_drift_with_other_group_counts_and_empty_lists(op):
    """The output follows num_groups; with empty lists the device is segments'."""
    args = BASES[op]("cpu")
    args.update(current=[], reference=[], segments=torch.zeros(0, 4, **_i64), num_groups=5)
    if op == "js_mass_partial":
        args["totals"] = torch.ones(2, 5, dtype=torch.float64)
    cpu = _call(op, args)
    meta = _call(op, _meta(args, "meta"))
    assert _metadata(meta) == _metadata(cpu) and meta.device.type == "meta"


@pytest.mark.parametrize("device", devices)
def test_bfloat16_fisher_state_is_admitted_in_eager_and_under_fake_mode(device):
    """Note [bfloat16 state] (csrc/common/state.h): the fake kernel admits bfloat16 Fisher
    state exactly where the op does (any device), and float16 state is still refused by both
    with the same message."""
    def error_of(call):
        try:
            call()
        except Exception as e:  # noqa: BLE001 - compared below
            return e
        return None

    for dtype, ok in ((torch.bfloat16, True), (torch.float16, False)):
        args = _fisher_accumulate_(device)
        args.update(fisher=[f.to(dtype) for f in args["fisher"]])
        mode = FakeTensorMode()
        fake = tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, args)
        with mode:
            fake_error = error_of(lambda: _call("fisher_accumulate_", fake))
        real_error = error_of(lambda: _call("fisher_accumulate_", args))
        if ok:
            assert fake_error is None and real_error is None, (fake_error, real_error)
            assert all(f.dtype == torch.bfloat16 for f in args["fisher"])
        else:
            message = ("fisheradaptune.fisher_accumulate_: argument 'fisher[0]': expected float32 "
                       "or bfloat16 (or float64 on CPU), got Half on ")
            assert str(fake_error).startswith(message), fake_error
            assert str(real_error).startswith(message), real_error


def test_all_meta_float64_state_is_admitted():
    """Meta stands for any device, float64 (CPU-only) state included."""
    args = _fisher_accumulate_("cpu")
    args.update(fisher=[f.double() for f in args["fisher"]],
                grads=[g.double() for g in args["grads"]])
    assert _call("fisher_accumulate_", _meta(args, "cpu")) is None


# ---------------------------------------------------------------------------------------------
# (4) Aliasing (Note [Aliasing], csrc/common/validate.h): every overlap the C++ refuses is refused by
# the fake kernel too, with the same exception and message, so that torch.compile(fullgraph)
# does not run what eager refuses (issue 21: `js_drift([c], [c], update_reference=0.5)` and
# per_sample_grad_sq_ with `fisher` overlapping `x` ran when compiled). Each case: (op, change
# to the base call, argument named, the argument it overlaps, both written).

def _same_tensor_twice_drift(a):
    """The issue's reproducer: one tensor as both current and reference, one group."""
    c = a["current"][0]
    return dict(current=[c], reference=[c], segments=torch.tensor([[0, 0, 6, 0]]), num_groups=1)


def _shared(make):
    """A change that builds its overlapping tensors from one buffer on the base call's device."""
    def change(a):
        device = next(iter(_tensors(a))).device
        return make(device, a)
    return change


ALIAS_CASES = [
    # fisher_accumulate_: every fisher tensor, group_sums and nonfinite are written; grads read
    ("fisher_accumulate_", _shared(lambda d, a: (lambda buf: dict(
        fisher=[buf[:6], buf[:6].view(2, 3)]))(torch.rand(12, device=d))),
     "fisher[1]", "fisher[0]", True),
    ("fisher_accumulate_", _shared(lambda d, a: (lambda buf: dict(
        fisher=[a["fisher"][0], buf[:6].view(2, 3)], grads=[buf[3:9], a["grads"][1]]))(
            torch.rand(12, device=d))),
     "grads[0]", "fisher[1]", False),
    ("fisher_accumulate_", _shared(lambda d, a: (lambda buf: dict(
        fisher=[buf[:6], a["fisher"][1]], group_sums=buf[5:7]))(torch.rand(8, device=d))),
     "group_sums", "fisher[0]", True),
    ("fisher_accumulate_", _shared(lambda d, a: (lambda buf: dict(
        grads=[a["grads"][0], buf[:6].view(2, 3)], nonfinite=buf.view(torch.int64)[1]))(
            torch.zeros(8, device=d))),
     "nonfinite", "grads[1]", False),
    # js_drift / js_mass_partial with an update: reference written, current (and totals) read
    ("js_drift", _same_tensor_twice_drift, "reference[0]", "current[0]", False),
    ("js_drift", _shared(lambda d, a: (lambda buf: dict(
        reference=[buf[:6], buf[:6].view(2, 3)]))(torch.rand(12, device=d))),
     "reference[1]", "reference[0]", True),
    ("js_mass_partial", lambda a: {**_same_tensor_twice_drift(a),
                                   "totals": a["totals"][:, :1].contiguous()},
     "reference[0]", "current[0]", False),
    ("js_mass_partial", _shared(lambda d, a: (lambda buf: dict(
        reference=[buf[:6], a["reference"][1]],
        totals=buf[4:12].view(torch.float64).view(2, 2)))(torch.rand(14, device=d))),
     "totals", "reference[0]", False),
    # per_sample_grad_sq_: fisher and nonfinite written, x and grad_out read in place
    ("per_sample_grad_sq_", _shared(lambda d, a: (lambda buf: dict(
        x=buf.view(2, 4, 5), fisher=buf[10:25].view(3, 5)))(torch.randn(40, device=d))),
     "x", "fisher", False),
    ("per_sample_grad_sq_", _shared(lambda d, a: (lambda buf: dict(
        fisher=buf[:15].view(3, 5), grad_out=buf[12:36].view(2, 4, 3)))(
            torch.randn(36, device=d))),
     "grad_out", "fisher", False),
    ("per_sample_grad_sq_", _shared(lambda d, a: (lambda buf: dict(
        fisher=buf[:15].view(3, 5), nonfinite=buf.view(torch.int64)[7]))(
            torch.rand(16, device=d))),
     "nonfinite", "fisher", True),
]

#: Sharing that the C++ accepts (nothing written overlaps): accepted everywhere too.
ALIAS_OK = [
    # nothing is written without an update: current and reference may be the same tensors
    ("js_drift", lambda a: {**_same_tensor_twice_drift(a), "update_reference": None}),
    ("js_mass_partial", lambda a: {**_same_tensor_twice_drift(a), "update_reference": None,
                                   "totals": a["totals"][:, :1].contiguous()}),
    # inputs only read may overlap each other
    ("fisher_accumulate_", _shared(lambda d, a: (lambda buf: dict(
        grads=[buf[:6], buf[:6].view(2, 3)]))(torch.randn(6, device=d)))),
    # a non-contiguous input is copied before the kernel reads it: the copy aliases nothing
    ("js_drift", lambda a: (lambda buf: dict(current=[buf[::2], a["current"][1]],
                                             reference=[buf[:6], a["reference"][1]]))(
        torch.rand(12, device=a["current"][0].device))),
]


def _alias_ids(cases):
    return [f"{c[0]}-{c[2]}" if len(c) > 2 else f"{c[0]}-{i}" for i, c in enumerate(cases)]


def _compiled(op: str):
    return torch.compile(lambda *a: getattr(_ops, op)(*a), backend="aot_eager", fullgraph=True)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("op, change, arg, other, both", ALIAS_CASES, ids=_alias_ids(ALIAS_CASES))
def test_aliasing_is_refused_eagerly_under_fake_mode_and_compiled(device, op, change, arg, other,
                                                                    both):
    args = _changed(op, change, device)
    message = (rf"^fisheradaptune\.{op}: argument '{re.escape(arg)}': shares memory with "
               rf"'{re.escape(other)}', and {'both are' if both else 'one is'} written in place")
    live = _tensors(args)
    before = snapshot(live)
    with pytest.raises(ValueError, match=message) as eager:
        _call(op, args)
    assert_unchanged(before, live)

    mode = FakeTensorMode()
    fake = tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, args)
    with mode, pytest.raises(ValueError) as traced:
        _call(op, fake)
    assert str(traced.value) == str(eager.value)

    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"ValueError.*" + message[1:]):
        _compiled(op)(*args.values())
    assert_unchanged(before, live)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("op, change", ALIAS_OK, ids=_alias_ids(ALIAS_OK))
def test_sharing_that_eager_accepts_is_accepted_under_fake_mode_and_compiled(device, op, change):
    def make():
        torch.manual_seed(0)  # the same values in every call (the bases are random)
        return _changed(op, change, device)

    eager_args, compiled_args = make(), make()
    want = _call(op, eager_args)
    mode = FakeTensorMode()
    fake = tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t,
                    make())
    with mode:
        _call(op, fake)
    torch._dynamo.reset()
    got = _compiled(op)(*compiled_args.values())
    torch.testing.assert_close(got, want)
    assert_unchanged(_tensors(eager_args), _tensors(compiled_args))
