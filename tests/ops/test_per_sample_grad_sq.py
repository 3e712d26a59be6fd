"""ops.per_sample_grad_sq_: fisher += scale * sum_n (grad_out[n]^T x[n])**2 for a Linear weight,
per-sample gradients formed one tile of samples at a time (docs/methods.md section 1, "per_sample")."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_unchanged, devices, make_generator, requires_cuda, snapshot
from fisheradaptune import ops, reference
from fisheradaptune.ops import _library

TILE = 1 << 22   # CPU kernel: per-sample-gradient elements (out * in * samples) per tile
TOL = {torch.float32: dict(rtol=2e-4, atol=1e-6), torch.float64: dict(rtol=1e-11, atol=1e-14)}


def inputs(n, t, fin, fout, seed, dtype=torch.float32, device="cpu", fisher_dtype=None):
    g = make_generator(seed)
    x = torch.randn(n, t, fin, generator=g, dtype=torch.float64).to(dtype).to(device)
    go = torch.randn(n, t, fout, generator=g, dtype=torch.float64).to(dtype).to(device)
    fisher = torch.rand(fout, fin, generator=g, dtype=torch.float64)
    return fisher.to(fisher_dtype or torch.float32).to(device), x, go


def assert_matches_reference(fisher, x, go, scale=1.0):
    a, b = fisher.clone(), fisher.clone()
    x_before, go_before = snapshot(x), snapshot(go)
    count = ops.per_sample_grad_sq_(a, x, go, scale=scale)
    r_count = reference.per_sample_grad_sq_(b, x, go, scale=scale)
    torch.testing.assert_close(a, b, **TOL[fisher.dtype], equal_nan=True)
    assert count.shape == () and count.dtype == torch.int64 and count.device == fisher.device
    assert int(count) == int(r_count)
    assert_unchanged([x_before, go_before], [x, go])
    return a


# ---------------------------------------------------------------------------------------------
# Against the reference


@pytest.mark.parametrize("device", devices)
@given(n=st.integers(0, 9), t=st.integers(0, 5), fin=st.integers(0, 17), fout=st.integers(0, 13),
       scale=st.sampled_from([1.0, 0.25, 3.0, 0.0]), seed=st.integers(0, 2**20))
def test_matches_reference(device, n, t, fin, fout, scale, seed):
    fisher, x, go = inputs(n, t, fin, fout, seed, device=device)
    assert_matches_reference(fisher, x, go, scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    fisher, x, go = inputs(6, 4, 24, 10, 1, dtype=dtype)
    out = assert_matches_reference(fisher, x, go, 0.5)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("x_dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_float64_fisher(x_dtype):
    fisher, x, go = inputs(5, 3, 9, 7, 2, dtype=x_dtype, fisher_dtype=torch.float64)
    assert_matches_reference(fisher, x, go, 0.5)


def test_2d_inputs_are_one_token_per_sample():
    fisher, x, go = inputs(8, 1, 6, 4, 3)
    a = fisher.clone()
    ops.per_sample_grad_sq_(a, x[:, 0], go[:, 0], scale=0.5)
    b = fisher.clone()
    ops.per_sample_grad_sq_(b, x, go, scale=0.5)
    assert torch.equal(a, b)
    expected = fisher + 0.5 * torch.einsum("no,ni->noi", go[:, 0].double(), x[:, 0].double()).pow(2).sum(0)
    torch.testing.assert_close(a, expected.float(), **TOL[torch.float32])


def test_scale_and_accumulation():
    fisher, x, go = inputs(4, 3, 5, 6, 4)
    zero = fisher.clone()
    ops.per_sample_grad_sq_(zero, x, go, scale=0.0)
    assert torch.equal(zero, fisher)
    once, twice = fisher.clone(), fisher.clone()
    ops.per_sample_grad_sq_(once, x, go, scale=2.0)
    ops.per_sample_grad_sq_(twice, x, go, scale=1.0)
    ops.per_sample_grad_sq_(twice, x, go, scale=1.0)   # accumulates: fisher += ...
    torch.testing.assert_close(once, twice, **TOL[torch.float32])
    # per-sample: sum_n g_n**2, which is not the squared batch gradient (sum_n g_n)**2
    per_sample = torch.einsum("nto,nti->noi", go.double(), x.double()).pow(2).sum(0)
    batch = torch.einsum("nto,nti->oi", go.double(), x.double()).pow(2)
    torch.testing.assert_close((once - fisher).double(), 2 * per_sample, rtol=2e-4, atol=1e-5)
    assert not torch.allclose(per_sample, batch, rtol=1e-2)


def test_empty_samples_tokens_and_features_change_nothing():
    for n, t, fin, fout in [(0, 3, 4, 5), (3, 0, 4, 5), (3, 2, 0, 5), (3, 2, 4, 0)]:
        fisher, x, go = inputs(n, t, fin, fout, 5)
        before = fisher.clone()
        ops.per_sample_grad_sq_(fisher, x, go, scale=1.0)
        assert torch.equal(fisher, before)


# ---------------------------------------------------------------------------------------------
# Against torch.func per-sample gradients of a tiny model


class TokenModel(nn.Module):
    """An nn.Linear applied to a token axis [N, T, in], then a nonlinearity, a head and a mean
    over tokens."""

    def __init__(self, fin, fout, ncls=3):
        super().__init__()
        self.proj = nn.Linear(fin, fout)
        self.head = nn.Linear(fout, ncls)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x))).mean(-2)


class FlatModel(nn.Module):
    def __init__(self, fin, fout, ncls=3):
        super().__init__()
        self.proj = nn.Linear(fin, fout)
        self.head = nn.Linear(fout, ncls)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)))


def per_sample_fisher_torch_func(model, x, y):
    """(1/N) sum_n (d loss_n / d proj.weight)**2 with torch.func (materialises every g_n)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return ((out - yi.unsqueeze(0)) ** 2).sum()

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)["proj.weight"]
    return (g * g).sum(0) / x.shape[0]


def layer_input_and_output_grad(model, x, y):
    """x and dL/dy of model.proj for L = sum_n loss_n (so grad_out[n] is sample n's own)."""
    seen = {}
    handle = model.proj.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    try:
        loss = ((model(x) - y) ** 2).sum()
    finally:
        handle.remove()
    (go,) = torch.autograd.grad(loss, seen["y"])
    return seen["x"].detach(), go.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("model_cls, x_shape", [(TokenModel, (6, 5, 7)), (FlatModel, (9, 7))])
def test_matches_torch_func_per_sample_gradients(dtype, model_cls, x_shape):
    torch.manual_seed(0)
    model = model_cls(7, 4).to(dtype)
    x = torch.randn(*x_shape, dtype=dtype)
    y = torch.randn(x_shape[0], 3, dtype=dtype)
    expected = per_sample_fisher_torch_func(model, x, y)
    xin, go = layer_input_and_output_grad(model, x, y)
    fisher = torch.zeros_like(model.proj.weight, dtype=dtype)
    ops.per_sample_grad_sq_(fisher, xin, go, scale=1.0 / x.shape[0])
    torch.testing.assert_close(fisher, expected, **TOL[dtype])


# ---------------------------------------------------------------------------------------------
# Tiling (CPU tile: 1 << 22 per-sample-gradient elements, at least one sample)


def test_several_tiles_with_a_partial_last_tile():
    fout, fin = 96, 128                    # 12288 per sample: tiles of 341 samples
    n = 700                                # 341 + 341 + 18
    assert TILE // (fout * fin) < n
    fisher, x, go = inputs(n, 3, fin, fout, 6)
    assert_matches_reference(fisher, x, go, 1.0 / n)


def test_layer_larger_than_half_a_tile_gets_one_sample_per_tile():
    fout, fin = 2048, 1025                 # out * in > 1 << 21: one sample per tile
    assert fout * fin > TILE // 2
    fisher, x, go = inputs(3, 2, fin, fout, 7)
    assert_matches_reference(fisher, x, go, 0.5)


def test_tiling_does_not_change_the_result():
    # the same samples in one call and split across two calls agree to float rounding, and a
    # repeated call is bitwise identical (samples are accumulated in order)
    fisher, x, go = inputs(700, 2, 128, 96, 8)
    one = fisher.clone()
    ops.per_sample_grad_sq_(one, x, go)
    again = fisher.clone()
    ops.per_sample_grad_sq_(again, x, go)
    assert torch.equal(one, again)
    split = fisher.clone()
    ops.per_sample_grad_sq_(split, x[:350], go[:350])
    ops.per_sample_grad_sq_(split, x[350:], go[350:])
    torch.testing.assert_close(split, one, **TOL[torch.float32])


def test_non_contiguous_inputs():
    fisher, x, go = inputs(5, 4, 6, 3, 9)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    gt = go.transpose(1, 2).contiguous().transpose(1, 2)
    assert not xt.is_contiguous() and not gt.is_contiguous()
    got = fisher.clone()
    ops.per_sample_grad_sq_(got, xt, gt)
    expected = fisher.clone()
    ops.per_sample_grad_sq_(expected, x, go)
    torch.testing.assert_close(got, expected, **TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# Matmul precision (Note [Full fp32 per-sample GEMM], csrc/fisher/per_sample_grad_sq.cpp): the
# typed wrapper sets full fp32 around the op; a raw call follows the caller's setting. (Whether
# a reduced precision changes the GEMM's result depends on the hardware: the result is checked
# in tests/ops/test_cuda_contract.py.)


def _matmul_flags():
    """The cuBLAS and oneDNN matmul flags, and whether cuBLAS would use TF32 (torch raises there
    when the legacy setting and cuBLAS's flag disagree)."""
    return (torch.backends.cuda.matmul.fp32_precision,
            torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.allow_tf32)


@pytest.fixture
def restore_matmul_flags():
    # Taken now: a test may patch them.
    set_precision = torch.set_float32_matmul_precision
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    saved = torch.get_float32_matmul_precision(), [b.fp32_precision for b in backends]
    yield
    set_precision(saved[0])
    for backend, flag in zip(backends, saved[1]):
        backend.fp32_precision = flag


def _reduce_precision(setting):
    """The caller's reduced precision: through the legacy API, or oneDNN's flag set directly."""
    if setting == "flag":
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    else:
        torch.set_float32_matmul_precision(setting)


class _FlagsAtCall(TorchDispatchMode):
    """Records the matmul flags whenever per_sample_grad_sq_ runs."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.fisheradaptune.per_sample_grad_sq_.default:
            self.seen.append(_matmul_flags())
        return func(*args, **(kwargs or {}))


FULL_FP32 = ("ieee", "ieee", False)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("setting", ["high", "medium", "flag"])
def test_wrapper_runs_the_op_in_full_fp32_and_a_raw_call_does_not(device, setting,
                                                                   restore_matmul_flags):
    fisher, x, go = inputs(3, 4, 8, 6, seed=5, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    _reduce_precision(setting)
    callers = _matmul_flags()
    with _FlagsAtCall() as mode:
        ops.per_sample_grad_sq_(fisher, x, go)
        assert _matmul_flags() == callers  # restored
        torch.ops.fisheradaptune.per_sample_grad_sq_(fisher, x, go, 1.0, count)
        with pytest.raises(ValueError, match="argument 'scale'"):
            ops.per_sample_grad_sq_(fisher, x, go, scale=-1.0)
        assert _matmul_flags() == callers  # restored after an error too
    assert mode.seen == [FULL_FP32, callers, FULL_FP32]
    if setting != "flag":
        assert torch.get_float32_matmul_precision() == setting


@pytest.mark.parametrize("setting", ["high", "medium", "flag"])
def test_full_fp32_matmul_keeps_the_legacy_and_new_settings_consistent(setting,
                                                                      restore_matmul_flags):
    # Setting only cuBLAS's flag to "ieee" under "high" makes _matmul_flags() (like a cuBLAS
    # matmul) raise about mixing the legacy and new TF32 APIs.
    _reduce_precision(setting)
    callers = _matmul_flags()
    with _library.full_fp32_matmul():
        assert _matmul_flags() == FULL_FP32
    assert _matmul_flags() == callers


def test_full_fp32_matmul_leaves_full_precision_untouched(monkeypatch, restore_matmul_flags):
    torch.set_float32_matmul_precision("highest")

    def refuse(value):
        raise AssertionError(f"set_float32_matmul_precision({value!r}) called")

    monkeypatch.setattr(torch, "set_float32_matmul_precision", refuse)
    with _library.full_fp32_matmul():
        assert _matmul_flags() == FULL_FP32
    assert _matmul_flags() == FULL_FP32


def test_full_fp32_matmul_without_per_backend_flags_uses_the_legacy_setting(
        monkeypatch, restore_matmul_flags):
    # A torch without the per-backend fp32_precision flags: only the legacy setting exists.
    torch.set_float32_matmul_precision("medium")
    monkeypatch.setattr(torch.backends.mkldnn, "matmul", SimpleNamespace())
    monkeypatch.setattr(torch.backends.cuda, "matmul", SimpleNamespace())
    with _library.full_fp32_matmul():
        assert torch.get_float32_matmul_precision() == "highest"
    assert torch.get_float32_matmul_precision() == "medium"


# ---------------------------------------------------------------------------------------------
# opcheck


@pytest.mark.parametrize("device", devices)
def test_opcheck(device):
    def count():
        return (torch.zeros((), dtype=torch.int64, device=device),)

    cases = [
        inputs(4, 3, 5, 6, 0, device=device) + (0.5,) + count(),
        inputs(4, 3, 5, 6, 1, dtype=torch.bfloat16, device=device) + (1.0,) + count(),
        inputs(0, 3, 5, 6, 2, device=device) + (1.0,) + count(),
        inputs(3, 0, 5, 6, 3, device=device) + (1.0,) + count(),
    ]
    if device == "cpu":
        cases.append(inputs(4, 2, 3, 2, 4, dtype=torch.float64, fisher_dtype=torch.float64)
                     + (2.0,) + count())
    for args in cases:
        result = opcheck(torch.ops.fisheradaptune.per_sample_grad_sq_, args)
        assert all(v == "SUCCESS" for v in result.values()), result


# ---------------------------------------------------------------------------------------------
# Bad input: error naming the argument, fisher unchanged


def _bad(fix):
    fisher, x, go = inputs(4, 3, 5, 6, 0)
    return fix(fisher, x, go)


@pytest.mark.parametrize("make, exc, match", [
    (lambda f, x, g: (f, x[:, 0], g), ValueError, r"argument 'x': expected \[N, T, in_features\]"),
    (lambda f, x, g: (f, x, g[:, 0]), ValueError, r"argument 'grad_out': expected \[N, T, out_features\]"),
    (lambda f, x, g: (f, x, g[:3]), ValueError, r"argument 'grad_out': expected the same N and T as x"),
    (lambda f, x, g: (f, x, g[:, :2]), ValueError, r"argument 'grad_out': expected the same N and T"),
    (lambda f, x, g: (f.t().contiguous(), x, g), ValueError,
     r"argument 'fisher': expected shape \[6, 5\] \(out_features, in_features\), got \[5, 6\]"),
    (lambda f, x, g: (f.reshape(-1), x, g), ValueError, r"argument 'fisher': expected shape \[6, 5\]"),
    (lambda f, x, g: (f.t().contiguous().t(), x, g), ValueError,
     r"argument 'fisher': expected a contiguous tensor"),
    (lambda f, x, g: (f.to(torch.int32), x, g), ValueError, r"argument 'fisher': expected float32"),
    (lambda f, x, g: (f.half(), x, g), ValueError, r"argument 'fisher': expected float32"),
    (lambda f, x, g: (f, x.to(torch.int64), g), ValueError, r"argument 'x': expected float32, bfloat16"),
    (lambda f, x, g: (f, x.double(), g.double()), ValueError, r"argument 'x': expected .*float64 with "
                                                              r"float64 state"),
    (lambda f, x, g: (f, x, g.bfloat16()), ValueError, r"argument 'grad_out': expected the dtype of x"),
])
def test_rejects_bad_arguments(make, exc, match):
    fisher, x, go = _bad(make)
    before = snapshot([fisher, x, go])
    with pytest.raises(exc, match=match):
        ops.per_sample_grad_sq_(fisher, x, go, scale=1.0)
    assert_unchanged(before, [fisher, x, go])


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 1e308, 3.5e38,
                                   -1.0, -1e-30])
def test_rejects_bad_scale(device, scale):
    # non-finite, beyond float32's range (finite as a double, inf in the kernels), or negative
    fisher, x, go = inputs(4, 3, 5, 6, 0, device=device)
    before = fisher.clone()
    with pytest.raises(ValueError, match=r"argument 'scale': expected a finite number in \[0, "):
        ops.per_sample_grad_sq_(fisher, x, go, scale=scale)
    assert torch.equal(fisher, before)
    f64 = fisher.double().cpu()  # the same range for float64 state
    with pytest.raises(ValueError, match=r"argument 'scale'"):
        ops.per_sample_grad_sq_(f64, x.double().cpu(), go.double().cpu(), scale=scale)


def test_accepts_scale_at_the_edges_of_float32():
    fisher, x, go = inputs(2, 1, 3, 2, 0)
    for scale in (0.0, 1e-45, 3.4e38):
        ops.per_sample_grad_sq_(fisher.clone(), x * 1e-30, go * 1e-10, scale=scale)


@pytest.mark.parametrize("make, arg", [
    (lambda f, x, g: (f, f.reshape(1, 6, 5).expand(4, 6, 5)[:, :3], g), "x"),
    (lambda f, x, g: (f, x, f.reshape(-1)[:18].reshape(1, 3, 6).expand(4, 3, 6)), "grad_out"),
])
def test_rejects_fisher_sharing_memory_with_an_input(make, arg):
    fisher, x, go = inputs(4, 3, 5, 6, 0)
    f, x2, g2 = make(fisher, x, go)
    before = snapshot([f])
    with pytest.raises(ValueError, match=rf"argument '{arg}': shares memory with 'fisher'"):
        ops.per_sample_grad_sq_(f, x2, g2)
    assert_unchanged(before, [f])
    # a copy shares nothing
    ops.per_sample_grad_sq_(f, x2.clone(), g2.clone())


def test_rejects_count_sharing_memory_with_fisher():
    fisher = torch.zeros(2, 2, dtype=torch.float64)
    count = fisher.view(torch.int64).reshape(-1)[0]
    x, go = torch.randn(3, 1, 2, dtype=torch.float64), torch.randn(3, 1, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"argument 'nonfinite': shares memory with 'fisher'"):
        torch.ops.fisheradaptune.per_sample_grad_sq_(fisher, x, go, 1.0, count)
    assert torch.equal(fisher, torch.zeros(2, 2, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Non-finite inputs: skipped and counted, as fisher_accumulate_ (Note [Skipping in
# per_sample_grad_sq_], csrc/fisher/per_sample_grad_sq.cpp)


def _poisoned(device, seed=20):
    fisher, x, go = inputs(5, 3, 6, 4, seed, device=device)
    x[1, 2, 3] = float("nan")      # sample 1: column 3 of g_1 is NaN
    go[3, 0, 2] = float("inf")     # sample 3: row 2 of g_3 is +-inf (x has no zeros)
    return fisher, x, go


@pytest.mark.parametrize("device", devices)
def test_nonfinite_inputs_are_skipped_and_counted(device):
    fisher, x, go = _poisoned(device)
    got = fisher.clone()
    count = ops.per_sample_grad_sq_(got, x, go, scale=0.5)
    bad = torch.zeros(4, 6, dtype=torch.bool)
    bad[:, 3] = True
    bad[2, :] = True
    bad = bad.to(device)
    assert int(count) == int(bad.sum()) == 9
    assert torch.isfinite(got).all()
    # skipped elements keep their value from before the call, the others are updated
    assert torch.equal(got[bad], fisher[bad])
    assert int(reference.per_sample_grad_sq_(fisher.clone(), x, go, scale=0.5)) == 9
    assert_matches_reference(fisher, x, go, 0.5)
    assert not torch.equal(got[~bad], fisher[~bad])


@pytest.mark.parametrize("device", devices)
def test_overflowing_squares_are_skipped(device):
    fisher, x, go = inputs(3, 1, 4, 2, 21, device=device)
    x[0, 0, 1] = 1e30             # finite input, square of g_0[:, 1] overflows float32
    got = fisher.clone()
    count = ops.per_sample_grad_sq_(got, x, go, scale=1e-30)
    assert int(count) == 2
    assert torch.equal(got[:, 1], fisher[:, 1]) and torch.isfinite(got).all()
    assert_matches_reference(fisher, x, go, 1e-30)


def test_an_already_nonfinite_fisher_is_counted_not_written():
    fisher, x, go = inputs(3, 2, 4, 2, 22)
    fisher[0, 0] = float("inf")
    got = fisher.clone()
    assert int(ops.per_sample_grad_sq_(got, x, go)) == 1
    assert got[0, 0] == float("inf")


def test_skipping_does_not_depend_on_the_tiling():
    # 341 samples a tile here: a NaN in the second tile must leave the element as it was
    # before the call (the first tile's squares are not kept either), as one tile would
    fout, fin, n = 96, 128, 700
    assert TILE // (fout * fin) < n
    fisher, x, go = inputs(n, 1, fin, fout, 23)
    x[500, 0, 7] = float("nan")
    got = fisher.clone()
    count = ops.per_sample_grad_sq_(got, x, go, scale=1.0 / n)
    assert int(count) == fout
    assert torch.equal(got[:, 7], fisher[:, 7])
    assert_matches_reference(fisher, x, go, 1.0 / n)


def test_count_is_written_not_added():
    fisher, x, go = _poisoned("cpu")
    count = torch.full((), 100, dtype=torch.int64)
    torch.ops.fisheradaptune.per_sample_grad_sq_(fisher, x, go, 1.0, count)
    assert int(count) == 9
    empty = torch.full((), 5, dtype=torch.int64)
    torch.ops.fisheradaptune.per_sample_grad_sq_(fisher, x[:0], go[:0], 1.0, empty)
    assert int(empty) == 0


@pytest.mark.parametrize("make, exc, match", [
    (lambda d: torch.zeros((), dtype=torch.int32, device=d), ValueError, "expected int64"),
    (lambda d: torch.zeros(2, dtype=torch.int64, device=d), ValueError, "expected one element"),
])
def test_rejects_bad_count_tensor(make, exc, match):
    fisher, x, go = inputs(4, 3, 5, 6, 0)
    before = fisher.clone()
    with pytest.raises(exc, match=r"argument 'nonfinite': " + match):
        torch.ops.fisheradaptune.per_sample_grad_sq_(fisher, x, go, 1.0, make("cpu"))
    assert torch.equal(fisher, before)


@pytest.mark.cuda
@requires_cuda
def test_rejects_device_mismatch():
    fisher, x, go = inputs(4, 3, 5, 6, 0, device="cuda")
    before = fisher.clone()
    with pytest.raises(ValueError, match=r"argument 'x': expected a tensor on cuda"):
        ops.per_sample_grad_sq_(fisher, x.cpu(), go, scale=1.0)
    with pytest.raises(ValueError, match=r"argument 'grad_out': expected a tensor on cuda"):
        ops.per_sample_grad_sq_(fisher, x, go.cpu(), scale=1.0)
    assert torch.equal(fisher, before)
