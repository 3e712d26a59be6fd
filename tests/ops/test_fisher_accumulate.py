"""ops.fisher_accumulate_: fisher[i] = decay*fisher[i] + scale*grads[i]**2, fused, with per-group
sums of the updated Fisher and a count of skipped non-finite elements (docs/methods.md
section 1)."""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, strategies as st
from torch.library import opcheck

from helpers import (CHUNK, EDGE_NUMELS, LAYOUT_KINDS, assert_bitwise_equal, assert_unchanged,
                     devices, make_layout, rand_fisher, rand_grads, requires_cuda, set_threads,
                     shape_lists, snapshot)
from fisheradaptune import groups, ops, reference

GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# float32 state: the kernel fuses scale*g*g + decay*f into one FMA, the reference rounds twice.
FISHER_TOL = dict(rtol=1e-6, atol=1e-30)
# group sums: float lanes flushed into double every 1024 elements vs a float64 reference sum.
SUMS_TOL = dict(rtol=2e-5, atol=1e-30)
# bfloat16 state (Note [bfloat16 state], csrc/common/state.h): the same float32 update
# rounded once to bfloat16, so op and reference differ at most where their float32 results
# straddle a bfloat16 rounding boundary: one bfloat16 ulp (2^-7 relative).
STATE_DTYPES = [torch.float32, torch.bfloat16]
BF16_TOL = dict(rtol=2 ** -7, atol=1e-30)


def state_tol(dtype):
    return BF16_TOL if dtype == torch.bfloat16 else FISHER_TOL


def run_both(fisher, grads, decay, scale, layout):
    """Run the op and the reference on copies of the same inputs; return both results."""
    f_op, f_ref = snapshot(fisher), snapshot(fisher)
    sums, count = ops.fisher_accumulate_(f_op, grads, decay=decay, scale=scale, layout=layout)
    ref_sums, ref_count = reference.fisher_accumulate_(f_ref, grads, decay=decay, scale=scale,
                                                       layout=layout)
    return (f_op, sums, count), (f_ref, ref_sums, ref_count)


def assert_matches_reference(fisher, grads, decay, scale, layout, tol=FISHER_TOL, sums_tol=SUMS_TOL):
    (f_op, sums, count), (f_ref, ref_sums, ref_count) = run_both(fisher, grads, decay, scale, layout)
    for i, (a, b) in enumerate(zip(f_op, f_ref)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"fisher[{i}]: {m}")
        assert bool(torch.isfinite(a).all())
    assert count.dtype == torch.int64 and count.dim() == 0
    assert int(count) == int(ref_count)
    if layout is None:
        assert sums is None
    else:
        assert sums.dtype == torch.float32 and sums.shape == (layout.num_groups,)
        torch.testing.assert_close(sums, ref_sums, **sums_tol)
    return f_op, sums, count


def inject_nonfinite(grads, seed):
    """Put NaN, +-Inf and overflowing finite values at random places (incl. block edges)."""
    rng = random.Random(seed)
    for g in grads:
        if g is None or g.numel() == 0:
            continue
        flat = g.view(-1)
        big = 1e20 if g.dtype != torch.float16 else 6e4   # float16: overflow needs a big scale
        for idx in {0, flat.numel() - 1, min(1023, flat.numel() - 1), rng.randrange(flat.numel())}:
            flat[idx] = rng.choice([float("nan"), float("inf"), -float("inf"), big, -big])


# ---------------------------------------------------------------------------------------------
# Against the reference


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@given(shapes=shape_lists(), kind=st.sampled_from(LAYOUT_KINDS + ("none",)),
       grad_dtype=st.sampled_from(GRAD_DTYPES), decay=st.floats(0.0, 1.0),
       scale=st.floats(0.0, 2.0), none_prob=st.sampled_from([0.0, 0.3, 1.0]),
       nonfinite=st.booleans(), seed=st.integers(0, 2**20))
def test_matches_reference(device, state_dtype, shapes, kind, grad_dtype, decay, scale, none_prob,
                           nonfinite, seed):
    layout = None if kind == "none" else make_layout(shapes, kind, seed)
    fisher = [f.to(state_dtype) for f in rand_fisher(shapes, seed, device=device)]
    grads = rand_grads(shapes, seed + 1, grad_dtype, device, none_prob=none_prob)
    if nonfinite:
        inject_nonfinite(grads, seed)
    f_op, _, _ = assert_matches_reference(fisher, grads, decay, scale, layout,
                                          tol=state_tol(state_dtype))
    assert all(f.dtype == state_dtype for f in f_op)


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_long_list_of_300_small_tensors(kind):
    rng = random.Random(300)
    shapes = [rng.choice([(), (0,), (rng.randint(1, 30),), (rng.randint(1, 5), rng.randint(1, 6))])
              for _ in range(300)]
    fisher = rand_fisher(shapes, 300)
    grads = rand_grads(shapes, 301, torch.bfloat16, none_prob=0.2)
    inject_nonfinite(grads[::17], 302)
    assert_matches_reference(fisher, grads, 0.99, 0.01, make_layout(shapes, kind, 303))


@pytest.mark.parametrize("grad_dtype", [torch.float64, torch.float32, torch.bfloat16])
@given(shapes=shape_lists(max_len=40), kind=st.sampled_from(LAYOUT_KINDS),
       decay=st.floats(0.0, 1.0), scale=st.floats(0.0, 2.0), seed=st.integers(0, 2**20))
def test_float64_state_matches_reference(grad_dtype, shapes, kind, decay, scale, seed):
    layout = make_layout(shapes, kind, seed)
    fisher = rand_fisher(shapes, seed, dtype=torch.float64)
    grads = rand_grads(shapes, seed + 1, grad_dtype, none_prob=0.2)
    tol = dict(rtol=1e-13, atol=1e-300)
    # group_sums are float32 whatever the state dtype
    assert_matches_reference(fisher, grads, decay, scale, layout, tol=tol,
                             sums_tol=dict(rtol=1e-6, atol=1e-30))


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
@pytest.mark.parametrize("numel", [0] + EDGE_NUMELS)
def test_sizes_straddling_block_and_chunk(device, numel, grad_dtype, state_dtype):
    shapes = [(numel,), (3,), (numel,)]
    fisher = [f.to(state_dtype) for f in rand_fisher(shapes, numel, device=device)]
    grads = rand_grads(shapes, numel + 1, grad_dtype, device)
    grads[1] = None
    # non-finite values right at block and chunk edges
    for idx in (1023, 1024, CHUNK - 1, CHUNK, numel - 1):
        if 0 <= idx < numel:
            grads[0].view(-1)[idx] = float("nan")
            grads[2].view(-1)[idx] = float("inf")
    for kind in ("slabs", "gaps"):
        f_op, _, count = assert_matches_reference(fisher, grads, 0.9, 0.1,
                                                  make_layout(shapes, kind, numel),
                                                  tol=state_tol(state_dtype))
    assert int(count) == int(sum(int((~torch.isfinite(g)).sum()) for g in grads if g is not None))


def test_known_values_and_group_sums_over_gaps_and_spanning_groups():
    fisher = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([[10.0, 20.0], [30.0, 40.0]])]
    grads = [torch.tensor([1.0, 0.0, 2.0, -1.0]), None]
    # group 0: fisher[0][0:2] and fisher[1][2:4]; group 1: fisher[0][3:4]; fisher[0][2] in none;
    # group 2: no elements.
    layout = groups.GroupLayout(("a", "b"), ((4,), (2, 2)), ("g0", "g1", "g2"),
                                torch.tensor([[1, 2, 4, 0], [0, 3, 4, 1], [0, 0, 2, 0]]))
    sums, count = ops.fisher_accumulate_(fisher, grads, decay=0.5, scale=2.0, layout=layout)
    torch.testing.assert_close(fisher[0], torch.tensor([2.5, 1.0, 9.5, 4.0]), rtol=0, atol=0)
    torch.testing.assert_close(fisher[1], torch.tensor([[10.0, 20.0], [30.0, 40.0]]), rtol=0, atol=0)
    # gap element fisher[0][2] is updated but counted in no group; grad-less tensor contributes
    torch.testing.assert_close(sums, torch.tensor([2.5 + 1.0 + 30.0 + 40.0, 4.0, 0.0]), rtol=0, atol=0)
    assert int(count) == 0


def test_plain_running_sum_with_decay_1_scale_1():
    fisher = [torch.zeros(5)]
    g = torch.arange(5.0)
    for _ in range(3):
        ops.fisher_accumulate_(fisher, [g], decay=1.0, scale=1.0)
    torch.testing.assert_close(fisher[0], 3 * g * g, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices)
def test_none_grads_leave_fisher_untouched_but_count_in_sums(device):
    shapes = [(40000,), (7, 3), ()]
    fisher = rand_fisher(shapes, 3, device=device)
    before = snapshot(fisher)
    layout = groups.slabs([(f"t{i}", f) for i, f in enumerate(fisher)])
    sums, count = ops.fisher_accumulate_(fisher, [None, None, None], decay=0.5, scale=3.0,
                                         layout=layout)
    assert_unchanged(before, fisher)
    assert int(count) == 0
    expected = torch.tensor([float(before[t].reshape(-1)[b:e].double().sum())
                             for t, b, e, _ in layout.segments.tolist()])
    torch.testing.assert_close(sums.cpu(), expected.float(), **SUMS_TOL)


@pytest.mark.parametrize("device", devices)
def test_empty_lists_and_empty_tensors(device):
    sums, count = ops.fisher_accumulate_([], [], decay=0.9, scale=0.1)
    assert sums is None and int(count) == 0 and count.dtype == torch.int64
    empty_layout = groups.per_tensor([])
    sums, count = ops.fisher_accumulate_([], [], decay=0.9, scale=0.1, layout=empty_layout)
    assert sums.shape == (0,) and int(count) == 0
    fisher = [torch.zeros(0, device=device), torch.zeros(3, 0, device=device)]
    grads = [torch.zeros(0, device=device), torch.zeros(3, 0, device=device, dtype=torch.bfloat16)]
    layout = groups.slabs([("a", fisher[0]), ("b", fisher[1])])
    sums, count = ops.fisher_accumulate_(fisher, grads, decay=0.9, scale=0.1, layout=layout)
    assert sums.shape == (0,) and int(count) == 0
    assert sums.device.type == device and count.device.type == device


def test_fisher_views_into_one_flat_buffer_and_non_contiguous_grads():
    # Fisher state often lives in one flat buffer; each tensor is a contiguous view at an offset.
    buf = torch.rand(2 + 12 + 3 + 40 + 5)
    before = buf.clone()
    fisher = [buf[2:14].view(3, 4), buf[17:57].view(5, 8)]
    assert fisher[1].storage_offset() == 17 and fisher[1].is_contiguous()
    grads = [torch.randn(4, 3).t(), torch.randn(8, 5, dtype=torch.bfloat16).t()]
    assert not grads[0].is_contiguous()
    layout = groups.slabs([("a", fisher[0]), ("b", fisher[1])], k=2)
    expected = [0.5 * f + 2.0 * g.float() ** 2 for f, g in zip(fisher, grads)]
    sums, count = ops.fisher_accumulate_(fisher, grads, decay=0.5, scale=2.0, layout=layout)
    for f, e in zip(fisher, expected):
        torch.testing.assert_close(f, e, **FISHER_TOL)
    # nothing outside the views was touched
    for lo, hi in [(0, 2), (14, 17), (57, 62)]:
        assert torch.equal(buf[lo:hi], before[lo:hi])
    torch.testing.assert_close(sums, torch.stack([fisher[0][:2].sum(), fisher[0][2:].sum(),
                                                  fisher[1][:3].sum(), fisher[1][3:].sum()]),
                               **SUMS_TOL)
    assert int(count) == 0


# ---------------------------------------------------------------------------------------------
# Non-finite gradients


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
def test_nonfinite_grads_are_skipped_and_counted(device, grad_dtype, state_dtype):
    n = 3000  # vector body, several flush blocks, and a scalar tail
    fisher = [f.to(state_dtype) for f in rand_fisher([(n,)], 0, device=device)]
    before = snapshot(fisher)
    g = torch.randn(n, device=device).to(grad_dtype)
    bad = torch.tensor([0, 5, 1023, 1024, 2047, 2999])
    g[bad] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan"),
                           float("inf"), float("nan")], device=device).to(grad_dtype)
    layout = groups.per_tensor([("w", fisher[0])])
    sums, count = ops.fisher_accumulate_(fisher, [g], decay=0.9, scale=0.1, layout=layout)
    assert int(count) == len(bad)
    assert bool(torch.isfinite(fisher[0]).all()) and bool(torch.isfinite(sums).all())
    # skipped elements keep their Fisher exactly; the others are updated
    torch.testing.assert_close(fisher[0][bad.to(device)], before[0][bad.to(device)], rtol=0, atol=0)
    ok = torch.ones(n, dtype=torch.bool)
    ok[bad] = False
    ok = ok.to(device)
    expected = (0.9 * before[0].float() + 0.1 * g.float() ** 2).to(state_dtype)
    torch.testing.assert_close(fisher[0][ok], expected[ok], **state_tol(state_dtype))


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("grad_dtype, value, scale", [
    (torch.float32, 1e20, 1.0),     # g*g = 1e40 > FLT_MAX
    (torch.bfloat16, 1e20, 1.0),
    (torch.float32, 1e19, 1e3),     # finite square, overflowing scale*g*g
    (torch.float16, 6e4, 1e30),     # float16 cannot overflow by itself: its square times scale can
])
def test_overflow_of_a_finite_grad_squared_is_skipped(device, grad_dtype, value, scale):
    n = 50
    fisher = [torch.ones(n, device=device)]
    g = torch.full((n,), 0.5, device=device).to(grad_dtype)
    g[[3, 17, 49]] = torch.tensor([value, -value, value], device=device).to(grad_dtype)
    assert bool(torch.isfinite(g).all())
    _, count = ops.fisher_accumulate_(fisher, [g], decay=1.0, scale=scale)
    assert int(count) == 3
    assert bool(torch.isfinite(fisher[0]).all())
    torch.testing.assert_close(fisher[0][[3, 17, 49]], torch.ones(3, device=device), rtol=0, atol=0)
    assert float(fisher[0][0]) == pytest.approx(1.0 + scale * 0.25, rel=1e-6)


@pytest.mark.parametrize("device", devices)
def test_bfloat16_state_update_overflowing_only_on_rounding_is_skipped(device):
    # Note [bfloat16 state]: the skip test is on the stored (rounded) value. bfloat16's largest
    # finite value is 3.3895e38 and its top ulp 2^120 (1.329e36): adding 1e36 gives 3.3995e38,
    # finite in float32 but past max + ulp/2, so it rounds to Inf and is skipped; adding 5e35
    # rounds back down to max and is stored. float32 state stores both.
    top = torch.finfo(torch.bfloat16).max
    g = torch.tensor([1e18, 1.0, 5e35 ** 0.5, float("nan")], device=device)
    for dtype, expected_count in ((torch.bfloat16, 2), (torch.float32, 1)):
        fisher = [torch.tensor([top, 2.0, top, 3.0], device=device).to(dtype)]
        before = fisher[0].clone()
        _, count = ops.fisher_accumulate_(fisher, [g], decay=1.0, scale=1.0)
        assert int(count) == expected_count, dtype
        assert bool(torch.isfinite(fisher[0]).all())
        if dtype == torch.bfloat16:
            assert float(fisher[0][0]) == top  # skipped: kept
            assert float(fisher[0][1]) == 3.0
            assert float(fisher[0][2]) == top  # rounded down to max: stored
        else:
            assert float(fisher[0][0]) == pytest.approx(top + 1e36, rel=1e-6)
        assert float(fisher[0][3]) == float(before[3])
        ref = [before.clone()]
        _, ref_count = reference.fisher_accumulate_(ref, [g], decay=1.0, scale=1.0)
        assert int(ref_count) == expected_count
        assert_bitwise_equal(ref[0], fisher[0])


def test_overflow_of_the_decayed_fisher_plus_update_is_skipped():
    big = 0.9 * torch.finfo(torch.float32).max
    fisher = [torch.tensor([big, big, 1.0])]
    g = torch.tensor([1e19, 1.0, 1.0])           # big + 1e38 overflows; the others do not
    expected = fisher[0] + g * g
    expected[0] = fisher[0][0]
    _, count = ops.fisher_accumulate_(fisher, [g], decay=1.0, scale=1.0)
    assert int(count) == 1
    torch.testing.assert_close(fisher[0], expected, rtol=0, atol=0)


def test_counter_is_reset_each_call_not_accumulated():
    fisher = [torch.zeros(4)]
    g = torch.tensor([float("nan"), 1.0, 1.0, 1.0])
    for _ in range(3):
        _, count = ops.fisher_accumulate_(fisher, [g], decay=1.0, scale=1.0)
        assert int(count) == 1
    assert fisher[0].tolist() == [0.0, 3.0, 3.0, 3.0]


# ---------------------------------------------------------------------------------------------
# Determinism


def _determinism_case(device):
    shapes = [(2 * CHUNK + 17,), (3, 40000), (1000,), (), (0,)]
    layout = make_layout(shapes, "spanning", 5)
    fisher = rand_fisher(shapes, 11, device=device)
    grads = rand_grads(shapes, 12, torch.bfloat16, device)
    grads[2] = None
    return fisher, grads, layout


def _run(fisher, grads, layout):
    f = snapshot(fisher)
    sums, count = ops.fisher_accumulate_(f, grads, decay=0.95, scale=0.05, layout=layout)
    return f, sums, count


@pytest.mark.parametrize("device", devices)
def test_two_identical_calls_are_bitwise_equal(device):
    fisher, grads, layout = _determinism_case(device)
    a, b = _run(fisher, grads, layout), _run(fisher, grads, layout)
    assert_bitwise_equal(list(a[0]) + [a[1], a[2]], list(b[0]) + [b[1], b[2]])


def test_bitwise_equal_for_any_number_of_threads():
    fisher, grads, layout = _determinism_case("cpu")
    results = []
    for n in (1, 2, 3):
        with set_threads(n):
            results.append(_run(fisher, grads, layout))
    flat = [list(r[0]) + [r[1], r[2]] for r in results]
    assert_bitwise_equal(flat[0], flat[1])
    assert_bitwise_equal(flat[0], flat[2])


# ---------------------------------------------------------------------------------------------
# opcheck


def _raw_args(fisher, grads, decay, scale, layout):
    segs = None if layout is None else layout.segments
    g = layout.num_groups if layout is not None else 0
    device = fisher[0].device if fisher else torch.device("cpu")
    return (fisher, grads, decay, scale, segs, torch.empty(g, device=device),
            torch.zeros((), dtype=torch.int64, device=device))


def _opcheck_cases(device):
    shapes = [(10,), (3, 4), (), (0,)]
    f32 = rand_fisher(shapes, 0, device=device)
    grads = rand_grads(shapes, 1, torch.bfloat16, device)
    yield "segments+bf16", _raw_args(f32, grads, 0.9, 0.1, groups.slabs(
        [(f"t{i}", t) for i, t in enumerate(f32)], k=2))
    yield "no-segments", _raw_args(rand_fisher(shapes, 0, device=device),
                                   rand_grads(shapes, 2, torch.float32, device), 1.0, 1.0, None)
    none_grads = rand_grads(shapes, 3, torch.float16, device)
    none_grads[0] = None
    none_grads[1] = None
    yield "none-grads", _raw_args(rand_fisher(shapes, 0, device=device), none_grads, 0.5, 2.0,
                                  make_layout(shapes, "spanning", 1))
    nan_grads = rand_grads(shapes, 4, torch.float32, device)
    nan_grads[0][3] = float("nan")
    yield "nonfinite", _raw_args(rand_fisher(shapes, 0, device=device), nan_grads, 0.9, 0.1,
                                 make_layout(shapes, "gaps", 2))
    bf16 = [f.to(torch.bfloat16) for f in rand_fisher(shapes, 0, device=device)]
    yield "bf16-state", _raw_args(bf16, rand_grads(shapes, 6, torch.float32, device), 0.9, 0.1,
                                  make_layout(shapes, "spanning", 3))
    if device == "cpu":
        yield "float64", _raw_args(rand_fisher(shapes, 0, torch.float64), rand_grads(
            shapes, 5, torch.float64), 0.9, 0.1, groups.per_tensor(
            [(f"t{i}", torch.empty(s)) for i, s in enumerate(shapes)]))


@pytest.mark.parametrize("device", devices)
def test_opcheck(device):
    for name, args in _opcheck_cases(device):
        result = opcheck(torch.ops.fisheradaptune.fisher_accumulate_, args)
        assert all(v == "SUCCESS" for v in result.values()), (name, result)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, and nothing modified


def _case():
    fisher = [torch.rand(6), torch.rand(2, 3)]
    grads = [torch.randn(6), torch.randn(2, 3)]
    layout = groups.per_tensor([("a", fisher[0]), ("b", fisher[1])])
    return fisher, grads, layout


def assert_rejects(exc, match, fisher, grads, call):
    """``call()`` raises ``exc`` matching ``match`` and leaves fisher and grads untouched."""
    before = snapshot([list(fisher), list(grads)])
    with pytest.raises(exc, match=match):
        call()
    assert_unchanged(before, [list(fisher), list(grads)])


def test_rejects_list_length_mismatch():
    fisher, grads, _ = _case()
    assert_rejects(ValueError, r"argument 'grads': expected a list of the same length as 'fisher' "
                   r"\(2\), got 1", fisher, grads,
                   lambda: ops.fisher_accumulate_(fisher, grads[:1], decay=0.9, scale=0.1))


@pytest.mark.parametrize("with_layout", [False, True])
def test_rejects_grad_shape_mismatch(with_layout):
    fisher, grads, layout = _case()
    grads[1] = torch.randn(3, 2)
    assert_rejects(ValueError, r"argument 'grads\[1\]': expected shape \[2, 3\], got \[3, 2\]",
                   fisher, grads, lambda: ops.fisher_accumulate_(
                       fisher, grads, decay=0.9, scale=0.1, layout=layout if with_layout else None))


@pytest.mark.parametrize("index, bad, exc, match", [
    (0, lambda t: t.to(torch.int32), ValueError, r"argument 'fisher\[0\]': expected float32"),
    (1, lambda t: t.to(torch.int64), ValueError, r"argument 'fisher\[1\]': expected float32"),
    (1, lambda t: t.to(torch.float16), ValueError,
     r"argument 'fisher\[1\]': expected float32 or bfloat16 \(or float64 on CPU\), got Half"),
    (1, lambda t: t.t().contiguous().t(), ValueError,
     r"argument 'fisher\[1\]': expected a contiguous tensor"),
])
def test_rejects_bad_fisher(index, bad, exc, match):
    fisher, grads, _ = _case()
    fisher[index] = bad(fisher[index])
    # fisher[0] is valid in the last cases: it must not be updated before fisher[1] is rejected
    assert_rejects(exc, match, fisher, grads,
                   lambda: ops.fisher_accumulate_(fisher, grads, decay=0.9, scale=0.1))


@pytest.mark.parametrize("index, dtype", [(1, torch.int32), (1, torch.float64), (0, torch.bool)])
def test_rejects_bad_grad_dtype(index, dtype):
    fisher, grads, _ = _case()
    grads[index] = grads[index].to(dtype)
    assert_rejects(ValueError, rf"argument 'grads\[{index}\]': expected float32, bfloat16 or float16",
                   fisher, grads, lambda: ops.fisher_accumulate_(fisher, grads, decay=0.9, scale=0.1))


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("arg, value", [
    ("decay", float("nan")), ("decay", float("inf")), ("scale", -float("inf")),
    ("scale", float("nan")),
    # finite doubles that are inf in float32, where the kernels multiply (Note [Coefficients])
    ("decay", 1e308), ("scale", 1e308), ("scale", 3.5e38), ("decay", -3.5e38),
    # negative: a negative Fisher
    ("decay", -0.5), ("scale", -1e-30), ("scale", -1.0)])
def test_rejects_bad_coefficients(device, arg, value):
    fisher, grads, layout = _case()
    fisher, grads = [f.to(device) for f in fisher], [g.to(device) for g in grads]
    kwargs = dict(decay=0.9, scale=0.1)
    kwargs[arg] = value
    assert_rejects(ValueError, rf"argument '{arg}': expected a finite number in \[0, 3.40282e\+38\]",
                   fisher, grads, lambda: ops.fisher_accumulate_(fisher, grads, layout=layout,
                                                                 **kwargs))
    # the same range for float64 state (CPU)
    f64, g64 = [f.double().cpu() for f in fisher], [g.double().cpu() for g in grads]
    assert_rejects(ValueError, rf"argument '{arg}'", f64, g64,
                   lambda: ops.fisher_accumulate_(f64, g64, **kwargs))


def test_accepts_coefficients_at_the_edges_of_float32():
    fisher, grads, _ = _case()
    for decay, scale in [(0.0, 0.0), (3.4e38, 1e-45), (1.0, 3.4e38)]:
        ops.fisher_accumulate_([f.clone() * 0 for f in fisher], [g * 0 for g in grads],
                               decay=decay, scale=scale)


# ---------------------------------------------------------------------------------------------
# Aliasing (Note [Aliasing], csrc/common/validate.h): in-place targets that share memory race


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("make, arg, other", [
    # the same tensor twice
    (lambda buf: ([buf[:8], buf[:8]], None), r"fisher\[1\]", r"fisher\[0\]"),
    (lambda buf: ([buf[:8], buf[20:28], buf[:8]], None), r"fisher\[2\]", r"fisher\[0\]"),
    # partial overlap between two views of one buffer
    (lambda buf: ([buf[4:12], buf[:8]], None), r"fisher\[1\]", r"fisher\[0\]"),
    (lambda buf: ([buf[:16].view(2, 8), buf[15:23]], None), r"fisher\[1\]", r"fisher\[0\]"),
    # a gradient read in place from another target's memory
    (lambda buf: ([buf[:8], buf[8:16]], [buf[10:18], None]), r"grads\[0\]", r"fisher\[1\]"),
    # ... or from its own (elementwise harmless, but one rule: no written tensor overlaps)
    (lambda buf: ([buf[:8]], [buf[:8]]), r"grads\[0\]", r"fisher\[0\]"),
])
def test_rejects_overlapping_targets(device, make, arg, other):
    buf = torch.rand(40, device=device)
    fisher, grads = make(buf)
    if grads is None:
        grads = [torch.randn(f.shape, device=device) for f in fisher]
    before = buf.clone()
    with pytest.raises(ValueError, match=rf"fisher_accumulate_: argument '{arg}': shares memory "
                                         rf"with '{other}'"):
        ops.fisher_accumulate_(fisher, grads, decay=0.5, scale=2.0)
    assert torch.equal(buf, before)


def test_overlap_that_is_not_read_in_place_is_fine():
    # adjacent, non-overlapping views: fine (test_fisher_views_into_one_flat_buffer...); a
    # non-contiguous gradient is copied before the kernel runs, so it races with nothing
    buf = torch.rand(16)
    fisher = [buf[:8].view(2, 4)]
    g = buf[8:16].view(4, 2).t()
    assert not g.is_contiguous()
    ops.fisher_accumulate_(fisher, [g], decay=0.5, scale=1.0)
    # an empty tensor owns no memory
    ops.fisher_accumulate_([buf[:0], buf[:0], buf[:4]], [None, None, torch.ones(4)], decay=1.0,
                           scale=1.0)


def test_raw_op_rejects_outputs_sharing_memory_with_fisher():
    buf = torch.zeros(8, dtype=torch.float64)
    fisher = [buf[:4]]
    with pytest.raises(ValueError, match=r"argument 'nonfinite': shares memory with 'fisher\[0\]'"):
        torch.ops.fisheradaptune.fisher_accumulate_(fisher, [torch.ones(4)], 0.5, 1.0, None,
                                                    torch.empty(0), buf.view(torch.int64)[2])
    sums = torch.zeros(2)
    with pytest.raises(ValueError, match=r"argument 'nonfinite': shares memory with 'group_sums'"):
        torch.ops.fisheradaptune.fisher_accumulate_([torch.zeros(4)], [None], 0.5, 1.0,
                                                    torch.tensor([[0, 0, 4, 0]]), sums[:1],
                                                    sums.view(torch.int64)[0])
    assert torch.equal(buf, torch.zeros(8, dtype=torch.float64))


def test_rejects_layout_with_wrong_tensors():
    fisher, grads, _ = _case()
    three = groups.per_tensor([("a", fisher[0]), ("b", fisher[1]), ("c", torch.zeros(2))])
    assert_rejects(ValueError, r"argument 'fisher': expected 3 tensors", fisher, grads,
                   lambda: ops.fisher_accumulate_(fisher, grads, decay=0.9, scale=0.1, layout=three))
    reshaped = groups.per_tensor([("a", fisher[0]), ("b", torch.zeros(3, 2))])
    assert_rejects(ValueError, r"argument 'fisher\[1\]': expected shape \(3, 2\)", fisher, grads,
                   lambda: ops.fisher_accumulate_(fisher, grads, decay=0.9, scale=0.1,
                                                  layout=reshaped))
    assert_rejects(TypeError, r"argument 'layout': expected a GroupLayout", fisher, grads,
                   lambda: ops.fisher_accumulate_(fisher, grads, decay=0.9, scale=0.1,
                                                  layout=three.segments))


# Raw op calls: the C++ validation of arguments that GroupLayout would already have refused.


@pytest.mark.parametrize("segments, num_groups, exc, match", [
    ([[2, 0, 1, 0]], 1, ValueError, r"argument 'segments': row 0: tensor_index 2 is out of range"),
    ([[0, 0, 7, 0]], 1, ValueError, r"argument 'segments': row 0: range \[0, 7\) is out of bounds"),
    ([[0, 3, 2, 0]], 1, ValueError, r"argument 'segments': row 0: range \[3, 2\) is out of bounds"),
    ([[0, -1, 2, 0]], 1, ValueError, r"argument 'segments': row 0: range \[-1, 2\)"),
    ([[0, 0, 6, 0], [1, 0, 6, 1]], 1, ValueError, r"argument 'segments': row 1: group_id 1 is out"),
    ([[0, 0, 6, 0], [1, 0, 6, -1]], 2, ValueError, r"argument 'segments': row 1: group_id -1"),
    ([[0, 0, 4, 0], [1, 0, 6, 1], [0, 3, 6, 1]], 2, ValueError,
     r"argument 'segments': segments \[0, 4\) and \[3, 6\) of tensor 0 overlap"),
    ([[1, 2, 5, 0], [1, 0, 3, 1]], 2, ValueError, r"argument 'segments': .*overlap"),
    (torch.tensor([[0, 0, 6, 0]], dtype=torch.int32), 1, ValueError,
     r"argument 'segments': expected int64"),
    (torch.tensor([[0, 0, 6]]), 1, ValueError, r"argument 'segments': expected shape \[S, 4\]"),
    (torch.tensor([0, 0, 6, 0]), 1, ValueError, r"argument 'segments': expected shape \[S, 4\]"),
])
def test_raw_op_rejects_bad_segments(segments, num_groups, exc, match):
    fisher, grads, _ = _case()
    segments = torch.as_tensor(segments)
    sums = torch.full((num_groups,), -1.0)
    count = torch.full((), -7, dtype=torch.int64)
    before = snapshot([fisher, grads, [sums, count, segments]])
    with pytest.raises(exc, match=match):
        torch.ops.fisheradaptune.fisher_accumulate_(fisher, grads, 0.9, 0.1, segments, sums, count)
    assert_unchanged(before, [fisher, grads, [sums, count, segments]])


@pytest.mark.parametrize("sums, count, segments, exc, match", [
    (torch.empty(1, dtype=torch.float64), torch.zeros((), dtype=torch.int64), [[0, 0, 6, 0]],
     ValueError, r"argument 'group_sums': expected float32"),
    (torch.empty(2, 1), torch.zeros((), dtype=torch.int64), [[0, 0, 6, 0]],
     ValueError, r"argument 'group_sums': expected a contiguous 1-D tensor"),
    (torch.empty(2), torch.zeros((), dtype=torch.int64), None,
     ValueError, r"argument 'group_sums': expected an empty tensor when no segments"),
    (torch.empty(1), torch.zeros((), dtype=torch.int32), [[0, 0, 6, 0]],
     ValueError, r"argument 'nonfinite': expected int64"),
    (torch.empty(1), torch.zeros(2, dtype=torch.int64), [[0, 0, 6, 0]],
     ValueError, r"argument 'nonfinite': expected one element"),
])
def test_raw_op_rejects_bad_outputs(sums, count, segments, exc, match):
    fisher, grads, _ = _case()
    segments = None if segments is None else torch.tensor(segments)
    before = snapshot([fisher, grads])
    with pytest.raises(exc, match=match):
        torch.ops.fisheradaptune.fisher_accumulate_(fisher, grads, 0.9, 0.1, segments, sums, count)
    assert_unchanged(before, [fisher, grads])


@pytest.mark.cuda
@requires_cuda
def test_rejects_device_mismatch():
    fisher = [torch.rand(6, device="cuda"), torch.rand(2, 3, device="cuda")]
    grads = [torch.randn(6, device="cuda"), torch.randn(2, 3)]
    assert_rejects(ValueError, r"argument 'grads\[1\]': expected a tensor on cuda", fisher, grads,
                   lambda: ops.fisher_accumulate_(fisher, grads, decay=0.9, scale=0.1))
    fisher2 = [torch.rand(6, device="cuda"), torch.rand(2, 3)]
    grads2 = [torch.randn(6, device="cuda"), torch.randn(2, 3)]
    assert_rejects(ValueError, r"argument 'fisher\[1\]': expected a tensor on cuda", fisher2,
                   grads2, lambda: ops.fisher_accumulate_(fisher2, grads2, decay=0.9, scale=0.1))
