"""ops.bipartite_merge: ToMe bipartite token merging (docs/methods.md section 7, Note [Bipartite
merge] in csrc/tokens/bipartite_merge.h), its backward op, and its float64 twin
reference.bipartite_merge.

Exact discrete agreement (dest_index) with the reference needs similarities that round the same
way in the op and in the reference: a float64 metric of continuous random rows (the op then
works in float64 too; near-ties at 1e-15 have negligible probability), or a "lattice" metric in
any dtype, whose rows are positive multiples of a few prototype vectors with 1 or 4 entries of
+-1 (unit vectors with entries 0, +-1, +-1/2: every similarity is exact in float32 as in float64,
so the many exact ties must break to the lower index in both). Other float32/bf16/fp16 metrics
are checked for near-optimal choices against float64 similarities instead.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.library import opcheck

from helpers import assert_unchanged, devices, make_generator, requires_cuda, set_threads, snapshot
from fisheradaptune import ops, reference

_ops = torch.ops.fisheradaptune

TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
         torch.float16: torch.int16}


# ---------------------------------------------------------------------------------------------
# Inputs and independent checks


def make_metric(b, n, d, g, kind="random", dtype=torch.float64, zero_rows=0.0):
    """``random``: Gaussian rows. ``lattice``: positive multiples of 3 prototypes with 1 or 4
    entries of +-1 (exact similarities, many exact ties); ``zero_rows`` of them zero."""
    if kind == "random":
        m = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    else:
        protos = torch.zeros(3, d, dtype=torch.float64)
        for k in range(3):
            nnz = 4 if d >= 4 and torch.rand((), generator=g) < 0.5 else min(1, d)
            pos = torch.randperm(d, generator=g)[:nnz]
            protos[k, pos] = torch.randint(0, 2, (nnz,), generator=g).double() * 2 - 1
        m = protos[torch.randint(0, 3, (b, n), generator=g)]
        m = m * torch.exp(torch.randn(b, n, 1, generator=g, dtype=torch.float64))
        if zero_rows:
            m = torch.where(torch.rand(b, n, 1, generator=g) < zero_rows, 0.0, m)
    return m.to(dtype)


def make_sizes(b, n, g, kind):
    if kind is None:
        return None
    if kind == "ints":
        return torch.randint(1, 5, (b, n), generator=g).float()
    if kind == "zeros":  # some W == 0 rows
        return torch.randint(0, 3, (b, n), generator=g).float()
    return torch.rand(b, n, generator=g) * 3 + 0.05  # "floats"


def inputs(b, n, c, d, seed, dtype=torch.float32, metric_dtype=torch.float64, device="cpu",
           sizes="ints", metric="random", zero_rows=0.0):
    g = make_generator(seed)
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64).to(dtype)
    m = make_metric(b, n, d, g, metric, metric_dtype, zero_rows)
    s = make_sizes(b, n, g, sizes)
    return x.to(device), m.to(device), (s.to(device) if s is not None else None)


def bits(t):
    return t.detach().cpu().contiguous().view(_BITS[t.dtype])


def partition(n, p):
    """ToMe's sets by position over all n tokens (Note [Bipartite merge]): the sources are the
    even positions that are not protected, the destinations the odd ones."""
    a = [i for i in range(0, n, 2) if i >= p]
    b = [i for i in range(1, n, 2) if i >= p]
    return torch.tensor(a, dtype=torch.int64), torch.tensor(b, dtype=torch.int64)


def similarity(metric, p):
    """Cosine similarities of A to B tokens in float64, NaN mapped to +inf (it ranks first)."""
    m = metric.detach().double().cpu()
    b, n, d = m.shape
    top = m.abs().amax(-1, keepdim=True) if d else m.new_zeros(b, n, 1)
    m = m / torch.where(top > 0, top, 1.0)
    m = m / torch.where(m.norm(dim=-1, keepdim=True) > 0, m.norm(dim=-1, keepdim=True), 1.0)
    m = torch.where(torch.isfinite(metric.detach().cpu()).all(-1, keepdim=True), m, float("nan"))
    ia, ib = partition(n, p)
    sim = m[:, ia] @ m[:, ib].transpose(1, 2)
    return torch.where(torch.isnan(sim), float("inf"), sim)


def check_structure(dest, b, n, p, r):
    """dest_index is the map of Note [Bipartite merge]; returns the merged mask of A [b, |A|]."""
    ia, ib = partition(n, p)
    na, nb = len(ia), len(ib)
    rows, first_b = n - r, p + na - r
    assert dest.shape == (b, n) and dest.dtype == torch.int64
    dest = dest.cpu()
    if b == 0:
        return torch.zeros(0, na, dtype=torch.bool)
    assert bool(((dest >= 0) & (dest < rows)).all())
    hits = torch.zeros(b, rows, dtype=torch.int64).scatter_add(1, dest, torch.ones_like(dest))
    assert bool((hits > 0).all()), "every out row has a source"
    assert torch.equal(dest[:, :p], torch.arange(p).expand(b, p))
    assert torch.equal(dest[:, ib], (first_b + torch.arange(nb)).expand(b, nb))
    da = dest[:, ia]
    merged = da >= first_b
    assert torch.equal(merged.sum(1), torch.full((b,), r))
    for i in range(b):  # unmerged A tokens keep their order, in rows P .. P + |A| - r - 1
        assert torch.equal(da[i][~merged[i]], torch.arange(p, first_b))
    return merged


def check_choices(metric, dest, p, r, tol):
    """Each merged A token's partner is (within tol) its most similar B token, and the merged
    A tokens are (within tol) those of highest best similarity."""
    b, n = dest.shape
    if b == 0 or r == 0:
        return
    ia, _ = partition(n, p)
    na = len(ia)
    first_b = p + na - r
    sim = similarity(metric, p)
    best = sim.max(2).values
    da = dest[:, ia].cpu()
    merged = da >= first_b
    partner = (da - first_b).clamp(min=0)
    chosen = sim.gather(2, partner.unsqueeze(-1)).squeeze(-1)
    assert bool((chosen[merged] >= best[merged] - tol).all())
    if r < na:
        lo = torch.where(merged, best, float("inf")).min(1).values
        hi = torch.where(merged, -float("inf"), best).max(1).values
        assert bool((lo >= hi - tol).all())


def check_rows(x, sizes, out, out_sizes, dest):
    """out / out_sizes from dest_index by Note [Bipartite merge], computed here in float64:
    single-source rows are bitwise copies, others the size-weighted means."""
    b, n, c = x.shape
    rows = out.shape[1]
    xd, dd = x.detach().cpu(), dest.cpu()
    s = sizes.cpu().double() if sizes is not None else torch.ones(b, n, dtype=torch.float64)
    single = torch.zeros(b, rows, dtype=torch.bool)
    expected = torch.zeros(b, rows, c, dtype=torch.float64)
    w_all = torch.zeros(b, rows, dtype=torch.float64)
    for i in range(b):
        for d in range(rows):
            src = (dd[i] == d).nonzero().flatten()
            w = s[i, src].sum()
            w_all[i, d] = w
            if len(src) == 1:
                single[i, d] = True
                assert torch.equal(bits(out[i, d]), bits(xd[i, src[0]]))
            elif w == 0:
                assert bool((out[i, d] == 0).all()), "W == 0: a zero row"
            else:
                coef = s[i, src] / w
                xs = torch.where((coef != 0).unsqueeze(-1), xd[i, src].double(), 0.0)
                expected[i, d] = (coef.unsqueeze(-1) * xs).sum(0)
    torch.testing.assert_close(out_sizes.cpu(), w_all.float(), rtol=1e-6, atol=0)
    o = out.detach().cpu()
    torch.testing.assert_close(o[~single], expected[~single].to(o.dtype), **TOL[x.dtype])
    return single


def run_checked(x, metric, r, p, sizes, exact=True, tol=1e-5):
    """The op against the rules above and (exact=True) against the reference; inputs unchanged."""
    before = snapshot([x, metric, sizes])
    out, out_sizes, dest = ops.bipartite_merge(x, metric, r, num_protected=p, sizes=sizes)
    assert_unchanged(before, [x, metric, sizes])
    b, n, c = x.shape
    assert out.shape == (b, n - r, c) and out.dtype == x.dtype and out.device == x.device
    assert out_sizes.shape == (b, n - r) and out_sizes.dtype == torch.float32
    check_structure(dest, b, n, p, r)
    single = check_rows(x, sizes, out, out_sizes, dest)
    total = sizes.double().sum(1) if sizes is not None else torch.full((b,), float(n),
                                                                       dtype=torch.float64)
    torch.testing.assert_close(out_sizes.double().sum(1).cpu(), total.cpu(), rtol=1e-6, atol=1e-6)
    if exact:
        r_out, r_sizes, r_dest = reference.bipartite_merge(x, metric, r, num_protected=p,
                                                           sizes=sizes)
        assert_unchanged(before, [x, metric, sizes])
        assert torch.equal(dest, r_dest)
        torch.testing.assert_close(out_sizes, r_sizes, rtol=1e-6, atol=0)
        single = single.to(x.device)
        # exact (NaN == NaN: the reference's arithmetic may change a NaN's bits, the op's
        # copies are bitwise, checked against x above)
        assert_unchanged(r_out[single], out[single])
        torch.testing.assert_close(out, r_out, equal_nan=True, **TOL[x.dtype])
    else:
        check_choices(metric, dest, p, r, tol)
    return out, out_sizes, dest


# ---------------------------------------------------------------------------------------------
# Against the reference, property tests


@st.composite
def problems(draw):
    p = draw(st.integers(0, 3))
    m = draw(st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(0, 30)))
    n = p + m
    b = draw(st.integers(0, 3))
    c = draw(st.integers(0, 9))
    d = draw(st.integers(0, 8))
    r = draw(st.one_of(st.integers(0, m // 2), st.just(m // 2)))
    return b, n, c, d, p, r


@pytest.mark.parametrize("device", devices)
@settings(max_examples=30, deadline=None)
@given(problem=problems(), dtype=st.sampled_from(DTYPES),
       metric=st.sampled_from(["random", "lattice"]),
       metric_dtype=st.sampled_from(DTYPES),
       sizes=st.sampled_from([None, "ints", "zeros", "floats"]), seed=st.integers(0, 2**20))
def test_matches_reference(device, problem, dtype, metric, metric_dtype, sizes, seed):
    b, n, c, d, p, r = problem
    if metric == "random":
        metric_dtype = torch.float64  # only then are the op's similarities the reference's
    x, m, s = inputs(b, n, c, d, seed, dtype, metric_dtype, device, sizes, metric,
                     zero_rows=0.1)
    run_checked(x, m, r, p, s)


@pytest.mark.parametrize("device", devices)
@settings(max_examples=20, deadline=None)
@given(problem=problems(), dtype=st.sampled_from(DTYPES),
       metric_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       sizes=st.sampled_from([None, "ints", "floats"]), seed=st.integers(0, 2**20))
def test_low_precision_metric_chooses_near_optimally(device, problem, dtype, metric_dtype, sizes,
                                                    seed):
    # similarities in float32: discrete choices may differ from float64's at near-ties only
    b, n, c, d, p, r = problem
    x, m, s = inputs(b, n, c, d, seed, dtype, metric_dtype, device, sizes, "random")
    run_checked(x, m, r, p, s, exact=False, tol=1e-5)


def test_vit_b_shape():
    x, m, s = inputs(2, 197, 768, 64, 0, torch.float32, torch.float64)
    run_checked(x, m, 16, 1, s)
    x, m, s = inputs(2, 197, 384, 64, 1, torch.bfloat16, torch.float32, metric="lattice")
    run_checked(x, m, 98, 1, s)


def test_mixed_dtypes_exhaustively():
    for dtype in DTYPES:
        for metric_dtype in DTYPES:
            x, m, s = inputs(2, 15, 5, 8, 3, dtype, metric_dtype, metric="lattice")
            run_checked(x, m, 5, 2, s)
        x, m, s = inputs(2, 15, 5, 8, 4, dtype, torch.float64)
        run_checked(x, m, 7, 1, s)


def test_non_contiguous_inputs():
    x, m, s = inputs(3, 12, 8, 6, 5, torch.float32, torch.float64)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    mt = m[..., ::2]
    run_checked(xt, mt, 4, 1, s.t().contiguous().t())
    a = ops.bipartite_merge(xt, mt, 4, sizes=s.t().contiguous().t())
    b_ = ops.bipartite_merge(x, mt.contiguous(), 4, sizes=s)
    assert all(torch.equal(u, v) for u, v in zip(a, b_))


def test_wrapper_and_registered_op_agree():
    x, m, s = inputs(2, 10, 4, 3, 6)
    a = ops.bipartite_merge(x, m, 3, num_protected=2, sizes=s)
    b_ = _ops.bipartite_merge(x, m, s, 2, 3)
    assert all(torch.equal(u, v) for u, v in zip(a, b_))
    # num_protected defaults to 1, sizes to ones
    a = ops.bipartite_merge(x, m, 3)
    b_ = ops.bipartite_merge(x, m, 3, num_protected=1, sizes=torch.ones(2, 10))
    assert all(torch.equal(u, v) for u, v in zip(a, b_))


# ---------------------------------------------------------------------------------------------
# Semantics by hand, ties, non-finite metric


def test_semantics_by_hand():
    # ToMe's partition by position: A = tokens 0, 2, 4 and B = tokens 1, 3; with P = 1 the class
    # token 0 (in A) is never a source, so the sources are 2, 4 and the destinations 1, 3.
    # sim(2, 1) = 0, sim(2, 3) = 0.707; sim(4, 1) = 1 / sqrt(1.01) = 0.995, sim(4, 3) = 0.774
    metric = torch.tensor([[[5., 5.], [1., 0.], [0., 1.], [1., 1.], [1., 0.1]]])
    x = torch.tensor([[[10.], [1.], [2.], [3.], [4.]]], dtype=torch.float64)
    sizes = torch.tensor([[1., 2., 1., 1., 3.]])
    out, out_sizes, dest = ops.bipartite_merge(x, metric, 1, sizes=sizes)
    assert dest.tolist() == [[0, 2, 1, 3, 2]]  # token 4 merges into token 1
    assert out[0, :, 0].tolist() == [10., 2., (2 * 1. + 3 * 4.) / 5, 3.]
    assert out_sizes.tolist() == [[1., 1., 5., 1.]]
    out, out_sizes, dest = ops.bipartite_merge(x, metric, 2, sizes=sizes)
    assert dest.tolist() == [[0, 1, 2, 2, 1]]  # and token 2 into token 3
    torch.testing.assert_close(out[0, :, 0], torch.tensor([10., (2. + 12.) / 5, (2. + 3.) / 2],
                                                          dtype=torch.float64))
    assert out_sizes.tolist() == [[1., 5., 2.]]
    out, out_sizes, dest = ops.bipartite_merge(x, metric, 0, sizes=sizes)
    assert dest.tolist() == [[0, 3, 1, 4, 2]]  # protected, A (2, 4), B (1, 3)
    assert out[0, :, 0].tolist() == [10., 2., 4., 1., 3.]
    # the pre-issue-23 partition (A = tokens 1, 3 after the protected one) chose otherwise:
    # token 1 into token 4, dest [[0, 3, 2, 1, 3]]
    assert ops.bipartite_merge(x, metric, 1, sizes=sizes)[2].tolist() != [[0, 3, 2, 1, 3]]


def test_protected_tokens_keep_their_sets():
    # P = 2 (class token 0 in A, distillation token 1 in B): sources 2, 4, 6; destinations 3, 5.
    # P = 3: sources 4, 6; destinations 3, 5. The protected tokens stay rows 0 .. P - 1.
    e = torch.eye(3)
    m = torch.stack([e[0], e[1], e[2], e[2], e[1], e[1], e[0]]).unsqueeze(0)
    x = torch.randn(1, 7, 2)
    # P = 2: token 2 (e2) -> 3 (sim 1), token 4 (e1) -> 5 (sim 1), token 6 (e0) -> 3 (sim 0)
    _, _, dest = ops.bipartite_merge(x, m, 2, num_protected=2)
    assert dest.tolist() == [[0, 1, 3, 3, 4, 4, 2]]
    # P = 3: token 4 (e1) -> 5, token 6 (e0) -> 3 (sim 0, first B' on the tie)
    _, _, dest = ops.bipartite_merge(x, m, 1, num_protected=3)
    assert dest.tolist() == [[0, 1, 2, 4, 5, 5, 3]]
    for p, r in ((2, 2), (3, 1), (3, 2), (0, 3), (1, 3)):
        run_checked(x, m, r, p, None)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("kind", ["same", "zero", "empty"])
def test_ties_go_to_the_lower_index(device, kind):
    # every similarity equal (1 for identical rows, 0 for zero rows or D = 0): every A token
    # picks B 0, and the first r A tokens merge
    x = torch.randn(2, 9, 3, device=device)
    d = 0 if kind == "empty" else 4
    m = torch.ones(2, 9, d, device=device) * (0.0 if kind == "zero" else 1.0)
    m[:, 0] = torch.randn(2, d)  # the protected token does not take part
    _, _, dest = ops.bipartite_merge(x, m, 2)
    # sources (A) = 2, 4, 6, 8; destinations (B) = 1, 3, 5, 7; first_b = 1 + 4 - 2 = 3
    assert dest.tolist() == [[0, 3, 3, 4, 3, 5, 1, 6, 2]] * 2
    run_checked(x, m, 2, 1, None)
    _, _, dest = ops.bipartite_merge(x, m, 4)
    assert dest.tolist() == [[0, 1, 1, 2, 1, 3, 1, 4, 1]] * 2


def test_duplicate_rows_tie_to_the_lower_index():
    # B tokens 2 and 6 hold the same direction as A token 3 (B 1 with a different scale): A 3
    # picks B index 0 (token 2); A tokens 1 and 5 are exactly as similar to their best, and
    # the lower A index merges first
    e = torch.eye(4, dtype=torch.float32)
    rows = [e[0], e[2], e[1], e[3], e[1] * 3, e[2] * 7, e[2] * 0.5, e[0], e[3] * 2]
    m = torch.stack(rows).unsqueeze(0)
    x = torch.randn(1, 9, 2)
    # P = 1: A = tokens 2, 4, 6, 8 (e1, 3e1, e2/2, 2e3), B = tokens 1, 3, 5, 7 (e2, e3, 7e2, e0)
    # A 2 (e1): no B (all 0) -> B 0, best 0; A 4 (3e1): same; A 6 (e2): B 0 (token 1), best 1;
    # A 8 (e3): B 1 (token 3), best 1
    _, _, dest = ops.bipartite_merge(x, m, 1)
    assert dest.tolist() == [[0, 4, 1, 5, 2, 6, 4, 7, 3]]
    _, _, dest = ops.bipartite_merge(x, m, 3)
    # merged: A 6, A 8 (best 1), then A 2 (best 0, lower than A 4)
    assert dest.tolist() == [[0, 2, 2, 3, 1, 4, 2, 5, 3]]
    run_checked(x, m, 3, 1, None)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("metric_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_nonfinite_metric_rows_rank_first(device, bad, metric_dtype):
    g = make_generator(7)
    x = torch.randn(1, 11, 3, generator=g).to(device)
    m = torch.randn(1, 11, 4, generator=g, dtype=torch.float64)
    m[0, 8, 2] = bad  # A token 8 (A index 3): all its similarities are NaN
    m = m.to(metric_dtype).to(device)
    _, _, dest = ops.bipartite_merge(x, m, 1)
    # it merges first (r = 1), into B index 0 (NaN ties go to the lower B index)
    first_b = 1 + 5 - 1
    assert dest[0, 8].item() == first_b + 0
    run_checked(x, m, 1, 1, None, exact=metric_dtype == torch.float64)
    # a B token with a NaN row (token 3, B index 1) attracts every A token
    m2 = torch.randn(1, 11, 4, generator=g, dtype=torch.float64)
    m2[0, 3, 0] = bad
    m2 = m2.to(metric_dtype).to(device)
    _, _, dest = ops.bipartite_merge(x, m2, 3)
    assert dest[0, 2::2].tolist() == [4, 4, 4, 1, 2] and dest[0, 0].item() == 0
    _, _, r_dest = reference.bipartite_merge(x, m2, 3)
    assert torch.equal(dest, r_dest)


@pytest.mark.parametrize("device", devices)
def test_zero_metric_row(device):
    g = make_generator(8)
    x = torch.randn(2, 9, 3, generator=g).to(device)
    m = torch.randn(2, 9, 4, generator=g, dtype=torch.float64)
    m[0, 4] = 0  # A token: similarity 0 to every B, picks B 0
    m[1, 3] = 0  # B token: similarity 0 to every A
    m = m.to(device)
    for r in range(5):
        run_checked(x, m, r, 1, None)
    _, _, dest = ops.bipartite_merge(x, m, 4)
    assert dest[0, 4].item() == 1 + 4 - 4


@pytest.mark.parametrize("metric_dtype,scale", [
    (torch.bfloat16, 1e30), (torch.bfloat16, 1e-30), (torch.float16, 1e4), (torch.float16, 1e-6),
    (torch.float32, 1e38), (torch.float32, 1e-40), (torch.float64, 1e300), (torch.float64, 1e-310)])
def test_extreme_metric_magnitudes(metric_dtype, scale):
    # the rows are scaled by their largest entry before the norm: no overflow or underflow of
    # the squares, the same choices as for the unscaled metric (cosine is scale invariant)
    g = make_generator(31)
    m = torch.randn(2, 13, 5, generator=g, dtype=torch.float64)
    x = torch.randn(2, 13, 3, generator=g)
    big = (m * scale).to(metric_dtype)
    assert bool(torch.isfinite(big).all()) and bool((big != 0).any(-1).all())
    _, _, dest = run_checked(x, big, 5, 1, None, exact=metric_dtype == torch.float64)
    if metric_dtype == torch.float64:
        assert torch.equal(dest, ops.bipartite_merge(x, m, 5)[2])


# ---------------------------------------------------------------------------------------------
# Edge cases


@pytest.mark.parametrize("device", devices)
def test_empty_batch(device):
    for n, p, r in [(9, 1, 4), (5, 0, 2), (3, 3, 0), (0, 0, 0)]:
        x = torch.empty(0, n, 4, device=device, requires_grad=True)
        m = torch.empty(0, n, 2, device=device)
        out, out_sizes, dest = ops.bipartite_merge(x, m, r, num_protected=p)
        assert out.shape == (0, n - r, 4) and out_sizes.shape == (0, n - r)
        assert dest.shape == (0, n)
        r_out, r_sizes, r_dest = reference.bipartite_merge(x, m, r, num_protected=p)
        assert r_out.shape == out.shape and r_dest.shape == dest.shape
        (gx,) = torch.autograd.grad(out.sum(), x)
        assert gx.shape == x.shape


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_protected_and_one_left(device, dtype):
    x, m, s = inputs(2, 6, 3, 4, 9, dtype, torch.float32, device)
    for p in (6, 5):  # N - P = 0, 1: nothing can merge
        out, out_sizes, dest = ops.bipartite_merge(x, m, 0, num_protected=p, sizes=s)
        assert torch.equal(bits(out), bits(x)) and torch.equal(out_sizes, s)
        assert torch.equal(dest, torch.arange(6, device=device).expand(2, 6))
        run_checked(x, m, 0, p, s)
        with pytest.raises(ValueError, match="fisheradaptune.bipartite_merge: argument 'r'"):
            ops.bipartite_merge(x, m, 1, num_protected=p, sizes=s)
        with pytest.raises(ValueError, match="argument 'r'"):
            reference.bipartite_merge(x, m, 1, num_protected=p, sizes=s)
    # N - P = 2, r = 1: the A token merges into the B token
    out, out_sizes, dest = ops.bipartite_merge(x, m, 1, num_protected=4, sizes=s)
    assert dest.tolist() == [[0, 1, 2, 3, 4, 4]] * 2
    run_checked(x, m, 1, 4, s)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("n", [10, 11])
def test_r_max(device, n):
    x, m, s = inputs(3, n, 5, 4, n, torch.float32, torch.float64, device)
    for p in (0, 1, 2):
        r = (n - p) // 2
        out, out_sizes, dest = run_checked(x, m, r, p, s)
        ia, ib = partition(n, p)
        na = len(ia)
        assert out.shape[1] == p + (na - r) + len(ib)  # protected, A left, B
        assert bool((dest[:, ia.to(device)] >= p + na - r).sum(1).eq(r).all())


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_zero_sizes(device, dtype, bad):
    # P = 1: A = tokens 2, 4, 6 (e0, e1, e2), B = tokens 1, 3, 5, 7 (e0, e1, e2, e0). Every best
    # similarity is 1: A tokens 2, 4, 6 merge into B tokens 1, 3, 5 (token 2 ties between 1 and
    # 7: the lower); B token 7 stays. Out rows: 0 | {1, 2} | {3, 4} | {5, 6} | 7.
    e = torch.eye(3, dtype=torch.float64)
    m = torch.stack([e[0], e[0], e[0], e[1], e[1], e[2], e[2], e[0]]).unsqueeze(0)
    m = m.repeat(2, 1, 1).to(device)
    x = torch.randn(2, 8, 4, generator=make_generator(10), dtype=torch.float64)
    x[0, 1, 2] = bad   # size 0 merged into a size-0 B token: W == 0, a zero row
    x[0, 3, :] = bad   # size 0 merged into a B token of size 2: coefficient 0, reads as 0
    x[1, 7] = bad      # a B token that absorbed nothing: copied as is
    sizes = torch.tensor([[1., 0., 0., 0., 2., 1., 1., 1.], [1., 1., 1., 1., 1., 0., 0., 1.]],
                         device=device)
    x = x.to(dtype).to(device).requires_grad_(True)
    out, out_sizes, dest = ops.bipartite_merge(x, m, 3, sizes=sizes)
    assert dest.tolist() == [[0, 1, 1, 2, 2, 3, 3, 4]] * 2
    assert out_sizes.tolist() == [[1., 0., 2., 2., 1.], [1., 2., 2., 0., 1.]]
    zero = torch.zeros(4, dtype=dtype, device=device)
    assert torch.equal(out[0, 1], zero)                 # W == 0, with an inf/NaN source
    assert torch.equal(out[0, 2], x[0, 4].detach())     # 0 * x_3 + 1 * x_4, x_3 inf/NaN
    assert torch.equal(out[1, 3], zero)                 # W == 0
    assert torch.equal(bits(out[1, 4]), bits(x[1, 7]))  # a copy, inf/NaN kept
    assert bool(torch.isfinite(out[0]).all()) and bool(torch.isfinite(out[1, [0, 1, 2, 3]]).all())
    run_checked(x, m, 3, 1, sizes)
    g = torch.randn(out.shape, generator=make_generator(11)).to(dtype).to(device)
    (gx,) = torch.autograd.grad(out, x, g)
    assert bool(torch.isfinite(gx).all())
    for i, t in [(0, 1), (0, 2), (0, 3), (1, 5), (1, 6)]:  # zero coefficients
        assert torch.equal(gx[i, t], zero)
    assert torch.equal(gx[0, 4], g[0, 2]) and torch.equal(gx[1, 7], g[1, 4])
    r_out, _, _ = reference.bipartite_merge(x, m, 3, sizes=sizes)
    (r_gx,) = torch.autograd.grad(r_out, x, g)
    torch.testing.assert_close(gx, r_gx, **TOL[dtype])


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_x_of_copied_rows_is_copied(device, dtype):
    x, m, s = inputs(2, 11, 5, 4, 12, dtype, torch.float64, device)
    _, _, dest = ops.bipartite_merge(x, m, 3, sizes=s)
    counts = torch.zeros(2, 8, dtype=torch.int64, device=device).scatter_add(
        1, dest, torch.ones_like(dest))
    single = counts.gather(1, dest) == 1  # tokens that are the only source of their row
    x = x.clone()
    x[0, 0, 0] = float("inf")  # protected
    x[single.unsqueeze(-1).expand_as(x) & (torch.rand(x.shape, generator=make_generator(1))
                                           .to(device) < 0.3)] = float("nan")
    x[single.unsqueeze(-1).expand_as(x) & (torch.rand(x.shape, generator=make_generator(2))
                                           .to(device) < 0.2)] = -float("inf")
    out, _, dest2 = ops.bipartite_merge(x, m, 3, sizes=s)
    assert torch.equal(dest, dest2)  # x does not take part in the matching
    for i in range(2):
        for t in single[i].nonzero().flatten().tolist():
            assert torch.equal(bits(out[i, dest[i, t]]), bits(x[i, t]))
    run_checked(x, m, 3, 1, s)


@pytest.mark.parametrize("device", devices)
def test_rejects_more_than_int32_tokens(device):
    n = 2 ** 31
    x = torch.empty(0, n, 4, device=device)
    m = torch.empty(0, n, 2, device=device)
    with pytest.raises(ValueError, match=r"bipartite_merge: argument 'x': expected at most "
                                         r"2\^31 - 1 tokens"):
        ops.bipartite_merge(x, m, 3)
    out, _, _ = ops.bipartite_merge(x[:, :-1], m[:, :-1], 3)
    assert out.shape == (0, n - 4, 4)


# ---------------------------------------------------------------------------------------------
# Determinism


def test_deterministic_across_calls_and_threads():
    x, m, s = inputs(8, 197, 96, 16, 13, torch.float32, torch.float32, metric="lattice",
                     sizes="floats")
    x2, m2, _ = inputs(8, 197, 96, 16, 14, torch.bfloat16, torch.float32)
    for xx, mm in ((x, m), (x2, m2)):
        outs = []
        for threads in (1, 2, 1):
            with set_threads(threads):
                outs.append(ops.bipartite_merge(xx, mm, 48, sizes=s))
                g = torch.randn(outs[-1][0].shape, generator=make_generator(0)).to(xx.dtype)
                outs[-1] = outs[-1] + (_ops.bipartite_merge_backward(g, s, outs[-1][2]),)
        for o in outs[1:]:
            for a, b_ in zip(outs[0], o):
                assert torch.equal(bits(a) if a.is_floating_point() else a,
                                   bits(b_) if b_.is_floating_point() else b_)


# ---------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("p,r", [(1, 3), (0, 0), (0, 4), (3, 1), (8, 0)])
@pytest.mark.parametrize("sizes", [None, "zeros"])
def test_gradcheck(p, r, sizes):
    x, m, s = inputs(2, 9, 4, 3, 20 + p + r, torch.float64, torch.float64, sizes=sizes)
    x.requires_grad_(True)
    fn = lambda x: ops.bipartite_merge(x, m, r, num_protected=p, sizes=s)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("device", devices)
@settings(max_examples=20, deadline=None)
@given(problem=problems(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       sizes=st.sampled_from([None, "ints", "zeros", "floats"]), seed=st.integers(0, 2**20))
def test_backward_matches_reference(device, problem, dtype, sizes, seed):
    b, n, c, d, p, r = problem
    x, m, s = inputs(b, n, c, d, seed, dtype, torch.float64, device, sizes)
    x.requires_grad_(True)
    out, _, dest = ops.bipartite_merge(x, m, r, num_protected=p, sizes=s)
    g = torch.randn(out.shape, generator=make_generator(seed + 1)).to(dtype).to(device)
    (gx,) = torch.autograd.grad(out, x, g)
    r_out, _, r_dest = reference.bipartite_merge(x, m, r, num_protected=p, sizes=s)
    assert torch.equal(dest, r_dest)
    (r_gx,) = torch.autograd.grad(r_out, x, g)
    assert gx.dtype == dtype and gx.shape == x.shape
    torch.testing.assert_close(gx, r_gx, **TOL[dtype])
    # the sole source of a row gets that row's gradient bitwise
    counts = torch.zeros(b, n - r, dtype=torch.int64, device=device).scatter_add(
        1, dest, torch.ones_like(dest))
    single = counts.gather(1, dest) == 1
    row_g = g.gather(1, dest.unsqueeze(-1).expand(b, n, c))
    assert torch.equal(bits(gx[single]), bits(row_g[single]))


def test_backward_float32_against_reference_autograd():
    x, m, s = inputs(4, 197, 64, 16, 21, torch.float32, torch.float64, sizes="floats")
    x.requires_grad_(True)
    out, _, _ = ops.bipartite_merge(x, m, 40, sizes=s)
    r_out, _, _ = reference.bipartite_merge(x, m, 40, sizes=s)
    g = torch.randn(out.shape, generator=make_generator(22))
    (gx,) = torch.autograd.grad((out * g).sum(), x)
    (r_gx,) = torch.autograd.grad((r_out * g).sum(), x)
    torch.testing.assert_close(gx, r_gx, rtol=1e-6, atol=1e-6)


def test_metric_gets_no_gradient():
    x, m, s = inputs(2, 9, 4, 3, 23, torch.float32, torch.float32, sizes="ints")
    x.requires_grad_(True)
    m.requires_grad_(True)
    out, out_sizes, dest = ops.bipartite_merge(x, m, 3, sizes=s)
    assert out.requires_grad and not out_sizes.requires_grad and not dest.requires_grad
    out.sum().backward()
    assert x.grad is not None and m.grad is None  # the backward returns None for metric
    (gm,) = torch.autograd.grad(ops.bipartite_merge(x, m, 3)[0].sum(), m, allow_unused=True)
    assert gm is None
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(ops.bipartite_merge(x, m, 3)[0].sum(), m)
    # the reference too: its metric is detached
    (gm,) = torch.autograd.grad(reference.bipartite_merge(x, m, 3)[0].sum(), m, allow_unused=True)
    assert gm is None
    # with only metric requiring grad, out is still attached to the graph; backward leaves
    # metric.grad None
    m.grad = None
    out = ops.bipartite_merge(x.detach(), m, 3)[0]
    assert out.requires_grad
    out.sum().backward()
    assert m.grad is None


def test_backward_op_directly():
    x, m, s = inputs(2, 9, 3, 4, 24, torch.float32, torch.float64)
    out, _, dest = ops.bipartite_merge(x, m, 3, sizes=s)
    g = torch.randn_like(out)
    gx = _ops.bipartite_merge_backward(g, s, dest)
    assert gx.shape == x.shape and gx.dtype == x.dtype
    x.requires_grad_(True)
    (ref,) = torch.autograd.grad(ops.bipartite_merge(x, m, 3, sizes=s)[0], x, g)
    assert torch.equal(gx, ref)
    before = snapshot([g, s, dest])
    for bad in (-1, out.shape[1]):
        d2 = dest.clone()
        d2[1, 5] = bad
        with pytest.raises(ValueError, match=r"fisheradaptune.bipartite_merge_backward: argument "
                                             r"'dest_index': expected values in \[0, 6\)"):
            _ops.bipartite_merge_backward(g, s, d2)
    assert_unchanged(before, [g, s, dest])


def test_negative_sizes_backward():
    """Sizes are not checked to be positive: a negative coefficient s_i / W is still a
    coefficient, not taken for a copied row (a sentinel -1 once did that)."""
    x = torch.randn(1, 3, 2, dtype=torch.float64, requires_grad=True)
    m = torch.tensor([[[1., 0.], [1., 0.], [0., 1.]]], dtype=torch.float64)
    sizes = torch.tensor([[3., -1., 1.]])  # token 0 (A) merges into token 1 (B): W = 2
    out, _, dest = ops.bipartite_merge(x, m, 1, num_protected=0, sizes=sizes)
    r_out, _, r_dest = reference.bipartite_merge(x, m, 1, num_protected=0, sizes=sizes)
    assert torch.equal(dest, r_dest)
    torch.testing.assert_close(out, r_out)  # the forward is right
    g = torch.ones_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (r_gx,) = torch.autograd.grad(r_out, x, g)
    torch.testing.assert_close(gx, r_gx)  # token 1: -0.5


# ---------------------------------------------------------------------------------------------
# opcheck, compile


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype,metric_dtype,sizes,p,r", [
    (torch.float32, torch.float32, "ints", 1, 3), (torch.float32, torch.float64, None, 0, 0),
    (torch.float64, torch.bfloat16, "floats", 2, 3), (torch.bfloat16, torch.float32, None, 3, 1)])
def test_opcheck(device, dtype, metric_dtype, sizes, p, r):
    x, m, s = inputs(3, 9, 6, 5, 25, dtype, metric_dtype, device, sizes)
    x.requires_grad_(True)
    opcheck(_ops.bipartite_merge.default, (x, m, s, p, r))
    out, _, dest = ops.bipartite_merge(x, m, r, num_protected=p, sizes=s)
    opcheck(_ops.bipartite_merge_backward.default, (torch.randn_like(out), s, dest))


def test_compiles():
    x, m, _ = inputs(2, 11, 8, 4, 26, torch.float32, torch.float32)
    x.requires_grad_(True)
    f = lambda x, m: ops.bipartite_merge(x, m, 3)  # noqa: E731
    compiled = torch.compile(f, fullgraph=True)
    a, b_ = compiled(x, m), f(x, m)
    assert all(torch.equal(u, v) for u, v in zip(a, b_))
    g = torch.randn(a[0].shape, generator=make_generator(27))
    (ga,) = torch.autograd.grad(a[0], x, g)
    (gb,) = torch.autograd.grad(b_[0], x, g)
    assert torch.equal(ga, gb)


def test_compiles_dynamic():
    compiled = torch.compile(lambda x, m: ops.bipartite_merge(x, m, 3), fullgraph=True,
                             dynamic=True)
    for b in (2, 5):
        x, m, _ = inputs(b, 11, 8, 4, 28 + b, torch.float32, torch.float32)
        x.requires_grad_(True)
        a = compiled(x, m)
        e = ops.bipartite_merge(x, m, 3)
        assert all(torch.equal(u, v) for u, v in zip(a, e))
        (ga,) = torch.autograd.grad(a[0].sum(), x)
        (ge,) = torch.autograd.grad(e[0].sum(), x)
        assert torch.equal(ga, ge)


# ---------------------------------------------------------------------------------------------
# Bad input (per-argument shape/dtype/device cases: tests/ops/test_fake_kernels.py)


@pytest.mark.parametrize("r,p,arg,bound", [
    (5, 1, "r", 4), (-1, 1, "r", 4), (4, 3, "r", 3), (4, 2, "r", 3), (1, 9, "r", 0),
    (1, 8, "r", 0), (5, 0, "r", 4), (0, 10, "num_protected", None),
    (0, -1, "num_protected", None)])
def test_bad_values(r, p, arg, bound):
    x, m, s = inputs(2, 9, 4, 3, 29, torch.float32, torch.float32)
    before = snapshot([x, m, s])
    msg = f"fisheradaptune.bipartite_merge: argument '{arg}': expected"
    if bound is not None:
        msg += rf" 0 <= r <= \(N - num_protected\) // 2 = {bound} .*got {r}"
    with pytest.raises(ValueError, match=msg):
        ops.bipartite_merge(x, m, r, num_protected=p, sizes=s)
    with pytest.raises(ValueError, match=msg):
        _ops.bipartite_merge(x, m, s, p, r)
    with pytest.raises(ValueError, match=f"argument '{arg}'"):
        reference.bipartite_merge(x, m, r, num_protected=p, sizes=s)
    assert_unchanged(before, [x, m, s])


# ---------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("n", [197, 577])
def test_cuda_matches_cpu(n):
    for metric, metric_dtype in (("random", torch.float64), ("lattice", torch.float32)):
        x, m, s = inputs(3, n, 40, 64, n, torch.float32, metric_dtype, sizes="floats",
                         metric=metric)
        r = (n - 1) // 4
        a = ops.bipartite_merge(x.cuda(), m.cuda(), r, sizes=s.cuda())
        b_ = ops.bipartite_merge(x, m, r, sizes=s)
        assert torch.equal(a[2].cpu(), b_[2])
        torch.testing.assert_close(a[0].cpu(), b_[0])
        torch.testing.assert_close(a[1].cpu(), b_[1])
        again = ops.bipartite_merge(x.cuda(), m.cuda(), r, sizes=s.cuda())
        assert all(torch.equal(u, v) for u, v in zip(a, again))
        g = torch.randn(a[0].shape, generator=make_generator(30))
        ga = _ops.bipartite_merge_backward(g.cuda(), s.cuda(), a[2])
        gb = _ops.bipartite_merge_backward(g, s, b_[2])
        torch.testing.assert_close(ga.cpu(), gb)


@pytest.mark.parametrize("bad", [2.7, True, "3"])
def test_a_non_int_r_is_refused_not_truncated(bad):
    x, m = torch.randn(1, 9, 4), torch.randn(1, 9, 3)
    with pytest.raises(TypeError, match=r"fisheradaptune.bipartite_merge: argument 'r': expected an int"):
        ops.bipartite_merge(x, m, bad)


# ---------------------------------------------------------------------------------------------
# Note [Merge weights] (csrc/tokens/token_prune_merge.h): a source that weighs something is never
# dropped


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
def test_a_weight_that_underflows_does_not_hide_a_nonfinite_token(device, dtype, bad):
    """Issue 21: sizes [[1e-45, 3e38]] with an inf token merged to 1.0 in float32, bfloat16
    and float16 (its coefficient 1e-45 / 3e38 is 0 in float32); float64 and the reference give
    inf. A nonzero size is a nonzero weight: the bad value propagates, forward and backward."""
    x = torch.tensor([[[bad, 2.0], [1.0, 1.0]]], dtype=dtype, device=device, requires_grad=True)
    m = torch.ones(1, 2, 3, device=device)
    sizes = torch.tensor([[1e-45, 3e38]], device=device)
    out, out_sizes, dest = ops.bipartite_merge(x, m, 1, num_protected=0, sizes=sizes)
    r_out, r_sizes, r_dest = reference.bipartite_merge(x, m, 1, num_protected=0, sizes=sizes)
    assert dest.tolist() == r_dest.tolist() == [[0, 0]]
    assert out.shape == (1, 1, 2)
    if bad != bad:
        assert bool(out.detach()[0, 0, 0].isnan())
    else:
        assert float(out.detach()[0, 0, 0]) == bad  # was 1.0
    assert float(out.detach()[0, 0, 1]) == 1.0     # 2 * 3.3e-84 + 1 * 1
    torch.testing.assert_close(out, r_out, equal_nan=True, **TOL[dtype])
    torch.testing.assert_close(out_sizes, r_sizes)
    # backward: the tiny coefficient times an inf gradient is inf (not 0), as the reference's
    g = torch.tensor([[[float("inf"), 1.0]]], dtype=dtype, device=device)
    (gx,) = torch.autograd.grad(out, x, g)
    (r_gx,) = torch.autograd.grad(r_out, x, g)
    assert float(gx[0, 0, 0]) == float("inf")
    torch.testing.assert_close(gx, r_gx, equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_zero_size_still_hides_a_nonfinite_token(device, dtype):
    """The contrast (Note [Zero coefficients]): a size of exactly 0 weighs nothing."""
    x = torch.tensor([[[float("inf"), 2.0], [1.0, 1.0]]], dtype=dtype, device=device)
    out, _, _ = ops.bipartite_merge(x, torch.ones(1, 2, 3, device=device), 1, num_protected=0,
                                    sizes=torch.tensor([[0.0, 3e38]], device=device))
    assert out[0, 0].tolist() == [1.0, 1.0]
