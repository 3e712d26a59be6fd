"""ops.js_drift: per-group Jensen-Shannon distance between two Fisher snapshots (docs/methods.md section 3),
"mass" and "histogram" modes, with the optional fused reference EMA update."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from scipy.spatial.distance import jensenshannon
from torch.library import opcheck

from helpers import random_snapshots as snapshots
from helpers import (BLOCK, CHUNK, LAYOUT_KINDS, assert_bitwise_equal, assert_unchanged, devices,
                     make_generator, make_layout, requires_cuda, set_threads, shape_lists,
                     snapshot)
from fisheradaptune import groups, ops, reference
from fisheradaptune.groups import GroupLayout

MAX_NATS = math.sqrt(math.log(2.0))
F32_EPS = 1e-6          # float32 output of a float64 computation
MODES = ("mass", "histogram")


# ---------------------------------------------------------------------------------------------
# Helpers


def group_values(tensors, layout: GroupLayout, g: int) -> np.ndarray:
    parts = [tensors[t].reshape(-1)[b:e].double().cpu().numpy()
             for t, b, e, gid in layout.segments.tolist() if gid == g]
    return np.concatenate(parts) if parts else np.zeros(0)


def numpy_histogram_js(c: np.ndarray, r: np.ndarray, bins=64, lower_q=0.01, upper_q=0.99,
                       min_log_range=1e-3, base=None) -> float:
    """docs/methods.md section 3's histogram mode written with numpy, independently of the library."""
    if not (np.abs(c).sum() > 0 and np.abs(r).sum() > 0):
        return 0.0
    lc, lr = np.log10(np.abs(c) + 1e-12), np.log10(np.abs(r) + 1e-12)
    union = np.concatenate([lc, lr])
    lo, hi = np.quantile(union, lower_q), np.quantile(union, upper_q)   # default: "linear"
    if hi - lo < min_log_range:
        hi = lo + min_log_range
    hc = np.histogram(lc, bins=bins, range=(lo, hi))[0] + 1e-12
    hr = np.histogram(lr, bins=bins, range=(lo, hi))[0] + 1e-12
    p, q = hc / hc.sum(), hr / hr.sum()
    m = 0.5 * (p + q)
    js = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
    js = max(js, 0.0)
    return math.sqrt(js / math.log(2.0)) if base == 2 else math.sqrt(js)


def scipy_mass_js(c: np.ndarray, r: np.ndarray, base=None) -> float:
    c, r = np.abs(c), np.abs(r)
    if not (c.sum() > 0 and r.sum() > 0):
        return 0.0
    return float(jensenshannon(c, r, base=base))


def assert_ema_close(new_refs, expected_refs, cur, old_refs, rho):
    """``new = rho*old + (1-rho)*cur`` up to float rounding of each term (the terms may cancel
    when signs differ, so the tolerance scales with the terms, not the result)."""
    for new, exp, c, old in zip(new_refs, expected_refs, cur, old_refs):
        if rho is None:
            assert_bitwise_equal(new, old)
            continue
        scale = (rho * old.abs() + (1 - rho) * c.abs()).double()
        err = (new.double() - exp.double()).abs()
        eps = torch.finfo(new.dtype).eps
        assert bool((err <= 4 * eps * scale).all()), float((err / scale.clamp_min(1e-300)).max())


def drift(cur, ref, layout, **kw):
    """ops.js_drift on copies (so the inputs of a comparison stay pristine)."""
    return ops.js_drift(snapshot(cur), snapshot(ref), layout, **kw)


# ---------------------------------------------------------------------------------------------
# Against scipy, numpy and the reference


@pytest.mark.parametrize("base", ["e", "2"])
@given(shapes=shape_lists(max_len=60), kind=st.sampled_from(LAYOUT_KINDS),
       dtype=st.sampled_from([torch.float32, torch.float64]), zeros=st.sampled_from([0.0, 0.3]),
       seed=st.integers(0, 2**20))
def test_mass_matches_scipy_jensenshannon(base, shapes, kind, dtype, zeros, seed):
    layout = make_layout(shapes, kind, seed)
    cur, ref = snapshots(shapes, seed, dtype, zeros=zeros, negative=True)
    got = drift(cur, ref, layout, drift_mode="mass", base=base)
    assert got.dtype == torch.float32 and got.shape == (layout.num_groups,)
    expected = [scipy_mass_js(group_values(cur, layout, g), group_values(ref, layout, g),
                              base=2 if base == "2" else None) for g in range(layout.num_groups)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32),
                               rtol=1e-5, atol=F32_EPS)


@pytest.mark.parametrize("base", ["e", "2"])
@given(sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=4),
       quantiles=st.sampled_from([(0.01, 0.99), (0.05, 0.95), (0.1, 0.9), (0.0, 1.0)]),
       bins=st.sampled_from([2, 7, 64, 200]), min_log_range=st.sampled_from([1e-3, 0.5, 3.0]),
       zeros=st.sampled_from([0.0, 0.2]), seed=st.integers(0, 2**20))
def test_histogram_matches_numpy_spec(base, sizes, quantiles, bins, min_log_range, zeros, seed):
    # float32 snapshots: the kernel's float32 order statistics are exact for them (see the
    # float64 test below).
    shapes = [(n,) for n in sizes]
    layout = make_layout(shapes, "slabs", seed)
    cur, ref = snapshots(shapes, seed, torch.float32, zeros=zeros, negative=True)
    lower_q, upper_q = quantiles
    kw = dict(bins=bins, lower_q=lower_q, upper_q=upper_q, min_log_range=min_log_range)
    got = drift(cur, ref, layout, drift_mode="histogram", base=base, **kw)
    expected = [numpy_histogram_js(group_values(cur, layout, g), group_values(ref, layout, g),
                                   base=2 if base == "2" else None, **kw)
                for g in range(layout.num_groups)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32),
                               rtol=1e-5, atol=2 * F32_EPS)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@given(shapes=shape_lists(max_len=100), kind=st.sampled_from(LAYOUT_KINDS),
       mode=st.sampled_from(MODES),
       base=st.sampled_from(["e", "2"]), zeros=st.sampled_from([0.0, 0.5]),
       rho=st.sampled_from([None, 0.0, 0.9, 1.0]), seed=st.integers(0, 2**20))
def test_matches_reference(device, dtype, shapes, kind, mode, base, zeros, rho, seed):
    # bfloat16 (Note [bfloat16 state], csrc/common/state.h): the same values widened,
    # scored as float32 state is; the update rounded once to bfloat16.
    layout = make_layout(shapes, kind, seed)
    cur, ref = snapshots(shapes, seed, dtype, device, zeros=zeros, negative=True)
    ref_op, ref_ref = snapshot(ref), snapshot(ref)
    cur_before = snapshot(cur)
    kw = dict(drift_mode=mode, base=base, update_reference=rho)
    got = ops.js_drift(cur, ref_op, layout, **kw)
    expected = reference.js_drift(cur, ref_ref, layout, **kw)
    assert got.device.type == device
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=F32_EPS)
    assert_unchanged(cur_before, cur)
    assert_ema_close(ref_op, ref_ref, cur, ref, rho)


@given(shapes=shape_lists(max_len=40), kind=st.sampled_from(LAYOUT_KINDS),
       mode=st.sampled_from(MODES), seed=st.integers(0, 2**20))
def test_float64_matches_reference(shapes, kind, mode, seed):
    # default quantiles (0.01, 0.99) never fall exactly on an order statistic of the (even
    # sized) union, so float32 order statistics only move lo/hi by ~1e-8 here.
    layout = make_layout(shapes, kind, seed)
    cur, ref = snapshots(shapes, seed, torch.float64)
    ref_op, ref_ref = snapshot(ref), snapshot(ref)
    got = ops.js_drift(cur, ref_op, layout, drift_mode=mode, update_reference=0.75)
    expected = reference.js_drift(cur, ref_ref, layout, drift_mode=mode, update_reference=0.75)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=F32_EPS)
    for a, b in zip(ref_op, ref_ref):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("numel", [1, BLOCK + 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 1])
def test_sizes_straddling_the_chunk(device, numel, dtype):
    shapes = [(5,), (numel,)]
    cur, ref = snapshots(shapes, numel, dtype, device, zeros=0.1)
    ema_tol = dict(rtol=2 ** -7, atol=1e-30) if dtype == torch.bfloat16 else dict(rtol=1e-6,
                                                                                  atol=1e-30)
    for kind in ("per_tensor", "gaps", "spanning"):
        layout = make_layout(shapes, kind, numel)
        for mode in MODES:
            ref_op, ref_ref = snapshot(ref), snapshot(ref)
            got = ops.js_drift(cur, ref_op, layout, drift_mode=mode, update_reference=0.9)
            expected = reference.js_drift(cur, ref_ref, layout, drift_mode=mode, update_reference=0.9)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=F32_EPS)
            for a, b in zip(ref_op, ref_ref):
                torch.testing.assert_close(a, b, **ema_tol)


@pytest.mark.parametrize("mode", MODES)
def test_long_list_of_300_small_tensors(mode):
    shapes = [((i * 7) % 23,) if i % 3 else ((i % 4) + 1, 3) for i in range(300)]
    layout = make_layout(shapes, "spanning", 300)
    cur, ref = snapshots(shapes, 300, zeros=0.1)
    ref_op, ref_ref = snapshot(ref), snapshot(ref)
    got = ops.js_drift(cur, ref_op, layout, drift_mode=mode, update_reference=0.9)
    expected = reference.js_drift(cur, ref_ref, layout, drift_mode=mode, update_reference=0.9)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=F32_EPS)
    assert_ema_close(ref_op, ref_ref, cur, ref, 0.9)


def test_float64_histogram_with_min_max_quantiles_matches_numpy():
    g = make_generator(0)
    cur = [torch.rand(50, generator=g, dtype=torch.float64) * 1.2345678901234]
    ref = [torch.rand(50, generator=g, dtype=torch.float64) * 0.987654321]
    layout = groups.per_tensor([("a", cur[0])])
    got = drift(cur, ref, layout, drift_mode="histogram", lower_q=0.0, upper_q=1.0)
    expected = numpy_histogram_js(cur[0].numpy(), ref[0].numpy(), lower_q=0.0, upper_q=1.0)
    assert float(got[0]) == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Properties


def _layout_and_snapshots(shapes, kind, seed, device="cpu", dtype=torch.float32, **kw):
    layout = make_layout(shapes, kind, seed)
    cur, ref = snapshots(shapes, seed, dtype, device, **kw)
    return layout, cur, ref


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("mode", MODES)
@given(shapes=shape_lists(max_len=50), kind=st.sampled_from(LAYOUT_KINDS),
       seed=st.integers(0, 2**20))
def test_identical_snapshots_give_exactly_zero(device, mode, shapes, kind, seed):
    layout, cur, _ = _layout_and_snapshots(shapes, kind, seed, device, zeros=0.2)
    got = drift(cur, snapshot(cur), layout, drift_mode=mode)
    assert got.tolist() == [0.0] * layout.num_groups


@pytest.mark.parametrize("mode", MODES)
@given(shapes=shape_lists(max_len=30, allow_edge_sizes=False), kind=st.sampled_from(LAYOUT_KINDS),
       seed=st.integers(0, 2**20))
def test_magnitudes_are_used_negation_changes_nothing(mode, shapes, kind, seed):
    layout, cur, ref = _layout_and_snapshots(shapes, kind, seed)
    a = drift(cur, ref, layout, drift_mode=mode)
    b = drift([-c for c in cur], ref, layout, drift_mode=mode)
    assert_bitwise_equal(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_current_is_read_correctly(mode):
    g = make_generator(4)
    cur_t = [torch.rand(9, 6, generator=g)]
    ref = [torch.rand(6, 9, generator=g)]
    cur = [cur_t[0].t()]
    assert not cur[0].is_contiguous()
    layout = groups.slabs([("w", ref[0])], k=3)
    ref_a, ref_b = snapshot(ref), snapshot(ref)
    a = ops.js_drift(cur, ref_a, layout, drift_mode=mode, update_reference=0.5)
    b = ops.js_drift([cur[0].contiguous()], ref_b, layout, drift_mode=mode, update_reference=0.5)
    assert_bitwise_equal([a] + ref_a, [b] + ref_b)
    assert bool((a > 0).all())


@pytest.mark.parametrize("mode", MODES)
@given(sizes=st.lists(st.integers(20, 2000), min_size=1, max_size=3),
       k=st.sampled_from([-12, -5, 3, 9]), seed=st.integers(0, 2**20))
def test_invariant_to_scaling_both_snapshots_by_one_constant(mode, sizes, k, seed):
    # A power of two keeps float32 scaling exact; values stay >= ~1e-6 after scaling so the
    # +1e-12 of the histogram's log transform is negligible.
    shapes = [(n,) for n in sizes]
    layout = make_layout(shapes, "slabs", seed)
    g = make_generator(seed)
    cur = [torch.rand(s, generator=g) + 0.05 for s in shapes]
    ref = [torch.rand(s, generator=g) * 2 + 0.05 for s in shapes]
    c = 2.0 ** k
    a = drift(cur, ref, layout, drift_mode=mode)
    b = drift([x * c for x in cur], [y * c for y in ref], layout, drift_mode=mode)
    assert bool((a > 0.01).all())          # a non-trivial distance to be invariant
    torch.testing.assert_close(b, a, rtol=1e-5, atol=F32_EPS)


@given(shapes=shape_lists(max_len=30), kind=st.sampled_from(LAYOUT_KINDS),
       cs=st.floats(1e-6, 1e6), rs=st.floats(1e-6, 1e6), seed=st.integers(0, 2**20))
def test_mass_invariant_to_scaling_either_side(shapes, kind, cs, rs, seed):
    layout, cur, ref = _layout_and_snapshots(shapes, kind, seed, zeros=0.2)
    a = drift(cur, ref, layout, drift_mode="mass")
    b = drift([x * cs for x in cur], ref, layout, drift_mode="mass")
    c = drift(cur, [y * rs for y in ref], layout, drift_mode="mass")
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@given(shapes=shape_lists(max_len=40), kind=st.sampled_from(LAYOUT_KINDS),
       zeros=st.sampled_from([0.0, 0.5, 0.9]), seed=st.integers(0, 2**20))
def test_range_and_base_2(mode, shapes, kind, zeros, seed):
    layout, cur, ref = _layout_and_snapshots(shapes, kind, seed, zeros=zeros)
    nats = drift(cur, ref, layout, drift_mode=mode)
    bits = drift(cur, ref, layout, drift_mode=mode, base="2")
    assert bool((nats >= 0).all()) and bool((nats <= MAX_NATS + F32_EPS).all())
    assert bool((bits >= 0).all()) and bool((bits <= 1 + F32_EPS).all())
    torch.testing.assert_close(bits, nats / MAX_NATS, rtol=1e-5, atol=F32_EPS)


def test_disjoint_supports_reach_the_maximum():
    cur = [torch.tensor([1.0, 2.0, 0.0, 0.0, 5.0, 0.0])]
    ref = [torch.tensor([0.0, 0.0, 3.0, 4.0, 0.0, 6.0])]
    layout = groups.per_tensor([("w", cur[0])])
    assert float(drift(cur, ref, layout, drift_mode="mass")[0]) == pytest.approx(MAX_NATS, abs=F32_EPS)
    assert float(drift(cur, ref, layout, drift_mode="mass", base="2")[0]) == pytest.approx(1.0, abs=F32_EPS)
    # histogram: two clusters decades apart land in disjoint bins (up to the 1e-12 pseudo-count)
    g = make_generator(1)
    small = [1e-6 * (1 + 0.1 * torch.rand(500, generator=g))]
    large = [1e2 * (1 + 0.1 * torch.rand(500, generator=g))]
    layout = groups.per_tensor([("w", small[0])])
    hist = drift(small, large, layout, drift_mode="histogram", lower_q=0.0, upper_q=1.0)
    assert float(hist[0]) == pytest.approx(MAX_NATS, abs=1e-4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rho", [None, 0.5])
def test_zero_sum_and_empty_groups_give_zero(zero_total_case, mode, rho):
    cur, ref, layout = zero_total_case()
    got = drift(cur, ref, layout, drift_mode=mode, update_reference=rho)
    assert got[[0, 1, 3, 4]].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert float(got[2]) > 0


# ---------------------------------------------------------------------------------------------
# update_reference


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rho", [0.0, 0.3, 0.9, 1.0])
def test_update_reference_is_an_ema_over_every_element_after_scoring(device, mode, rho):
    # tensor 0: partly grouped (gaps), tensor 1 in no group at all, tensor 2 empty, tensor 3
    # larger than a chunk
    shapes = [(50,), (7, 3), (0,), (40000,)]
    layout = GroupLayout(tuple(f"t{i}" for i in range(4)), shapes, ("g0", "g1", "g2"),
                         torch.tensor([[0, 5, 20, 0], [0, 30, 40, 1], [3, 100, 39000, 2],
                                       [3, 39500, 39990, 0]]))
    cur, ref = snapshots(shapes, 7, torch.float32, device)
    expected_ref = [rho * r + (1 - rho) * c for c, r in zip(cur, ref)]
    scored = drift(cur, ref, layout, drift_mode=mode)
    cur_before, ref_before = snapshot(cur), snapshot(ref)
    got = ops.js_drift(cur, ref, layout, drift_mode=mode, update_reference=rho)
    assert_bitwise_equal(got, scored)          # scored before the update, not after
    assert_unchanged(cur_before, cur)
    for r, e, old, c in zip(ref, expected_ref, ref_before, cur):
        if rho == 1.0:
            assert_bitwise_equal(r, old)
        elif rho == 0.0:
            assert_bitwise_equal(r, c)
        else:
            torch.testing.assert_close(r, e, rtol=1e-6, atol=1e-30)
    assert not torch.equal(ref[1], ref_before[1]) or rho == 1.0   # ungrouped tensor updated


def test_update_reference_in_float64():
    shapes = [(100,), (33,)]
    layout = make_layout(shapes, "gaps", 3)
    cur, ref = snapshots(shapes, 3, torch.float64)
    expected = [0.9 * r + 0.1 * c for c, r in zip(cur, ref)]
    ops.js_drift(cur, ref, layout, drift_mode="histogram", update_reference=0.9)
    for r, e in zip(ref, expected):
        torch.testing.assert_close(r, e, rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------------
# The histogram pathology (documented in docs/methods.md section 3 and ops.js_drift)


def test_histogram_pathology_near_constant_group_and_min_log_range():
    """A LayerNorm-like group whose Fisher is near-constant (all values within ~0.05% of each
    other) and changes by a negligible 0.05% between snapshots. Its log-magnitudes span far less
    than the paper's min_log_range=1e-3 decades, so the 64 bins are 1.6e-5 decades wide and
    measurement noise alone puts the two snapshots into different bins: the histogram JSD is
    close to its maximum sqrt(ln 2) ~ 0.83 although nothing meaningful changed. A larger floor
    (0.1 decades) puts everything in one bin and the drift vanishes; mass mode is unaffected."""
    g = make_generator(0)
    n = 768
    cur = [1e-4 * (1 + 1e-4 * torch.randn(n, generator=g))]
    ref = [1e-4 * 1.0005 * (1 + 1e-4 * torch.randn(n, generator=g))]
    layout = groups.per_tensor([("blocks.0.norm1.weight", cur[0])])
    paper_floor = float(drift(cur, ref, layout, drift_mode="histogram", min_log_range=1e-3)[0])
    wide_floor = float(drift(cur, ref, layout, drift_mode="histogram", min_log_range=0.1)[0])
    mass = float(drift(cur, ref, layout, drift_mode="mass")[0])
    assert paper_floor > 0.75 * MAX_NATS
    assert wide_floor < 1e-3
    assert mass < 1e-3
    # even pure noise (no change at all between snapshots) gives a sizeable distance
    ref_noise = [1e-4 * (1 + 1e-4 * torch.randn(n, generator=g))]
    noise = float(drift(cur, ref_noise, layout, drift_mode="histogram", min_log_range=1e-3)[0])
    assert noise > 0.05
    assert float(drift(cur, ref_noise, layout, drift_mode="histogram", min_log_range=0.1)[0]) < 1e-3


# ---------------------------------------------------------------------------------------------
# Determinism


def _determinism_case(device="cpu"):
    shapes = [(70000,), (3, 20000), (999,), (), (0,)]
    layout = make_layout(shapes, "spanning", 9)
    cur, ref = snapshots(shapes, 9, torch.float32, device, zeros=0.1)
    return cur, ref, layout


def _run(cur, ref, layout, mode):
    r = snapshot(ref)
    out = ops.js_drift(cur, r, layout, drift_mode=mode, update_reference=0.9)
    return [out] + r


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("mode", MODES)
def test_two_identical_calls_are_bitwise_equal(device, mode):
    cur, ref, layout = _determinism_case(device)
    assert_bitwise_equal(_run(cur, ref, layout, mode), _run(cur, ref, layout, mode))


@pytest.mark.parametrize("mode", MODES)
def test_bitwise_equal_for_any_number_of_threads(mode):
    cur, ref, layout = _determinism_case()
    results = []
    for n in (1, 2, 3):
        with set_threads(n):
            results.append(_run(cur, ref, layout, mode))
    assert_bitwise_equal(results[0], results[1])
    assert_bitwise_equal(results[0], results[2])


# ---------------------------------------------------------------------------------------------
# opcheck


def _opcheck_cases(device):
    shapes = [(10,), (3, 4), (), (0,)]
    for i, (kind, mode, rho, dtype) in enumerate([
            ("slabs", "mass", None, torch.float32), ("gaps", "histogram", 0.9, torch.float32),
            ("spanning", "mass", 0.5, torch.float32), ("per_tensor", "histogram", None,
                                                       torch.float64),
            ("slabs", "mass", 0.9, torch.bfloat16), ("gaps", "histogram", 0.5, torch.bfloat16)]):
        if dtype == torch.float64 and device != "cpu":
            continue
        layout = make_layout(shapes, kind, i)
        cur, ref = snapshots(shapes, i, dtype, device)
        yield (cur, ref, layout.segments_on(device), layout.num_groups, mode, 64, 0.01, 0.99,
               1e-3, i % 2 == 1, rho)
    yield ([], [], torch.zeros(0, 4, dtype=torch.int64), 2, "mass", 64, 0.01, 0.99, 1e-3, False,
           None)


@pytest.mark.parametrize("device", devices)
def test_opcheck_schema_fake_and_autograd_registration(device):
    for args in _opcheck_cases(device):
        result = opcheck(torch.ops.fisheradaptune.js_drift, args,
                         test_utils=("test_schema", "test_autograd_registration",
                                     "test_faketensor"))
        assert all(v == "SUCCESS" for v in result.values()), result


def test_opcheck_aot_dispatch_dynamic():
    args = next(_opcheck_cases("cpu"))
    opcheck(torch.ops.fisheradaptune.js_drift, args, test_utils="test_aot_dispatch_dynamic")


# ---------------------------------------------------------------------------------------------
# Bad input: an error naming the argument, nothing modified (also with update_reference)


def _case(dtype=torch.float32):
    shapes = [(6,), (2, 3)]
    cur, ref = snapshots(shapes, 0, dtype)
    layout = groups.per_tensor([("a", cur[0]), ("b", cur[1])])
    return cur, ref, layout


def assert_rejects(exc, match, cur, ref, call):
    before = snapshot([list(cur), list(ref)])
    with pytest.raises(exc, match=match):
        call()
    assert_unchanged(before, [list(cur), list(ref)])


@pytest.mark.parametrize("kw, exc, match", [
    (dict(bins=1), ValueError, r"argument 'bins': expected 2 <= bins <= 2\^30, got 1"),
    (dict(bins=-5), ValueError, r"argument 'bins'"),
    # issue 21: bins=2**31 was accepted on the CPU and the process was killed for memory; one
    # bound (CUDA's 2^30) on every backend, in both modes
    (dict(bins=2 ** 31), ValueError,
     r"argument 'bins': expected 2 <= bins <= 2\^30, got 2147483648"),
    (dict(bins=2 ** 30 + 1), ValueError,
     r"argument 'bins': expected 2 <= bins <= 2\^30, got 1073741825"),
    (dict(lower_q=0.5, upper_q=0.5), ValueError, r"argument 'lower_q/upper_q'"),
    (dict(lower_q=0.9, upper_q=0.1), ValueError, r"argument 'lower_q/upper_q'"),
    (dict(lower_q=-0.1), ValueError, r"argument 'lower_q/upper_q'"),
    (dict(upper_q=1.5), ValueError, r"argument 'lower_q/upper_q'"),
    (dict(lower_q=float("nan")), ValueError, r"argument 'lower_q/upper_q'"),
    (dict(min_log_range=0.0), ValueError, r"argument 'min_log_range': expected a finite number > 0"),
    (dict(min_log_range=-1.0), ValueError, r"argument 'min_log_range'"),
    (dict(min_log_range=float("inf")), ValueError, r"argument 'min_log_range'"),
    (dict(min_log_range=float("nan")), ValueError, r"argument 'min_log_range'"),
    (dict(drift_mode="kl"), ValueError, r"argument 'drift_mode': expected \"mass\" or \"histogram\", got \"kl\""),
    (dict(base="10"), ValueError, r"argument 'base': expected \"e\" or \"2\""),
    (dict(base=2), ValueError, r"argument 'base'"),
    (dict(update_reference=1.5), ValueError, r"argument 'update_reference': expected a decay in \[0, 1\]"),
    (dict(update_reference=-0.1), ValueError, r"argument 'update_reference'"),
    (dict(update_reference=float("nan")), ValueError, r"argument 'update_reference'"),
])
@pytest.mark.parametrize("mode", MODES)
def test_rejects_bad_options(kw, exc, match, mode):
    cur, ref, layout = _case()
    kw = {"drift_mode": mode, "update_reference": 0.5, **kw}
    assert_rejects(exc, match, cur, ref, lambda: ops.js_drift(cur, ref, layout, **kw))


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make, arg, other", [
    # the same reference tensor twice
    (lambda buf: ([buf[20:26], buf[26:32]], [buf[:6], buf[:6]]), r"reference\[1\]",
     r"reference\[0\]"),
    # overlapping references
    (lambda buf: ([buf[20:26], buf[26:32]], [buf[:6], buf[4:10]]), r"reference\[1\]",
     r"reference\[0\]"),
    # a current snapshot inside another tensor's reference ...
    (lambda buf: ([buf[:6], buf[26:32]], [buf[10:16], buf[3:9]]), r"reference\[1\]",
     r"current\[0\]"),
    # ... or its own
    (lambda buf: ([buf[:6], buf[26:32]], [buf[:6], buf[10:16]]), r"reference\[0\]",
     r"current\[0\]"),
])
def test_rejects_overlapping_references_when_updating(device, mode, make, arg, other):
    buf = torch.rand(40, device=device) + 0.1
    cur, ref = make(buf)
    layout = GroupLayout(("a", "b"), ((6,), (6,)), ("a", "b"),
                         torch.tensor([[0, 0, 6, 0], [1, 0, 6, 1]]))
    before = buf.clone()
    with pytest.raises(ValueError, match=rf"js_drift: argument '{arg}': shares memory with "
                                         rf"'{other}'"):
        ops.js_drift(cur, ref, layout, drift_mode=mode, update_reference=0.5)
    assert torch.equal(buf, before)
    # without an update nothing is written: sharing is fine
    ops.js_drift(cur, ref, layout, drift_mode=mode)
    assert torch.equal(buf, before)


def test_non_contiguous_current_overlapping_reference_is_copied_first():
    # a non-contiguous current is read from a copy made before anything is written
    buf = torch.rand(12) + 0.1
    ref = [buf[:6].view(2, 3)]
    cur = [buf[:6].view(3, 2).t()]
    layout = groups.per_tensor([("a", ref[0])])
    expected_ref = [r.clone() for r in ref]
    want = reference.js_drift([c.clone() for c in cur], expected_ref, layout, update_reference=0.5)
    got = ops.js_drift(cur, ref, layout, update_reference=0.5)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ref[0], expected_ref[0])


def test_rejects_mixed_dtypes():
    cur, ref, layout = _case()
    cur64 = [cur[0].double(), cur[1]]
    assert_rejects(ValueError, r"argument 'current\[0\]': expected the dtype of reference\[0\]",
                   cur64, ref, lambda: ops.js_drift(cur64, ref, layout, update_reference=0.5))
    cur_mixed = [cur[0], cur[1].double()]
    ref_mixed = [ref[0], ref[1].double()]
    assert_rejects(ValueError, r"argument 'reference\[1\]': expected every tensor to share the dtype",
                   cur_mixed, ref_mixed,
                   lambda: ops.js_drift(cur_mixed, ref_mixed, layout, update_reference=0.5))
    ref_int = [ref[0], ref[1].to(torch.int32)]
    cur_int = [cur[0], cur[1].to(torch.int32)]
    assert_rejects(ValueError, r"argument 'reference\[1\]': expected float32", cur_int, ref_int,
                   lambda: ops.js_drift(cur_int, ref_int, layout, update_reference=0.5))
    ref_half = [ref[0].half(), ref[1]]
    cur_half = [cur[0].half(), cur[1]]
    assert_rejects(ValueError, r"argument 'reference\[0\]'", cur_half, ref_half,
                   lambda: ops.js_drift(cur_half, ref_half, layout, update_reference=0.5))


def test_rejects_shape_and_length_mismatch():
    cur, ref, layout = _case()
    ref_bad = [ref[0], ref[1].reshape(3, 2).contiguous()]
    assert_rejects(ValueError, r"argument '(current|reference)\[1\]': expected shape", cur,
                   ref_bad, lambda: ops.js_drift(cur, ref_bad, layout, update_reference=0.5))
    cur_bad = [cur[0], cur[1].reshape(3, 2)]
    assert_rejects(ValueError, r"argument 'current\[1\]': expected shape \(2, 3\)", cur_bad, ref,
                   lambda: ops.js_drift(cur_bad, ref, layout, update_reference=0.5))
    assert_rejects(ValueError, r"argument 'reference': expected a list of the same length as "
                   r"'current' \(2\), got 1", cur, ref,
                   lambda: ops.js_drift(cur, ref[:1], layout, update_reference=0.5))
    assert_rejects(ValueError, r"argument 'current': expected 2 tensors", cur, ref,
                   lambda: ops.js_drift(cur[:1], ref[:1], layout, update_reference=0.5))
    assert_rejects(TypeError, r"argument 'layout': expected a GroupLayout", cur, ref,
                   lambda: ops.js_drift(cur, ref, "slabs"))


def test_rejects_non_contiguous_reference():
    cur, ref, _ = _case()
    cur = [torch.rand(4, 3), torch.rand(5)]
    ref = [torch.rand(3, 4).t(), torch.rand(5)]
    layout = groups.per_tensor([("a", cur[0]), ("b", cur[1])])
    assert_rejects(ValueError, r"argument 'reference\[0\]': expected a contiguous tensor", cur,
                   ref, lambda: ops.js_drift(cur, ref, layout, update_reference=0.5))


@pytest.mark.parametrize("segments, num_groups, exc, match", [
    ([[0, 0, 4, 0], [0, 3, 6, 1]], 2, ValueError,
     r"argument 'segments': segments \[0, 4\) and \[3, 6\) of tensor 0 overlap"),
    ([[1, 0, 6, 0], [0, 0, 6, 1], [1, 5, 6, 1]], 2, ValueError, r"argument 'segments': .*overlap"),
    ([[2, 0, 1, 0]], 1, ValueError, r"argument 'segments': row 0: tensor_index 2"),
    ([[0, 0, 7, 0]], 1, ValueError, r"argument 'segments': row 0: range \[0, 7\)"),
    ([[0, 0, 6, 1]], 1, ValueError, r"argument 'segments': row 0: group_id 1"),
    ([[0, 0, 6, 0]], -1, ValueError, r"argument 'num_groups': expected >= 0"),
    (torch.tensor([[0, 0, 6, 0]], dtype=torch.int32), 1, ValueError, r"argument 'segments': expected int64"),
    (torch.tensor([[0, 0, 6]]), 1, ValueError, r"argument 'segments': expected shape \[S, 4\]"),
])
@pytest.mark.parametrize("mode", MODES)
def test_raw_op_rejects_bad_segments(segments, num_groups, exc, match, mode):
    cur, ref, _ = _case()
    segments = torch.as_tensor(segments)
    assert_rejects(exc, match, cur, ref, lambda: torch.ops.fisheradaptune.js_drift(
        cur, ref, segments, num_groups, mode, 64, 0.01, 0.99, 1e-3, False, 0.5))


@pytest.mark.cuda
@requires_cuda
def test_rejects_device_mismatch():
    cur, ref, layout = _case()
    cur = [cur[0].cuda(), cur[1].cuda()]
    ref_mixed = [ref[0].cuda(), ref[1]]
    assert_rejects(ValueError, r"argument 'reference\[1\]': expected a tensor on cuda", cur,
                   ref_mixed, lambda: ops.js_drift(cur, ref_mixed, layout, update_reference=0.5))


# ---------------------------------------------------------------------------------------------
# Note [Tiny totals] (csrc/drift/drift_math.h): a float64 group whose total is subnormal


def _subnormal_case(exponent: int):
    """Integer-valued float64 snapshots of two groups (group 1's total is 11 and 12) scaled by
    2^exponent: exact for every exponent down to -1074, so mass mode's distance must not
    change, to the bit."""
    cur = [torch.tensor([3.0, 1.0, 0.0, 7.0, 2.0, 5.0], dtype=torch.float64)]
    ref = [torch.tensor([1.0, 4.0, 2.0, 5.0, 5.0, 2.0], dtype=torch.float64)]
    layout = GroupLayout(("a",), ((6,),), ("g0", "g1"), torch.tensor([[0, 0, 4, 0], [0, 4, 6, 1]]))
    return [torch.ldexp(c, torch.tensor(exponent)) for c in cur], \
        [torch.ldexp(r, torch.tensor(exponent)) for r in ref], layout


@pytest.mark.parametrize("exponent", [-1000, -1040, -1070, -1074])
def test_mass_mode_scores_a_group_with_a_subnormal_total(exponent):
    """Issue 21: a float64 group whose total is below ~5.6e-309 read as settled (0.0, the
    reference 0.4528): 1 / total overflowed to inf."""
    cur, ref, layout = _subnormal_case(exponent)
    assert float(cur[0][:4].abs().sum()) < 5.6e-309 or exponent == -1000
    got = ops.js_drift(cur, ref, layout, drift_mode="mass")
    want = reference.js_drift(cur, ref, layout, drift_mode="mass")
    torch.testing.assert_close(got, want, rtol=F32_EPS, atol=0)
    assert bool((got > 0.1).all()), got
    # scale invariance, bitwise: the unscaled snapshots give the same distances
    assert_bitwise_equal(got, ops.js_drift(*_subnormal_case(0), drift_mode="mass"))


# ---------------------------------------------------------------------------------------------
# Note [Sparse histogram] (csrc/drift/drift_histogram_cpu.cpp): bins up to 2^30 on the CPU in
# O(values) memory


def _sparse_histogram_distance(c: np.ndarray, r: np.ndarray, bins: int, lower_q=0.01,
                               upper_q=0.99, min_log_range=1e-3) -> float:
    """docs/methods.md section 3's histogram distance with the bins held sparsely (numpy), for a
    bin count whose dense histogram would not fit in memory."""
    lc, lr = np.log10(np.abs(c) + 1e-12), np.log10(np.abs(r) + 1e-12)
    union = torch.from_numpy(np.concatenate([lc, lr]))
    lo, hi = reference.log_quantile(union, lower_q), reference.log_quantile(union, upper_q)
    hi = max(hi, lo + min_log_range)

    def bin_index(v):
        v = v[(v >= lo) & (v <= hi)]
        return np.minimum(np.floor((v - lo) * (bins / (hi - lo))), bins - 1).astype(np.int64)

    ic, ir = bin_index(lc), bin_index(lr)
    nc, nr = len(ic) + bins * 1e-12, len(ir) + bins * 1e-12
    occupied = np.union1d(ic, ir)
    hc = np.array([np.count_nonzero(ic == b) for b in occupied], dtype=np.float64)
    hr = np.array([np.count_nonzero(ir == b) for b in occupied], dtype=np.float64)

    def term(p, q):
        m = (p + q) / 2
        return 0.5 * (p * np.log(p / m) + q * np.log(q / m))

    js = term((hc + 1e-12) / nc, (hr + 1e-12) / nr).sum()
    js += (bins - len(occupied)) * term(1e-12 / nc, 1e-12 / nr)
    return math.sqrt(max(js, 0.0))


@pytest.mark.parametrize("bins", [2 ** 16 + 1, 100_000])
def test_histogram_beyond_the_dense_bins_matches_the_reference(bins):
    cur, ref, layout = _case()
    got = ops.js_drift(cur, ref, layout, drift_mode="histogram", bins=bins)
    want = reference.js_drift(cur, ref, layout, drift_mode="histogram", bins=bins)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_histogram_with_two_to_the_30_bins_runs_in_small_memory():
    """The largest accepted bins on the CPU: dense counts would take 16 GiB per thread (issue
    21: bins=2**31 was accepted and the process killed); the distance is the sparse form's."""
    cur, ref, layout = _case()
    got = ops.js_drift(cur, ref, layout, drift_mode="histogram", bins=2 ** 30)
    for g in range(layout.num_groups):
        (t, b, e), = layout.segments_of(g)
        want = _sparse_histogram_distance(cur[t].reshape(-1)[b:e].double().numpy(),
                                          ref[t].reshape(-1)[b:e].double().numpy(), 2 ** 30)
        assert float(got[g]) == pytest.approx(want, rel=1e-5)
