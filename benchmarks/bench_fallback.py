#!/usr/bin/env python3
"""What the pure-PyTorch fallback costs: every op, compiled kernel vs fallback kernel, on the
shapes of the other benchmarks.

    python benchmarks/bench_fallback.py [--device cpu|cuda] [--iters N] [--quick]

Per op, one representative call, timed the same way for both implementations (interleaved, in
the same run): the compiled kernel (``torch.ops.fisheradaptune.<op>``, when the compiled
library is loaded) and the family's fallback kernel (``fisheradaptune.ops.<family>
.FALLBACK_KERNELS[<op>]``, the function registered under ``FISHERADAPTUNE_FALLBACK=1``), both
called below the autograd and in-place layers (the Python kernels above them are the same for
both). ``slowdown`` = fallback ms / compiled ms. ``max_abs_diff``: the largest difference of
the first outputs (out-of-place ops) or of the written tensors (in-place ops), after one call
of each on the same inputs.

Shapes: ``fisher_accumulate_`` and the drift ops on ViT-S's parameter list with
``groups.slabs(k=4)`` (bench_fisher.py); ``per_sample_grad_sq_`` on ViT-S's fc1 (384 -> 1536),
8 samples of 197 tokens; the token ops on ViT-S activations, B=8, N=197, C=384 (bench_tokens.py,
keep 138; bench_tome.py, r=16, metric D=64); ``sampled_grad`` on ViT-B's fc1 (768 -> 3072) at
0.5 % density with 8 x 197 tokens (bench_selection.py). ``--quick``: 2 ViT blocks, fewer
samples and iterations (results ``bench_fallback-quick-*``, git-ignored).

Results: ``benchmarks/results/bench_fallback-<cpu|cuda>.{json,md}``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch

import fisheradaptune
from fisheradaptune import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_fisher import layout_for, vit_param_shapes  # noqa: E402
from bench_selection import random_index  # noqa: E402
from common import announce, environment, print_table, timeit, write_results  # noqa: E402

_ops = torch.ops.fisheradaptune
FAMILY_OF = {name: family for family in ops.FAMILIES
             for name in getattr(family, "FALLBACK_KERNELS", {})}


def _vit_lists(device, quick):
    named = vit_param_shapes(384, 2 if quick else 12, 6, 1536)
    layout = layout_for(named)
    g = torch.Generator().manual_seed(0)
    shapes = [s for _, s in named]
    a = [torch.rand(s, generator=g).mul_(1e-4).to(device) for s in shapes]
    b = [torch.rand(s, generator=g).mul_(1e-4).to(device) for s in shapes]
    grads = [torch.randn(s, generator=g).mul_(1e-2).to(device) for s in shapes]
    return a, b, grads, layout, f"ViT-S {'2' if quick else '12'} blocks, " \
        f"{sum(t.numel() for t in a) / 1e6:.1f}M params, {layout.num_groups} groups"


def _tokens(device, quick):
    g = torch.Generator().manual_seed(1)
    b, n, c = 8, 197, 384
    x = torch.randn(b, n, c, generator=g).to(device)
    scores = torch.rand(b, n - 1, generator=g).to(device)
    sizes = torch.randint(1, 4, (b, n), generator=g).float().to(device)
    metric = torch.randn(b, n, 64, generator=g).to(device)
    return x, scores, sizes, metric


def cases(device, quick) -> List[Tuple[str, str, Callable[[], tuple]]]:
    """(op, shape description, make() -> the op's arguments in schema order)."""
    out = []
    a, b, grads, layout, vit = _vit_lists(device, quick)
    segs = layout.segments
    out.append(("fisher_accumulate_", vit + ", fp32 grads", lambda: (
        [t.clone() for t in a], grads, 0.9, 0.1, segs,
        torch.empty(layout.num_groups, device=device),
        torch.zeros((), dtype=torch.int64, device=device))))
    n_samples, t = (4, 16) if quick else (8, 197)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n_samples, t, 384, generator=g).to(device)
    go = torch.randn(n_samples, t, 1536, generator=g).to(device)
    out.append(("per_sample_grad_sq_", f"fc1 384->1536, N={n_samples}, T={t}", lambda: (
        torch.zeros(1536, 384, device=device), x, go, 1.0 / n_samples,
        torch.zeros((), dtype=torch.int64, device=device))))
    for mode in ("mass", "histogram"):
        out.append(("js_drift", f"{vit}, {mode}", lambda mode=mode: (
            a, b, segs, layout.num_groups, mode, 64, 0.01, 0.99, 1e-3, False, None)))
    out.append(("js_mass_totals", vit, lambda: (a, b, segs, layout.num_groups)))
    totals_holder: Dict[str, torch.Tensor] = {}

    def mass_partial():
        if "t" not in totals_holder:
            cur = [t.to(torch.float64) for t in a]
            ref = [t.to(torch.float64) for t in b]
            tot = torch.zeros(2, layout.num_groups, dtype=torch.float64)
            for (ti, lo, hi, grp) in segs.tolist():
                tot[0, grp] += cur[ti].reshape(-1)[lo:hi].abs().sum().cpu()
                tot[1, grp] += ref[ti].reshape(-1)[lo:hi].abs().sum().cpu()
            totals_holder["t"] = tot.to(device)
        return (a, b, segs, layout.num_groups, totals_holder["t"], None)
    out.append(("js_mass_partial", vit, mass_partial))
    xt, scores, sizes, metric = _tokens(device, quick)
    keep = math.ceil(0.7 * 196)
    tok = "B=8, N=197, C=384"
    out.append(("token_prune_merge", f"{tok}, keep {keep}",
                lambda: (xt, scores, sizes, 1, keep, True)))

    def prune_backward():
        fwd = _reference_call("token_prune_merge", (xt, scores, sizes, 1, keep, True))
        return (_seeded_like(fwd[0]), xt, scores, sizes, fwd[1], 1, True)
    out.append(("token_prune_merge_backward", f"{tok}, keep {keep}", prune_backward))
    out.append(("bipartite_merge", f"{tok}, D=64, r=16",
                lambda: (xt, metric, sizes, 1, 16)))

    def bipartite_backward():
        fwd = _reference_call("bipartite_merge", (xt, metric, sizes, 1, 16))
        return (_seeded_like(fwd[0]), sizes, fwd[2])
    out.append(("bipartite_merge_backward", f"{tok}, D=64, r=16", bipartite_backward))
    tokens = 8 * 197
    c = max(1, round(0.005 * 768))
    g = torch.Generator().manual_seed(3)
    go2 = torch.randn(tokens, 3072, generator=g).to(device)
    x2 = torch.randn(tokens, 768, generator=g).to(device)
    idx = random_index(3072, 768, c, device, g)
    out.append(("sampled_grad", f"fc1 768->3072, T={tokens}, C={c}", lambda: (go2, x2, idx)))
    return out


def _seeded_like(t: torch.Tensor) -> torch.Tensor:
    """The same random gradient at every call: the agreement check compares the two kernels
    on fresh but equal inputs."""
    g = torch.Generator().manual_seed(5)
    return torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)


def _compiled_available(device) -> bool:
    return fisheradaptune.has_compiled_ops() and (
        torch.device(device).type == "cpu" or fisheradaptune.has_cuda_kernels())


def _reference_call(op, args):
    """Outputs to build a backward's inputs: the compiled op when loaded, else the fallback."""
    with torch._C._AutoDispatchBelowADInplaceOrView():
        return getattr(_ops, op).default(*args)


def _written(op, args, result):
    """What to compare: the first output, or the first written tensor(s)."""
    if op == "fisher_accumulate_":
        return torch.cat([t.reshape(-1) for t in args[0]] + [args[5], args[6].reshape(1).double()])
    if op == "per_sample_grad_sq_":
        return args[0]
    return result[0] if isinstance(result, (tuple, list)) else result


def run_case(op, shape, make, device, args) -> dict:
    row = {"op": op, "shape": shape}
    family = FAMILY_OF.get(op)
    fallback = family.FALLBACK_KERNELS[op] if family is not None else None
    compiled = getattr(_ops, op).default if _compiled_available(device) else None
    below = torch._C._AutoDispatchBelowADInplaceOrView
    inputs = make()
    fns = {}
    if compiled is not None:
        def run_compiled():
            with below():
                return compiled(*inputs)
        fns["compiled"] = run_compiled
    if fallback is not None:
        def run_fallback():
            with below():
                return fallback(*inputs)
        fns["fallback"] = run_fallback
    if len(fns) == 2:  # agreement, on fresh inputs for each
        got = {}
        for name in ("compiled", "fallback"):
            fresh = make()
            with below():
                res = (compiled if name == "compiled" else fallback)(*fresh)
            got[name] = _written(op, fresh, res).double()
        row["max_abs_diff"] = float((got["compiled"] - got["fallback"]).abs().max()) \
            if got["compiled"].numel() else 0.0
    timings = {}
    for rep in range(2):  # interleaved, the best median of two rounds each
        for name, fn in fns.items():
            t = timeit(fn, warmup=args.warmup if rep == 0 else 0, iters=args.iters,
                       device=device, max_seconds=args.max_seconds)
            if name not in timings or t.median_ms < timings[name].median_ms:
                timings[name] = t
    for name in ("compiled", "fallback"):
        if name in timings:
            row[f"{name}_ms"] = timings[name].median_ms
            row[f"{name}_iqr_ms"] = timings[name].iqr_ms
            if timings[name].cpu_ms is not None:
                row[f"{name}_cpu_ms"] = timings[name].cpu_ms
        else:
            row[f"{name}_ms"] = None
    if "compiled" in timings and "fallback" in timings:
        row["slowdown"] = timings["fallback"].median_ms / timings["compiled"].median_ms
    if fallback is None:
        row["note"] = "no fallback kernel in this build"
    elif compiled is None:
        row["note"] = "compiled kernel not loaded"
    return row


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="2 ViT blocks, few iterations")
    ap.add_argument("--ops", default=None, help="comma-separated op names (default: all)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.iters = args.iters or (3 if args.quick else 20 if cuda else 7)
    args.warmup = 1 if args.quick else (5 if cuda else 2)
    args.max_seconds = None if cuda else (1.0 if args.quick else 4.0)
    env = environment(device)
    env["has_compiled_ops"] = fisheradaptune.has_compiled_ops()
    announce(env, device)
    wanted = set(args.ops.split(",")) if args.ops else None
    rows = []
    for op, shape, make in cases(device, args.quick):
        if wanted is not None and op not in wanted:
            continue
        row = run_case(op, shape, make, device, args)
        print(f"  {op:28s} {shape:50s} compiled {row.get('compiled_ms')} ms, "
              f"fallback {row.get('fallback_ms')} ms", flush=True)
        rows.append(row)
    cols = ["op", "shape", "compiled_ms", "fallback_ms", "slowdown", "max_abs_diff",
            "compiled_cpu_ms", "fallback_cpu_ms", "note"]
    print_table(rows, cols, title="compiled vs pure-PyTorch fallback")
    notes = [
        "compiled: torch.ops.fisheradaptune.<op>.default (the C++ kernel); fallback: the "
        "family's FALLBACK_KERNELS[<op>] (what FISHERADAPTUNE_FALLBACK=1 or a missing compiled "
        "library registers); both called below the autograd / ADInplaceOrView layers.",
        "slowdown = fallback ms / compiled ms; ms are medians (best of two interleaved rounds).",
        "max_abs_diff: largest difference of the first outputs (in-place ops: the written "
        "tensors) after one call of each on the same fresh inputs.",
    ]
    paths = write_results("bench_fallback" + ("-quick" if args.quick else ""), rows, env,
                          notes=notes, columns={"results": cols})
    print(f"wrote {paths['json']} and {paths['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
