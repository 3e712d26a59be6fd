#!/usr/bin/env python3
"""Benchmark of token_prune_merge (docs/methods.md section 6) and of the ViT hook.

    python benchmarks/bench_tokens.py [--device cpu|cuda] [--iters N] [--no-e2e] [--threads T]
                                      [--quick]

1. The op, forward + backward (and forward alone), against the eager EViT-style composition in
   the same run: ``torch.topk`` of the kept and of the merged tokens, sort of the kept indices
   (original order), ``torch.gather`` of both, weighted sum ``sum w x / sum w`` with
   ``w = score * size``, ``torch.cat`` of protected, kept and fused rows, and the new sizes; its
   backward is autograd's. Shapes: ViT-B (B=256, N=197, C=768) and B in 1, 2, 4, 8; keep
   ceil(0.7 * 196) = 138 of the 196 non-protected tokens, one protected token, random sizes.
   On CUDA also bfloat16, and each row's bandwidth as a fraction of a device-to-device copy
   measured in the same run (bytes: forward reads x and writes out; backward reads grad_out and
   the merged tokens of x, writes grad_x).
2. End to end: inference throughput and training-step time of a ViT patched with
   ``fisheradaptune.vit.prune_merge(keep=0.7, layers=(3, 6, 9))`` vs unpatched. On CUDA timm's
   ``vit_base_patch16_224`` (random weights, bf16 autocast, B=256) when timm imports; on CPU a
   ViT-S/16-shaped ``TinyViT`` (224 px, B=8, float32).

Results: ``benchmarks/results/bench_tokens-<cpu|cuda>.{json,md}``. Targets are printed, not
asserted: >= 1.3x over the eager composition on CPU, >= 2x on H100, end-to-end >= 1.3x.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

import fisheradaptune as fat
from fisheradaptune import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (announce, d2d_copy_bandwidth, environment, print_table,  # noqa: E402
                    set_speedup, timeit, write_results)

P = 1


def eager_prune_merge(x, scores, sizes, keep):
    """The EViT-style eager composition (same semantics as the op, up to tie order)."""
    b, n, c = x.shape
    m = n - P
    kept = torch.topk(scores, keep, dim=1).indices.sort(1).values
    merged = torch.topk(scores, m - keep, dim=1, largest=False).indices
    cand, cs = x[:, P:], sizes[:, P:]
    xk = torch.gather(cand, 1, kept.unsqueeze(-1).expand(-1, -1, c))
    xm = torch.gather(cand, 1, merged.unsqueeze(-1).expand(-1, -1, c))
    sm = torch.gather(cs, 1, merged)
    w = torch.gather(scores, 1, merged) * sm
    fused = (w.unsqueeze(-1) * xm).sum(1, keepdim=True) / w.sum(1, keepdim=True).unsqueeze(-1)
    out = torch.cat([x[:, :P], xk, fused.to(x.dtype)], 1)
    out_sizes = torch.cat([sizes[:, :P], torch.gather(cs, 1, kept), sm.sum(1, keepdim=True)], 1)
    return out, kept, out_sizes


def op_prune_merge(x, scores, sizes, keep):
    return ops.token_prune_merge(x, scores, keep, num_protected=P, sizes=sizes)


def bench_op(device, dtype, iters, copy_bw, rows, batches=(1, 2, 4, 8, 256)):
    n, c = 197, 768
    keep = math.ceil(0.7 * (n - P))
    for b in batches:
        g = torch.Generator().manual_seed(b)
        x0 = torch.randn(b, n, c, generator=g).to(dtype).to(device)
        s0 = torch.rand(b, n - P, generator=g).to(device)
        sizes = torch.randint(1, 4, (b, n), generator=g).float().to(device)
        x = x0.clone().requires_grad_(True)
        s = s0.clone().requires_grad_(True)
        grad = torch.randn(b, P + keep + 1, c, generator=g).to(dtype).to(device)
        es = x0.element_size()
        fwd_bytes = b * n * c * es + b * (P + keep + 1) * c * es
        bwd_bytes = b * (P + keep + 1) * c * es + b * (n - P - keep) * c * es + b * n * c * es
        times = {}
        for name, fn in (("op", op_prune_merge), ("eager", eager_prune_merge)):
            def fwd():
                with torch.no_grad():
                    fn(x0, s0, sizes, keep)

            def fwd_bwd():
                out = fn(x, s, sizes, keep)[0]
                torch.autograd.backward(out, grad)
                x.grad = None
                s.grad = None

            for mode, f, nbytes in (("fwd", fwd, fwd_bytes), ("fwd+bwd", fwd_bwd,
                                                              fwd_bytes + bwd_bytes)):
                budget = 4.0 if device == "cpu" else 2.0
                t = timeit(f, warmup=3, iters=iters, device=device, max_seconds=budget)
                times[(name, mode)] = t
                row = {"table": "token_prune_merge", "B": b, "N": n, "C": c, "keep": keep,
                       "dtype": str(dtype).replace("torch.", ""), "variant": name, "pass": mode,
                       "ms": t.median_ms, "iqr_ms": t.iqr_ms, "iters": t.iters,
                       "GB/s": nbytes / (t.median_ms * 1e-3) / 1e9}
                if t.cpu_ms is not None:
                    row["cpu_ms"] = t.cpu_ms
                if copy_bw:
                    row["copy_frac"] = row["GB/s"] * 1e9 / copy_bw
                rows.append(row)
        for r in rows[-4:]:
            set_speedup(r, times[("op", r["pass"])])
        del x, s, x0, s0, grad


def bench_e2e(device, iters, rows, notes):
    if device == "cuda":
        try:
            import timm
        except ImportError:
            notes.append("end to end: timm not importable, skipped")
            return
        model = timm.create_model("vit_base_patch16_224", pretrained=False).to(device)
        b, img, dtype, name = 256, 224, torch.bfloat16, "timm vit_base_patch16_224"
    else:
        torch.manual_seed(0)
        model = fat.models.TinyViT(img_size=224, patch=16, in_chans=3, dim=384, depth=12,
                                   heads=6, mlp_ratio=4.0, num_classes=1000)
        b, img, dtype, name = 8, 224, None, "TinyViT ViT-S/16 shape"
    x = torch.randn(b, 3, img, img, device=device)
    y = torch.randint(0, 1000, (b,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def ctx():
        return torch.autocast(device, dtype=dtype) if dtype is not None else \
            torch.autocast(device, enabled=False)

    def infer():
        with torch.no_grad(), ctx():
            model(x)

    def train():
        with ctx():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    res = {}
    for patched in (False, True):
        h = fat.vit.prune_merge(model, keep=0.7, layers=(3, 6, 9)) if patched else None
        model.eval()
        ti = timeit(infer, warmup=2, iters=iters, device=device, max_seconds=15)
        model.train()
        tt = timeit(train, warmup=2, iters=iters, device=device, max_seconds=15)
        if h is not None:
            h.remove()
        res[patched] = (ti, tt)
    for patched in (False, True):
        ti, tt = res[patched]
        rows.append({"table": "end to end", "model": name, "B": b,
                     "dtype": "bf16 autocast" if dtype else "float32",
                     "variant": "keep 0.7 @ 3,6,9" if patched else "unpatched",
                     "infer_ms": ti.median_ms, "infer_img/s": b / (ti.median_ms * 1e-3),
                     "train_ms": tt.median_ms,
                     "infer_speedup": res[False][0].median_ms / ti.median_ms,
                     "train_speedup": res[False][1].median_ms / tt.median_ms})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--quick", action="store_true",
                    help="B in (8, 256) only, 10 iterations, no end-to-end (results *-quick-*)")
    args = ap.parse_args()
    if args.quick:
        args.iters, args.no_e2e = min(args.iters, 10), True
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    env = environment(device)
    announce(env, device)
    rows, notes = [], []
    copy_bw = None
    if device == "cuda":
        copy_bw = d2d_copy_bandwidth(256 << 20, device)
        env["copy_GBps"] = round(copy_bw / 1e9, 1)
    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    for dtype in dtypes:
        bench_op(device, dtype, args.iters, copy_bw, rows,
                 batches=(8, 256) if args.quick else (1, 2, 4, 8, 256))
    if not args.no_e2e:
        bench_e2e(device, max(5, args.iters // 3), rows, notes)
    env["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    notes += [
        "op: fisheradaptune.ops.token_prune_merge; eager: topk (kept) + topk (merged) + sort + "
        "gather + weighted sum + cat, backward by autograd. op_speedup = eager ms / op ms.",
        "fwd+bwd: one forward and one backward with a fixed output gradient; GB/s counts "
        "forward x read + out write, backward grad_out read + merged x read + grad_x write.",
        "Targets: op >= 1.3x eager on CPU, >= 2x on H100; end to end >= 1.3x inference.",
    ]
    if device == "cpu" and max(env.get("loadavg_1m") or 0, env["loadavg_1m_end"]) > 2:
        notes.append(f"machine shared and loaded (load average {env['loadavg_1m']} -> "
                     f"{env['loadavg_1m_end']} on {env['cpu_count']} cores): wall times are "
                     "noisy; cpu_ms / cpu_speedup (process CPU time) are the steadier measure.")
    for title in ("token_prune_merge", "end to end"):
        trows = [r for r in rows if r["table"] == title]
        if trows:
            print_table(trows, [k for k in trows[0] if k != "table"], title)
    paths = write_results("bench_tokens" + ("-quick" if args.quick else ""), rows, env, notes=notes)
    print(f"\nwrote {paths['json']} and {paths['md']}")


if __name__ == "__main__":
    main()
