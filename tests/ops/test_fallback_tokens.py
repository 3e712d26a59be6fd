"""The token family's pure-PyTorch fallback kernels (fisheradaptune/ops/tokens.py,
``FALLBACK_KERNELS``): called directly, against the compiled ops (when the compiled library is
the one in use) and the float64 twins of fisheradaptune.reference.

The same contract: selections identical (ties to the lower index, NaN first, -0.0 tying +0.0),
rows to rounding with copies bitwise, Note [Merge weights] / [Zero coefficients], the same
refusals with the same exception and message (the data checks on kept_index / dest_index
included), inputs untouched, deterministic results.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fisheradaptune
from fisheradaptune import reference
from fisheradaptune.ops import tokens
from helpers import assert_unchanged, make_generator, set_threads, snapshot
from test_bipartite_merge import (bits, inputs as bm_inputs, problems as bm_problems)
from test_fake_kernels import BASES, CASES, META_CASES, _changed, _on_meta
from test_token_prune_merge import inputs as tpm_inputs, problems as tpm_problems

_ops = torch.ops.fisheradaptune
FB = tokens.FALLBACK_KERNELS
OPS = ("token_prune_merge", "token_prune_merge_backward", "bipartite_merge",
       "bipartite_merge_backward")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}

#: Whether torch.ops.fisheradaptune runs the compiled kernels (else they are these fallbacks,
#: and the comparisons with them hold trivially: the reference's still bite).
COMPILED = getattr(fisheradaptune, "has_compiled_ops", lambda: True)()


def _close(a, b, dtype, **kw):
    torch.testing.assert_close(a, b, equal_nan=True, **{**TOL[dtype], **kw})


def test_kernels_cover_the_family_with_the_schemas_arguments():
    assert set(FB) == set(OPS)
    for name, fn in FB.items():
        schema = getattr(_ops, name).default._schema
        assert list(inspect.signature(fn).parameters) == [a.name for a in schema.arguments], name


# ---------------------------------------------------------------------------------------------
# token_prune_merge


def _tpm_both(x, scores, sizes, p, keep, normalize, g=None):
    """Fallback and compiled forward (and backward at ``g``, default random), compared; the
    fallback's results."""
    before = snapshot([x, scores, sizes])
    out, kept, out_sizes = FB["token_prune_merge"](x, scores, sizes, p, keep, normalize)
    c_out, c_kept, c_sizes = _ops.token_prune_merge(x, scores, sizes, p, keep, normalize)
    assert out.dtype == x.dtype and kept.dtype == torch.int64 and out_sizes.dtype == torch.float32
    assert out.shape == c_out.shape and out.is_contiguous()
    assert torch.equal(kept, c_kept)
    torch.testing.assert_close(out_sizes, c_sizes, rtol=1e-6, atol=0)
    assert torch.equal(bits(out[:, :p + keep]), bits(c_out[:, :p + keep]))  # copies
    _close(out, c_out, x.dtype)
    if g is None:
        g = torch.randn(out.shape, generator=make_generator(keep + 1)).to(x.dtype).to(x.device)
    gx, gs = FB["token_prune_merge_backward"](g, x, scores, sizes, kept, p, normalize)
    c_gx, c_gs = _ops.token_prune_merge_backward(g, x, scores, sizes, kept, p, normalize)
    assert gx.dtype == x.dtype and gs.dtype == scores.dtype and gx.shape == x.shape
    # protected and kept tokens get their row's gradient bitwise
    copied = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    copied[:, p:] = False
    copied[:, p:].scatter_(1, kept, True)
    assert torch.equal(bits(gx[copied]), bits(c_gx[copied]))
    _close(gx, c_gx, x.dtype)
    scale = max(1.0, float(c_gs.double().abs().nan_to_num(0, 0, 0).max())) if gs.numel() else 1.
    _close(gs.double() / scale, c_gs.double() / scale, x.dtype,
           atol=TOL[x.dtype]["atol"] * max(1, x.shape[2]) ** 0.5)
    assert_unchanged(before, [x, scores, sizes])
    return out, kept, out_sizes, gx, gs


@settings(max_examples=40, deadline=None)
@given(problem=tpm_problems(), dtype=st.sampled_from(DTYPES), with_sizes=st.booleans(),
       normalize=st.booleans(), ties=st.booleans(), fp32_scores=st.booleans(),
       nans=st.sampled_from([0.0, 0.0, 0.2]), seed=st.integers(0, 2**20))
def test_token_prune_merge_matches_compiled_and_reference(problem, dtype, with_sizes, normalize,
                                                          ties, fp32_scores, nans, seed):
    b, n, c, p, keep = problem
    x, scores, sizes = tpm_inputs(b, n, c, p, seed, dtype, "cpu", with_sizes, ties,
                                  torch.float32 if fp32_scores else None)
    if nans:
        hit = torch.rand(scores.shape, generator=make_generator(seed + 7)) < nans
        scores = scores.masked_fill(hit, float("nan"))
    out, kept, out_sizes, _, _ = _tpm_both(x, scores, sizes, p, keep, normalize)
    r_out, r_kept, r_sizes = reference.token_prune_merge(x, scores, keep, num_protected=p,
                                                         sizes=sizes, normalize=normalize)
    assert torch.equal(kept, r_kept)
    torch.testing.assert_close(out_sizes, r_sizes, rtol=1e-6, atol=0)
    _close(out, r_out, dtype)


def test_token_selection_ties_nan_and_signed_zeros():
    x = torch.arange(3 * 7 * 3, dtype=torch.float32).reshape(3, 7, 3)
    scores = torch.tensor([[1., 2., 2., 0., 2., 1.], [0., 0., 0., 0., 0., 0.],
                           [-0., 0., float("nan"), -0., float("nan"), 0.]])
    for keep, want in [(2, [[1, 2], [0, 1], [2, 4]]), (4, [[0, 1, 2, 4], [0, 1, 2, 3],
                                                          [0, 1, 2, 4]])]:
        _, kept, _, _, _ = _tpm_both(x, scores, None, 1, keep, True)
        assert kept.tolist() == want
        assert torch.equal(kept, reference.token_prune_merge(x, scores, keep)[1])


def test_token_semantics_by_hand():
    x = torch.tensor([[[10.], [1.], [2.], [3.], [4.]]])
    scores = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    sizes = torch.tensor([[1., 1., 2., 3., 1.]])
    out, kept, out_sizes, _, _ = _tpm_both(x, scores, sizes, 1, 2, True)
    assert kept.tolist() == [[1, 3]] and out_sizes.tolist() == [[1., 2., 1., 4.]]
    torch.testing.assert_close(out[0, :, 0], torch.tensor([10., 2., 4., (0.1 + 0.6 * 3) / 0.7]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
@pytest.mark.parametrize("scores, sizes", [
    ([[1.0, 1.0]], [[1e-45, 3e38]]),   # the coefficient 1e-45 / 3e38 is 0 in float32
    ([[1e-30, 1.0]], [[1e-20, 1.0]]),  # w = 1e-50 is 0 in float32
], ids=["coefficient-underflow", "weight-underflow"])
def test_token_weight_that_underflows_does_not_hide_a_nonfinite_token(dtype, normalize, bad,
                                                                      scores, sizes):
    """Note [Merge weights]: sizes [[1e-45, 3e38]] fused an inf token to 1.0 in float32 before
    issue 21; the fallback gives inf (NaN for NaN), forward and backward, as the compiled op."""
    x = torch.tensor([[[bad, 2.0], [1.0, 1.0]]], dtype=dtype)
    scores, sizes = torch.tensor(scores), torch.tensor(sizes)
    g = torch.tensor([[[float("inf"), 1.0]]], dtype=dtype)
    out, _, _, gx, _ = _tpm_both(x, scores, sizes, 0, 0, normalize, g)
    fused = float(out[0, -1, 0])
    assert math.isnan(fused) if bad != bad else fused == bad
    assert float(gx[0, 0, 0]) == float("inf")  # coef * inf, coef > 0 however small
    _close(out, reference.token_prune_merge(x, scores, 0, num_protected=0, sizes=sizes,
                                            normalize=normalize)[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scores, sizes", [
    ([[1e-30, 1e-30, 3e-30]], [[1e-20, 1e-20, 1e-20]]), ([[1.0, 1.0, 3.0]], [[3e38, 3e38, 3e38]])],
    ids=["underflow", "overflow"])
def test_token_weights_outside_float32s_range(dtype, scores, sizes):
    x = torch.tensor([[[1.0], [3.0], [5.0]]], dtype=dtype)
    out, _, _, _, _ = _tpm_both(x, torch.tensor(scores), torch.tensor(sizes), 0, 0, True,
                                torch.ones(1, 1, 1, dtype=dtype))
    assert float(out[0, 0, 0]) == pytest.approx(3.8, rel=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_token_zero_weight_nonfinite_tokens(dtype, normalize, bad):
    """Note [Zero coefficients]: weightless inf/NaN tokens add nothing; W == 0 gives zeros."""
    g = make_generator(13)
    x = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    x[0, 2, 1], x[0, 5, :], x[1, 3, 0] = bad, bad, bad
    scores = torch.rand(2, 6, generator=g, dtype=torch.float64) + 0.1
    scores[0] = torch.tensor([1.0, 0.0, 0.0, 0.9, 0.0, 0.0])  # row 0: W == 0
    scores[1, 2] = 0.0                                          # row 1: one weightless token
    x, scores = x.to(dtype), scores.to(dtype)
    out, kept, _, gx, gs = _tpm_both(x, scores, None, 1, 2, normalize)
    assert kept[0].tolist() == [0, 3]
    assert torch.equal(out[0, -1], torch.zeros(3, dtype=dtype))
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(gs).all())
    _close(out, reference.token_prune_merge(x, scores, 2, normalize=normalize)[0], dtype)


def test_token_edge_shapes_and_layouts():
    for b, c in [(0, 4), (2, 0)]:
        x, scores, sizes = tpm_inputs(b, 5, c, 1, 3)
        _tpm_both(x, scores, sizes, 1, 2, True)
    x, scores, sizes = tpm_inputs(3, 9, 4, 2, 1)
    out, kept, out_sizes, _, _ = _tpm_both(x, scores, sizes, 2, 7, True)  # keep all: no fuse
    assert torch.equal(out, x) and torch.equal(out_sizes, sizes)
    x, scores, sizes = tpm_inputs(3, 10, 8, 1, 5)
    _tpm_both(x.transpose(0, 1).contiguous().transpose(0, 1), scores.t().contiguous().t(),
              sizes.t().contiguous().t(), 1, 6, True)
    x, scores, sizes = tpm_inputs(2, 7, 2100, 1, 6)  # channels over two accumulation blocks
    _tpm_both(x, scores, sizes, 1, 3, True)


# ---------------------------------------------------------------------------------------------
# bipartite_merge


def _bm_both(x, metric, sizes, p, r, g=None):
    before = snapshot([x, metric, sizes])
    out, out_sizes, dest = FB["bipartite_merge"](x, metric, sizes, p, r)
    c_out, c_sizes, c_dest = _ops.bipartite_merge(x, metric, sizes, p, r)
    assert out.dtype == x.dtype and out_sizes.dtype == torch.float32 and dest.dtype == torch.int64
    assert out.shape == c_out.shape and out.is_contiguous()
    assert torch.equal(dest, c_dest)
    assert torch.equal(out_sizes, c_sizes)  # float64 sums in the same (token) order
    b, n = dest.shape
    counts = torch.zeros(b, n - r, dtype=torch.int64).scatter_add_(1, dest, torch.ones_like(dest))
    single = counts == 1
    assert torch.equal(bits(out[single]), bits(c_out[single]))
    _close(out, c_out, x.dtype)
    if g is None:
        g = torch.randn(out.shape, generator=make_generator(r + 3)).to(x.dtype)
    gx = FB["bipartite_merge_backward"](g, sizes, dest)
    c_gx = _ops.bipartite_merge_backward(g, sizes, dest)
    assert gx.dtype == g.dtype and gx.shape == x.shape
    copied = single.gather(1, dest)
    assert torch.equal(bits(gx[copied]), bits(c_gx[copied]))
    _close(gx, c_gx, x.dtype)
    assert_unchanged(before, [x, metric, sizes])
    return out, out_sizes, dest, gx


@settings(max_examples=40, deadline=None)
@given(problem=bm_problems(), dtype=st.sampled_from(DTYPES),
       metric=st.sampled_from(["random", "lattice"]), metric_dtype=st.sampled_from(DTYPES),
       sizes=st.sampled_from([None, "ints", "zeros", "floats"]),
       nan_row=st.booleans(), seed=st.integers(0, 2**20))
def test_bipartite_merge_matches_compiled_and_reference(problem, dtype, metric, metric_dtype,
                                                        sizes, nan_row, seed):
    """Exact choices need similarities that round alike: a float64 random metric or a
    lattice one (exact ties) in any dtype (tests/ops/test_bipartite_merge.py)."""
    b, n, c, d, p, r = problem
    if metric == "random":
        metric_dtype = torch.float64
    x, m, s = bm_inputs(b, n, c, d, seed, dtype, metric_dtype, "cpu", sizes, metric,
                        zero_rows=0.1)
    if nan_row and b and n > p and d:
        m = m.clone()
        m[0, p + seed % (n - p), seed % d] = float("nan")
    out, out_sizes, dest, _ = _bm_both(x, m, s, p, r)
    r_out, r_sizes, r_dest = reference.bipartite_merge(x, m, r, num_protected=p, sizes=s)
    assert torch.equal(dest, r_dest)
    torch.testing.assert_close(out_sizes, r_sizes, rtol=1e-6, atol=0)
    _close(out, r_out, dtype)


@pytest.mark.parametrize("kind", ["same", "zero", "empty"])
def test_bipartite_ties_go_to_the_lower_index(kind):
    x = torch.randn(2, 9, 3, generator=make_generator(1))
    d = 0 if kind == "empty" else 4
    m = torch.ones(2, 9, d) * (0.0 if kind == "zero" else 1.0)
    m[:, 0] = torch.randn(2, d, generator=make_generator(2))
    _, _, dest, _ = _bm_both(x, m, None, 1, 2)
    assert dest.tolist() == [[0, 3, 3, 4, 3, 5, 1, 6, 2]] * 2
    _, _, dest, _ = _bm_both(x, m, None, 1, 4)
    assert dest.tolist() == [[0, 1, 1, 2, 1, 3, 1, 4, 1]] * 2


def test_bipartite_duplicate_rows_and_signed_zero_similarities():
    e = torch.eye(4)
    rows = [e[0], e[2], e[1], e[3], e[1] * 3, e[2] * 7, e[2] * 0.5, e[0], e[3] * 2]
    m = torch.stack(rows).unsqueeze(0)
    x = torch.randn(1, 9, 2, generator=make_generator(3))
    assert _bm_both(x, m, None, 1, 1)[2].tolist() == [[0, 4, 1, 5, 2, 6, 4, 7, 3]]
    assert _bm_both(x, m, None, 1, 3)[2].tolist() == [[0, 2, 2, 3, 1, 4, 2, 5, 3]]
    # similarities -0.0 and +0.0 tie: A token 0 (e0) against B tokens -e1 (sim -0) and e2 (+0)
    m = torch.stack([e[0], -e[1], e[3], e[2]]).unsqueeze(0)
    assert _bm_both(torch.randn(1, 4, 2), m, None, 0, 1)[2].tolist() == [[1, 1, 0, 2]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("metric_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_bipartite_nonfinite_metric_rows_rank_first(bad, metric_dtype):
    g = make_generator(7)
    x = torch.randn(1, 11, 3, generator=g)
    m = torch.randn(1, 11, 4, generator=g, dtype=torch.float64)
    m[0, 8, 2] = bad  # an A token: all its similarities NaN, it merges first, into B 0
    _, _, dest, _ = _bm_both(x, m.to(metric_dtype), None, 1, 1)
    assert dest[0, 8].item() == 1 + 5 - 1
    m2 = torch.randn(1, 11, 4, generator=g, dtype=torch.float64)
    m2[0, 3, 0] = bad  # a B token with a NaN row attracts every A token
    _, _, dest, _ = _bm_both(x, m2.to(metric_dtype), None, 1, 3)
    assert dest[0, 2::2].tolist() == [4, 4, 4, 1, 2]


@pytest.mark.parametrize("metric_dtype,scale", [
    (torch.bfloat16, 1e30), (torch.float16, 1e-6), (torch.float32, 1e38), (torch.float32, 1e-40),
    (torch.float64, 1e300), (torch.float64, 1e-310)])
def test_bipartite_extreme_metric_magnitudes(metric_dtype, scale):
    g = make_generator(31)
    m = torch.randn(2, 13, 5, generator=g, dtype=torch.float64)
    _bm_both(torch.randn(2, 13, 3, generator=g), (m * scale).to(metric_dtype), None, 1, 5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
def test_bipartite_weight_that_underflows_does_not_hide_a_nonfinite_token(dtype, bad):
    """Issue 21's reproducer, sizes [[1e-45, 3e38]]: the merged row is inf (NaN), not 1.0."""
    x = torch.tensor([[[bad, 2.0], [1.0, 1.0]]], dtype=dtype)
    sizes = torch.tensor([[1e-45, 3e38]])
    g = torch.tensor([[[float("inf"), 1.0]]], dtype=dtype)
    out, _, dest, gx = _bm_both(x, torch.ones(1, 2, 3), sizes, 0, 1, g)
    assert dest.tolist() == [[0, 0]]
    v = float(out[0, 0, 0])
    assert math.isnan(v) if bad != bad else v == bad
    assert float(out[0, 0, 1]) == 1.0 and float(gx[0, 0, 0]) == float("inf")
    _close(out, reference.bipartite_merge(x, torch.ones(1, 2, 3), 1, num_protected=0,
                                          sizes=sizes)[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_bipartite_zero_sizes(dtype, bad):
    e = torch.eye(3, dtype=torch.float64)
    m = torch.stack([e[0], e[0], e[0], e[1], e[1], e[2], e[2], e[0]]).unsqueeze(0).repeat(2, 1, 1)
    x = torch.randn(2, 8, 4, generator=make_generator(10), dtype=torch.float64)
    x[0, 1, 2], x[0, 3, :], x[1, 7] = bad, bad, bad
    sizes = torch.tensor([[1., 0., 0., 0., 2., 1., 1., 1.], [1., 1., 1., 1., 1., 0., 0., 1.]])
    out, out_sizes, dest, gx = _bm_both(x.to(dtype), m, sizes, 1, 3)
    assert dest.tolist() == [[0, 1, 1, 2, 2, 3, 3, 4]] * 2
    assert out_sizes.tolist() == [[1., 0., 2., 2., 1.], [1., 2., 2., 0., 1.]]
    assert torch.equal(out[0, 1], torch.zeros(4, dtype=dtype))
    assert bool(torch.isfinite(gx).all())


def test_bipartite_negative_sizes_and_edges():
    m = torch.tensor([[[1., 0.], [1., 0.], [0., 1.]]], dtype=torch.float64)
    _bm_both(torch.randn(1, 3, 2, dtype=torch.float64), m, torch.tensor([[3., -1., 1.]]), 0, 1)
    for n, p, r in [(9, 1, 4), (5, 0, 2), (3, 3, 0), (0, 0, 0)]:
        _bm_both(torch.empty(0, n, 4), torch.empty(0, n, 2), None, p, r)
    x, m, s = bm_inputs(2, 6, 3, 4, 9, torch.float32, torch.float32)
    for p, r in [(6, 0), (5, 0), (4, 1)]:
        _bm_both(x, m, s, p, r)
    x, m, s = bm_inputs(3, 12, 8, 6, 5, torch.float32, torch.float64)
    _bm_both(x.transpose(0, 1).contiguous().transpose(0, 1), m[..., ::2], s.t().contiguous().t(),
             1, 4)
    x, m, s = bm_inputs(2, 197, 40, 1100, 6, torch.bfloat16, torch.float32, metric="lattice")
    _bm_both(x, m, s, 1, 60)  # metric rows over two accumulation blocks


# ---------------------------------------------------------------------------------------------
# Refusals: the same exception and message as the compiled op, nothing written


def _refusal(call):
    with pytest.raises(Exception) as info:
        call()
    return info.value


def _same_refusal(op, args):
    live = [t for t in args.values() if isinstance(t, torch.Tensor)]
    before = snapshot(live)
    fb_error = _refusal(lambda: FB[op](*args.values()))
    assert str(fb_error).startswith(f"fisheradaptune.{op}: argument '")
    if COMPILED:
        c_error = _refusal(lambda: getattr(_ops, op)(*args.values()))
        assert type(fb_error) is type(c_error) and str(fb_error) == str(c_error)
    assert_unchanged(before, live)
    return fb_error


_CASES = [pytest.param(op, change, exc, arg, id=f"{op}-{arg}-{i}")
          for i, (op, change, exc, arg, *_) in enumerate(CASES) if op in OPS]


@pytest.mark.parametrize("op, change, exc, arg", _CASES)
def test_bad_input_is_refused_as_the_compiled_op_refuses_it(op, change, exc, arg):
    error = _same_refusal(op, _changed(op, change, "cpu"))
    assert type(error) is exc and f"argument '{arg}'" in str(error)


@pytest.mark.parametrize("op, arg", [c for c in META_CASES if c[0] in OPS])
def test_a_meta_tensor_among_cpu_ones_is_refused_by_name(op, arg):
    error = _same_refusal(op, _on_meta(BASES[op]("cpu"), arg))
    assert type(error) is ValueError and f"argument '{arg}'" in str(error)


@pytest.mark.parametrize("kept, shown", [
    ([[2, 0], [1, 3]], "got 0 at [0, 1]"),     # decreasing
    ([[0, 2], [1, 1]], "got 1 at [1, 1]"),     # repeated
    ([[-1, 2], [1, 3]], "got -1 at [0, 0]"),   # negative
    ([[0, 2], [1, 4]], "got 4 at [1, 1]"),     # out of range (M = 4)
])
def test_kept_index_values_are_checked(kept, shown):
    args = BASES["token_prune_merge_backward"]("cpu")
    args["kept_index"] = torch.tensor(kept)
    error = _same_refusal("token_prune_merge_backward", args)
    assert type(error) is ValueError
    assert str(error) == ("fisheradaptune.token_prune_merge_backward: argument 'kept_index': "
                          "expected strictly increasing indices in [0, 4) per row, " + shown)


@pytest.mark.parametrize("where, value", [((1, 5), -1), ((0, 2), 4), ((1, 0), 99)])
def test_dest_index_values_are_checked(where, value):
    args = BASES["bipartite_merge_backward"]("cpu")
    args["dest_index"] = args["dest_index"].clone()
    args["dest_index"][where] = value
    error = _same_refusal("bipartite_merge_backward", args)
    assert type(error) is ValueError
    assert str(error) == ("fisheradaptune.bipartite_merge_backward: argument 'dest_index': "
                          f"expected values in [0, 4) (the out rows), got {value} at "
                          f"[{where[0]}, {where[1]}]")


@pytest.mark.parametrize("op, n", [("token_prune_merge", 2 ** 31), ("bipartite_merge", 2 ** 31)])
def test_more_than_int32_tokens_refused(op, n):
    second = torch.empty(0, n - 1) if op == "token_prune_merge" else torch.empty(0, n, 2)
    names = [a.name for a in getattr(_ops, op).default._schema.arguments]
    values = (torch.empty(0, n, 4), second, None, 1, 3, True)
    error = _same_refusal(op, dict(zip(names, values)))
    assert "at most 2^31 - 1 tokens" in str(error)


# ---------------------------------------------------------------------------------------------
# Determinism


def test_deterministic_across_calls_and_threads():
    x, scores, sizes = tpm_inputs(4, 197, 64, 1, 4, ties=True)
    xb, m, s = bm_inputs(4, 197, 64, 16, 13, torch.float32, torch.float32, metric="lattice",
                         sizes="floats")
    runs = []
    for threads in (1, 2, 1):
        with set_threads(threads):
            out, kept, _ = FB["token_prune_merge"](x, scores, sizes, 1, 137, True)
            g = torch.randn(out.shape, generator=make_generator(0))
            grads = FB["token_prune_merge_backward"](g, x, scores, sizes, kept, 1, True)
            merged = FB["bipartite_merge"](xb, m, s, 1, 48)
            gb = torch.randn(merged[0].shape, generator=make_generator(1))
            runs.append([out, kept, *grads, *merged,
                         FB["bipartite_merge_backward"](gb, s, merged[2])])
    for run in runs[1:]:
        for a, b_ in zip(runs[0], run):
            assert torch.equal(bits(a) if a.is_floating_point() else a,
                               bits(b_) if b_.is_floating_point() else b_)


# ---------------------------------------------------------------------------------------------
# CUDA: the same kernels on the device, against the CPU's


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    """The fallback needs no compiled CUDA kernels: on a GPU it runs with any build."""
    x, scores, sizes = tpm_inputs(3, 197, 40, 1, 5, ties=True)
    a = FB["token_prune_merge"](x, scores, sizes, 1, 137, True)
    b_ = FB["token_prune_merge"](x.cuda(), scores.cuda(), sizes.cuda(), 1, 137, True)
    assert torch.equal(a[1], b_[1].cpu())
    torch.testing.assert_close(a[0], b_[0].cpu())
    x, m, s = bm_inputs(3, 197, 40, 64, 6, torch.float32, torch.float32, sizes="floats",
                        metric="lattice")
    a = FB["bipartite_merge"](x, m, s, 1, 49)
    b_ = FB["bipartite_merge"](x.cuda(), m.cuda(), s.cuda(), 1, 49)
    assert torch.equal(a[2], b_[2].cpu()) and torch.equal(a[1], b_[1].cpu())
    torch.testing.assert_close(a[0], b_[0].cpu())


@pytest.mark.parametrize("dtype", DTYPES)
def test_copies_keep_nan_payloads(dtype):
    """Copied rows (protected, kept, single-source) and copied gradients are bitwise, NaN
    payloads included: torch's gather rewrote a bfloat16 NaN's bits (0x7FC0 read 0xFFFF)."""
    bits_t = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    payloads = torch.tensor([0x7FC0, 0x7FC1, 0xFFC0 - 2 ** 16, -1], dtype=torch.int64)
    if dtype.itemsize > 2:  # quiet NaNs with payloads of the wider types
        payloads = (payloads & 0xFFFF) << (8 * dtype.itemsize - 16)
    def nan_rows(shape, seed):
        t = torch.randn(shape, generator=make_generator(seed)).to(dtype)
        hit = torch.rand(shape, generator=make_generator(seed + 1)) < 0.3
        pick = torch.randint(0, 4, shape, generator=make_generator(seed + 2))
        return torch.where(hit, payloads[pick].to(bits_t).view(dtype), t)
    x, scores, sizes = tpm_inputs(2, 9, 6, 1, 3, dtype)
    x = nan_rows(x.shape, 4)
    g = nan_rows((2, 6, 6), 5)
    _tpm_both(x, scores.abs() + 1, sizes, 1, 4, True, g)  # checks the copies bitwise
    x, m, s = bm_inputs(2, 11, 5, 4, 12, dtype, torch.float64)
    _bm_both(nan_rows(x.shape, 6), m, s, 1, 3, nan_rows((2, 8, 5), 7))
