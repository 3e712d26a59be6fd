"""ops.js_mass_totals / ops.js_mass_partial: js_drift's "mass" mode in two halves whose results
add over any split of a group's elements (Note [Sharded drift] in csrc/drift/drift_math.h), the
basis of distributed.js_drift over FSDP2 shards."""
from __future__ import annotations

import math
from typing import List

import pytest
import torch
from hypothesis import given, strategies as st
from torch.library import opcheck

from helpers import random_snapshots as snapshots
from helpers import (CHUNK, LAYOUT_KINDS, assert_bitwise_equal, assert_unchanged, devices,
                     make_generator, make_layout, requires_cuda, set_threads,
                     shape_lists, snapshot)
from fisheradaptune import distributed, groups, ops, reference
from fisheradaptune.groups import GroupLayout

F32_EPS = 1e-6          # float32 output of a float64 computation
LN2 = math.log(2.0)
RHOS = [None, 0.0, 0.5, 0.9, 1.0]


# ---------------------------------------------------------------------------------------------
# Helpers


def ema(cur, ref, rho):
    """The expected reference after ``update_reference=rho`` (every element of every tensor)."""
    return [r if rho is None else rho * r + (1 - rho) * c for c, r in zip(cur, ref)]


def assert_ema_close(new_refs, cur, old_refs, rho):
    """``new = rho*old + (1-rho)*cur`` for every element: bitwise for rho None / 1 (unchanged)
    and 0 (a copy of cur), otherwise up to float rounding of each term (the terms may cancel
    when signs differ, so the tolerance scales with the terms, not the result)."""
    assert len(new_refs) == len(old_refs) == len(cur)
    for new, c, old in zip(new_refs, cur, old_refs):
        assert new.dtype == old.dtype and new.shape == old.shape
        if rho is None or rho == 1.0:
            torch.testing.assert_close(new, old, rtol=0, atol=0)
            continue
        if rho == 0.0:
            torch.testing.assert_close(new, c, rtol=0, atol=0)
            continue
        exp = rho * old.double() + (1 - rho) * c.double()
        scale = (rho * old.double().abs() + (1 - rho) * c.double().abs())
        err = (new.double() - exp).abs()
        eps = torch.finfo(new.dtype).eps
        assert bool((err <= 4 * eps * scale).all()), float((err / scale.clamp_min(1e-300)).max())


def distance(partial: torch.Tensor, base: str = "e") -> torch.Tensor:
    """JS^2 sums (nats, float64) -> float32 distance, as js_drift's js_distance does it."""
    v = partial.clamp_min(0.0)
    if base == "2":
        v = v / LN2
    return v.sqrt().float()


def two_halves(cur, ref, layout, *, update_reference=None, base="e"):
    """sqrt(js_mass_partial(js_mass_totals)) on the given (live) tensors."""
    totals = ops.js_mass_totals(cur, ref, layout)
    return distance(ops.js_mass_partial(cur, ref, layout, totals,
                                        update_reference=update_reference), base)


def dtypes_for(device):
    # bfloat16: Note [bfloat16 state] (csrc/common/state.h), every device.
    if device == "cpu":
        return [torch.float32, torch.float64, torch.bfloat16]
    return [torch.float32, torch.bfloat16]


# Row shards (FSDP2 Shard(0), torch.chunk semantics) ------------------------------------------


def row_shards(shapes, k: int) -> List[distributed.Sharding]:
    """One Sharding per rank for ``k`` ranks: ceil(rows / k) rows per rank (trailing ranks may
    be empty); a 0-d tensor lives whole on rank 0 (empty elsewhere)."""
    out = []
    for r in range(k):
        offsets, local_shapes = [], []
        for s in shapes:
            s = torch.Size(s)
            if len(s) == 0:
                offsets.append(0)
                local_shapes.append(s if r == 0 else torch.Size([0]))
                continue
            rows = s[0]
            per = -(-rows // k)
            start = min(r * per, rows)
            end = min(start + per, rows)
            offsets.append(start * (s.numel() // rows if rows else 0))
            local_shapes.append(torch.Size([end - start, *s[1:]]))
        out.append(distributed.Sharding(mesh=None, group=None, offsets=tuple(offsets),
                                        local_shapes=tuple(local_shapes),
                                        global_shapes=tuple(torch.Size(s) for s in shapes),
                                        placements=((),) * len(shapes)))
    return out


def local_views(tensors, sharding: distributed.Sharding) -> List[torch.Tensor]:
    """Each tensor's shard as a contiguous view of the full tensor (so that an in-place
    reference update of the shards updates the full tensor)."""
    out = []
    for t, off, shape in zip(tensors, sharding.offsets, sharding.local_shapes):
        n = shape.numel()
        out.append(t.reshape(-1)[off:off + n].view(shape))
    return out


def sharded_mass(cur, ref, layout, k, update_reference=None):
    """The mass distance through k row shards: per-shard totals summed (the all-reduce), every
    shard's partial against the global totals, summed, sqrt. Updates ``ref`` in place through
    the shards' views. Returns (distance, summed totals, per-rank local layouts)."""
    shardings = row_shards(layout.shapes, k)
    locals_ = [distributed.local_layout(layout, s) for s in shardings]
    views = [(local_views(cur, s), local_views(ref, s)) for s in shardings]
    totals = sum(ops.js_mass_totals(c, r, loc) for (c, r), loc in zip(views, locals_))
    js = sum(ops.js_mass_partial(c, r, loc, totals, update_reference=update_reference)
             for (c, r), loc in zip(views, locals_))
    return distance(js), totals, locals_


# ---------------------------------------------------------------------------------------------
# Against the reference twins


@pytest.mark.parametrize("device", devices)
@given(shapes=shape_lists(max_len=80), kind=st.sampled_from(LAYOUT_KINDS),
       dtype_idx=st.integers(0, 2), zeros=st.sampled_from([0.0, 0.4]),
       seed=st.integers(0, 2**20))
def test_totals_match_reference(device, shapes, kind, dtype_idx, zeros, seed):
    dtype = dtypes_for(device)[dtype_idx % len(dtypes_for(device))]
    layout = make_layout(shapes, kind, seed)
    cur, ref = snapshots(shapes, seed, dtype, device, zeros=zeros, negative=True)
    before = snapshot([cur, ref])
    got = ops.js_mass_totals(cur, ref, layout)
    expected = reference.js_mass_totals(cur, ref, layout)
    assert got.dtype == torch.float64 and got.shape == (2, layout.num_groups)
    assert got.device.type == device
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    assert bool((got >= 0).all())
    assert_unchanged(before, [cur, ref])                  # nothing written


@pytest.mark.parametrize("device", devices)
@given(shapes=shape_lists(max_len=80), kind=st.sampled_from(LAYOUT_KINDS),
       dtype_idx=st.integers(0, 2), zeros=st.sampled_from([0.0, 0.4]),
       rho=st.sampled_from(RHOS), inflate=st.sampled_from([1.0, 3.0]),
       seed=st.integers(0, 2**20))
def test_partial_matches_reference(device, shapes, kind, dtype_idx, zeros, rho, inflate, seed):
    # inflate > 1: totals larger than these elements' own sums, as for one shard of a group.
    dtype = dtypes_for(device)[dtype_idx % len(dtypes_for(device))]
    layout = make_layout(shapes, kind, seed)
    cur, ref = snapshots(shapes, seed, dtype, device, zeros=zeros, negative=True)
    totals = reference.js_mass_totals(cur, ref, layout) * inflate
    cur_before, ref_before, totals_before = snapshot(cur), snapshot(ref), snapshot(totals)
    ref_op, ref_twin = snapshot(ref), snapshot(ref)
    got = ops.js_mass_partial(cur, ref_op, layout, totals, update_reference=rho)
    expected = reference.js_mass_partial(cur, ref_twin, layout, totals, update_reference=rho)
    assert got.dtype == torch.float64 and got.shape == (layout.num_groups,)
    assert got.device.type == device
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)
    assert bool((got >= -1e-15).all())
    assert_unchanged(cur_before, cur)
    assert_unchanged(totals_before, totals)
    assert_ema_close(ref_op, cur, ref_before, rho)       # the op's EMA, every element
    assert_ema_close(ref_twin, cur, ref_before, rho)     # (and the twin's, for consistency)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("rho", [0.0, 0.3, 0.9, 1.0])
def test_update_reference_is_an_ema_over_every_element_after_scoring(device, dtype, rho):
    if dtype == torch.float64 and device != "cpu":
        pytest.skip("float64 state is CPU only")
    # tensor 0: partly grouped (gaps), tensor 1 in no group at all, tensor 2 empty, tensor 3
    # larger than a chunk with a gap straddling the chunk boundary, tensor 4 0-d in no group
    shapes = [(50,), (7, 3), (0,), (CHUNK + 8000,), ()]
    layout = GroupLayout(tuple(f"t{i}" for i in range(5)), shapes, ("g0", "g1", "g2"),
                         torch.tensor([[0, 5, 20, 0], [0, 30, 40, 1], [3, 100, CHUNK - 10, 2],
                                       [3, CHUNK + 500, CHUNK + 7990, 0]]))
    cur, ref = snapshots(shapes, 7, dtype, device, zeros=0.1, negative=True)
    totals = ops.js_mass_totals(cur, ref, layout)
    scored = ops.js_mass_partial(cur, snapshot(ref), layout, totals)
    cur_before, ref_before = snapshot(cur), snapshot(ref)
    got = ops.js_mass_partial(cur, ref, layout, totals, update_reference=rho)
    assert_bitwise_equal(got, scored)          # scored before the update, not after
    assert_unchanged(cur_before, cur)
    assert_ema_close(ref, cur, ref_before, rho)
    if rho != 1.0:                             # elements in no group are updated as well
        assert not torch.equal(ref[1], ref_before[1])
        assert not torch.equal(ref[4], ref_before[4])
        assert not torch.equal(ref[0][:5], ref_before[0][:5])
        assert not torch.equal(ref[3][CHUNK - 10:CHUNK + 500], ref_before[3][CHUNK - 10:CHUNK + 500])
    if dtype == torch.float64 and device == "cpu":
        for r, c, old in zip(ref, cur, ref_before):
            torch.testing.assert_close(r, rho * old + (1 - rho) * c, rtol=1e-15, atol=0)
    if dtype == torch.bfloat16:
        # The float32 update (rho and 1 - rho in float32, each product and the sum rounded
        # there), rounded once to bfloat16: bitwise.
        r32 = torch.tensor(rho, dtype=torch.float32)
        keep, take = float(r32), float(1 - r32)
        for r, c, old in zip(ref, cur, ref_before):
            want = (old.float() * keep + c.float() * take).to(torch.bfloat16)
            assert_bitwise_equal(r, want)


# ---------------------------------------------------------------------------------------------
# sqrt(partial(totals)) is js_drift's mass mode


@pytest.mark.parametrize("device", devices)
@given(shapes=shape_lists(max_len=80), kind=st.sampled_from(LAYOUT_KINDS),
       dtype_idx=st.integers(0, 2), zeros=st.sampled_from([0.0, 0.5]),
       base=st.sampled_from(["e", "2"]), rho=st.sampled_from([None, 0.9]),
       seed=st.integers(0, 2**20))
def test_two_halves_equal_js_drift_mass(device, shapes, kind, dtype_idx, zeros, base, rho, seed):
    dtype = dtypes_for(device)[dtype_idx % len(dtypes_for(device))]
    layout = make_layout(shapes, kind, seed)
    cur, ref = snapshots(shapes, seed, dtype, device, zeros=zeros, negative=True)
    ref_halves, ref_drift = snapshot(ref), snapshot(ref)
    totals = ops.js_mass_totals(cur, ref_halves, layout)
    got = distance(ops.js_mass_partial(cur, ref_halves, layout, totals, update_reference=rho),
                   base)
    expected = ops.js_drift(cur, ref_drift, layout, drift_mode="mass", base=base, update_reference=rho)
    assert got.dtype == expected.dtype == torch.float32
    zero_total = ~((totals[0] > 0) & (totals[1] > 0))
    assert got[zero_total.to(got.device)].tolist() == [0.0] * int(zero_total.sum())
    if device == "cpu":    # the same summation in the same order
        assert_bitwise_equal(got, expected)
        assert_bitwise_equal(ref_halves, ref_drift)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=F32_EPS)
        assert_ema_close(ref_halves, cur, ref, rho)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("numel", [1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 1])
def test_two_halves_equal_js_drift_at_chunk_sizes(device, numel):
    shapes = [(5,), (numel,), (3, 7)]
    cur, ref = snapshots(shapes, numel, torch.float32, device, zeros=0.1, negative=True)
    for kind in LAYOUT_KINDS:
        layout = make_layout(shapes, kind, numel)
        got = two_halves(cur, snapshot(ref), layout)
        expected = ops.js_drift(cur, snapshot(ref), layout, drift_mode="mass")
        if device == "cpu":
            assert_bitwise_equal(got, expected)
        else:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=F32_EPS)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("rho", [None, 0.5])
def test_zero_total_and_empty_groups_give_zero(zero_total_case, device, rho):
    cur, ref, layout = zero_total_case(device)
    totals = ops.js_mass_totals(cur, ref, layout)
    assert totals[:, 4].tolist() == [0.0, 0.0]
    assert totals[0, 0] == 0 and totals[1, 1] == 0 and totals[:, 3].tolist() == [0.0, 0.0]
    partial = ops.js_mass_partial(cur, snapshot(ref), layout, totals, update_reference=rho)
    assert partial[[0, 1, 3, 4]].tolist() == [0.0] * 4
    assert float(partial[2]) > 0
    got = distance(partial)
    expected = ops.js_drift(cur, snapshot(ref), layout, drift_mode="mass", update_reference=rho)
    assert got[[0, 1, 3, 4]].tolist() == [0.0] * 4
    torch.testing.assert_close(got, expected, rtol=1e-6 if device != "cpu" else 0,
                               atol=F32_EPS if device != "cpu" else 0)
    # A zero total passed in gives 0 even where the given elements have mass (a shard whose
    # group is empty on every other side).
    forced = totals.clone()
    forced[0, 2] = 0.0
    assert float(ops.js_mass_partial(cur, snapshot(ref), layout, forced)[2]) == 0.0
    forced = totals.clone()
    forced[1, 2] = 0.0
    assert float(ops.js_mass_partial(cur, snapshot(ref), layout, forced)[2]) == 0.0


@given(shapes=shape_lists(max_len=30, allow_edge_sizes=False), kind=st.sampled_from(LAYOUT_KINDS),
       seed=st.integers(0, 2**20))
def test_magnitudes_are_used_negation_changes_nothing(shapes, kind, seed):
    layout = make_layout(shapes, kind, seed)
    cur, ref = snapshots(shapes, seed, zeros=0.2, negative=True)
    neg_c, neg_r = [-c for c in cur], [-r for r in ref]
    t = ops.js_mass_totals(cur, ref, layout)
    assert_bitwise_equal(ops.js_mass_totals(neg_c, neg_r, layout), t)
    assert_bitwise_equal(ops.js_mass_partial(neg_c, neg_r, layout, t),
                         ops.js_mass_partial(cur, ref, layout, t))


def test_identical_snapshots_give_exactly_zero():
    shapes = [(100,), (CHUNK + 3,), (4, 5)]
    layout = make_layout(shapes, "spanning", 1)
    cur, _ = snapshots(shapes, 1, zeros=0.2, negative=True)
    ref = [c.abs() for c in cur]
    partial = ops.js_mass_partial(cur, ref, layout, ops.js_mass_totals(cur, ref, layout))
    assert partial.tolist() == [0.0] * layout.num_groups


def test_non_contiguous_current_and_totals_are_read_correctly():
    g = make_generator(4)
    cur = [torch.rand(9, 6, generator=g).t()]
    ref = [torch.rand(6, 9, generator=g)]
    assert not cur[0].is_contiguous()
    layout = groups.slabs([("w", ref[0])], k=3)
    totals = ops.js_mass_totals(cur, ref, layout)
    assert_bitwise_equal(totals, ops.js_mass_totals([cur[0].contiguous()], ref, layout))
    totals_nc = totals.t().contiguous().t()           # [2, G] with strides (1, 2)
    assert not totals_nc.is_contiguous()
    ref_a, ref_b = snapshot(ref), snapshot(ref)
    a = ops.js_mass_partial(cur, ref_a, layout, totals_nc, update_reference=0.5)
    b = ops.js_mass_partial([cur[0].contiguous()], ref_b, layout, totals, update_reference=0.5)
    assert_bitwise_equal([a] + ref_a, [b] + ref_b)
    assert bool((a > 0).all())


def test_empty_lists():
    layout = GroupLayout((), (), ("a", "b"), torch.zeros(0, 4, dtype=torch.int64))
    totals = ops.js_mass_totals([], [], layout)
    assert totals.dtype == torch.float64 and totals.tolist() == [[0.0, 0.0], [0.0, 0.0]]
    partial = ops.js_mass_partial([], [], layout, totals, update_reference=0.5)
    assert partial.dtype == torch.float64 and partial.tolist() == [0.0, 0.0]
    no_groups = GroupLayout(("w",), ((3,),), (), torch.zeros(0, 4, dtype=torch.int64))
    cur, ref = [torch.rand(3)], [torch.rand(3)]
    totals = ops.js_mass_totals(cur, ref, no_groups)
    assert totals.shape == (2, 0)
    ref_before = snapshot(ref)
    assert ops.js_mass_partial(cur, ref, no_groups, totals, update_reference=0.25).shape == (0,)
    assert_ema_close(ref, cur, ref_before, 0.25)       # updated although in no group


# ---------------------------------------------------------------------------------------------
# Sharded: row shards of every tensor, totals summed, partials summed = unsharded drift


@given(shapes=shape_lists(max_len=40), kind=st.sampled_from(LAYOUT_KINDS), k=st.integers(1, 4),
       zeros=st.sampled_from([0.0, 0.3]), rho=st.sampled_from([None, 0.9]),
       seed=st.integers(0, 2**20))
def test_row_sharded_halves_equal_unsharded_drift(shapes, kind, k, zeros, rho, seed):
    layout = make_layout(shapes, kind, seed)
    cur, ref = snapshots(shapes, seed, zeros=zeros, negative=True)
    ref_sharded, ref_whole = snapshot(ref), snapshot(ref)
    got, totals, locals_ = sharded_mass(cur, ref_sharded, layout, k, update_reference=rho)
    expected = ops.js_drift(cur, ref_whole, layout, drift_mode="mass", update_reference=rho)
    # the local layouts partition every group's elements
    assert sum(loc.group_sizes for loc in locals_).tolist() == layout.group_sizes.tolist()
    torch.testing.assert_close(totals, ops.js_mass_totals(cur, ref, layout), rtol=1e-12, atol=0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=F32_EPS)
    zero_total = ~((totals[0] > 0) & (totals[1] > 0))
    assert got[zero_total].tolist() == [0.0] * int(zero_total.sum())
    assert_ema_close(ref_sharded, cur, ref, rho)       # every shard's part updated, once


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("shape", [(2 * CHUNK + 2,), (CHUNK + 1,), (3, CHUNK // 2 + 1),
                                   (CHUNK // 64 + 1, 64), (3, 5), (1, 9), (2, 0)])
def test_row_sharded_straddling_the_chunk(k, shape):
    shapes = [(7,), shape, (), (k - 1, 3)]              # (k - 1, 3): an empty trailing shard
    numel = int(torch.Size(shape).numel())
    cur, ref = snapshots(shapes, numel + k, zeros=0.1, negative=True)
    for kind in ("per_tensor", "gaps", "spanning"):
        layout = make_layout(shapes, kind, numel + k)
        ref_sharded, ref_whole = snapshot(ref), snapshot(ref)
        got, _, _ = sharded_mass(cur, ref_sharded, layout, k, update_reference=0.75)
        expected = ops.js_drift(cur, ref_whole, layout, drift_mode="mass", update_reference=0.75)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=F32_EPS)
        assert_ema_close(ref_sharded, cur, ref, 0.75)


def test_one_group_spread_over_shards_equals_scipy_like_formula():
    # One group spanning two tensors; 3 shards; against the textbook JS on the whole group.
    g = make_generator(11)
    cur = [torch.rand(10, 4, generator=g), torch.rand(5, generator=g)]
    ref = [torch.rand(10, 4, generator=g), torch.rand(5, generator=g)]
    layout = GroupLayout(("a", "b"), ((10, 4), (5,)), ("all",),
                         torch.tensor([[0, 0, 40, 0], [1, 0, 5, 0]]))
    got, _, locals_ = sharded_mass(cur, snapshot(ref), layout, 3)
    assert all(loc.num_groups == 1 for loc in locals_)
    p = torch.cat([c.reshape(-1) for c in cur]).double()
    q = torch.cat([r.reshape(-1) for r in ref]).double()
    expected = reference.js_distance(p / p.sum(), q / q.sum())
    assert float(got[0]) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Determinism


def _determinism_case(device="cpu"):
    shapes = [(70000,), (3, 20000), (999,), (), (0,)]
    layout = make_layout(shapes, "spanning", 9)
    cur, ref = snapshots(shapes, 9, torch.float32, device, zeros=0.1, negative=True)
    return cur, ref, layout


def _run(cur, ref, layout):
    r = snapshot(ref)
    totals = ops.js_mass_totals(cur, r, layout)
    partial = ops.js_mass_partial(cur, r, layout, totals, update_reference=0.9)
    return [totals, partial] + r


@pytest.mark.parametrize("device", devices)
def test_two_identical_calls_are_bitwise_equal(device):
    cur, ref, layout = _determinism_case(device)
    assert_bitwise_equal(_run(cur, ref, layout), _run(cur, ref, layout))


def test_bitwise_equal_for_any_number_of_threads():
    cur, ref, layout = _determinism_case()
    results = []
    for n in (1, 2, 3):
        with set_threads(n):
            results.append(_run(cur, ref, layout))
    assert_bitwise_equal(results[0], results[1])
    assert_bitwise_equal(results[0], results[2])


# ---------------------------------------------------------------------------------------------
# opcheck


def _opcheck_cases(device):
    """(totals args, partial args) pairs."""
    shapes = [(10,), (3, 4), (), (0,)]
    for i, (kind, rho, dtype) in enumerate([
            ("slabs", None, torch.float32), ("gaps", 0.9, torch.float32),
            ("spanning", 0.5, torch.float32), ("per_tensor", None, torch.float64)]):
        if dtype == torch.float64 and device != "cpu":
            continue
        layout = make_layout(shapes, kind, i)
        cur, ref = snapshots(shapes, i, dtype, device, zeros=0.2, negative=True)
        seg = layout.segments_on(device)
        totals = ops.js_mass_totals(cur, ref, layout)
        yield ((cur, ref, seg, layout.num_groups),
               (cur, ref, seg, layout.num_groups, totals, rho))
    empty = torch.zeros(0, 4, dtype=torch.int64)
    yield (([], [], empty, 2), ([], [], empty, 2, torch.zeros(2, 2, dtype=torch.float64), None))


@pytest.mark.parametrize("device", devices)
def test_opcheck_schema_fake_and_autograd_registration(device):
    for totals_args, partial_args in _opcheck_cases(device):
        for op, args in ((torch.ops.fisheradaptune.js_mass_totals, totals_args),
                         (torch.ops.fisheradaptune.js_mass_partial, partial_args)):
            result = opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                   "test_faketensor"))
            assert all(v == "SUCCESS" for v in result.values()), result


def test_opcheck_aot_dispatch_dynamic():
    cases = list(_opcheck_cases("cpu"))
    opcheck(torch.ops.fisheradaptune.js_mass_totals, cases[0][0],
            test_utils="test_aot_dispatch_dynamic")
    opcheck(torch.ops.fisheradaptune.js_mass_partial, cases[0][1],
            test_utils="test_aot_dispatch_dynamic")
    opcheck(torch.ops.fisheradaptune.js_mass_partial, cases[1][1],     # mutates reference
            test_utils="test_aot_dispatch_dynamic")


# ---------------------------------------------------------------------------------------------
# Bad input: an error naming the argument, nothing modified


def _case(dtype=torch.float32, device="cpu"):
    shapes = [(6,), (2, 3)]
    cur, ref = snapshots(shapes, 0, dtype, device)
    layout = groups.per_tensor([("a", cur[0]), ("b", cur[1])])
    return cur, ref, layout, ops.js_mass_totals(cur, ref, layout)


def assert_rejects(exc, match, cur, ref, call, totals=None):
    before = snapshot([list(cur), list(ref)])
    totals_before = snapshot(totals)
    with pytest.raises(exc, match=match):
        call()
    assert_unchanged(before, [list(cur), list(ref)])
    assert_unchanged(totals_before, totals)


@pytest.mark.parametrize("make_totals, exc, match", [
    (lambda t: t.float(), ValueError, r"js_mass_partial: argument 'totals': expected float64, got Float"),
    (lambda t: t.to(torch.int64), ValueError, r"argument 'totals': expected float64"),
    (lambda t: t[:1], ValueError, r"argument 'totals': expected shape \[2, 2\], got \[1, 2\]"),
    (lambda t: t.reshape(-1), ValueError, r"argument 'totals': expected shape \[2, 2\], got \[4\]"),
    (lambda t: torch.cat([t, t], 1), ValueError, r"argument 'totals': expected shape \[2, 2\]"),
    (lambda t: torch.zeros(3, 2, dtype=torch.float64), ValueError,
     r"argument 'totals': expected shape \[2, 2\], got \[3, 2\]"),
    (lambda t: t.reshape(2, 2, 1), ValueError, r"argument 'totals': expected shape \[2, 2\]"),
    (lambda t: t[0].tolist(), TypeError, r"argument 'totals': expected a Tensor"),
])
@pytest.mark.parametrize("rho", [None, 0.5])
def test_rejects_bad_totals(make_totals, exc, match, rho):
    cur, ref, layout, totals = _case()
    bad = make_totals(totals)
    assert_rejects(exc, match, cur, ref,
                   lambda: ops.js_mass_partial(cur, ref, layout, bad, update_reference=rho),
                   totals=bad if isinstance(bad, torch.Tensor) else None)


@pytest.mark.parametrize("rho", [1.5, -0.1, float("nan"), float("inf")])
def test_rejects_update_reference_outside_unit_interval(rho):
    cur, ref, layout, totals = _case()
    assert_rejects(ValueError, r"js_mass_partial: argument 'update_reference': expected a decay "
                   r"in \[0, 1\]", cur, ref,
                   lambda: ops.js_mass_partial(cur, ref, layout, totals, update_reference=rho))


@pytest.mark.parametrize("device", devices)
def test_rejects_overlapping_references_when_updating(device):
    buf = torch.rand(40, device=device) + 0.1
    layout = GroupLayout(("a", "b"), ((6,), (6,)), ("a", "b"),
                         torch.tensor([[0, 0, 6, 0], [1, 0, 6, 1]]))
    cur = [buf[20:26], buf[26:32]]
    for ref, arg, other in [([buf[:6], buf[:6]], r"reference\[1\]", r"reference\[0\]"),
                            ([buf[:6], buf[22:28]], r"reference\[1\]", r"current\[0\]")]:
        totals = ops.js_mass_totals(cur, ref, layout)  # reads only: sharing is fine
        before = buf.clone()
        with pytest.raises(ValueError, match=rf"js_mass_partial: argument '{arg}': shares memory "
                                             rf"with '{other}'"):
            ops.js_mass_partial(cur, ref, layout, totals, update_reference=0.5)
        assert torch.equal(buf, before)
        ops.js_mass_partial(cur, ref, layout, totals)  # no update: nothing written
    # totals are read while the reference is updated
    tbuf = torch.rand(8, dtype=torch.float64, device=device)
    ref64, cur64 = [tbuf[:6]], [torch.rand(6, dtype=torch.float64, device=device)]
    if device == "cpu":  # float64 state is CPU only
        lay1 = groups.per_tensor([("a", ref64[0])])
        with pytest.raises(ValueError, match=r"argument 'totals': shares memory with "
                                             r"'reference\[0\]'"):
            ops.js_mass_partial(cur64, ref64, lay1, tbuf[4:6].reshape(2, 1), update_reference=0.5)


@pytest.mark.parametrize("op", ["totals", "partial"])
def test_rejects_length_shape_dtype_and_layout_mismatch(op):
    cur, ref, layout, totals = _case()
    name = "js_mass_totals" if op == "totals" else "js_mass_partial"

    def call(c, r, lay=layout):
        if op == "totals":
            return lambda: ops.js_mass_totals(c, r, lay)
        return lambda: ops.js_mass_partial(c, r, lay, totals, update_reference=0.5)

    assert_rejects(ValueError, name + r": argument 'reference': expected a list of the same "
                   r"length as 'current' \(2\), got 1", cur, ref, call(cur, ref[:1]))
    assert_rejects(ValueError, r"argument 'current': expected 2 tensors", cur, ref,
                   call(cur[:1], ref[:1]))
    ref_bad = [ref[0], ref[1].reshape(3, 2).contiguous()]
    assert_rejects(ValueError, name + r": argument 'current\[1\]': expected shape", cur, ref_bad,
                   call(cur, ref_bad))
    cur_mixed = [cur[0].double(), cur[1]]
    assert_rejects(ValueError, name + r": argument 'current\[0\]': expected the dtype of "
                   r"reference\[0\]", cur_mixed, ref, call(cur_mixed, ref))
    ref_int = [ref[0], ref[1].to(torch.int32)]
    cur_int = [cur[0], cur[1].to(torch.int32)]
    assert_rejects(ValueError, name + r": argument 'reference\[1\]': expected float32", cur_int,
                   ref_int, call(cur_int, ref_int))
    ref_nc = [torch.rand(3, 2).t(), ref[1]]
    cur_nc = [torch.rand(2, 3), cur[1]]
    lay_nc = groups.per_tensor([("a", cur_nc[0]), ("b", cur_nc[1])])
    assert_rejects(ValueError, name + r": argument 'reference\[0\]': expected a contiguous tensor",
                   cur_nc, ref_nc, call(cur_nc, ref_nc, lay_nc))
    assert_rejects(TypeError, r"argument 'layout': expected a GroupLayout", cur, ref,
                   call(cur, ref, "slabs"))


@pytest.mark.parametrize("segments, num_groups, exc, match", [
    ([[0, 0, 4, 0], [0, 3, 6, 1]], 2, ValueError, r"argument 'segments': .*overlap"),
    ([[2, 0, 1, 0]], 1, ValueError, r"argument 'segments': row 0: tensor_index 2"),
    ([[0, 0, 7, 0]], 1, ValueError, r"argument 'segments': row 0: range \[0, 7\)"),
    ([[0, 0, 6, 1]], 1, ValueError, r"argument 'segments': row 0: group_id 1"),
    ([[0, 0, 6, 0]], -1, ValueError, r"argument 'num_groups': expected >= 0"),
])
def test_raw_ops_reject_bad_segments(segments, num_groups, exc, match):
    cur, ref, _, _ = _case()
    segments = torch.as_tensor(segments)
    totals = torch.ones(2, max(num_groups, 0), dtype=torch.float64)
    assert_rejects(exc, match, cur, ref, lambda: torch.ops.fisheradaptune.js_mass_totals(
        cur, ref, segments, num_groups))
    assert_rejects(exc, match, cur, ref, lambda: torch.ops.fisheradaptune.js_mass_partial(
        cur, ref, segments, num_groups, totals, 0.5))


@pytest.mark.cuda
@requires_cuda
def test_rejects_totals_on_another_device():
    cur, ref, layout, totals = _case(device="cuda")
    cpu_totals = totals.cpu()
    assert_rejects(ValueError, r"argument 'totals': expected a tensor on cuda", cur, ref,
                   lambda: ops.js_mass_partial(cur, ref, layout, cpu_totals,
                                               update_reference=0.5))
    cur, ref, layout, totals = _case()
    cuda_totals = totals.cuda()
    assert_rejects(ValueError, r"argument 'totals': expected a tensor on cpu", cur, ref,
                   lambda: ops.js_mass_partial(cur, ref, layout, cuda_totals,
                                               update_reference=0.5))


@pytest.mark.cuda
@requires_cuda
def test_rejects_reference_on_another_device():
    cur, ref, layout, totals = _case(device="cuda")
    ref_mixed = [ref[0], ref[1].cpu()]
    for call in (lambda: ops.js_mass_totals(cur, ref_mixed, layout),
                 lambda: ops.js_mass_partial(cur, ref_mixed, layout, totals,
                                             update_reference=0.5)):
        assert_rejects(ValueError, r"argument 'reference\[1\]': expected a tensor on cuda", cur,
                       ref_mixed, call)


# ---------------------------------------------------------------------------------------------
# Note [Tiny totals] (csrc/drift/drift_math.h)


@pytest.mark.parametrize("exponent", [-1040, -1074])
def test_partial_with_subnormal_totals_is_finite_and_scale_invariant(exponent):
    """Issue 21: js_mass_partial returned NaN for a float64 group whose totals are subnormal
    (1 / total overflowed, and 0 * inf is NaN); the reference scores it. Integer values scaled
    by 2^exponent are exact, so the partial must equal the unscaled one, to the bit."""
    layout = GroupLayout(("a",), ((6,),), ("g0", "g1"), torch.tensor([[0, 0, 4, 0], [0, 4, 6, 1]]))

    def case(e):
        cur = [torch.ldexp(torch.tensor([3.0, 1.0, 0.0, 7.0, 2.0, 5.0], dtype=torch.float64),
                           torch.tensor(e))]
        ref = [torch.ldexp(torch.tensor([1.0, 4.0, 2.0, 5.0, 5.0, 2.0], dtype=torch.float64),
                           torch.tensor(e))]
        return cur, ref, ops.js_mass_totals(cur, ref, layout)

    cur, ref, totals = case(exponent)
    assert float(totals.max()) < 5.6e-309
    got = ops.js_mass_partial(cur, ref, layout, totals)
    assert bool(torch.isfinite(got).all()), got
    torch.testing.assert_close(got, reference.js_mass_partial(cur, ref, layout, totals),
                               rtol=1e-12, atol=0)
    plain_cur, plain_ref, plain_totals = case(0)
    assert_bitwise_equal(got, ops.js_mass_partial(plain_cur, plain_ref, layout, plain_totals))
    # a zero total still gives 0 (the contract), next to a subnormal one
    zero = totals.clone()
    zero[0, 1] = 0.0
    assert float(ops.js_mass_partial(cur, ref, layout, zero)[1]) == 0.0


def test_partial_with_a_subnormal_total_and_larger_elements_matches_the_reference():
    """Totals handed in need not be these elements' (other shards): a subnormal total with
    normal elements scores like the reference's division, not NaN."""
    layout = GroupLayout(("a",), ((4,),), ("g",), torch.tensor([[0, 0, 4, 0]]))
    cur = [torch.tensor([1e-310, 2e-310, 0.0, 5e-311], dtype=torch.float64)]
    ref = [torch.tensor([3e-310, 1e-311, 1e-310, 0.0], dtype=torch.float64)]
    for t in ([[1e-320], [1.0]], [[5e-324], [5e-324]]):
        totals = torch.tensor(t, dtype=torch.float64)
        got = ops.js_mass_partial(cur, ref, layout, totals)
        torch.testing.assert_close(got, reference.js_mass_partial(cur, ref, layout, totals),
                                   rtol=1e-12, atol=0)
