"""ops.token_prune_merge: keep the top-scoring tokens, fuse the rest into one (docs/methods.md section 6,
Note [Token prune-merge] in csrc/tokens/token_prune_merge.h), and its backward op."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st
from torch.library import opcheck

from helpers import assert_unchanged, devices, make_generator, requires_cuda, set_threads, snapshot
from fisheradaptune import ops, reference

TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def inputs(b, n, c, p, seed, dtype=torch.float32, device="cpu", with_sizes=True, ties=False,
           score_dtype=None):
    g = make_generator(seed)
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    if ties:  # few distinct values: many ties for the index tie-break to settle
        scores = torch.randint(0, 4, (b, n - p), generator=g).to(torch.float64) / 4 + 0.25
    else:
        scores = torch.rand(b, n - p, generator=g, dtype=torch.float64) + 0.01
    sizes = (torch.randint(1, 5, (b, n), generator=g).float() if with_sizes else None)
    x = x.to(dtype).to(device)
    scores = scores.to(score_dtype or dtype).to(device)
    return x, scores, (sizes.to(device) if sizes is not None else None)


def check_against_reference(x, scores, keep, p, sizes, normalize):
    before = snapshot([x, scores, sizes])
    out, kept, out_sizes = ops.token_prune_merge(x, scores, keep, num_protected=p, sizes=sizes,
                                                 normalize=normalize)
    r_out, r_kept, r_sizes = reference.token_prune_merge(x, scores, keep, num_protected=p,
                                                         sizes=sizes, normalize=normalize)
    assert_unchanged(before, [x, scores, sizes])
    b, n, c = x.shape
    rows = p + keep + (1 if keep < n - p else 0)
    assert out.shape == (b, rows, c) and out.dtype == x.dtype
    assert kept.shape == (b, keep) and kept.dtype == torch.int64
    assert out_sizes.shape == (b, rows) and out_sizes.dtype == torch.float32
    assert torch.equal(kept, r_kept)
    torch.testing.assert_close(out_sizes, r_sizes, rtol=1e-6, atol=0)
    # Protected and kept rows are exact copies.
    assert torch.equal(out[:, :p + keep], r_out[:, :p + keep])
    torch.testing.assert_close(out, r_out, **TOL[x.dtype])
    return out, kept, out_sizes


# ---------------------------------------------------------------------------------------------
# Against the reference


@st.composite
def problems(draw):
    n = draw(st.one_of(st.integers(2, 24), st.integers(2, 1025)))
    c = draw(st.integers(1, 12)) if n > 200 else draw(st.integers(1, 40))
    b = draw(st.integers(1, 3)) if n > 200 else draw(st.integers(0, 5))
    p = draw(st.integers(0, min(3, n - 1)))
    m = n - p
    keep = draw(st.one_of(st.integers(0, m), st.sampled_from([0, m, max(m - 1, 0),
                                                               math.ceil(0.7 * m)])))
    return b, n, c, p, keep


@pytest.mark.parametrize("device", devices)
@given(problem=problems(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       with_sizes=st.booleans(), normalize=st.booleans(), ties=st.booleans(),
       fp32_scores=st.booleans(), seed=st.integers(0, 2**20))
def test_matches_reference(device, problem, dtype, with_sizes, normalize, ties, fp32_scores, seed):
    b, n, c, p, keep = problem
    x, scores, sizes = inputs(b, n, c, p, seed, dtype, device, with_sizes, ties,
                              torch.float32 if fp32_scores else None)
    check_against_reference(x, scores, keep, p, sizes, normalize)


def test_vit_b_shape_float64():
    x, scores, sizes = inputs(2, 197, 768, 1, 0, torch.float64)
    check_against_reference(x, scores, 137, 1, sizes, True)


def test_ties_go_to_the_lower_index():
    x = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)
    scores = torch.tensor([[1., 2., 2., 0., 2., 1.], [0., 0., 0., 0., 0., 0.]])
    out, kept, _ = ops.token_prune_merge(x, scores, 2)
    assert kept.tolist() == [[1, 2], [0, 1]]
    out, kept, _ = ops.token_prune_merge(x, scores, 4)
    assert kept.tolist() == [[0, 1, 2, 4], [0, 1, 2, 3]]


def test_nan_scores_rank_first():
    x = torch.randn(1, 5, 2)
    scores = torch.tensor([[0.5, float("nan"), 2.0, float("nan")]])
    _, kept, _ = ops.token_prune_merge(x, scores, 2, num_protected=1)
    assert kept.tolist() == [[1, 3]]
    _, r_kept, _ = reference.token_prune_merge(x, scores, 2, num_protected=1)
    assert kept.tolist() == r_kept.tolist()


def test_semantics_by_hand():
    x = torch.tensor([[[10.], [1.], [2.], [3.], [4.]]])
    scores = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    sizes = torch.tensor([[1., 1., 2., 3., 1.]])
    out, kept, out_sizes = ops.token_prune_merge(x, scores, 2, sizes=sizes)
    assert kept.tolist() == [[1, 3]]  # tokens 2 and 4 (scores 0.4 and 0.3)
    w = torch.tensor([0.1 * 1.0, 0.2 * 3.0])  # tokens 1 and 3
    fused = (w[0] * 1.0 + w[1] * 3.0) / w.sum()
    torch.testing.assert_close(out, torch.tensor([[[10.], [2.], [4.], [float(fused)]]]))
    assert out_sizes.tolist() == [[1., 2., 1., 4.]]
    out, _, _ = ops.token_prune_merge(x, scores, 2, sizes=sizes, normalize=False)
    torch.testing.assert_close(out[0, -1, 0], w[0] * 1.0 + w[1] * 3.0)


def test_keep_all_has_no_fused_token():
    x, scores, sizes = inputs(3, 9, 4, 2, 1)
    out, kept, out_sizes = ops.token_prune_merge(x, scores, 7, num_protected=2, sizes=sizes)
    assert out.shape == (3, 9, 4) and torch.equal(out, x)
    assert torch.equal(kept, torch.arange(7).expand(3, 7))
    assert torch.equal(out_sizes, sizes)


def test_keep_zero_fuses_everything():
    x, scores, sizes = inputs(2, 6, 3, 1, 2, torch.float64)
    out, kept, out_sizes = ops.token_prune_merge(x, scores, 0, sizes=sizes)
    assert out.shape == (2, 2, 3) and kept.shape == (2, 0)
    w = scores * sizes[:, 1:].double()
    expected = (w.unsqueeze(-1) * x[:, 1:]).sum(1) / w.sum(1, keepdim=True)
    torch.testing.assert_close(out[:, 1], expected)
    torch.testing.assert_close(out_sizes[:, 1], sizes[:, 1:].sum(1))


def test_zero_weight_fused_token_is_zeros():
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    scores = torch.rand(2, 5, dtype=torch.float64)
    scores[0, :] = torch.tensor([1.0, 0.0, 0.0, 0.9, 0.0])  # the merged ones weigh nothing
    scores.requires_grad_(True)
    out, kept, out_sizes = ops.token_prune_merge(x, scores, 2)
    assert kept[0].tolist() == [0, 3]
    assert torch.equal(out[0, -1], torch.zeros(3, dtype=torch.float64))
    assert out_sizes[0, -1].item() == 3.0
    r_out, _, _ = reference.token_prune_merge(x, scores, 2)
    torch.testing.assert_close(out, r_out)
    g = torch.randn_like(out)
    gx, gs = torch.autograd.grad(out, (x, scores), g)
    r_gx, r_gs = torch.autograd.grad(r_out, (x, scores), g)
    torch.testing.assert_close(gx, r_gx)
    torch.testing.assert_close(gs, r_gs)
    assert torch.equal(gs[0], torch.zeros(5, dtype=torch.float64))
    # Unnormalised, zero weights give a zero token too, and the score gradient is x . g.
    out, _, _ = ops.token_prune_merge(x, scores, 2, normalize=False)
    assert torch.equal(out[0, -1], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
def test_zero_weight_fused_row_with_nonfinite_token_is_zeros(device, dtype, bad):
    # Note [Zero coefficients] (csrc/tokens/token_prune_merge.h): W == 0 gives zeros even when a
    # fused token is inf or NaN (0 * inf would be NaN), with zero gradients, on the kernels and the
    # reference
    g = make_generator(13)
    x = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    x[0, 2, 1] = bad                   # candidate 1 of row 0: merged, weight 0
    x[0, 5, :] = bad                   # candidate 4 of row 0: merged, weight 0
    scores = torch.rand(2, 5, generator=g, dtype=torch.float64) + 0.1
    scores[0] = torch.tensor([1.0, 0.0, 0.0, 0.9, 0.0])
    x = x.to(dtype).to(device).requires_grad_(True)
    scores = scores.to(dtype).to(device).requires_grad_(True)
    for normalize in (True, False):
        out, kept, _ = ops.token_prune_merge(x, scores, 2, normalize=normalize)
        assert kept[0].tolist() == [0, 3]
        assert torch.equal(out[0, -1], torch.zeros(3, dtype=dtype, device=device))
        assert bool(torch.isfinite(out[1]).all())
        r_out, _, _ = reference.token_prune_merge(x, scores, 2, normalize=normalize)
        assert torch.equal(r_out[0, -1], out[0, -1])
        torch.testing.assert_close(out, r_out, **TOL[dtype])
        grad = torch.randn(out.shape, generator=make_generator(14)).to(dtype).to(device)
        gx, gs = torch.autograd.grad(out, (x, scores), grad)
        r_gx, r_gs = torch.autograd.grad(r_out, (x, scores), grad)
        # merged tokens of row 0 get coef * g = 0, kept/protected ones their row's gradient
        assert bool(torch.isfinite(gx).all()) and bool(torch.isfinite(gs).all())
        for i in (2, 3, 5):
            assert torch.equal(gx[0, i], torch.zeros(3, dtype=dtype, device=device))
        torch.testing.assert_close(gx, r_gx, **TOL[dtype])
        torch.testing.assert_close(gs, r_gs, **TOL[dtype])
        if normalize:
            assert torch.equal(gs[0], torch.zeros(5, dtype=dtype, device=device))


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("normalize", [True, False])
def test_zero_weight_nonfinite_token_does_not_poison_a_weighted_fuse(device, normalize):
    # W != 0: the weightless inf/NaN token adds nothing; the fused row and every gradient stay
    # finite and match the reference (whose masks do the same)
    g = make_generator(15)
    x = torch.randn(1, 7, 4, generator=g, dtype=torch.float64)
    x[0, 3, 0] = float("inf")
    x[0, 4, 2] = float("nan")
    scores = torch.tensor([[2.0, 1.0, 0.0, 0.0, 0.5, 3.0]], dtype=torch.float64)
    x = x.to(device).requires_grad_(True)
    scores = scores.to(device).requires_grad_(True)
    out, kept, _ = ops.token_prune_merge(x, scores, 2, normalize=normalize)
    assert kept.tolist() == [[0, 5]]
    r_out, _, _ = reference.token_prune_merge(x, scores, 2, normalize=normalize)
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, r_out)
    grad = torch.randn(out.shape, generator=make_generator(16), dtype=torch.float64).to(device)
    gx, gs = torch.autograd.grad(out, (x, scores), grad)
    r_gx, r_gs = torch.autograd.grad(r_out, (x, scores), grad)
    assert bool(torch.isfinite(gx).all()) and bool(torch.isfinite(gs).all())
    torch.testing.assert_close(gx, r_gx)
    torch.testing.assert_close(gs, r_gs)


@pytest.mark.parametrize("device", devices)
def test_rejects_more_than_int32_tokens(device):
    # token indices are int32 in both kernels; an empty batch (no memory) still has N = 2^31
    n = 2 ** 31
    x = torch.empty(0, n, 4, device=device)
    scores = torch.empty(0, n - 1, device=device)
    with pytest.raises(ValueError, match=r"token_prune_merge: argument 'x': expected at most "
                                         r"2\^31 - 1 tokens"):
        ops.token_prune_merge(x, scores, 3)
    kept = torch.empty(0, 3, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match=r"token_prune_merge_backward: argument 'x'"):
        torch.ops.fisheradaptune.token_prune_merge_backward(
            torch.empty(0, 5, 4, device=device), x, scores, None, kept, 1, True)
    # 2^31 - 1 is accepted
    out, _, _ = ops.token_prune_merge(x[:, :-1], scores[:, :-1], 3)
    assert out.shape == (0, 5, 4)


def test_empty_batch_and_channels():
    for b, c in [(0, 4), (2, 0)]:
        x, scores, sizes = inputs(b, 5, c, 1, 3)
        out, kept, out_sizes = ops.token_prune_merge(x, scores, 2, sizes=sizes)
        assert out.shape == (b, 4, c) and kept.shape == (b, 2) and out_sizes.shape == (b, 4)


def test_deterministic_across_calls_and_threads():
    x, scores, sizes = inputs(8, 197, 96, 1, 4, ties=True)
    outs = []
    for threads in (1, 2, 1):
        with set_threads(threads):
            outs.append(ops.token_prune_merge(x, scores, 137, sizes=sizes))
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a, b)


def test_non_contiguous_inputs():
    x, scores, sizes = inputs(3, 10, 8, 1, 5)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    st_ = scores.t().contiguous().t()
    check_against_reference(xt, st_, 6, 1, sizes.t().contiguous().t(), True)


# ---------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("p,keep", [(1, 3), (0, 0), (2, 6), (1, 7), (3, 1)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_sizes", [True, False])
def test_gradcheck(p, keep, normalize, with_sizes):
    x, scores, sizes = inputs(2, 9, 5, p, 6 + p + keep, torch.float64, with_sizes=with_sizes)
    x.requires_grad_(True)
    scores.requires_grad_(True)
    keep = min(keep, 9 - p)
    fn = lambda x, s: ops.token_prune_merge(x, s, keep, num_protected=p, sizes=sizes,  # noqa: E731
                                            normalize=normalize)[0]
    assert torch.autograd.gradcheck(fn, (x, scores))


@pytest.mark.parametrize("device", devices)
@given(problem=problems(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       with_sizes=st.booleans(), normalize=st.booleans(), seed=st.integers(0, 2**20))
def test_backward_matches_reference(device, problem, dtype, with_sizes, normalize, seed):
    b, n, c, p, keep = problem
    x, scores, sizes = inputs(b, n, c, p, seed, dtype, device, with_sizes)
    x.requires_grad_(True)
    scores.requires_grad_(True)
    out, _, _ = ops.token_prune_merge(x, scores, keep, num_protected=p, sizes=sizes,
                                      normalize=normalize)
    g = torch.randn(out.shape, generator=make_generator(seed + 1)).to(dtype).to(device)
    gx, gs = torch.autograd.grad(out, (x, scores), g, allow_unused=True)
    # The reference in float64 (its fused token rounds to the input dtype, so compare the
    # float64 gradients with the op's up to the op's precision).
    x64 = x.detach().double().requires_grad_(True)
    s64 = scores.detach().double().requires_grad_(True)
    r_out, _, _ = reference.token_prune_merge(x64, s64, keep, num_protected=p, sizes=sizes,
                                              normalize=normalize)
    r_gx, r_gs = torch.autograd.grad(r_out, (x64, s64), g.double(), allow_unused=True)
    r_gx = torch.zeros_like(x64) if r_gx is None else r_gx
    r_gs = torch.zeros_like(s64) if r_gs is None else r_gs
    assert gx.dtype == dtype and gs.dtype == scores.dtype
    tol = TOL[dtype]
    torch.testing.assert_close(gx.double(), r_gx, **tol)
    scale = max(1.0, float(r_gs.abs().max())) if r_gs.numel() else 1.0
    torch.testing.assert_close(gs.double() / scale, r_gs / scale, rtol=tol["rtol"],
                               atol=tol["atol"] * max(1, c) ** 0.5)


def test_kept_scores_get_zero_gradient():
    x, scores, sizes = inputs(2, 8, 4, 1, 7)
    scores.requires_grad_(True)
    out, kept, _ = ops.token_prune_merge(x, scores, 3, sizes=sizes)
    (gs,) = torch.autograd.grad(out.sum(), scores)
    assert bool((gs.gather(1, kept) == 0).all())


def test_backward_op_directly():
    x, scores, sizes = inputs(2, 7, 3, 1, 8)
    out, kept, _ = ops.token_prune_merge(x, scores, 4, sizes=sizes)
    g = torch.randn_like(out)
    gx, gs = torch.ops.fisheradaptune.token_prune_merge_backward(g, x, scores, sizes, kept, 1, True)
    assert gx.shape == x.shape and gs.shape == scores.shape
    bad = kept.flip(1)
    with pytest.raises(ValueError, match="kept_index"):
        torch.ops.fisheradaptune.token_prune_merge_backward(g, x, scores, sizes, bad, 1, True)
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.fisheradaptune.token_prune_merge_backward(g[:, :-1], x, scores, sizes, kept, 1,
                                                            True)
    with pytest.raises(ValueError, match="kept_index"):
        torch.ops.fisheradaptune.token_prune_merge_backward(g, x, scores, sizes, kept.int(), 1,
                                                            True)


# ---------------------------------------------------------------------------------------------
# opcheck, compile


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype,with_sizes,p,keep,normalize", [
    (torch.float32, True, 1, 5, True), (torch.float32, False, 0, 0, False),
    (torch.float64, True, 2, 7, True), (torch.bfloat16, True, 1, 3, False)])
def test_opcheck(device, dtype, with_sizes, p, keep, normalize):
    x, scores, sizes = inputs(3, 9, 6, p, 9, dtype, device, with_sizes)
    x.requires_grad_(True)
    scores.requires_grad_(True)
    opcheck(torch.ops.fisheradaptune.token_prune_merge.default,
            (x, scores, sizes, p, keep, normalize))
    out, kept, _ = ops.token_prune_merge(x, scores, keep, num_protected=p, sizes=sizes,
                                         normalize=normalize)
    opcheck(torch.ops.fisheradaptune.token_prune_merge_backward.default,
            (torch.randn_like(out), x.detach(), scores.detach(), sizes, kept, p, normalize))


def test_compiles():
    x, scores, sizes = inputs(2, 11, 8, 1, 10)
    x.requires_grad_(True)

    def f(x, scores, sizes):
        out, _, out_sizes = ops.token_prune_merge(x, scores, 6, sizes=sizes)
        return (out * 2).sum(1), out_sizes

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    a, sa = compiled(x, scores, sizes)
    b, sb = f(x, scores, sizes)
    assert torch.equal(a, b) and torch.equal(sa, sb)
    ga, = torch.autograd.grad(a.sum(), x)
    gb, = torch.autograd.grad(b.sum(), x)
    assert torch.equal(ga, gb)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("call,exc,match", [
    (lambda x, s, z: ops.token_prune_merge(x, s, 9), ValueError, "'keep'"),
    (lambda x, s, z: ops.token_prune_merge(x, s, -1), ValueError, "'keep'"),
    (lambda x, s, z: ops.token_prune_merge(x, s, 2, num_protected=9), ValueError, "'num_protected'"),
    (lambda x, s, z: ops.token_prune_merge(x, s, 2, num_protected=-1), ValueError, "'num_protected'"),
    (lambda x, s, z: ops.token_prune_merge(x, s[:, :-1], 2), ValueError, "'scores'"),
    (lambda x, s, z: ops.token_prune_merge(x, s[:1], 2), ValueError, "'scores'"),
    (lambda x, s, z: ops.token_prune_merge(x, s.double(), 2), ValueError, "'scores'"),
    (lambda x, s, z: ops.token_prune_merge(x, s, 2, sizes=z[:, 1:]), ValueError, "'sizes'"),
    (lambda x, s, z: ops.token_prune_merge(x, s, 2, sizes=z.double()), ValueError, "'sizes'"),
    (lambda x, s, z: ops.token_prune_merge(x[0], s, 2), ValueError, "'x'"),
    (lambda x, s, z: ops.token_prune_merge(x.int(), s, 2), ValueError, "'x'"),
    (lambda x, s, z: ops.token_prune_merge(x, s.to("meta"), 2), ValueError, "'scores'"),
    (lambda x, s, z: ops.token_prune_merge(x, s, 2, sizes=z.to("meta")), ValueError, "'sizes'"),
])
def test_bad_input(call, exc, match):
    x, scores, sizes = inputs(2, 9, 4, 1, 11)
    with pytest.raises(exc, match=match):
        call(x, scores, sizes)


@pytest.mark.cuda
@requires_cuda
def test_devices_that_differ_cuda():
    x, scores, sizes = inputs(2, 9, 4, 1, 12, device="cuda")
    with pytest.raises(ValueError, match="'scores'"):
        ops.token_prune_merge(x, scores.cpu(), 2)
    with pytest.raises(ValueError, match="'sizes'"):
        ops.token_prune_merge(x, scores, 2, sizes=sizes.cpu())


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("n", [197, 1025, 4097])
def test_cuda_matches_cpu_large(n):
    x, scores, sizes = inputs(3, n, 40, 1, n, ties=True)
    keep = math.ceil(0.7 * (n - 1))
    a = ops.token_prune_merge(x.cuda(), scores.cuda(), keep, sizes=sizes.cuda())
    b = ops.token_prune_merge(x, scores, keep, sizes=sizes)
    assert torch.equal(a[1].cpu(), b[1])
    torch.testing.assert_close(a[0].cpu(), b[0])
    again = ops.token_prune_merge(x.cuda(), scores.cuda(), keep, sizes=sizes.cuda())
    assert all(torch.equal(u, v) for u, v in zip(a, again))


# ---------------------------------------------------------------------------------------------
# Note [Merge weights] (csrc/tokens/token_prune_merge.h): weights in float64, a token that weighs
# something is never dropped

LOW_AND_FULL = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", LOW_AND_FULL)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
@pytest.mark.parametrize("scores, sizes", [
    ([[1.0, 1.0]], [[1e-45, 3e38]]),   # the issue's: coefficient 1e-45 / 3e38 is 0 in float32
    ([[1e-30, 1.0]], [[1e-20, 1.0]]),  # w = 1e-50 is 0 in float32
], ids=["coefficient-underflow", "weight-underflow"])
def test_a_weight_that_underflows_does_not_hide_a_nonfinite_token(device, dtype, normalize, bad,
                                                                   scores, sizes):
    """Issue 21: with sizes [[1e-45, 3e38]] an inf token fused to 1.0 in float32, bfloat16 and
    float16; float64 and the reference give inf."""
    x = torch.tensor([[[bad, 2.0], [1.0, 1.0]]], dtype=dtype, device=device, requires_grad=True)
    scores = torch.tensor(scores, device=device)
    sizes = torch.tensor(sizes, device=device)
    out, _, _ = ops.token_prune_merge(x, scores, 0, num_protected=0, sizes=sizes,
                                      normalize=normalize)
    r_out, _, _ = reference.token_prune_merge(x, scores, 0, num_protected=0, sizes=sizes,
                                              normalize=normalize)
    fused = float(out.detach()[0, -1, 0])
    assert (math.isnan(fused) if bad != bad else fused == bad), out  # was 1.0 (normalize)
    torch.testing.assert_close(out, r_out, equal_nan=True, **TOL[dtype])
    g = torch.tensor([[[float("inf"), 1.0]]], dtype=dtype, device=device)
    gx, = torch.autograd.grad(out, x, g)
    r_gx, = torch.autograd.grad(r_out, x, g)
    assert float(gx[0, 0, 0]) == float("inf")  # coef * inf, coef > 0 however small
    torch.testing.assert_close(gx, r_gx, equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", LOW_AND_FULL)
@pytest.mark.parametrize("scores, sizes", [
    ([[1e-30, 1e-30, 3e-30]], [[1e-20, 1e-20, 1e-20]]),  # every w_i underflowed: W == 0, zeros
    ([[1.0, 1.0, 3.0]], [[3e38, 3e38, 3e38]]),           # W overflowed: every coefficient 0
], ids=["underflow", "overflow"])
def test_weights_outside_float32s_range_fuse_as_in_float64(device, dtype, scores, sizes):
    """A float32 W of 0 or inf turned a fuse of finite tokens into zeros; in float64 (the
    reference's) it is the weighted mean (1, 3, 5) with weights (1, 1, 3): 19 / 5 = 3.8. The
    score gradients, whose quotient is by W, match the reference's too."""
    x = torch.tensor([[[1.0], [3.0], [5.0]]], dtype=dtype, device=device, requires_grad=True)
    scores = torch.tensor(scores, device=device, requires_grad=True)
    sizes = torch.tensor(sizes, device=device)
    out, _, _ = ops.token_prune_merge(x, scores, 0, num_protected=0, sizes=sizes)
    r_out, _, _ = reference.token_prune_merge(x, scores, 0, num_protected=0, sizes=sizes)
    assert float(out.detach()[0, 0, 0]) == pytest.approx(3.8, rel=1e-2)  # was 0.0
    torch.testing.assert_close(out, r_out, **TOL[dtype])
    g = torch.ones_like(out)
    gx, gs = torch.autograd.grad(out, (x, scores), g)
    r_gx, r_gs = torch.autograd.grad(r_out, (x, scores), g)
    torch.testing.assert_close(gx, r_gx, **TOL[dtype])
    torch.testing.assert_close(gs, r_gs, rtol=TOL[dtype]["rtol"], atol=0)


@pytest.mark.parametrize("device", devices)
def test_fused_size_is_summed_in_float64(device):
    """out_sizes' fused entry adds the merged sizes in float64 on every backend, as the
    reference does: 3e38 + 3e38 - 3e38 is 3e38 (a float32 sum in this order is inf)."""
    x = torch.ones(1, 4, 2, device=device)
    sizes = torch.tensor([[1.0, 3e38, 3e38, -3e38]], device=device)
    _, _, out_sizes = ops.token_prune_merge(x, torch.ones(1, 3, device=device), 0, sizes=sizes)
    _, _, want = reference.token_prune_merge(x, torch.ones(1, 3, device=device), 0, sizes=sizes)
    assert out_sizes.tolist() == want.tolist() == [[1.0, pytest.approx(3e38, rel=1e-6)]]
