#!/usr/bin/env python3
"""Benchmark of bipartite_merge (ToMe bipartite token merging, docs/methods.md section 7).

    python benchmarks/bench_tome.py [--device cpu|cuda] [--iters N] [--threads T] [--quick]
                                    [--vit | --vit-only] [--vit-batch B]

The op, forward alone and forward + backward, against an eager PyTorch composition of the same
algorithm in the same run, written here in the input dtype: normalise the metric rows, split A
(even positions) / B (odd positions) tokens by slicing (ToMe's partition: the protected class
token at position 0 is in A and never a source), similarity ``bmm``, ``max`` over B (each A
token's best B), ``argsort`` of the best scores (the r highest merge), ``gather`` of the merged
A tokens, ``scatter_add`` of their size-weighted sums (and sizes) into B, then ``gather`` of the
kept A tokens (original order) and ``cat`` of protected, kept A and B rows. Its backward is
autograd's; the metric passes no gradient in either (the choice is discrete). Before timing,
each shape checks that the baseline computes what the op does: the same dest mapping (up to float32
near-ties of the similarities, which are reported) and close outputs.

Shapes: B in 1, 8, 64; N = 197 (ViT-B/16 at 224 px, one protected CLS token); C in 384, 768
(ViT-S, ViT-B); metric D = 64 (one head's keys); r = 16; float32; random sizes in 1..3.

End to end (``--vit``, needs timm and / or transformers): timm ViT-S/16 and ViT-B/16, and the
transformers ViT-B/16 (``ViTModel``) and CLIP ViT-B/16 vision tower (``CLIPVisionModel``), at
224 px, random init, inference throughput unpatched and with ``fisheradaptune.vit.token_merge``
at r = 8 and 13 (batch 8 on CPU, 256 on CUDA), next to ToMe's published 1.65x for ViT-B/16 at
r = 13 (V100), and the FLOP ratio unpatched / patched (``torch.utils.flop_counter``, attention
counted through its math decomposition): the bound the speed-up approaches. ``--vit-models``
picks among ``vit_s``, ``vit_b``, ``hf_vit_b``, ``hf_clip_b``.

Results: ``benchmarks/results/bench_tome-<cpu|cuda>.{json,md}`` (``--vit-only``:
``bench_tome_vit-*``) (``--quick``: ``bench_tome-quick-*``, git-ignored). ``op_speedup`` =
eager ms / op ms (above 1: the op is faster); on CPU ``cpu_speedup`` is the same ratio of
process CPU times.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from fisheradaptune import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (announce, environment, print_table, set_speedup, timeit,  # noqa: E402
                    timing_fields, write_results)

P = 1       # protected tokens (CLS)
N = 197
D = 64
R = 16


def first_positions(p):
    """ToMe's sets by position: A = even, B = odd positions; the protected ones (< p) are
    neither sources nor destinations. Returns the first source and destination positions."""
    return p + p % 2, p + 1 - p % 2


def eager_bipartite_merge(x, metric, sizes, r, p=P):
    """The eager composition, in x's dtype. Returns (out, out_sizes, (order, match))."""
    b, n, c = x.shape
    a0, b0 = first_positions(p)
    sizes = sizes.to(x.dtype)
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = torch.bmm(unit[:, a0::2], unit[:, b0::2].transpose(1, 2))    # [b, |A|, |B|]
    best, match = sim.max(dim=-1)                                        # best B of each A
    order = best.argsort(dim=-1, descending=True)                        # A by best score
    merged, kept = order[:, :r], order[:, r:].sort(dim=-1).values
    into = match.gather(1, merged)                                       # [b, r] B indices
    xa, xb = x[:, a0::2], x[:, b0::2]
    sa, sb = sizes[:, a0::2], sizes[:, b0::2]
    wa = (xa * sa.unsqueeze(-1)).gather(1, merged.unsqueeze(-1).expand(-1, -1, c))
    sum_b = (xb * sb.unsqueeze(-1)).scatter_add(1, into.unsqueeze(-1).expand(-1, -1, c), wa)
    size_b = sb.scatter_add(1, into, sa.gather(1, merged))
    out = torch.cat([x[:, :p], xa.gather(1, kept.unsqueeze(-1).expand(-1, -1, c)),
                     sum_b / size_b.unsqueeze(-1)], dim=1)
    out_sizes = torch.cat([sizes[:, :p], sa.gather(1, kept), size_b], dim=1)
    return out, out_sizes.float(), (order, match)


def eager_dest(order, match, n, r, p=P):
    """dest_index of the eager composition (for the check only; not timed)."""
    b, na = order.shape
    a0, b0 = first_positions(p)
    nb = len(range(b0, n, 2))
    first_b = p + na - r
    dest = torch.empty(b, n, dtype=torch.int64, device=order.device)
    dest[:, :p] = torch.arange(p, device=order.device)
    dest[:, b0::2] = first_b + torch.arange(nb, device=order.device)
    merged = torch.zeros(b, na, dtype=torch.bool, device=order.device)
    merged.scatter_(1, order[:, :r], True)
    kept_pos = p + torch.cumsum((~merged).long(), 1) - 1
    dest[:, a0::2] = torch.where(merged, first_b + match, kept_pos)
    return dest


def check_same_algorithm(x, metric, sizes, r):
    """The baseline against the op: dest equal except at float32 near-ties, outputs close on
    the batch rows whose dest agree. Returns a summary for the notes; raises if they differ."""
    out, out_sizes, dest = ops.bipartite_merge(x, metric, r, num_protected=P, sizes=sizes)
    e_out, e_sizes, (order, match) = eager_bipartite_merge(x, metric, sizes, r)
    e_dest = eager_dest(order, match, x.shape[1], r)
    same = (dest == e_dest).all(1)
    if not bool(same.all()):
        # every disagreement must be a near-tie of float64 similarities
        a0, b0 = first_positions(P)
        u = metric.double()
        u = u / u.norm(dim=-1, keepdim=True)
        sim = u[:, a0::2] @ u[:, b0::2].transpose(1, 2)
        na = sim.shape[1]
        first_b = P + na - r

        def chosen(d):
            da = d[:, a0::2]
            return da >= first_b, sim.gather(2, (da - first_b).clamp(min=0).unsqueeze(-1))[..., 0]

        best = sim.max(-1).values
        for d in (dest, e_dest):
            merged, s = chosen(d)
            if not bool((s[merged] >= best[merged] - 1e-5).all()):
                raise AssertionError("bench_tome: a merged token's partner is not its best B")
            lo = torch.where(merged, best, float("inf")).min(1).values
            hi = torch.where(merged, -float("inf"), best).max(1).values
            if not bool((lo >= hi - 1e-5).all()):
                raise AssertionError("bench_tome: the merged set is not the top-r")
    if not bool(same.any()):
        raise AssertionError("bench_tome: no batch row where the op and the baseline agree")
    torch.testing.assert_close(e_out[same], out[same], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(e_sizes[same], out_sizes[same], rtol=1e-6, atol=0)
    return f"{int(same.sum())}/{len(same)}"


def bench(device, dtype, iters, rows, notes, batches, channels):
    for c in channels:
        for b in batches:
            g = torch.Generator().manual_seed(1000 * c + b)
            x0 = torch.randn(b, N, c, generator=g).to(dtype).to(device)
            metric = torch.randn(b, N, D, generator=g).to(dtype).to(device)
            sizes = torch.randint(1, 4, (b, N), generator=g).float().to(device)
            grad = torch.randn(b, N - R, c, generator=g).to(dtype).to(device)
            x = x0.clone().requires_grad_(True)
            agree = check_same_algorithm(x0, metric, sizes, R)

            def op(xx):
                return ops.bipartite_merge(xx, metric, R, num_protected=P, sizes=sizes)[0]

            def eager(xx):
                return eager_bipartite_merge(xx, metric, sizes, R)[0]

            times = {}
            for name, fn in (("op", op), ("eager", eager)):
                def fwd():
                    with torch.no_grad():
                        fn(x0)

                def fwd_bwd():
                    torch.autograd.backward(fn(x), grad)
                    x.grad = None

                for mode, f in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                    t = timeit(f, warmup=3, iters=iters, device=device,
                               max_seconds=3.0 if device == "cpu" else 2.0)
                    times[(name, mode)] = t
                    rows.append({"table": "bipartite_merge", "B": b, "N": N, "C": c, "D": D,
                                 "r": R, "dtype": str(dtype).replace("torch.", ""),
                                 "variant": name, "pass": mode, **timing_fields(t),
                                 "dest_agree": agree})
            for r_ in rows[-4:]:
                set_speedup(r_, times[("op", r_["pass"])])
            del x, x0, metric, grad


VIT_MODELS = {  # name -> (library, model id / config, what is timed)
    "vit_s": ("timm", "vit_small_patch16_224"),
    "vit_b": ("timm", "vit_base_patch16_224"),
    "hf_vit_b": ("transformers", "ViTModel"),
    "hf_clip_b": ("transformers", "CLIPVisionModel"),
}


def _build_vit(key, device):
    """The model (random init, eval) of ``key``, or None with the reason when its library is
    missing. transformers models: ViT-B/16 at 224 px (ViTConfig's defaults) and the CLIP
    ViT-B/16 vision tower (CLIPVisionConfig with ViT-B/16's sizes), sdpa attention."""
    library, name = VIT_MODELS[key]
    torch.manual_seed(0)
    if library == "timm":
        try:
            import timm
        except ImportError:
            return None, "timm is not installed"
        return timm.create_model(name, pretrained=False).to(device).eval(), name
    try:
        import transformers
    except ImportError:
        return None, "transformers is not installed"
    if name == "ViTModel":
        cfg = transformers.ViTConfig(image_size=224, patch_size=16, attn_implementation="sdpa")
        label = "transformers ViTModel ViT-B/16"
    else:
        cfg = transformers.CLIPVisionConfig(hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12,
                                            image_size=224, patch_size=16,
                                            attn_implementation="sdpa")
        label = "transformers CLIPVisionModel ViT-B/16"
    return getattr(transformers, name)(cfg).to(device).eval(), label


def forward_flops(model, x):
    """FLOPs of one forward (torch.utils.flop_counter: matmuls, convolutions; attention through
    SDPA's math decomposition, whose matmuls are counted, the fused kernels not being)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    with torch.inference_mode(), sdpa_kernel([SDPBackend.MATH]), \
            FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def vit_throughput(device, batch, iters, rows, notes, models, rs):
    """End to end: ViTs at 224 px, random init, inference throughput with token_merge at each r
    against the unpatched model, in one run; and the FLOP ratio of the two."""
    from fisheradaptune import vit
    for key in models:
        model, label = _build_vit(key, device)
        if model is None:
            notes.append(f"{key} skipped: {label} (run in the integration venv: "
                         ".ci/venv-int/bin/python benchmarks/bench_tome.py --vit)")
            continue
        x = torch.randn(batch, 3, 224, 224, device=device)
        base = base_flops = None
        for r in (0,) + tuple(rs):
            handle = vit.token_merge(model, r=r) if r else None
            flops = forward_flops(model, x)
            with torch.inference_mode():
                t = timeit(lambda: model(x), warmup=1, iters=iters, device=device,
                           max_seconds=30.0 if device == "cpu" else 5.0)
                tokens = handle.sizes.shape[1] if handle is not None else 197
            if handle is not None:
                handle.remove()
            base = base or t
            base_flops = base_flops or flops
            row = {"table": "vit", "model": label, "batch": batch, "r": r,
                   "final_tokens": tokens, **timing_fields(t),
                   "img_per_s": batch * 1000.0 / t.median_ms, "gflops": flops / 1e9}
            # speedup = unpatched / patched: the inverse ratio of set_speedup's.
            row["speedup"] = base.median_ms / t.median_ms
            if t.cpu_ms is not None:
                row["cpu_speedup"] = base.cpu_ms / t.cpu_ms
            row["flop_ratio"] = base_flops / flops
            rows.append(row)
        del model
    notes.append("vit: models at 224 px, random init (no weights here), eval, inference_mode; "
                 "r = 0 is the unpatched model; token_merge(model, r) with proportional "
                 "attention, merging r tokens in every block. speedup = unpatched ms / patched "
                 "ms; flop_ratio = unpatched FLOPs / patched FLOPs (torch.utils.flop_counter, "
                 "attention counted through SDPA's math decomposition; the merge itself, ~1 "
                 "MFLOP per image and block, is not counted): the bound the speed-up approaches "
                 "when time is proportional to FLOPs. Published reference (ToMe, V100, off the "
                 "shelf): ViT-B/16 r = 13, 1.65x throughput.")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--quick", action="store_true",
                    help="B in (1, 8), C = 384 only, 5 iterations (results *-quick-*)")
    ap.add_argument("--vit", action="store_true",
                    help="also ViTs end to end (timm ViT-S/16, ViT-B/16; transformers "
                    "ViT-B/16, CLIP ViT-B/16 vision tower)")
    ap.add_argument("--vit-only", action="store_true", help="only the ViT end to end part")
    ap.add_argument("--vit-batch", type=int, default=None,
                    help="ViT batch (default 8 on CPU, 256 on CUDA)")
    ap.add_argument("--vit-models", default=None,
                    help=f"comma-separated, among {','.join(VIT_MODELS)} (default: all; "
                    "--quick: vit_s)")
    ap.add_argument("--vit-iters", type=int, default=None,
                    help="timed forwards per ViT case (default 10; --quick 3)")
    args = ap.parse_args()
    if args.quick:
        args.iters = min(args.iters, 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    env = environment(device)
    announce(env, device)
    rows, notes = [], []
    if not args.vit_only:
        bench(device, torch.float32, args.iters, rows, notes,
              batches=(1, 8) if args.quick else (1, 8, 64),
              channels=(384,) if args.quick else (384, 768))
    if args.vit or args.vit_only:
        batch = args.vit_batch or (8 if device == "cpu" else 256)
        models = args.vit_models.split(",") if args.vit_models else \
            (["vit_s"] if args.quick else list(VIT_MODELS))
        bad = [m for m in models if m not in VIT_MODELS]
        if bad:
            ap.error(f"--vit-models: unknown {bad}; expected among {list(VIT_MODELS)}")
        vit_throughput(device, batch, args.vit_iters or (3 if args.quick else 10), rows, notes,
                       models, (8, 13))
    env["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    notes += [] if args.vit_only else [
        "op: fisheradaptune.ops.bipartite_merge; eager: normalise + slice A/B + bmm + max + "
        "argsort + gather + scatter_add (size-weighted) + gather/cat, in the input dtype, "
        "backward by autograd. op_speedup = eager ms / op ms.",
        "fwd+bwd: one forward and one backward with a fixed output gradient (x only; the "
        "metric gets no gradient in either).",
        "dest_agree: batch rows whose dest mapping is identical in the op and the baseline; the "
        "others differ only at float32 near-ties of the similarities (checked against float64 "
        "similarities before timing), and outputs agree to 1e-4 on the identical rows.",
    ]
    if device == "cpu" and max(env.get("loadavg_1m") or 0, env["loadavg_1m_end"]) > 2:
        notes.append(f"machine shared and loaded (load average {env['loadavg_1m']} -> "
                     f"{env['loadavg_1m_end']} on {env['cpu_count']} cores): wall times are "
                     "noisy; cpu_ms / cpu_speedup (process CPU time) are the steadier measure.")
    for table in dict.fromkeys(r["table"] for r in rows):
        part = [r for r in rows if r["table"] == table]
        print_table(part, [k for k in part[0] if k != "table"], table)
    for n in notes:
        print(f"- {n}")
    name = "bench_tome" + ("_vit" if args.vit_only else "") + ("-quick" if args.quick else "")
    paths = write_results(name, rows, env, notes=notes)
    print(f"\nwrote {paths['json']} and {paths['md']}")


if __name__ == "__main__":
    main()
