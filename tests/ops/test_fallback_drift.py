"""The pure-PyTorch fallback kernels of the drift family (``fisheradaptune.ops.drift``'s
``FALLBACK_KERNELS``: js_drift, js_mass_totals, js_mass_partial), called directly with the
schema's arguments and compared with the compiled ops (when present) and with
fisheradaptune.reference: the same results to rounding, the same in-place reference update, the
same exceptions and messages for bad input with nothing modified, determinism, and bins up to
2^30 without a dense histogram.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given, strategies as st

from helpers import random_snapshots as snapshots
from test_js_drift import _sparse_histogram_distance as sparse_histogram_distance
from helpers import (CHUNK, EDGE_NUMELS, LAYOUT_KINDS, assert_bitwise_equal, assert_unchanged,
                     devices, make_layout, set_threads, shape_lists, snapshot)
import fisheradaptune
from fisheradaptune import groups, reference
from fisheradaptune.groups import GroupLayout
from fisheradaptune.ops import drift

FB = drift.FALLBACK_KERNELS
OPS = torch.ops.fisheradaptune
#: Whether torch.ops.fisheradaptune runs the compiled kernels (else they are these fallbacks).
COMPILED = getattr(fisheradaptune, "has_compiled_ops", lambda: True)()
requires_compiled = pytest.mark.skipif(not COMPILED, reason="the compiled library is not in use")
F32_EPS = 1e-6
MODES = ("mass", "histogram")
FAMILY = ("js_drift", "js_mass_totals", "js_mass_partial")


def dtypes_for(device):
    # bfloat16: Note [bfloat16 state] (csrc/common/state.h), every device.
    if device == "cpu":
        return [torch.float32, torch.float64, torch.bfloat16]
    return [torch.float32, torch.bfloat16]


def drift_args(cur, ref, layout, mode="mass", bins=64, lower_q=0.01, upper_q=0.99,
               min_log_range=1e-3, base2=False, rho=None):
    """js_drift's schema arguments."""
    return (cur, ref, layout.segments, layout.num_groups, mode, bins, lower_q, upper_q,
            min_log_range, base2, rho)


def run(fn, args):
    """``fn(*args)`` on a copy of the reference list (args[1]): (result, the written copy)."""
    args = list(args)
    args[1] = snapshot(args[1])
    return fn(*args), args[1]


def compiled_and_fallback(name, args):
    """The compiled op's and the fallback's (result, reference after the call), on copies."""
    fb = run(FB[name], args)
    if not COMPILED:
        return None, fb
    return run(getattr(OPS, name), args), fb


def assert_same(name, args, rtol, atol):
    """Fallback equals the compiled op to (rtol, atol); the written references bitwise."""
    (want, want_ref), (got, got_ref) = compiled_and_fallback(name, args) if COMPILED else \
        ((None, None), run(FB[name], args))
    if want is not None:
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.device == want.device
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True)
        assert_bitwise_equal(got_ref, want_ref)
    return got, got_ref


def assert_ema(new_refs, cur, old_refs, rho):
    """The update as ema_chunk rounds it: rho and 1 - rho in the state's dtype, each product
    and the sum rounded there (computed here in float64, then compared with a 2-ulp bound)."""
    for new, c, old in zip(new_refs, cur, old_refs):
        if rho is None:
            assert_bitwise_equal(new, old)
            continue
        # bfloat16 state is updated in float32 (Note [bfloat16 state]), rounded once.
        compute = torch.float32 if old.dtype == torch.bfloat16 else old.dtype
        r = torch.tensor(rho, dtype=compute)
        exp = float(r) * old.double() + float(1 - r) * c.double()
        scale = float(r) * old.double().abs() + float(1 - r) * c.double().abs()
        err = (new.double() - exp).abs()
        assert bool((err <= 2 * torch.finfo(new.dtype).eps * scale).all())


# ---------------------------------------------------------------------------------------------
# The kernels' signatures


def test_every_op_of_the_family_has_a_kernel_with_the_schemas_arguments():
    assert set(FB) == set(FAMILY)
    for name, fn in FB.items():
        assert fn.__name__ == f"_{name}_fallback"
        schema = getattr(OPS, name).default._schema
        assert list(inspect.signature(fn).parameters) == [a.name for a in schema.arguments]


@requires_compiled
def test_chunk_is_the_compiled_one():
    assert drift._FB_CHUNK == CHUNK


# ---------------------------------------------------------------------------------------------
# Against the compiled ops and the reference


@pytest.mark.parametrize("device", devices)
@given(shapes=shape_lists(max_len=60), kind=st.sampled_from(LAYOUT_KINDS),
       mode=st.sampled_from(MODES), dtype_idx=st.integers(0, 2), base2=st.booleans(),
       zeros=st.sampled_from([0.0, 0.4]), rho=st.sampled_from([None, 0.0, 0.3, 0.9, 1.0]),
       seed=st.integers(0, 2**20))
def test_js_drift_matches_compiled_and_reference(device, shapes, kind, mode, dtype_idx, base2,
                                                 zeros, rho, seed):
    dtype = dtypes_for(device)[dtype_idx % len(dtypes_for(device))]
    layout = make_layout(shapes, kind, seed)
    cur, ref = snapshots(shapes, seed, dtype, device, zeros=zeros, negative=True)
    cur_before, ref_before = snapshot(cur), snapshot(ref)
    args = drift_args(cur, ref, layout, mode, base2=base2, rho=rho)
    got, got_ref = assert_same("js_drift", args, rtol=1e-6, atol=1e-7)
    assert got.dtype == torch.float32 and got.shape == (layout.num_groups,)
    assert got.device.type == device
    assert_unchanged([cur_before, ref_before], [cur, ref])   # the call wrote only its copy
    ref_twin = snapshot(ref)
    want = reference.js_drift(cur, ref_twin, layout, drift_mode=mode,
                              base="2" if base2 else "e", update_reference=rho)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=F32_EPS)
    assert_ema(got_ref, cur, ref_before, rho)


@pytest.mark.parametrize("device", devices)
@given(shapes=shape_lists(max_len=60), kind=st.sampled_from(LAYOUT_KINDS),
       dtype_idx=st.integers(0, 2), zeros=st.sampled_from([0.0, 0.4]),
       rho=st.sampled_from([None, 0.5]), inflate=st.sampled_from([1.0, 3.0]),
       seed=st.integers(0, 2**20))
def test_mass_halves_match_compiled_reference_and_js_drift(device, shapes, kind, dtype_idx,
                                                           zeros, rho, inflate, seed):
    dtype = dtypes_for(device)[dtype_idx % len(dtypes_for(device))]
    layout = make_layout(shapes, kind, seed)
    cur, ref = snapshots(shapes, seed, dtype, device, zeros=zeros, negative=True)
    seg, G = layout.segments, layout.num_groups
    totals, _ = assert_same("js_mass_totals", (cur, ref, seg, G), rtol=1e-12, atol=0)
    assert totals.dtype == torch.float64 and totals.shape == (2, G)
    torch.testing.assert_close(totals, reference.js_mass_totals(cur, ref, layout),
                               rtol=1e-12, atol=0)
    given_totals = totals * inflate
    partial, partial_ref = assert_same("js_mass_partial", (cur, ref, seg, G, given_totals, rho),
                                       rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(partial, reference.js_mass_partial(
        cur, snapshot(ref), layout, given_totals), rtol=1e-6, atol=1e-12)
    assert_ema(partial_ref, cur, ref, rho)
    # js_drift's mass mode is the two halves, bitwise (the same sums in the same order)
    js, js_ref = run(FB["js_drift"], drift_args(cur, ref, layout, "mass", rho=rho))
    halves, _ = run(FB["js_mass_partial"], (cur, ref, seg, G, totals, rho))
    assert_bitwise_equal(js, halves.clamp_min(0).sqrt().float())
    assert_bitwise_equal(js_ref, partial_ref)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("numel", EDGE_NUMELS)
def test_sizes_straddling_the_block_and_chunk(device, mode, numel):
    shapes = [(5,), (numel,), (3, 7)]
    cur, ref = snapshots(shapes, numel, torch.float32, device, zeros=0.1, negative=True)
    for kind in LAYOUT_KINDS:
        layout = make_layout(shapes, kind, numel)
        got, _ = assert_same("js_drift", drift_args(cur, ref, layout, mode, rho=0.5),
                             rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got, reference.js_drift(cur, snapshot(ref), layout,
                                                           drift_mode=mode),
                                   rtol=1e-5, atol=F32_EPS)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rho", [None, 0.5])
def test_zero_totals_and_empty_groups_give_zero(zero_total_case, mode, rho):
    cur, ref, layout = zero_total_case()
    got, _ = assert_same("js_drift", drift_args(cur, ref, layout, mode, rho=rho), rtol=0, atol=0)
    assert got[[0, 1, 3, 4]].tolist() == [0.0] * 4 and float(got[2]) > 0
    totals = FB["js_mass_totals"](cur, ref, layout.segments, layout.num_groups)
    assert totals[:, 4].tolist() == [0.0, 0.0]
    partial = FB["js_mass_partial"](cur, snapshot(ref), layout.segments, layout.num_groups,
                                    totals, rho)
    assert partial[[0, 1, 3, 4]].tolist() == [0.0] * 4
    forced = totals.clone()
    forced[0, 2] = 0.0   # a zero total handed in gives 0, whatever the elements
    assert float(FB["js_mass_partial"](cur, ref, layout.segments, layout.num_groups, forced,
                                       None)[2]) == 0.0


def test_empty_lists_and_no_groups():
    layout = GroupLayout((), (), ("a", "b"), torch.zeros(0, 4, dtype=torch.int64))
    for mode in MODES:
        got, _ = assert_same("js_drift", drift_args([], [], layout, mode, rho=0.5), 0, 0)
        assert got.tolist() == [0.0, 0.0]
    totals, _ = assert_same("js_mass_totals", ([], [], layout.segments, 2), 0, 0)
    assert totals.tolist() == [[0.0, 0.0], [0.0, 0.0]]
    partial, _ = assert_same("js_mass_partial", ([], [], layout.segments, 2, totals, 0.5), 0, 0)
    assert partial.tolist() == [0.0, 0.0]
    no_groups = GroupLayout(("w",), ((3,),), (), torch.zeros(0, 4, dtype=torch.int64))
    cur, ref = [torch.rand(3)], [torch.rand(3)]
    for mode in MODES:
        got, new_ref = assert_same("js_drift", drift_args(cur, ref, no_groups, mode, rho=0.25),
                                   0, 0)
        assert got.shape == (0,)
        assert_ema(new_ref, cur, ref, 0.25)    # updated although in no group


# ---------------------------------------------------------------------------------------------
# Non-finite values: handled as the C++ handles them


def _nonfinite_case():
    cur = [torch.tensor([1.0, 2.0, 3.0, float("nan"), 1.0, 2.0, float("inf"), 4.0, 1.0, 2.0]),
           torch.tensor([0.5, -float("inf"), 2.0, 3.0])]
    ref = [torch.tensor([2.0, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0, 3.0, 2.0, float("nan")]),
           torch.tensor([1.0, 2.0, 3.0, float("inf")])]
    layout = GroupLayout(("a", "b"), ((10,), (4,)), ("nan", "inf", "nan-ref", "inf-both"),
                         torch.tensor([[0, 0, 4, 0], [0, 4, 8, 1], [0, 8, 10, 2], [1, 0, 4, 3]]))
    return cur, ref, layout


@requires_compiled
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("quantiles", [(0.01, 0.99), (0.0, 1.0), (0.5, 1.0)])
def test_non_finite_values_as_the_compiled_op(mode, quantiles):
    cur, ref, layout = _nonfinite_case()
    assert_same("js_drift", drift_args(cur, ref, layout, mode, lower_q=quantiles[0],
                                       upper_q=quantiles[1], rho=0.5), rtol=0, atol=0)
    totals, _ = assert_same("js_mass_totals", (cur, ref, layout.segments, 4), 0, 0)
    # totals handed in that are finite while an element is inf: NaN terms, as in the C++
    finite = torch.ones(2, 4, dtype=torch.float64)
    for t in (totals, finite):
        assert_same("js_mass_partial", (cur, ref, layout.segments, 4, t, 0.5), 1e-12, 0)


# ---------------------------------------------------------------------------------------------
# Note [Tiny totals] (csrc/drift/drift_math.h)


def _subnormal_case(exponent):
    cur = [torch.ldexp(torch.tensor([3.0, 1.0, 0.0, 7.0, 2.0, 5.0], dtype=torch.float64),
                       torch.tensor(exponent))]
    ref = [torch.ldexp(torch.tensor([1.0, 4.0, 2.0, 5.0, 5.0, 2.0], dtype=torch.float64),
                       torch.tensor(exponent))]
    layout = GroupLayout(("a",), ((6,),), ("g0", "g1"), torch.tensor([[0, 0, 4, 0], [0, 4, 6, 1]]))
    return cur, ref, layout


@pytest.mark.parametrize("exponent", [-1000, -1040, -1070, -1074])
def test_tiny_totals_are_scored_and_scale_invariant(exponent):
    cur, ref, layout = _subnormal_case(exponent)
    got, _ = assert_same("js_drift", drift_args(cur, ref, layout, "mass"), rtol=0, atol=0)
    torch.testing.assert_close(got, reference.js_drift(cur, ref, layout), rtol=F32_EPS, atol=0)
    assert bool((got > 0.1).all()), got
    plain_cur, plain_ref, _ = _subnormal_case(0)
    assert_bitwise_equal(got, FB["js_drift"](*drift_args(plain_cur, plain_ref, layout, "mass")))
    totals = FB["js_mass_totals"](cur, ref, layout.segments, 2)
    partial, _ = assert_same("js_mass_partial", (cur, ref, layout.segments, 2, totals, None),
                             rtol=1e-15, atol=0)
    assert bool(torch.isfinite(partial).all())
    torch.testing.assert_close(partial, reference.js_mass_partial(cur, ref, layout, totals),
                               rtol=1e-12, atol=0)


def test_a_subnormal_total_handed_in_with_larger_elements():
    layout = GroupLayout(("a",), ((4,),), ("g",), torch.tensor([[0, 0, 4, 0]]))
    cur = [torch.tensor([1e-310, 2e-310, 0.0, 5e-311], dtype=torch.float64)]
    ref = [torch.tensor([3e-310, 1e-311, 1e-310, 0.0], dtype=torch.float64)]
    for t in ([[1e-320], [1.0]], [[5e-324], [5e-324]]):
        totals = torch.tensor(t, dtype=torch.float64)
        got, _ = assert_same("js_mass_partial", (cur, ref, layout.segments, 1, totals, None),
                             rtol=1e-15, atol=0)
        torch.testing.assert_close(got, reference.js_mass_partial(cur, ref, layout, totals),
                                   rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------
# Histogram mode: quantiles, the range floor and its nextafter rule, sparse bins


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=4),
       quantiles=st.sampled_from([(0.01, 0.99), (0.0, 1.0), (0.1, 0.9), (0.5, 0.5000001)]),
       bins=st.sampled_from([2, 7, 64, 200]), min_log_range=st.sampled_from([1e-3, 0.5, 3.0]),
       zeros=st.sampled_from([0.0, 0.2]), seed=st.integers(0, 2**20))
def test_histogram_options_match_compiled_and_reference(dtype, sizes, quantiles, bins,
                                                        min_log_range, zeros, seed):
    shapes = [(n,) for n in sizes]
    layout = make_layout(shapes, "slabs", seed)
    cur, ref = snapshots(shapes, seed, dtype, zeros=zeros, negative=True)
    args = drift_args(cur, ref, layout, "histogram", bins, *quantiles, min_log_range)
    got, _ = assert_same("js_drift", args, rtol=1e-6, atol=1e-7)
    want = reference.js_drift(cur, ref, layout, drift_mode="histogram", bins=bins,
                              lower_q=quantiles[0], upper_q=quantiles[1],
                              min_log_range=min_log_range)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2 * F32_EPS)


@pytest.mark.parametrize("min_log_range", [1e-17, 1e-300, 1e-3])
def test_near_constant_group_and_the_range_floor(min_log_range):
    # values near 10: lo ~ 1, whose half ulp (1.1e-16) swallows 1e-17: hi = nextafter(lo)
    cur = [torch.full((50,), 10.0, dtype=torch.float64), torch.rand(40, dtype=torch.float64)]
    ref = [torch.full((50,), 10.0, dtype=torch.float64), torch.rand(40, dtype=torch.float64)]
    ref[0][::7] = 10.000000000000002
    layout = groups.per_tensor([("a", cur[0]), ("b", cur[1])])
    got, _ = assert_same("js_drift", drift_args(cur, ref, layout, "histogram",
                                                min_log_range=min_log_range), rtol=0, atol=0)
    torch.testing.assert_close(got, reference.js_drift(cur, ref, layout, drift_mode="histogram",
                                                       min_log_range=min_log_range),
                               rtol=1e-5, atol=F32_EPS)
    assert bool(torch.isfinite(got).all())


@pytest.mark.parametrize("bins", [2 ** 16, 2 ** 16 + 1, 100_000])
def test_bins_around_the_dense_limit(bins):
    shapes = [(600,), (2, 300)]
    cur, ref = snapshots(shapes, 3, torch.float32, zeros=0.1)
    layout = groups.slabs([("a", cur[0]), ("b", cur[1])], k=2)
    got, _ = assert_same("js_drift", drift_args(cur, ref, layout, "histogram", bins), 1e-6, 1e-7)
    want = reference.js_drift(cur, ref, layout, drift_mode="histogram", bins=bins)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_two_to_the_30_bins_allocate_no_dense_histogram(monkeypatch):
    """bins = 2^30 counts only the occupied bins: no tensor of 2^30 counts (8 GiB) is made."""
    shapes = [(6,), (2, 3)]
    cur, ref = snapshots(shapes, 0, torch.float32)
    layout = groups.per_tensor([("a", cur[0]), ("b", cur[1])])
    sizes = []
    bincount = torch.bincount

    def recording_bincount(x, weights=None, minlength=0):
        sizes.append(max(minlength, x.numel()))
        assert minlength <= 2 ** 16, f"a dense count of {minlength} bins"  # before allocating
        return bincount(x, weights, minlength)
    monkeypatch.setattr(torch, "bincount", recording_bincount)
    got, _ = assert_same("js_drift", drift_args(cur, ref, layout, "histogram", 2 ** 30),
                         rtol=1e-6, atol=1e-7)
    monkeypatch.undo()
    assert sizes and max(sizes) <= 12, sizes
    assert bool((got > 0).all())
    for g in range(layout.num_groups):     # the sparse form written with numpy
        (t, b, e), = layout.segments_of(g)
        want = sparse_histogram_distance(cur[t].reshape(-1)[b:e].double().numpy(),
                                         ref[t].reshape(-1)[b:e].double().numpy(), 2 ** 30)
        assert float(got[g]) == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# The reference update: in place, after scoring, every element, rounded as ema_chunk


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rho", [0.0, 0.3, 0.9, 1.0])
def test_update_reference_in_place_after_scoring(device, dtype, mode, rho):
    if dtype not in dtypes_for(device):
        pytest.skip("float64 state is CPU only")
    shapes = [(50,), (7, 3), (0,), (CHUNK + 800,), ()]
    layout = GroupLayout(tuple(f"t{i}" for i in range(5)), shapes, ("g0", "g1", "g2"),
                         torch.tensor([[0, 5, 20, 0], [0, 30, 40, 1], [3, 100, CHUNK - 10, 2],
                                       [3, CHUNK + 500, CHUNK + 790, 0]]))
    cur, ref = snapshots(shapes, 7, dtype, device, zeros=0.1, negative=True)
    cur_before, ref_before = snapshot(cur), snapshot(ref)
    ptrs = [r.data_ptr() for r in ref]
    scored = FB["js_drift"](*drift_args(cur, snapshot(ref), layout, mode))
    got = FB["js_drift"](*drift_args(cur, ref, layout, mode, rho=rho))
    assert_bitwise_equal(got, scored)              # scored before the update
    assert [r.data_ptr() for r in ref] == ptrs     # written in place, not rebound
    assert_unchanged(cur_before, cur)
    assert_ema(ref, cur, ref_before, rho)
    if rho != 1.0:                                 # elements in no group too
        assert not torch.equal(ref[1], ref_before[1]) and not torch.equal(ref[4], ref_before[4])
    if COMPILED:
        want_ref = snapshot(ref_before)
        OPS.js_drift(*drift_args(cur, want_ref, layout, mode, rho=rho))
        assert_bitwise_equal(ref, want_ref)
    ref = snapshot(ref_before)
    totals = FB["js_mass_totals"](cur, ref, layout.segments, 3)
    FB["js_mass_partial"](cur, ref, layout.segments, 3, totals, rho)
    assert_ema(ref, cur, ref_before, rho)


def test_non_contiguous_current_overlapping_reference_is_read_first():
    for mode in MODES:
        buf = torch.rand(12) + 0.1
        ref = [buf[:6].view(2, 3)]
        cur = [buf[:6].view(3, 2).t()]
        layout = groups.per_tensor([("a", ref[0])])
        want_ref = [r.clone() for r in ref]
        want = reference.js_drift([c.clone() for c in cur], want_ref, layout, drift_mode=mode,
                                  update_reference=0.5)
        got = FB["js_drift"](*drift_args(cur, ref, layout, mode, rho=0.5))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=F32_EPS)
        torch.testing.assert_close(ref[0], want_ref[0])


# ---------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("mode", MODES)
def test_bitwise_equal_across_calls_and_thread_counts(mode):
    shapes = [(3 * CHUNK + 17,), (40, 30), (5,)]
    cur, ref = snapshots(shapes, 11, torch.float32, zeros=0.1)
    layout = make_layout(shapes, "spanning", 4)
    outs = []
    for threads in (1, 2, 1):
        with set_threads(threads):
            outs.append(run(FB["js_drift"], drift_args(cur, ref, layout, mode, rho=0.9)))
            totals = FB["js_mass_totals"](cur, ref, layout.segments, layout.num_groups)
            outs.append([totals, *run(FB["js_mass_partial"], (cur, ref, layout.segments,
                                                              layout.num_groups, totals, 0.9))])
    for a, b in zip(outs[2:], outs[:-2]):
        assert_bitwise_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Bad input: the compiled op's exception type and message, nothing modified


def _case(dtype=torch.float32):
    cur, ref = snapshots([(6,), (2, 3)], 0, dtype)
    return cur, ref, groups.per_tensor([("a", cur[0]), ("b", cur[1])])


def _drift(mode="mass", **kw):
    """A js_drift call with one argument changed (``cur``/``ref``/``seg``/``G`` by builders)."""
    def make():
        cur, ref, layout = _case()
        opts = dict(bins=64, lower_q=0.01, upper_q=0.99, min_log_range=1e-3, base2=False,
                    rho=0.5)
        opts.update({k: v for k, v in kw.items() if k in opts})
        cur = kw["cur"](cur) if "cur" in kw else cur
        ref = kw["ref"](ref) if "ref" in kw else ref
        seg = torch.as_tensor(kw["seg"]) if "seg" in kw else layout.segments
        G = kw.get("G", layout.num_groups)
        return "js_drift", (cur, ref, seg, G, kw.get("drift_mode", mode), opts["bins"],
                            opts["lower_q"], opts["upper_q"], opts["min_log_range"],
                            opts["base2"], opts["rho"])
    return make


def _mass(op, **kw):
    def make():
        cur, ref, layout = _case()
        cur = kw["cur"](cur) if "cur" in kw else cur
        ref = kw["ref"](ref) if "ref" in kw else ref
        seg = torch.as_tensor(kw["seg"]) if "seg" in kw else layout.segments
        G = kw.get("G", layout.num_groups)
        if op == "js_mass_totals":
            return op, (cur, ref, seg, G)
        totals = kw["totals"] if "totals" in kw else torch.ones(2, max(G, 0), dtype=torch.float64)
        return op, (cur, ref, seg, G, totals, kw.get("rho", 0.5))
    return make


def _aliased(mode, make_lists):
    def make():
        buf = torch.rand(40) + 0.1
        cur, ref = make_lists(buf)
        seg = torch.tensor([[0, 0, 6, 0], [1, 0, 6, 1]])
        if mode == "partial":
            return "js_mass_partial", (cur, ref, seg, 2, torch.ones(2, 2, dtype=torch.float64),
                                       0.5)
        return "js_drift", (cur, ref, seg, 2, mode, 64, 0.01, 0.99, 1e-3, False, 0.5)
    return make


def _totals_aliased():
    tbuf = torch.rand(8, dtype=torch.float64)
    return "js_mass_partial", ([torch.rand(6, dtype=torch.float64)], [tbuf[:6]],
                               torch.tensor([[0, 0, 6, 0]]), 1, tbuf[4:6].reshape(2, 1), 0.5)


_ALIASING = [
    lambda buf: ([buf[20:26], buf[26:32]], [buf[:6], buf[:6]]),
    lambda buf: ([buf[20:26], buf[26:32]], [buf[:6], buf[4:10]]),
    lambda buf: ([buf[:6], buf[26:32]], [buf[10:16], buf[3:9]]),
    lambda buf: ([buf[:6], buf[26:32]], [buf[:6], buf[10:16]]),
]
_BAD_SEGMENTS = [
    ([[0, 0, 4, 0], [0, 3, 6, 1]], 2), ([[1, 0, 6, 0], [0, 0, 6, 1], [1, 5, 6, 1]], 2),
    ([[2, 0, 1, 0]], 1), ([[-1, 0, 1, 0]], 1), ([[0, 0, 7, 0]], 1), ([[0, 4, 3, 0]], 1),
    ([[0, -1, 3, 0]], 1), ([[0, 0, 6, 1]], 1), ([[0, 0, 6, -1]], 1), ([[0, 0, 6, 0]], -1),
    (torch.tensor([[0, 0, 6, 0]], dtype=torch.int32), 1), (torch.tensor([[0, 0, 6]]), 1),
]
BAD = [
    *[_drift(mode, bins=b) for mode in MODES for b in (1, -5, 2 ** 31, 2 ** 30 + 1)],
    *[_drift(mode, lower_q=lq, upper_q=uq) for mode in MODES
      for lq, uq in ((0.5, 0.5), (0.9, 0.1), (-0.1, 0.99), (0.01, 1.5), (math.nan, 0.99))],
    *[_drift(mode, min_log_range=m) for mode in MODES for m in (0.0, -1.0, math.inf, math.nan)],
    _drift(drift_mode="kl"),
    *[_drift(mode, rho=r) for mode in MODES for r in (1.5, -0.1, math.nan)],
    *[_aliased(mode, make) for mode in (*MODES, "partial") for make in _ALIASING],
    _totals_aliased,
    # a bad row wins over an aliasing error: the C++ reads the rows first
    lambda: ("js_drift", (*_aliased("mass", _ALIASING[0])()[1][:2], torch.tensor([[0, 0, 9, 0]]),
                          1, "mass", 64, 0.01, 0.99, 1e-3, False, 0.5)),
    *[f(cur=lambda c: [c[0].double(), c[1]]) for f in (_drift, lambda **k: _mass(
        "js_mass_totals", **k), lambda **k: _mass("js_mass_partial", **k))],
    *[f(cur=lambda c: [c[0], c[1].to(torch.int32)], ref=lambda r: [r[0], r[1].to(torch.int32)])
      for f in (_drift, lambda **k: _mass("js_mass_totals", **k))],
    _drift(cur=lambda c: [c[0].half(), c[1]], ref=lambda r: [r[0].half(), r[1]]),
    _drift(cur=lambda c: [c[0], c[1].double()], ref=lambda r: [r[0], r[1].double()]),
    _drift(ref=lambda r: [r[0], r[1].reshape(3, 2).contiguous()]),
    _drift(cur=lambda c: [c[0], c[1].reshape(3, 2)]),
    _drift(ref=lambda r: r[:1]),
    _mass("js_mass_partial", ref=lambda r: r[:1]),
    _drift(cur=lambda c: [torch.rand(3, 2), c[1]], ref=lambda r: [torch.rand(2, 3).t(), r[1]],
           seg=[[1, 0, 6, 0]]),
    *[_drift(mode, seg=s, G=g) for mode in MODES for s, g in _BAD_SEGMENTS],
    *[_mass(op, seg=s, G=g) for op in ("js_mass_totals", "js_mass_partial")
      for s, g in _BAD_SEGMENTS],
    *[_mass("js_mass_partial", totals=t, rho=r) for r in (None, 0.5) for t in (
        torch.ones(2, 2), torch.ones(2, 2, dtype=torch.int64),
        torch.ones(1, 2, dtype=torch.float64), torch.ones(4, dtype=torch.float64),
        torch.ones(2, 4, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64),
        torch.ones(2, 2, 1, dtype=torch.float64))],
    *[_mass("js_mass_partial", rho=r) for r in (1.5, -0.1, math.nan, math.inf)],
]


@requires_compiled
@pytest.mark.parametrize("make", BAD)
def test_bad_input_raises_what_the_compiled_op_raises(make):
    name, args = make()
    before = snapshot([a for a in args if isinstance(a, (list, torch.Tensor))])
    with pytest.raises((ValueError, TypeError)) as want:
        getattr(OPS, name)(*args)
    with pytest.raises(want.type) as got:
        FB[name](*args)
    assert str(got.value) == str(want.value)
    assert str(got.value).startswith(f"fisheradaptune.{name}: argument '")
    assert_unchanged(before, [a for a in args if isinstance(a, (list, torch.Tensor))])
