#!/usr/bin/env python3
"""Benchmark of fisheradaptune's Fisher ops on ViT-shaped parameter lists.

    python benchmarks/bench_fisher.py [--device cpu|cuda] [--models vit_s,vit_b] [--iters N]
                                      [--quick] [--no-thread-sweep]

1. ``fisher_accumulate_`` (``F = decay*F + scale*g*g`` plus per-group sums of the new ``F``)
   with float32 and bfloat16 gradients: the fused op against eager PyTorch baselines in the
   same run: a per-parameter Python loop and ``torch._foreach_*``, each with per-group sums (what
   the fused op computes) and with per-tensor sums (less work, a lower bound for a baseline).
2. ``js_drift`` in ``mass`` and ``histogram`` modes against a NumPy host implementation of
   docs/methods.md section 3 (the device-to-host copy included when on CUDA), with the max abs
   difference.

Parameter lists are built from the timm VisionTransformer naming (no timm needed); the group
layout is ``fisheradaptune.groups.slabs`` (k=4, fused qkv split). Results are written to
``benchmarks/results/bench_fisher-<cpu|cuda>.{json,md}`` (``bench_fisher-quick-*`` with
``--quick``, git-ignored). Targets are printed, not asserted.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import fisheradaptune
from fisheradaptune import groups, ops

from common import (d2d_copy_bandwidth, environment, print_table, timeit,  # noqa: E402
                    write_results)

DECAY, SCALE = 0.9, 0.1

# name: (embed, depth, heads, mlp hidden); patch 16, 224 px, 1000 classes.
MODELS: Dict[str, Tuple[int, int, int, int]] = {
    "vit_s": (384, 12, 6, 1536),
    "vit_b": (768, 12, 12, 3072),
}

# What each fisher_accumulate_ variant does (printed and written to the results).
VARIANTS = {
    "fused": "fisheradaptune.ops.fisher_accumulate_(F, G, decay, scale, layout): one pass, "
             "per-group sums, non-finite elements skipped and counted",
    "loop+group_sum": "per-parameter Python loop: f.mul_(decay); f.addcmul_(g, g, value=scale); "
                      "then .sum() of each of f's group slices (views prebuilt once)",
    "loop+tensor_sum": "per-parameter Python loop as above, then f.sum() per tensor",
    "foreach+group_sum": "torch._foreach_mul_ + torch._foreach_addcmul_, then .sum() of every "
                         "group slice",
    "foreach+group_l1": "torch._foreach_mul_ + torch._foreach_addcmul_, then "
                        "torch._foreach_norm(group slices, 1): an L1 norm, which equals the "
                        "sum because the Fisher is non-negative",
    "foreach+tensor_sum": "torch._foreach_mul_ + torch._foreach_addcmul_, then .sum() per tensor",
    "foreach_mixed+group_l1": "bf16 only: as foreach+group_l1 but _foreach_addcmul_ is given the "
                              "bf16 grads directly (mixed-dtype, no materialised upcast)",
}


# ---------------------------------------------------------------------------------------------
# Parameter lists


def vit_param_shapes(embed: int, depth: int, heads: int, mlp: int, *, patch: int = 16,
                     img: int = 224, in_chans: int = 3,
                     num_classes: int = 1000) -> List[Tuple[str, Tuple[int, ...]]]:
    """(name, shape) of a timm ``VisionTransformer``'s parameters, in ``named_parameters`` order."""
    if embed % heads:
        raise ValueError(f"embed {embed} is not divisible by heads {heads}")
    tokens = (img // patch) ** 2 + 1  # patches + cls token
    out: List[Tuple[str, Tuple[int, ...]]] = [
        ("cls_token", (1, 1, embed)),
        ("pos_embed", (1, tokens, embed)),
        ("patch_embed.proj.weight", (embed, in_chans, patch, patch)),
        ("patch_embed.proj.bias", (embed,)),
    ]
    for i in range(depth):
        p = f"blocks.{i}."
        out += [
            (p + "norm1.weight", (embed,)), (p + "norm1.bias", (embed,)),
            (p + "attn.qkv.weight", (3 * embed, embed)), (p + "attn.qkv.bias", (3 * embed,)),
            (p + "attn.proj.weight", (embed, embed)), (p + "attn.proj.bias", (embed,)),
            (p + "norm2.weight", (embed,)), (p + "norm2.bias", (embed,)),
            (p + "mlp.fc1.weight", (mlp, embed)), (p + "mlp.fc1.bias", (mlp,)),
            (p + "mlp.fc2.weight", (embed, mlp)), (p + "mlp.fc2.bias", (embed,)),
        ]
    out += [("norm.weight", (embed,)), ("norm.bias", (embed,)),
            ("head.weight", (num_classes, embed)), ("head.bias", (num_classes,))]
    return out


def layout_for(named_shapes: Sequence[Tuple[str, Tuple[int, ...]]]) -> groups.GroupLayout:
    # Meta tensors: the layout only needs names and shapes.
    return groups.slabs([(n, torch.empty(s, device="meta")) for n, s in named_shapes], k=4,
                        split_qkv=True)


# ---------------------------------------------------------------------------------------------
# fisher_accumulate_


def make_variants(F: List[torch.Tensor], G: List[torch.Tensor],
                  layout: groups.GroupLayout) -> Dict[str, Callable[[], object]]:
    """Closures over (F, G) for every variant. Each returns its sums; all mutate F in place."""
    device = F[0].device
    num_groups = layout.num_groups
    rows = sorted(layout.segments.tolist())  # (tensor, begin, end, group), tensor-major
    flat = [f.view(-1) for f in F]
    slices = [flat[t][b:e] for t, b, e, _ in rows]
    slices_by_tensor: List[List[torch.Tensor]] = [[] for _ in F]
    for (t, _, _, _), s in zip(rows, slices):
        slices_by_tensor[t].append(s)
    gid = torch.tensor([g for *_, g in rows], dtype=torch.int64, device=device)
    upcast = G[0].dtype != torch.float32

    def to_groups(parts: Sequence[torch.Tensor]) -> torch.Tensor:
        # One segment per group for slabs, but index_add_ keeps this right for any layout.
        return torch.zeros(num_groups, device=device).index_add_(0, gid, torch.stack(parts))

    def fused():
        return ops.fisher_accumulate_(F, G, decay=DECAY, scale=SCALE, layout=layout)[0]

    def loop(group_sums: bool):
        def run():
            parts = []
            for f, g, sl in zip(F, G, slices_by_tensor):
                if upcast:
                    g = g.float()
                f.mul_(DECAY)
                f.addcmul_(g, g, value=SCALE)
                if group_sums:
                    parts.extend(s.sum() for s in sl)
                else:
                    parts.append(f.sum())
            return to_groups(parts) if group_sums else torch.stack(parts)
        return run

    def foreach(sums: str, mixed: bool = False):
        def run():
            Gx = [g.float() for g in G] if upcast and not mixed else G
            torch._foreach_mul_(F, DECAY)
            torch._foreach_addcmul_(F, Gx, Gx, value=SCALE)
            if sums == "group_sum":
                return to_groups([s.sum() for s in slices])
            if sums == "group_l1":
                return to_groups(torch._foreach_norm(slices, 1))
            return torch.stack([f.sum() for f in F])
        return run

    out = {
        "fused": fused,
        "loop+group_sum": loop(True),
        "loop+tensor_sum": loop(False),
        "foreach+group_sum": foreach("group_sum"),
        "foreach+group_l1": foreach("group_l1"),
        "foreach+tensor_sum": foreach("tensor_sum"),
    }
    if upcast:
        out["foreach_mixed+group_l1"] = foreach("group_l1", mixed=True)
    return out


def check_fisher(F: List[torch.Tensor], G: List[torch.Tensor],
                 layout: groups.GroupLayout) -> Dict[str, float]:
    """One step of the fused op and of the loop baseline on copies of F: relative differences."""
    F1 = [f.clone() for f in F]
    F2 = [f.clone() for f in F]
    s1 = make_variants(F1, G, layout)["fused"]()
    s2 = make_variants(F2, G, layout)["loop+group_sum"]()
    dF = max(float(((a - b).abs() / b.abs().clamp_min(1e-30)).max()) for a, b in zip(F1, F2))
    dS = float(((s1 - s2).abs() / s2.abs().clamp_min(1e-30)).max())
    del F1, F2
    return {"fisher_max_rel_diff": dF, "group_sums_max_rel_diff": dS}


def bench_fisher(model: str, named_shapes, layout, device: torch.device, gdtype: torch.dtype,
                 args, copy_bw: float) -> Tuple[List[dict], dict]:
    torch.manual_seed(0)
    shapes = [s for _, s in named_shapes]
    F = [torch.rand(s, device=device).mul_(1e-4) for s in shapes]
    G = [torch.randn(s, device=device).mul_(1e-2).to(gdtype) for s in shapes]
    numel = sum(f.numel() for f in F)
    nbytes = numel * (4 + 4 + G[0].element_size())  # Fisher read + write, grad read
    cuda = device.type == "cuda"
    gname = {torch.float32: "fp32", torch.bfloat16: "bf16"}[gdtype]
    variants = make_variants(F, G, layout)
    if cuda and not fisheradaptune.has_cuda_kernels():
        print("  (this build has no CUDA kernels: the fused op is skipped on CUDA)")
        variants.pop("fused")

    def row(name, t, threads):
        gbps = nbytes / (t.median_ms * 1e-3) / 1e9
        return {"table": "fisher_accumulate_", "model": model, "grads": gname, "variant": name,
                "sums": ("group" if "group" in name or name == "fused" else "tensor"),
                "threads": threads, "ms": t.median_ms, "iqr_ms": t.iqr_ms, "iters": t.iters,
                "cpu_ms": t.cpu_ms, "GB/s": gbps, "copy_frac": gbps / (copy_bw / 1e9),
                "fused_speedup": None, "cpu_speedup": None}

    rows: List[dict] = []
    threads = torch.get_num_threads()
    for name, fn in variants.items():
        t = timeit(fn, warmup=args.warmup, iters=args.iters, device=device,
                   max_seconds=args.max_seconds)
        rows.append(row(name, t, threads if not cuda else None))
    if not cuda and args.thread_sweep and threads > 1:
        # Every variant again on one thread: shows how each scales, and stays meaningful when
        # other processes share the cores (OpenMP regions then wait for a descheduled thread).
        torch.set_num_threads(1)
        try:
            for name, fn in variants.items():
                t = timeit(fn, warmup=args.warmup, iters=args.iters, device=device,
                           max_seconds=args.max_seconds)
                rows.append(row(name, t, 1))
        finally:
            torch.set_num_threads(threads)
    # Speed-up of the fused op over each variant, at the same thread count.
    fused = {r["threads"]: r for r in rows if r["variant"] == "fused"}
    for r in rows:
        f = fused.get(r["threads"])
        if f is not None:
            r["fused_speedup"] = r["ms"] / f["ms"]
            if r["cpu_ms"] is not None and f["cpu_ms"]:
                r["cpu_speedup"] = r["cpu_ms"] / f["cpu_ms"]
    check = {"model": model, "grads": gname}
    if "fused" in variants:
        check.update(check_fisher(F, G, layout))
    del F, G, variants
    gc.collect()
    return rows, check


# ---------------------------------------------------------------------------------------------
# js_drift


def numpy_js(p: np.ndarray, q: np.ndarray) -> float:
    """JS distance (natural log) of two probability vectors; 0 log 0 = 0."""
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        kp = np.where(p > 0, p * np.log(p / m), 0.0).sum()
        kq = np.where(q > 0, q * np.log(q / m), 0.0).sum()
    return math.sqrt(max(0.5 * (kp + kq), 0.0))


def numpy_js_drift(current: Sequence[torch.Tensor], reference: Sequence[torch.Tensor],
                   seg_rows: Sequence[Sequence[int]], num_groups: int, mode: str, *,
                   bins: int = 64, lower_q: float = 0.01, upper_q: float = 0.99,
                   min_log_range: float = 1e-3) -> np.ndarray:
    """docs/methods.md section 3 on the host in NumPy (float64), with the copy off the device."""
    cur = [t.detach().cpu().numpy().reshape(-1) for t in current]
    ref = [t.detach().cpu().numpy().reshape(-1) for t in reference]
    by_group: List[List[Tuple[int, int, int]]] = [[] for _ in range(num_groups)]
    for t, b, e, g in seg_rows:
        by_group[g].append((t, b, e))

    def gather(host, segs):
        parts = [host[t][b:e] for t, b, e in segs]
        v = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return np.abs(v.astype(np.float64))

    out = np.zeros(num_groups)
    for g, segs in enumerate(by_group):
        if not segs:
            continue
        c, r = gather(cur, segs), gather(ref, segs)
        sc, sr = c.sum(), r.sum()
        if not (sc > 0 and sr > 0):
            continue
        if mode == "mass":
            out[g] = numpy_js(c / sc, r / sr)
            continue
        lc, lr = np.log10(c + 1e-12), np.log10(r + 1e-12)
        lo, hi = np.quantile(np.concatenate([lc, lr]), [lower_q, upper_q])
        if hi - lo < min_log_range:
            hi = lo + min_log_range
        hc = np.histogram(lc, bins=bins, range=(lo, hi))[0] + 1e-12
        hr = np.histogram(lr, bins=bins, range=(lo, hi))[0] + 1e-12
        out[g] = numpy_js(hc / hc.sum(), hr / hr.sum())
    return out


def bench_drift(model: str, named_shapes, layout, device: torch.device, args) -> List[dict]:
    torch.manual_seed(1)
    shapes = [s for _, s in named_shapes]
    # Log-normal Fisher values spanning orders of magnitude; the current snapshot is the
    # reference times log-normal noise, so every group has a moderate, non-zero drift.
    R = [torch.randn(s, device=device).mul_(2.0).sub_(10.0).exp_() for s in shapes]
    C = [r * torch.randn_like(r).mul_(0.3).exp_() for r in R]
    numel = sum(r.numel() for r in R)
    seg_rows = layout.segments.tolist()
    cuda = device.type == "cuda"
    have_op = not cuda or fisheradaptune.has_cuda_kernels()
    rows: List[dict] = []
    for mode in ("mass", "histogram"):
        fused_fn = lambda: ops.js_drift(C, R, layout, drift_mode=mode)  # noqa: E731
        numpy_fn = lambda: numpy_js_drift(C, R, seg_rows, layout.num_groups, mode)  # noqa: E731
        ref = numpy_fn()
        diff = None
        t_op = None
        if have_op:
            got = fused_fn().cpu().numpy().astype(np.float64)
            diff = float(np.abs(got - ref).max())
            t_op = timeit(fused_fn, warmup=args.drift_warmup, iters=args.drift_iters,
                          device=device, max_seconds=args.max_seconds)
        t_np = timeit(numpy_fn, warmup=args.drift_warmup, iters=args.drift_iters, device=device,
                      max_seconds=args.max_seconds)
        base = {"table": "js_drift", "model": model, "mode": mode, "groups": layout.num_groups}
        if t_op is not None:
            rows.append({**base, "impl": "fused", "ms": t_op.median_ms, "iqr_ms": t_op.iqr_ms,
                         "iters": t_op.iters, "cpu_ms": t_op.cpu_ms,
                         "GB/s": numel * 8 / (t_op.median_ms * 1e-3) / 1e9,
                         "fused_speedup": t_np.median_ms / t_op.median_ms,
                         "max_abs_diff": diff, "mean_jsd": float(ref.mean())})
        rows.append({**base, "impl": "numpy" + ("+d2h" if cuda else ""), "ms": t_np.median_ms,
                     "iqr_ms": t_np.iqr_ms, "iters": t_np.iters, "cpu_ms": t_np.cpu_ms,
                     "GB/s": numel * 8 / (t_np.median_ms * 1e-3) / 1e9, "fused_speedup": 1.0,
                     "max_abs_diff": None, "mean_jsd": float(ref.mean())})
        if diff is not None:
            print(f"  js_drift {mode:9s} {model}: max |op - numpy| = {diff:.3g} "
                  f"(mean JSD {ref.mean():.4f})")
    del R, C
    gc.collect()
    return rows


# ---------------------------------------------------------------------------------------------
# Targets (printed, never asserted)


def targets(rows: List[dict], device: torch.device) -> List[dict]:
    out = []
    cuda = device.type == "cuda"
    frows = [r for r in rows if r["table"] == "fisher_accumulate_"]
    for model, gname, threads in dict.fromkeys((r["model"], r["grads"], r["threads"])
                                               for r in frows):
        sel = [r for r in frows
               if (r["model"], r["grads"], r["threads"]) == (model, gname, threads)]
        fused = next((r for r in sel if r["variant"] == "fused"), None)
        fe = [r for r in sel if r["variant"].startswith("foreach") and r["sums"] == "group"]
        if fused is None or not fe:
            continue
        best = min(fe, key=lambda r: r["ms"])
        speedup = best["ms"] / fused["ms"]
        need = 2.0 if cuda else 1.5
        cpu_ratio = None
        if fused.get("cpu_ms"):  # the same comparison on process CPU time (CPU runs)
            cpu_ratio = min(r["cpu_ms"] for r in fe) / fused["cpu_ms"]
        out.append({"table": "targets", "model": model, "grads": gname, "threads": threads,
                    "target": f"fused >= {need}x fastest per-group _foreach ({best['variant']})",
                    "measured": speedup, "met": speedup >= need,
                    "measured_cpu_time": cpu_ratio})
        if cuda:
            out.append({"table": "targets", "model": model, "grads": gname, "threads": None,
                        "target": "fused >= 80% of D2D copy bandwidth",
                        "measured": fused["copy_frac"], "met": fused["copy_frac"] >= 0.8})
    if cuda:
        for r in rows:
            if r["table"] == "js_drift" and r["model"] == "vit_b" and r["mode"] == "histogram" \
                    and r["impl"] == "fused":
                out.append({"table": "targets", "model": "vit_b", "grads": None, "threads": None,
                            "target": "js_drift histogram < 10 ms", "measured": r["ms"],
                            "met": r["ms"] < 10.0})
    return out


# ---------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--models", default="vit_s,vit_b",
                   help=f"comma-separated, from {','.join(MODELS)} (default: all)")
    p.add_argument("--iters", type=int, default=None,
                   help="timed calls per fisher_accumulate_ case (default: 10 on CPU, 100 on "
                        "CUDA); js_drift uses a third of it, at least 3")
    p.add_argument("--quick", action="store_true",
                   help="ViT-S only, 3 timed calls, no thread sweep (a smoke run)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="cap on each case's timed loop (default: 10 s on CUDA, 6 s on CPU, 2 s "
                        "with --quick)")
    p.add_argument("--no-thread-sweep", dest="thread_sweep", action="store_false",
                   help="CPU: skip re-timing every fisher_accumulate_ variant at 1 thread")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch build sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device: expected cpu or cuda, got {args.device}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # set_device needs an index
    args.device = device
    cuda = device.type == "cuda"
    if args.quick:
        args.models = "vit_s"
        args.iters = args.iters or 3
        args.thread_sweep = False
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.models:
        if m not in MODELS:
            p.error(f"--models: unknown model {m!r}; expected some of {','.join(MODELS)}")
    args.iters = args.iters or (100 if cuda else 10)
    args.warmup = 10 if cuda else (1 if args.quick else 2)
    args.drift_iters = max(3, args.iters // 3)
    # The untimed call that gives the agreement check also warms up each js_drift case.
    args.drift_warmup = 2 if cuda else 0
    # Cap each case's timed loop so the default run stays within a few minutes (on CUDA this
    # only cuts the host-bound NumPy and Python-loop baselines short).
    if args.max_seconds is None:
        args.max_seconds = 10.0 if cuda else (2.0 if args.quick else 6.0)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = args.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    env = environment(device)
    # The reference bandwidth, measured in this run: D2D on CUDA; a host memcpy on CPU (rough).
    copy_bytes = (1 << 30) if cuda else (256 << 20)
    copy_bw = d2d_copy_bandwidth(copy_bytes, device)
    env["copy_bytes"] = copy_bytes
    env["copy_GBps"] = round(copy_bw / 1e9, 2)
    if env.get("loadavg_1m", 0) > 0.5:
        print(f"WARNING: load average {env['loadavg_1m']:.2f} before the run: other processes "
              "share the CPU, multi-thread CPU timings will be noisy (see the 1-thread rows)")
    print(f"device {env['device_name']} ({device}), torch {env['torch']}, cuda {env['cuda']}, "
          f"threads {env['threads']}/{env['cpu_count']} cpus, commit {env['commit']}"
          f"{' (dirty)' if env['dirty'] else ''}")
    print(f"{'D2D' if cuda else 'host'} copy bandwidth ({copy_bytes >> 20} MiB, read+write): "
          f"{copy_bw / 1e9:.1f} GB/s")

    rows: List[dict] = []
    checks: List[dict] = []
    for model in args.models:
        embed, depth, heads, mlp = MODELS[model]
        named = vit_param_shapes(embed, depth, heads, mlp)
        layout = layout_for(named)
        nparams = sum(math.prod(s) for _, s in named)
        print(f"\n{model}: embed {embed}, depth {depth}, heads {heads}, mlp {mlp}: "
              f"{nparams:,} parameters in {len(named)} tensors, {layout.num_groups} groups "
              f"(slabs k=4, qkv split)")
        for gdtype in (torch.float32, torch.bfloat16):
            r, c = bench_fisher(model, named, layout, device, gdtype, args, copy_bw)
            rows += r
            checks.append(c)
            print_table(r, ["model", "grads", "variant", "threads", "ms", "iqr_ms", "iters",
                            "cpu_ms", "GB/s", "copy_frac", "fused_speedup", "cpu_speedup"])
            if len(c) > 2:
                print(f"  check vs loop baseline: Fisher max rel diff "
                      f"{c['fisher_max_rel_diff']:.2g}, group sums max rel diff "
                      f"{c['group_sums_max_rel_diff']:.2g}")
        r = bench_drift(model, named, layout, device, args)
        rows += r
        print_table(r, ["model", "mode", "impl", "ms", "iqr_ms", "iters", "cpu_ms", "GB/s",
                        "fused_speedup", "max_abs_diff"])

    t = targets(rows, device)
    if t:
        print_table(t, ["model", "grads", "threads", "target", "measured", "met",
                        "measured_cpu_time"], title="targets (not asserted)")
    rows += t
    rows += [{"table": "checks", **c} for c in checks]
    notes = [f"{k}: {v}" for k, v in VARIANTS.items()] + [
        "bf16 grads: the baselines upcast each gradient with g.float() before addcmul_ (the "
        "upcast is timed); foreach_mixed+group_l1 instead passes bf16 grads to the mixed-dtype "
        "_foreach_addcmul_.",
        "GB/s: useful bytes / time, useful bytes = numel * (4 Fisher read + 4 Fisher write + "
        "grad bytes read); the same count for every variant, so GB/s ratios equal speed-ups.",
        "copy_frac: GB/s over the copy bandwidth measured in the same run (device-to-device on "
        "CUDA; on CPU a host memcpy through torch with the same threads, a rough reference).",
        "fused_speedup: this row's ms / the fused op's ms at the same thread count (> 1: fused "
        "faster). For js_drift: the NumPy time / the op's time.",
        "cpu_ms (CPU only): median process CPU time per call, all threads; cpu_speedup: its "
        "ratio to the fused op's. On 1 thread this excludes time the OS gave to other "
        "processes, so on a busy shared machine the 1-thread cpu_speedup is the ratio to trust.",
        "js_drift NumPy: float64, per group: mass p=c/sum(c), q=r/sum(r); histogram log10(|x|+"
        "1e-12), np.quantile 1%/99% of the union, np.histogram 64 bins, +1e-12, normalise; JS "
        "with natural log. Includes the device-to-host copy on CUDA. js_drift GB/s counts both "
        "snapshots read once (8 bytes/element).",
        "Timing: median and IQR of per-call wall times (CUDA events + synchronize on CUDA, "
        f"perf_counter on CPU); a case stops after {args.max_seconds:g} s once 3 calls were "
        "timed.",
    ]
    env["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    # A --quick smoke run must not overwrite the full results that are committed.
    name = "bench_fisher-quick" if args.quick else "bench_fisher"
    paths = write_results(name, rows, env, notes=notes)
    print(f"\nwrote {paths['json']} and {paths['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
