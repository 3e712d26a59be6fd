#!/usr/bin/env python3
"""Edge cases of every op family, small enough to run under compute-sanitizer.

    python3 tools/gpu_edge_cases.py [--device cuda|cpu] [--only fisher,drift,per_sample,tokens,bipartite,sparse]

Each case runs the op on ``--device`` and compares with the same op on the CPU (or, on the CPU,
with :mod:`fisheradaptune.reference`), so the run checks results as well as memory accesses:
empty lists and tensors, one element, sizes straddling the kernels' block and chunk
(``fisheradaptune.ops._library.BLOCK`` / ``CHUNK``), views whose data pointer is not 16-byte aligned
(the vectorised paths must fall back), non-finite values, and the grid limits (more than 65535
tokens; more chunks than blocks in one launch row). ``tools/gpu_check.sh`` runs it under
memcheck (every family) and racecheck (drift and tokens, the kernels with shared memory).
Prints one line per case; exits 1 if any case disagrees.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Dict, List

import torch

import fisheradaptune
from fisheradaptune import groups, ops, reference
from fisheradaptune.ops._library import BLOCK, CHUNK
EDGE = [0, 1, 7, BLOCK - 1, BLOCK + 1, CHUNK - 1, CHUNK, CHUNK + 1]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _misaligned(n: int, g: torch.Generator, device: str, dtype=torch.float32) -> torch.Tensor:
    """A contiguous view of ``n`` elements starting one element into its storage."""
    return (torch.rand(n + 1, generator=g) + 0.1).to(dtype).to(device)[1:]


def _to_device(tensors, g: torch.Generator, device: str, misaligned: bool):
    """``tensors`` on ``device``; with ``misaligned``, as views one element into their storage."""
    if not misaligned:
        return [t.to(device) for t in tensors]
    out = [_misaligned(t.numel(), g, device).view(t.shape) for t in tensors]
    for d, t in zip(out, tensors):
        d.copy_(t.to(device))
    return out


def _close(a: torch.Tensor, b: torch.Tensor, rtol=1e-5, atol=1e-6) -> None:
    torch.testing.assert_close(a.detach().cpu().to(b.dtype), b.detach().cpu(), rtol=rtol,
                               atol=atol, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# Families: each yields (name, thunk); a thunk raises on disagreement.


def fisher_cases(device: str):
    def run(shapes, seed, misaligned=False, nonfinite=False, grad_dtype=torch.float32):
        g = _gen(seed)
        fis = [torch.rand(s, generator=g) for s in shapes]
        grads = [(torch.randn(s, generator=g) * 3).to(grad_dtype) for s in shapes]
        if nonfinite and grads and grads[0].numel():
            grads[0].view(-1)[::3] = float("nan")
            grads[-1].view(-1)[:1] = float("inf")
        layout = groups.slabs([(f"t{i}", f) for i, f in enumerate(fis)], k=3) if fis else None
        want = [f.clone() for f in fis]
        s_want, n_want = ops.fisher_accumulate_(want, grads, decay=0.9, scale=0.5, layout=layout)
        got = _to_device(fis, g, device, misaligned)
        s_got, n_got = ops.fisher_accumulate_(got, [t.to(device) for t in grads], decay=0.9,
                                              scale=0.5, layout=layout)
        for a, b in zip(got, want):
            _close(a, b, rtol=0, atol=0)          # Note [CPU-identical Fisher update]
        assert int(n_got) == int(n_want), (int(n_got), int(n_want))
        if layout is not None:
            _close(s_got, s_want, rtol=1e-5)

    yield "fisher: empty list", lambda: run([], 0)
    yield "fisher: one element", lambda: run([(1,)], 1)
    yield "fisher: block/chunk edges", lambda: run([(n,) for n in EDGE], 2)
    yield "fisher: misaligned views", lambda: run([(5,), (BLOCK + 3,), (CHUNK + 1,)], 3, True)
    yield "fisher: non-finite grads", lambda: run([(CHUNK + 5,), (9, 7)], 4, nonfinite=True)
    yield "fisher: bf16 grads", lambda: run([(CHUNK - 1,), (33,)], 5, grad_dtype=torch.bfloat16)
    yield "fisher: 300 small tensors", lambda: run([(i % 17,) for i in range(300)], 6)


def drift_cases(device: str):
    def run(shapes, seed, mode, update=None, misaligned=False):
        g = _gen(seed)
        cur = [torch.rand(s, generator=g) for s in shapes]
        ref = [torch.rand(s, generator=g) for s in shapes]
        if cur and cur[0].numel() > 2:
            cur[0].view(-1)[:2] = 0.0
        layout = groups.slabs([(f"t{i}", t) for i, t in enumerate(cur)], k=2)
        r_want = [r.clone() for r in ref]
        want = ops.js_drift(cur, r_want, layout, drift_mode=mode, update_reference=update)
        c_dev = _to_device(cur, g, device, misaligned)
        r_dev = [r.to(device) for r in ref]
        got = ops.js_drift(c_dev, r_dev, layout, drift_mode=mode, update_reference=update)
        _close(got, want, rtol=1e-4, atol=1e-6)
        for a, b in zip(r_dev, r_want):
            _close(a, b, rtol=0, atol=0)           # the EMA is the CPU's, bitwise

    for mode in ("mass", "histogram"):
        yield f"drift {mode}: empty list", lambda m=mode: run([], 0, m)
        yield f"drift {mode}: one element", lambda m=mode: run([(1,)], 1, m)
        yield f"drift {mode}: chunk edges + update", lambda m=mode: run(
            [(n,) for n in EDGE if n], 2, m, update=0.3)
        yield f"drift {mode}: misaligned", lambda m=mode: run([(CHUNK + 3,), (5, 9)], 3, m,
                                                             misaligned=True)

    def tiny_range():
        x = torch.full((2000,), 10.0)
        layout = groups.per_tensor([("w", x)])
        got = ops.js_drift([x.to(device)], [x.to(device)], layout, drift_mode="histogram",
                           min_log_range=1e-17)
        assert torch.isfinite(got).all(), got
    yield "drift histogram: range below an ulp", tiny_range

    def tiny_totals():
        # Note [Tiny totals]: totals handed to js_mass_partial below ~5.6e-309 made 1 / total
        # inf (NaN partials); float32 state cannot sum to one, so they come from the caller.
        cur = [torch.tensor([1e-40, 2e-40, 0.0, 5e-41, 3e-40, 1e-41])]
        ref = [torch.tensor([3e-40, 1e-41, 1e-40, 0.0, 2e-40, 2e-40])]
        layout = groups.GroupLayout(("a",), ((6,),), ("g0", "g1"),
                                    torch.tensor([[0, 0, 4, 0], [0, 4, 6, 1]]))
        totals = torch.tensor([[1e-320, 4e-310], [5e-324, 1e-300]], dtype=torch.float64)
        want = reference.js_mass_partial(cur, ref, layout, totals)
        got = ops.js_mass_partial([t.to(device) for t in cur], [t.to(device) for t in ref],
                                  layout, totals.to(device))
        assert bool(torch.isfinite(got).all()), got
        _close(got, want, rtol=1e-9, atol=0)
    yield "drift mass: subnormal totals (js_mass_partial)", tiny_totals

    def bins_bound():
        x = [torch.rand(8, device=device)]
        layout = groups.per_tensor([("w", x[0])])
        for bins in (2 ** 30 + 1, 2 ** 31):
            try:
                ops.js_drift(x, [t.clone() for t in x], layout, drift_mode="histogram", bins=bins)
            except ValueError as e:
                assert "argument 'bins': expected 2 <= bins <= 2^30" in str(e), e
                continue
            raise AssertionError(f"bins={bins} accepted")
    yield "drift histogram: bins above 2^30 refused", bins_bound


def per_sample_cases(device: str):
    def run(n, t, o, i, seed, nonfinite=False):
        g = _gen(seed)
        x = torch.randn(n, t, i, generator=g)
        go = torch.randn(n, t, o, generator=g)
        if nonfinite and x.numel():
            x[0, 0, 0] = float("nan")
        want = torch.zeros(o, i, dtype=torch.float64)
        ops.per_sample_grad_sq_(want, x.double(), go.double())
        got = torch.zeros(o, i, device=device)
        ops.per_sample_grad_sq_(got, x.to(device), go.to(device))
        _close(got, want.float(), rtol=1e-4, atol=1e-5)

    yield "per_sample: one sample, one token", lambda: run(1, 1, 1, 1, 0)
    yield "per_sample: empty batch", lambda: run(0, 3, 4, 5, 1)
    yield "per_sample: odd sizes", lambda: run(7, 5, 33, 65, 2)


def token_cases(device: str):
    def run(b, n, c, keep, seed, dtype=torch.float32, p=1, with_sizes=True):
        g = _gen(seed)
        x = torch.randn(b, n, c, generator=g).to(dtype)
        s = torch.randn(b, n - p, generator=g).to(dtype)
        sizes = torch.rand(b, n, generator=g) + 0.5 if with_sizes else None
        go = torch.randn(b, p + keep + (1 if keep < n - p else 0), c, generator=g).to(dtype)
        results = []
        for dev in ("cpu", device):
            xd = x.to(dev).requires_grad_()
            sd = s.to(dev).requires_grad_()
            out, kept, osz = ops.token_prune_merge(xd, sd, keep, num_protected=p,
                                                   sizes=None if sizes is None else sizes.to(dev))
            gx, gs = torch.autograd.grad(out, (xd, sd), go.to(dev))
            results.append((out, kept, osz, gx, gs))
        (o1, k1, z1, gx1, gs1), (o2, k2, z2, gx2, gs2) = results
        assert torch.equal(k1, k2.cpu())
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        for a, b_ in ((o2, o1), (z2, z1), (gx2, gx1), (gs2, gs1)):
            _close(a, b_, **tol)

    yield "tokens: empty batch", lambda: run(0, 5, 4, 2, 0)
    yield "tokens: keep 0", lambda: run(2, 5, 4, 0, 1)
    yield "tokens: keep all", lambda: run(2, 5, 4, 4, 2)
    yield "tokens: odd channels bf16", lambda: run(3, 17, 13, 6, 3, torch.bfloat16)
    yield "tokens: misaligned channels", lambda: run(2, 9, 3, 4, 4)
    yield "tokens: 70000 tokens (grid-stride)", lambda: run(1, 70_000, 8, 10, 5, with_sizes=False)

    def tiny_weights(dtype, normalize, scores, sizes, x_rows):
        # Note [Merge weights]: weights in float64, so that a coefficient that underflows in
        # float32 neither hides an inf token nor turns a fuse into zeros; against the reference.
        x = torch.tensor([x_rows], dtype=dtype, device=device, requires_grad=True)
        s = torch.tensor(scores, device=device, requires_grad=True)
        z = torch.tensor(sizes, device=device)
        out, _, _ = ops.token_prune_merge(x, s, 0, num_protected=0, sizes=z, normalize=normalize)
        r_out, _, _ = reference.token_prune_merge(x, s, 0, num_protected=0, sizes=z,
                                                  normalize=normalize)
        g = torch.full_like(out, float("inf"))
        g[..., 1:] = 1.0
        gx, gs = torch.autograd.grad(out, (x, s), g)
        r_gx, r_gs = torch.autograd.grad(r_out, (x, s), g)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        for a, b_ in ((out, r_out), (gx, r_gx), (gs, r_gs)):
            _close(a, b_.to(a.dtype), **tol)

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).split(".")[1]
        for normalize in (True, False):
            yield f"tokens: inf token, weight underflows ({name}, normalize={normalize})", \
                lambda d=dtype, n=normalize: tiny_weights(
                    d, n, [[1.0, 1.0]], [[1e-45, 3e38]], [[float("inf"), 2.0], [1.0, 1.0]])
        yield f"tokens: W outside float32's range ({name})", lambda d=dtype: tiny_weights(
            d, True, [[1.0, 1.0, 3.0]], [[3e38, 3e38, 3e38]], [[1.0, 1.0], [3.0, 3.0], [5.0, 5.0]])

    def fused_size_in_float64():
        # the fused token's size is summed in float64 on both backends, as in the reference:
        # 3e38 + 3e38 - 3e38 is 3e38, not inf
        x = torch.ones(1, 4, 2, device=device)
        z = torch.tensor([[1.0, 3e38, 3e38, -3e38]], device=device)
        _, _, out_sizes = ops.token_prune_merge(x, torch.ones(1, 3, device=device), 0, sizes=z)
        _, _, want = reference.token_prune_merge(x.cpu(), torch.ones(1, 3), 0, sizes=z.cpu())
        _close(out_sizes, want, rtol=1e-6, atol=0)
    yield "tokens: fused size summed in float64", fused_size_in_float64


def bipartite_cases(device: str):
    def run(b, n, c, d, r, seed, dtype=torch.float32, p=1, with_sizes=True, metric=None):
        g = _gen(seed)
        x = torch.randn(b, n, c, generator=g).to(dtype)
        m = torch.randn(b, n, d, generator=g) if metric is None else metric(g, b, n, d)
        sizes = torch.randint(1, 4, (b, n), generator=g).float() if with_sizes else None
        go = torch.randn(b, n - r, c, generator=g).to(dtype)
        results = []
        for dev in ("cpu", device):
            xd = x.to(dev).requires_grad_()
            out, osz, dest = ops.bipartite_merge(xd, m.to(dev), r, num_protected=p,
                                                 sizes=None if sizes is None else sizes.to(dev))
            (gx,) = torch.autograd.grad(out, (xd,), go.to(dev))
            results.append((out, osz, dest, gx))
        (o1, z1, d1, g1), (o2, z2, d2, g2) = results
        assert torch.equal(d1, d2.cpu()), "dest_index differs from the CPU's"
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        for a, b_ in ((o2, o1), (z2, z1), (g2, g1)):
            _close(a, b_, **tol)

    def nan_rows(g, b, n, d):
        m = torch.randn(b, n, d, generator=g)
        m[:, 2::5] = float("nan")
        return m

    def backward_out_of_range():
        dest = torch.tensor([[0, 1, 2, 7]], device=device)  # 7 is no out row of 3
        gx = torch.ops.fisheradaptune.bipartite_merge_backward(
            torch.ones(1, 3, 4, device=device), None, dest)
        assert bool((gx[0, 3] == 0).all()) and bool((gx[0, :3] == 1).all())

    yield "bipartite: empty batch", lambda: run(0, 9, 4, 3, 2, 0)
    yield "bipartite: r 0", lambda: run(2, 9, 4, 3, 0, 1)
    yield "bipartite: r max, odd N - P", lambda: run(2, 10, 4, 3, 4, 2)
    yield "bipartite: D 0 (all ties)", lambda: run(2, 9, 5, 0, 3, 3)
    yield "bipartite: NaN metric rows", lambda: run(2, 21, 6, 4, 5, 4, metric=nan_rows)
    yield "bipartite: odd channels bf16", lambda: run(3, 17, 13, 8, 6, 5, torch.bfloat16)
    yield "bipartite: ViT-B shape", lambda: run(4, 197, 768, 64, 16, 6, p=1)
    yield "bipartite: 9000 tokens (|A| > 4096)", lambda: run(1, 9001, 8, 4, 100, 7)
    yield "bipartite: 600 batch rows, 520 A tokens", lambda: run(600, 1041, 2, 2, 8, 8,
                                                                    with_sizes=False)

    def tiny_coefficient(dtype, bad):
        # Note [Merge weights]: 1e-45 / 3e38 is 0 in float32; the bad token must still show
        x = torch.tensor([[[bad, 2.0], [1.0, 1.0]]], dtype=dtype, device=device,
                         requires_grad=True)
        m, z = torch.ones(1, 2, 3, device=device), torch.tensor([[1e-45, 3e38]], device=device)
        out, _, _ = ops.bipartite_merge(x, m, 1, num_protected=0, sizes=z)
        r_out, _, _ = reference.bipartite_merge(x, m, 1, num_protected=0, sizes=z)
        g = torch.tensor([[[float("inf"), 1.0]]], dtype=dtype, device=device)
        (gx,) = torch.autograd.grad(out, x, g)
        (r_gx,) = torch.autograd.grad(r_out, x, g)
        for a, b_ in ((out, r_out), (gx, r_gx)):
            _close(a, b_.to(a.dtype), rtol=2e-2, atol=2e-2)

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for bad in (float("inf"), float("nan")):
            yield (f"bipartite: {bad} token, coefficient underflows "
                   f"({str(dtype).split('.')[1]})"), lambda d=dtype, v=bad: tiny_coefficient(d, v)
    if device != "cpu":
        yield "bipartite: backward out-of-range dest", backward_out_of_range


def sparse_cases(device: str):
    def run(t, o, i, c, seed, bad=False):
        g = _gen(seed)
        go = torch.randn(t, o, generator=g)
        x = torch.randn(t, i, generator=g)
        idx = torch.stack([torch.randperm(i, generator=g)[:c] for _ in range(o)]) if o and i \
            else torch.zeros(o, c, dtype=torch.int64)
        if bad:
            idx[0, 0] = i
            try:
                ops.sampled_grad(go.to(device), x.to(device), idx.to(device))
            except ValueError:
                return
            raise AssertionError("out-of-range index accepted")
        got = ops.sampled_grad(go.to(device), x.to(device), idx.to(device))
        _close(got, reference.sampled_grad(go, x, idx), rtol=1e-4, atol=1e-5)

    yield "sparse: tokens 0", lambda: run(0, 4, 6, 2, 0)
    yield "sparse: one element", lambda: run(1, 1, 1, 1, 1)
    yield "sparse: odd sizes", lambda: run(197, 33, 65, 7, 2)
    yield "sparse: out-of-range index refused", lambda: run(5, 3, 6, 2, 3, bad=True)


FAMILIES: Dict[str, Callable] = {"fisher": fisher_cases, "drift": drift_cases,
                                 "per_sample": per_sample_cases, "tokens": token_cases,
                                 "bipartite": bipartite_cases, "sparse": sparse_cases}


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", default=",".join(FAMILIES),
                    help=f"comma-separated families from {','.join(FAMILIES)}")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        ap.error(f"--only: unknown families {unknown}; expected some of {list(FAMILIES)}")
    if args.device.startswith("cuda") and not fisheradaptune.has_cuda_kernels():
        ap.error("--device cuda: fisheradaptune was built without CUDA kernels")
    failed = 0
    for fam in names:
        for name, thunk in FAMILIES[fam](args.device):
            t0 = time.perf_counter()
            try:
                thunk()
                status = "ok"
            except Exception as e:  # report every case, then fail
                failed += 1
                status = f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            print(f"{name:45s} {time.perf_counter() - t0:7.2f} s  {status}", flush=True)
    print(f"{failed} failed" if failed else "all cases ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
