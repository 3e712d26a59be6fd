"""The pure-PyTorch fallback kernels of the fisher family (fisheradaptune/ops/fisher.py), called
directly, on CPU: the compiled op's results (the Fisher and the counts bitwise, group sums to
rounding), its refusals (same exception, same message, nothing written), in-place writes,
determinism, and the float64 reference. The comparisons with the compiled op skip, with a
reason, where the fallback is what runs (FISHERADAPTUNE_FALLBACK=1); the CI stage that reruns
the op tests that way covers the registered kernels end to end."""
from __future__ import annotations

import math
import re

import pytest
import torch

from fisheradaptune import reference
from fisheradaptune.ops import fisher as family
from helpers import (BLOCK, CHUNK, COMPILED, LAYOUT_KINDS, assert_bitwise_equal, assert_same_refusal,
                     assert_unchanged, make_generator, make_layout, rand_fisher, rand_grads,
                     raised, requires_compiled_op, set_threads, snapshot)
from test_fake_kernels import ALIAS_CASES, BASES, CASES, _changed, _tensors

_ops = torch.ops.fisheradaptune
accumulate = family._fisher_accumulate_fallback
per_sample = family._per_sample_grad_sq_fallback

SHAPES = [(7,), (BLOCK + 3,), (3, 11, 40), (CHUNK + 5,), (), (0,), (2 * CHUNK + 1,)]
STATE_GRAD = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
              (torch.float32, torch.float16), (torch.float64, torch.float64),
              (torch.float64, torch.float32), (torch.bfloat16, torch.float32),
              (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float16)]


def _sums_rtol(state):
    # Group sums add float32 block sums in float64; within a block the C++ adds in vector lanes
    # and torch in its own order. bfloat16 state's values (coarser, so fewer cancel) were seen
    # at 1.9e-6 apart.
    return 1e-5 if state == torch.bfloat16 else 1e-6


def test_the_family_declares_a_fallback_for_each_of_its_ops():
    assert set(family.FALLBACK_KERNELS) == {"fisher_accumulate_", "per_sample_grad_sq_"}
    assert family.FALLBACK_KERNELS["fisher_accumulate_"] is accumulate


# ---------------------------------------------------------------------------------------------
# fisher_accumulate_


def _poison(grads, seed):
    """NaN and Inf, and (but in float16) a square that overflows float32."""
    g = [t for t in grads if t is not None and t.numel() > 2]
    if g:
        g[0].view(-1)[0] = math.nan
        g[0].view(-1)[1] = math.inf
    if len(g) > 1:
        g[1].view(-1)[0] = -1e30 if g[1].dtype != torch.float16 else -6e4
    return grads


def _case(state, grad, kind, seed, poison=True):
    fisher = rand_fisher(SHAPES, seed, dtype=state)
    grads = rand_grads(SHAPES, seed + 1, dtype=grad, none_prob=0.2)
    if poison:
        _poison(grads, seed)
    layout = make_layout(SHAPES, kind, seed)
    return fisher, grads, layout


def _run(kernel, fisher, grads, layout, decay=0.9, scale=0.37):
    group_sums = torch.full((layout.num_groups,), -1.0)
    nonfinite = torch.full((), -7, dtype=torch.int64)
    kernel(fisher, grads, decay, scale, layout.segments, group_sums, nonfinite)
    return group_sums, nonfinite


@requires_compiled_op
@pytest.mark.parametrize("state, grad", STATE_GRAD)
@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_accumulate_matches_the_compiled_op(state, grad, kind):
    fisher, grads, layout = _case(state, grad, kind, seed=3)
    twin = snapshot(fisher)
    sums, count = _run(accumulate, fisher, grads, layout)
    want_sums, want_count = _run(_ops.fisher_accumulate_, twin, grads, layout)
    assert_bitwise_equal(fisher, twin)  # the update is spelled as the C++ rounds it
    assert int(count) == int(want_count) >= 2
    torch.testing.assert_close(sums, want_sums, rtol=_sums_rtol(state), atol=0)


@pytest.mark.parametrize("state, grad", STATE_GRAD)
def test_accumulate_matches_the_reference(state, grad):
    fisher, grads, layout = _case(state, grad, "spanning", seed=5)
    twin = snapshot(fisher)
    sums, count = _run(accumulate, fisher, grads, layout)
    want_sums, want_count = reference.fisher_accumulate_(twin, grads, decay=0.9, scale=0.37,
                                                         layout=layout)
    assert_bitwise_equal(fisher, twin)
    assert int(count) == int(want_count) >= 2
    torch.testing.assert_close(sums, want_sums, rtol=_sums_rtol(state), atol=0)


def test_accumulate_writes_in_place_and_skips_what_is_not_finite():
    f = torch.tensor([1.0, 2.0, 3.0, 4.0])
    data = f.data_ptr()
    g = torch.tensor([1.0, math.nan, -math.inf, 1e20])  # 1e20 ** 2 overflows float32
    layout = make_layout([(4,)], "per_tensor")
    sums, count = _run(accumulate, [f], [g], layout, decay=0.5, scale=2.0)
    assert f.data_ptr() == data
    assert f.tolist() == [2.5, 2.0, 3.0, 4.0] and int(count) == 3
    assert sums.tolist() == [11.5]


def test_accumulate_without_a_layout_and_with_empty_lists():
    f, g = [torch.ones(3)], [torch.full((3,), 2.0)]
    empty = torch.empty(0)
    count = torch.full((), -1, dtype=torch.int64)
    accumulate(f, g, 1.0, 1.0, None, empty, count)
    assert f[0].tolist() == [5.0, 5.0, 5.0] and int(count) == 0
    sums = torch.full((2,), -1.0)
    accumulate([], [], 1.0, 1.0, torch.zeros(0, 4, dtype=torch.int64), sums, count)
    assert sums.tolist() == [0.0, 0.0] and int(count) == 0


def test_accumulate_is_deterministic_across_calls_and_threads():
    results = []
    for threads in (1, 2, 1):
        fisher, grads, layout = _case(torch.float32, torch.float32, "gaps", seed=11)
        with set_threads(threads):
            sums, count = _run(accumulate, fisher, grads, layout)
        results.append((fisher, sums, count))
    for other in results[1:]:
        assert_bitwise_equal(list(results[0]), list(other))


def _fisher_cases():
    for op, change, exc, arg, *flags in CASES:
        if op in family.FALLBACK_KERNELS:
            yield pytest.param(op, change, exc, arg, id=f"{op}-{arg}-{len(flags)}")


@pytest.mark.parametrize("op, change, exc, arg", list(_fisher_cases()))
def test_bad_input_is_refused_as_the_compiled_op_does(op, change, exc, arg):
    args = _changed(op, change, "cpu")
    live = _tensors(args)
    before = snapshot(live)
    err = raised(lambda: family.FALLBACK_KERNELS[op](*args.values()))
    assert type(err) is exc and str(err).startswith(f"fisheradaptune.{op}: argument '{arg}': ")
    assert_unchanged(before, live)
    if COMPILED:
        assert_same_refusal(lambda: family.FALLBACK_KERNELS[op](*args.values()),
                            lambda: getattr(_ops, op)(*args.values()), live)


BAD_SEGMENTS = [
    ([[2, 0, 1, 0]], r"row 0: tensor_index 2 is out of range for 2 tensors"),
    ([[0, 0, 6, 0], [1, -1, 2, 1]], r"row 1: range \[-1, 2\) is out of bounds for tensor 1 "
                                    r"with 6 elements"),
    ([[1, 0, 7, 0]], r"row 0: range \[0, 7\) is out of bounds for tensor 1 with 6 elements"),
    ([[0, 3, 2, 0]], r"row 0: range \[3, 2\) is out of bounds"),
    ([[0, 0, 6, 2]], r"row 0: group_id 2 is out of range for 2 groups"),
    ([[0, 0, 4, 0], [1, 0, 6, 1], [0, 3, 6, 1]], r"segments \[0, 4\) and \[3, 6\) of tensor 0 "
                                                 r"overlap"),
]


@pytest.mark.parametrize("rows, message", BAD_SEGMENTS)
def test_bad_layout_rows_are_refused_before_anything_is_written(rows, message):
    args = BASES["fisher_accumulate_"]("cpu")
    args["segments"] = torch.tensor(rows, dtype=torch.int64)
    live = _tensors(args)
    before = snapshot(live)
    with pytest.raises(ValueError, match=r"^fisheradaptune\.fisher_accumulate_: argument "
                                         r"'segments': " + message):
        accumulate(*args.values())
    assert_unchanged(before, live)
    if COMPILED:
        assert_same_refusal(lambda: accumulate(*args.values()),
                            lambda: _ops.fisher_accumulate_(*args.values()), live)


@pytest.mark.parametrize("op, change, arg, other, both",
                         [c for c in ALIAS_CASES if c[0] in family.FALLBACK_KERNELS],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_aliasing_is_refused(op, change, arg, other, both):
    args = _changed(op, change, "cpu")
    live = _tensors(args)
    before = snapshot(live)
    with pytest.raises(ValueError, match=rf"argument '{re.escape(arg)}': shares memory with "
                                         rf"'{re.escape(other)}'"):
        family.FALLBACK_KERNELS[op](*args.values())
    assert_unchanged(before, live)


# ---------------------------------------------------------------------------------------------
# per_sample_grad_sq_


def _samples(n, t, out, inn, seed, dtype=torch.float32):
    g = make_generator(seed)
    x = torch.randn(n, t, inn, generator=g, dtype=torch.float64).to(dtype)
    grad_out = torch.randn(n, t, out, generator=g, dtype=torch.float64).to(dtype)
    return x, grad_out


def _per_sample(kernel, fisher, x, grad_out, scale=0.25):
    count = torch.full((), -7, dtype=torch.int64)
    kernel(fisher, x, grad_out, scale, count)
    return count


@requires_compiled_op
@pytest.mark.parametrize("n, t, out, inn", [(3, 5, 4, 6), (40, 2, 512, 512), (1, 1, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_sample_matches_the_compiled_op(n, t, out, inn, dtype):
    # (40, 2, 512, 512): 16 samples a tile on the CPU, so three tiles and two carries.
    x, grad_out = _samples(n, t, out, inn, seed=n, dtype=dtype)
    x[0, 0, 0] = math.nan
    fisher = rand_fisher([(out, inn)], 1, dtype=dtype)[0]
    twin = fisher.clone()
    count = _per_sample(per_sample, fisher, x, grad_out)
    want = _per_sample(_ops.per_sample_grad_sq_, twin, x, grad_out)
    assert int(count) == int(want) == out
    assert_bitwise_equal(fisher, twin)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_per_sample_matches_the_reference(grad_dtype):
    x, grad_out = _samples(5, 3, 6, 7, seed=2, dtype=grad_dtype)
    grad_out[1, 2, 3] = math.inf
    fisher = rand_fisher([(6, 7)], 4)[0]
    twin = fisher.clone()
    count = _per_sample(per_sample, fisher, x, grad_out)
    want = reference.per_sample_grad_sq_(twin, x, grad_out, scale=0.25)
    assert int(count) == int(want) == 7
    torch.testing.assert_close(fisher, twin, rtol=1e-5, atol=1e-6)


def test_per_sample_overflow_is_skipped_and_counted():
    fisher = torch.ones(2, 2)
    x = torch.full((2, 1, 2), 1e20)
    grad_out = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    count = _per_sample(per_sample, fisher, x, grad_out, scale=1e-30)
    # row 0's squares (1e40) overflow float32 even though scale would bring them back: skipped
    assert fisher.tolist() == [[1.0, 1.0], [1.0, 1.0]] and int(count) == 2


@pytest.mark.parametrize("n, t", [(0, 3), (3, 0)])
def test_per_sample_without_samples_or_tokens_writes_nothing(n, t):
    x, grad_out = _samples(n, t, 2, 3, seed=0)
    fisher = torch.rand(2, 3)
    before = fisher.clone()
    assert int(_per_sample(per_sample, fisher, x, grad_out)) == 0
    assert_bitwise_equal(fisher, before)


def test_per_sample_runs_in_full_fp32_and_restores_the_precision_setting():
    x, grad_out = _samples(4, 3, 8, 8, seed=9)
    results = []
    saved = torch.backends.mkldnn.matmul.fp32_precision
    try:
        for precision in ("ieee", "bf16"):
            torch.backends.mkldnn.matmul.fp32_precision = precision
            fisher = torch.zeros(8, 8)
            _per_sample(per_sample, fisher, x, grad_out)
            assert torch.backends.mkldnn.matmul.fp32_precision == precision
            results.append(fisher)
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = saved
    assert_bitwise_equal(results[0], results[1])


def test_per_sample_is_deterministic_across_threads():
    x, grad_out = _samples(40, 2, 512, 512, seed=1)
    out = []
    for threads in (1, 2):
        fisher = torch.zeros(512, 512)
        with set_threads(threads):
            _per_sample(per_sample, fisher, x, grad_out)
        out.append(fisher)
    assert_bitwise_equal(out[0], out[1])
