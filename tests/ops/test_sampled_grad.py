"""ops.sampled_grad: the TR-PTS sampled weight gradient (SDDMM), Note [Sampled gradient] in
csrc/sparse/sampled_grad.h."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode

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


@pytest.mark.parametrize("device", devices)
def test_opcheck_with_index_checked(device):
    grad_out, x, index = inputs(13, 6, 10, 4, seed=2, device=device)
    opcheck(torch.ops.fisheradaptune.sampled_grad.default, (grad_out, x, index, True))


# ---------------------------------------------------------------------------------------------
# index_checked and the wrapper's record of checked indices (Note [Checked indices],
# csrc/sparse/sampled_grad_args.cpp)

_op = torch.ops.fisheradaptune.sampled_grad.default


class FlagLog(TorchDispatchMode):
    """Records the index_checked of every sampled_grad call that reaches the backends."""

    def __init__(self):
        super().__init__()
        self.flags = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _op:
            self.flags.append(bool(args[3]) if len(args) > 3 else
                              bool(kwargs.get("index_checked", False)))
        return func(*args, **kwargs)


def _case(device, inn=6):
    g = make_generator(5)
    grad_out = torch.randn(7, 3, generator=g).to(device)
    x = torch.randn(7, inn, generator=g).to(device)
    index = torch.tensor([[0, 5], [1, 2], [3, 4]], device=device)
    return grad_out, x, index


@pytest.mark.parametrize("device", devices)
def test_raw_call_checks_even_an_index_the_wrapper_has_checked(device):
    grad_out, x, index = _case(device)
    ops.sampled_grad(grad_out, x, index)
    ops.sampled_grad(grad_out, x, index)
    index.data[1, 0] = 6            # bypasses the version counter: the record still matches
    with pytest.raises(ValueError, match=r"^fisheradaptune\.sampled_grad: argument 'index': "
                                         r"expected values in \[0, in\) = \[0, 6\), got values "
                                         r"in \[0, 6\]"):
        _op(grad_out, x, index)
    with pytest.raises(ValueError, match=r"argument 'index'.*\[0, 6\)"):
        _op(grad_out, x, index, False)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("t", [5, 0])
def test_stale_index_checked_gives_nan_never_an_out_of_bounds_read(device, t):
    # A caller that wrongly vouches for an index: each element whose column is outside [0, in)
    # is NaN, the others exact; with T == 0 nothing is read and the result is zeros.
    g = make_generator(6)
    grad_out = torch.randn(t, 3, generator=g, dtype=torch.float64).to(device)
    x = torch.randn(t, 6, generator=g, dtype=torch.float64).to(device)
    index = torch.tensor([[0, 6], [-1, 2], [1 << 40, 5]], device=device)
    bad = (index < 0) | (index >= 6)
    got = _op(grad_out, x, index, True)
    if t == 0:
        assert torch.equal(got, torch.zeros(3, 2, dtype=torch.float64, device=device))
        return
    assert torch.equal(got.isnan(), bad)
    want = reference.sampled_grad(grad_out, x, index.clamp(0, 5))
    torch.testing.assert_close(got[~bad], want[~bad], **TOL[torch.float64])


@pytest.mark.parametrize("device", devices)
def test_wrapper_checks_an_index_once_per_version(device):
    grad_out, x, index = _case(device)
    want = reference.sampled_grad(grad_out, x, index)
    with FlagLog() as log:
        for _ in range(3):
            torch.testing.assert_close(ops.sampled_grad(grad_out, x, index), want)
    assert log.flags == [False, True, True]      # checked once, then skipped
    # An in-place write bumps the version: checked again, and a bad value is refused.
    index[1, 0] = 6
    with FlagLog() as log, pytest.raises(ValueError, match=r"argument 'index'.*\[0, 6\)"):
        ops.sampled_grad(grad_out, x, index)
    assert log.flags == [False]
    with FlagLog() as log, pytest.raises(ValueError, match=r"argument 'index'.*\[0, 6\)"):
        ops.sampled_grad(grad_out, x, index)     # a refused index is never recorded
    assert log.flags == [False]
    index.view(-1)[2] = 0                        # through a view: the same version counter
    with FlagLog() as log:
        ops.sampled_grad(grad_out, x, index)
        ops.sampled_grad(grad_out, x, index)
    assert log.flags == [False, True]
    index.view(-1)[3] = -1
    with pytest.raises(ValueError, match="'index'"):
        ops.sampled_grad(grad_out, x, index)


@pytest.mark.parametrize("device", devices)
def test_wrapper_rechecks_for_a_narrower_x_a_new_tensor_or_a_data_swap(device):
    grad_out, x, index = _case(device)
    with FlagLog() as log:
        ops.sampled_grad(grad_out, x, index)                     # checked against in = 6
        with pytest.raises(ValueError, match=r"\[0, 5\)"):       # values up to 5: not < 5
            ops.sampled_grad(grad_out, x[:, :5], index)
        ops.sampled_grad(grad_out, torch.cat([x, x], 1), index)  # in = 12 >= 6: covered
        ops.sampled_grad(grad_out, x, index.clone())             # another tensor
        index.data = torch.tensor([[0, 1], [1, 2], [3, 4]], device=device)  # no version bump
        ops.sampled_grad(grad_out, x, index)
        ops.sampled_grad(grad_out, x[:, :5], index)              # narrower, but checked again
        ops.sampled_grad(grad_out, x[:, :5], index)
        ops.sampled_grad(grad_out, x, index)                     # values in [0, 5): also [0, 6)
    assert log.flags == [False, False, True, False, False, False, True, True]


@pytest.mark.parametrize("device", devices)
def test_inference_index_is_checked_at_every_call(device):
    grad_out, x, _ = _case(device)
    with torch.inference_mode():
        index = torch.tensor([[0, 5], [1, 2], [3, 4]], device=device)
        with FlagLog() as log:
            ops.sampled_grad(grad_out, x, index)
            ops.sampled_grad(grad_out, x, index)
        assert log.flags == [False, False]
        index[1, 0] = 6                          # an inference tensor has no version counter
        with pytest.raises(ValueError, match=r"argument 'index'.*\[0, 6\)"):
            ops.sampled_grad(grad_out, x, index)
    with pytest.raises(ValueError, match=r"argument 'index'.*\[0, 6\)"):
        ops.sampled_grad(grad_out, x, index)


def test_a_write_that_bypasses_the_version_counter_gives_nan():
    # The limit of the record (Note [Checked indices]): a write through .data is not seen, and
    # the element whose column it put out of range is NaN, never a read out of bounds.
    grad_out, x, index = _case("cpu")
    ops.sampled_grad(grad_out, x, index)
    index.data[1, 0] = 6
    got = ops.sampled_grad(grad_out, x, index)
    assert got.isnan().tolist() == [[False, False], [True, False], [False, False]]


def test_sparse_linear_backward_checks_its_index_once():
    from fisheradaptune.selection import SparseLinear
    g = make_generator(8)
    layer = SparseLinear(torch.randn(5, 9, generator=g),
                         torch.stack([torch.randperm(9, generator=g)[:3] for _ in range(5)]))
    with FlagLog() as log:
        for _ in range(3):
            layer(torch.randn(4, 9, generator=g)).sum().backward()
    assert log.flags == [False, True, True]


def test_the_wrapper_and_the_flag_compile_with_fullgraph():
    # Under torch.compile the wrapper records nothing and calls the op with the check; the fake
    # kernel takes index_checked either way.
    grad_out, x, index = _case("cpu")
    want = reference.sampled_grad(grad_out, x, index)
    wrapped = torch.compile(ops.sampled_grad, backend="aot_eager", fullgraph=True)
    flagged = torch.compile(lambda g, xx, i: _op(g, xx, i, True), backend="aot_eager",
                            fullgraph=True)
    for f in (wrapped, flagged):
        torch.testing.assert_close(f(grad_out, x, index), want)
    with pytest.raises(ValueError, match=r"argument 'index'.*\[0, 6\)"):
        wrapped(grad_out, x, index + 1)
