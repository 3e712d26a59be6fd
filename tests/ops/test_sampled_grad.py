"""ops.sampled_grad: the TR-PTS sampled weight gradient (SDDMM), Note [Sampled gradient] in
csrc/sparse/sampled_grad.h."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st
from torch.library import opcheck

from helpers import assert_unchanged, devices, make_generator, set_threads, snapshot
from fisheradaptune import ops, reference

TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-5, atol=1e-5),   # inputs are exact in every dtype (see inputs)
    torch.float16: dict(rtol=1e-5, atol=1e-5),
}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def inputs(t, out, inn, c, seed, dtype=torch.float32, device="cpu"):
    g = make_generator(seed)
    # Small integers / 8: exact in bfloat16 and float16, so only accumulation order differs.
    grad_out = (torch.randint(-8, 9, (t, out), generator=g).double() / 8).to(dtype).to(device)
    x = (torch.randint(-8, 9, (t, inn), generator=g).double() / 8).to(dtype).to(device)
    if inn == 0:
        index = torch.zeros(out, 0, dtype=torch.int64)
    else:
        index = torch.stack([torch.randperm(inn, generator=g)[:c] for _ in range(out)]) if out else \
            torch.zeros(0, c, dtype=torch.int64)
    return grad_out, x, index.to(device)


def check(grad_out, x, index):
    before = snapshot([grad_out, x, index])
    got = ops.sampled_grad(grad_out, x, index)
    want = reference.sampled_grad(grad_out, x, index)
    assert_unchanged(before, [grad_out, x, index])
    want_dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    assert got.dtype == want_dtype and got.shape == index.shape and got.device == grad_out.device
    torch.testing.assert_close(got, want, **TOL[grad_out.dtype])
    return got


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,out,inn,c", [(1, 1, 1, 1), (7, 5, 9, 3), (197, 24, 40, 8),
                                          (2500, 3, 17, 17), (0, 4, 6, 2), (5, 0, 6, 2),
                                          (5, 4, 6, 0), (5, 4, 0, 0)])
def test_against_reference(device, dtype, t, out, inn, c):
    check(*inputs(t, out, inn, c, seed=t + out, dtype=dtype, device=device))


@given(t=st.integers(0, 300), out=st.integers(0, 20), inn=st.integers(1, 30), data=st.data(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_hypothesis(t, out, inn, data, dtype, seed):
    c = data.draw(st.integers(0, inn))
    check(*inputs(t, out, inn, c, seed, dtype=dtype))


def test_repeated_and_noncontiguous():
    g = make_generator(3)
    grad_out = torch.randn(30, 8, generator=g, dtype=torch.float64)[:, ::2]   # [30, 4] strided
    x = torch.randn(12, 30, generator=g, dtype=torch.float64).T              # [30, 12] transposed
    index = torch.tensor([[0, 0, 11], [5, 3, 5], [1, 2, 3], [11, 10, 9]])
    check(grad_out, x, index)
    check(grad_out, x, index.T.contiguous().T)   # non-contiguous index


def test_deterministic_across_threads():
    grad_out, x, index = inputs(5000, 16, 64, 12, seed=1)
    grad_out = grad_out + torch.randn_like(grad_out) * 1e-3
    with set_threads(1):
        a = ops.sampled_grad(grad_out, x, index)
    with set_threads(4):
        b = ops.sampled_grad(grad_out, x, index)
    assert torch.equal(a, b)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(device, dtype):
    grad_out, x, index = inputs(13, 6, 10, 4, seed=2, dtype=dtype, device=device)
    opcheck(torch.ops.fisheradaptune.sampled_grad.default, (grad_out, x, index))


def test_errors():
    grad_out, x, index = inputs(5, 4, 6, 2, seed=0)
    with pytest.raises(ValueError, match="'grad_out'"):
        ops.sampled_grad(grad_out[0], x, index)
    with pytest.raises(ValueError, match="'x'"):
        ops.sampled_grad(grad_out, x[:4], index)
    with pytest.raises(ValueError, match="'x'"):
        ops.sampled_grad(grad_out, x.double(), index)
    with pytest.raises(ValueError, match="'grad_out'"):
        ops.sampled_grad(grad_out.int(), x.int(), index)
    with pytest.raises(ValueError, match="'index'"):
        ops.sampled_grad(grad_out, x, index.int())
    with pytest.raises(ValueError, match="'index'"):
        ops.sampled_grad(grad_out, x, index[:3])
    with pytest.raises(ValueError, match="'index'.*\\[0, 6\\)"):
        ops.sampled_grad(grad_out, x, index + 5)
    with pytest.raises(ValueError, match="'index'"):
        ops.sampled_grad(grad_out, x, index - 3)
