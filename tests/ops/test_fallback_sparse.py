"""The pure-PyTorch fallback kernel of the sparse family (fisheradaptune/ops/sparse.py),
called directly, on CPU: the compiled op's results to rounding, its refusals (same exception,
same message, the index range included), determinism, and the float64 reference. The
comparisons with the compiled op skip, with a reason, where the fallback is what runs."""
from __future__ import annotations

import inspect

import pytest
import torch

from fisheradaptune import reference
from fisheradaptune.ops import sparse as family
from helpers import (COMPILED, assert_bitwise_equal, assert_same_refusal, assert_unchanged,
                     make_generator, raised, requires_compiled_op, set_threads, snapshot)
from test_fake_kernels import CASES, _changed, _tensors

_ops = torch.ops.fisheradaptune
sampled = family._sampled_grad_fallback
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def test_the_family_declares_a_fallback_for_its_op():
    assert family.FALLBACK_KERNELS == {"sampled_grad": sampled}


def _inputs(t, out, inn, c, seed, dtype=torch.float32):
    g = make_generator(seed)
    grad_out = torch.randn(t, out, generator=g, dtype=torch.float64).to(dtype)
    x = torch.randn(t, inn, generator=g, dtype=torch.float64).to(dtype)
    index = torch.randint(0, max(inn, 1), (out, c), generator=g)  # repeats allowed
    return grad_out, x, index


SHAPES = [(5, 4, 7, 3), (300, 40, 64, 8), (2048, 3, 5, 5), (1, 1, 1, 1), (0, 3, 4, 2),
          (4, 0, 3, 2), (4, 3, 5, 0)]


@requires_compiled_op
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t, out, inn, c", SHAPES)
def test_matches_the_compiled_op(t, out, inn, c, dtype):
    args = _inputs(t, out, inn, c, seed=t + out, dtype=dtype)
    before = snapshot(list(args))
    got = sampled(*args)
    want = _ops.sampled_grad(*args)
    assert_unchanged(before, list(args))
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t, out, inn, c", SHAPES)
def test_matches_the_reference(t, out, inn, c, dtype):
    args = _inputs(t, out, inn, c, seed=7, dtype=dtype)
    got = sampled(*args)
    want = reference.sampled_grad(*args)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want.to(got.dtype), rtol=tol, atol=tol)


def test_no_tokens_gives_zeros_and_no_features_admits_only_no_columns():
    grad_out, x, index = _inputs(0, 3, 4, 2, seed=1)
    assert sampled(grad_out, x, index).tolist() == [[0.0, 0.0]] * 3
    empty = sampled(torch.randn(2, 3), torch.randn(2, 0), torch.zeros(3, 0, dtype=torch.int64))
    assert empty.shape == (3, 0)


@pytest.mark.parametrize("bad, seen", [(-1, "[-1, 4]"), (5, "[0, 5]")])
def test_index_out_of_range_is_refused_naming_the_range(bad, seen):
    grad_out, x, index = _inputs(3, 2, 5, 3, seed=2)
    index[0, 0] = 4
    index[1, 2] = bad
    lo_hi = seen.replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ValueError, match=r"^fisheradaptune\.sampled_grad: argument 'index': "
                                         r"expected values in \[0, in\) = \[0, 5\), got values "
                                         r"in " + lo_hi):
        sampled(grad_out, x, index)
    if COMPILED:
        assert_same_refusal(lambda: sampled(grad_out, x, index),
                            lambda: _ops.sampled_grad(grad_out, x, index), [grad_out, x, index])


def _sparse_cases():
    for op, change, exc, arg, *flags in CASES:
        if op in family.FALLBACK_KERNELS:
            yield pytest.param(op, change, exc, arg, id=f"{arg}-{len(flags)}")


@pytest.mark.parametrize("op, change, exc, arg", list(_sparse_cases()))
def test_bad_input_is_refused_as_the_compiled_op_does(op, change, exc, arg):
    args = _changed(op, change, "cpu")
    live = _tensors(args)
    err = raised(lambda: sampled(*args.values()))
    assert type(err) is exc and str(err).startswith(f"fisheradaptune.{op}: argument '{arg}': ")
    if COMPILED:
        assert_same_refusal(lambda: sampled(*args.values()),
                            lambda: _ops.sampled_grad(*args.values()), live)


def test_is_deterministic_across_calls_and_threads():
    args = _inputs(700, 50, 80, 16, seed=3)
    out = []
    for threads in (1, 2, 1):
        with set_threads(threads):
            out.append(sampled(*args))
    assert_bitwise_equal(out[0], out[1])
    assert_bitwise_equal(out[0], out[2])


def test_tiles_of_rows_give_the_untiled_result(monkeypatch):
    args = _inputs(64, 33, 20, 6, seed=4)
    whole = sampled(*args)
    monkeypatch.setattr(family, "_GATHER_ELEMS", 64 * 6 * 5)  # 5 rows a tile, the last partial
    assert_bitwise_equal(sampled(*args), whole)


def test_the_kernel_has_the_schemas_arguments():
    schema = _ops.sampled_grad.default._schema
    assert list(inspect.signature(sampled).parameters) == [a.name for a in schema.arguments]


@pytest.mark.parametrize("t", [5, 0])
def test_index_checked_skips_the_range_check_and_guards_every_read(t):
    # Note [Checked indices]: a stale flag gives NaN where the column is out of range (zeros
    # with T == 0), the other elements exact, as the compiled kernels do.
    grad_out, x, _ = _inputs(t, 3, 5, 2, seed=5, dtype=torch.float64)
    index = torch.tensor([[0, 5], [-1, 2], [4, 1 << 40]])
    bad = (index < 0) | (index >= 5)
    got = sampled(grad_out, x, index, True)
    if t == 0:
        assert got.tolist() == [[0.0, 0.0]] * 3
    else:
        assert torch.equal(got.isnan(), bad)
        want = reference.sampled_grad(grad_out, x, index.clamp(0, 4))
        torch.testing.assert_close(got[~bad], want[~bad], rtol=1e-12, atol=1e-12)
    if COMPILED:
        torch.testing.assert_close(got, _ops.sampled_grad(grad_out, x, index, True),
                                   rtol=1e-12, atol=1e-12, equal_nan=True)
