"""FisherAdapTune wrapper: overhead before any freeze, and savings as groups freeze.

    python benchmarks/bench_adaptune.py [--device cpu|cuda] [--model vit_s|vit_b|tiny] [--batch B]

1. Overhead: a training step (forward, backward, AdamW) with and without the wrapper, before any
   freeze, interleaved so both see the same machine state. The wrapper's drift check runs every
   ``check_every`` steps; its cost is timed separately and amortised (check time / check_every).
   Target: at most 5% on a ViT-S step on a 2-core CPU, at most 3% on ViT-B on H100.
2. Savings: the same step after freezing 0, 25, 50, 75 and 95% of the groups, two ways:
   "input side first" (all groups of the earliest tensors: backward stops early) and "random
   slabs" (partial tensors everywhere). Reports step time and optimizer-state + gradient bytes.

Models are timm-named ViTs built by ``fisheradaptune.demo.models.TinyViT`` (timm's own is used on
CUDA when importable): ViT-S/16 and ViT-B/16 at 224px, 1000 classes.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, print_table, timeit, write_results  # noqa: E402

import fisheradaptune as fat  # noqa: E402
from fisheradaptune.demo.models import TinyViT  # noqa: E402

MODELS = {
    "tiny": dict(img_size=32, patch=4, in_chans=3, dim=128, depth=6, heads=4, mlp_ratio=4.0, num_classes=100),
    "vit_s": dict(img_size=224, patch=16, in_chans=3, dim=384, depth=12, heads=6, mlp_ratio=4.0, num_classes=1000),
    "vit_b": dict(img_size=224, patch=16, in_chans=3, dim=768, depth=12, heads=12, mlp_ratio=4.0, num_classes=1000),
}


def build(name: str, device):
    if device.type == "cuda" and name in ("vit_s", "vit_b"):
        try:
            import timm
            return timm.create_model({"vit_s": "vit_small_patch16_224", "vit_b": "vit_base_patch16_224"}[name],
                                     pretrained=False).to(device), "timm"
        except Exception:
            pass
    return TinyViT(**MODELS[name]).to(device), "fisheradaptune.demo.models.TinyViT"


def state_bytes(model, inner) -> int:
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = sum(v.numel() * v.element_size() for s in inner.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    return grads + state


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="vit_s (CPU default), vit_b (CUDA default) or tiny")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--check-every", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="tiny model, few iterations")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    name = "tiny" if args.quick else args.model or ("vit_b" if cuda else "vit_s")
    batch = args.batch or (64 if cuda else 8 if name != "tiny" else 32)
    iters = args.iters or (5 if args.quick else 30 if cuda else 8)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    torch.manual_seed(0)
    model, source = build(name, device)
    cfg = MODELS[name]
    x = torch.randn(batch, cfg["in_chans"], cfg["img_size"], cfg["img_size"], device=device)
    y = torch.randint(0, cfg["num_classes"], (batch,), device=device)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    wrapped_inner = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    # Learning rate 0 keeps the weights (and so the step's cost) identical across variants.
    for o in (plain, wrapped_inner):
        for g in o.param_groups:
            g["lr"] = 0.0
    wrapped = fat.FisherAdapTune(wrapped_inner, model, check_every=10 ** 9)

    def step(opt):
        with amp:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rows = []
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{name} ({source}): {n_params / 1e6:.1f}M params, {wrapped.layout.num_groups} groups, "
          f"batch {batch}, device {device}")

    # 1. Overhead, interleaved: plain, wrapped, plain, wrapped, ...
    for _ in range(2):
        step(plain)
        step(wrapped)
    t_plain, t_wrap = [], []
    for _ in range(iters):
        t_plain.append(timeit(lambda: step(plain), warmup=0, iters=1, device=device).median_ms)
        t_wrap.append(timeit(lambda: step(wrapped), warmup=0, iters=1, device=device).median_ms)
    med = lambda v: sorted(v)[len(v) // 2]
    # The drift check (snapshot + js_drift over every group + policy), timed on its own.
    wrapped._check()  # first visit: references
    t_check = timeit(wrapped._check, warmup=1, iters=max(3, iters // 2), device=device).median_ms
    overhead = (med(t_wrap) + t_check / args.check_every) / med(t_plain) - 1.0
    rows.append({"table": "overhead before any freeze", "model": name, "batch": batch,
                 "plain_ms": med(t_plain), "wrapped_ms": med(t_wrap), "check_ms": t_check,
                 "check_every": args.check_every, "overhead_pct": 100 * overhead,
                 "target_pct": 3.0 if cuda else 5.0})

    # 2. Savings as groups freeze.
    names = list(wrapped.layout.names)
    rng = random.Random(0)
    shuffled = names[:]
    rng.shuffle(shuffled)
    for order_name, order in (("input side first", names), ("random slabs", shuffled)):
        for frac in (0.0, 0.25, 0.5, 0.75, 0.95):
            torch.manual_seed(0)
            model, _ = build(name, device)
            inner = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.05)
            opt = fat.FisherAdapTune(inner, model, check_every=10 ** 9)
            step(opt)
            opt.freeze(order[:int(round(frac * len(order)))])
            t = timeit(lambda: step(opt), warmup=1, iters=iters, device=device)
            # Gradients exist between backward and zero_grad: measure them there.
            with amp:
                F.cross_entropy(model(x), y).backward()
            rows.append({"table": "step time as groups freeze", "order": order_name,
                         "frozen_groups_pct": 100 * frac, "active_fraction": opt.active_fraction,
                         "step_ms": t.median_ms, "iqr_ms": t.iqr_ms,
                         "state_plus_grad_MiB": state_bytes(model, inner) / 2 ** 20})
            opt.zero_grad(set_to_none=True)
            del model, inner, opt
            if cuda:
                torch.cuda.empty_cache()
    base = {r["order"]: r["step_ms"] for r in rows if r.get("frozen_groups_pct") == 0.0}
    for r in rows:
        if "order" in r:
            r["speedup_vs_0pct"] = base[r["order"]] / r["step_ms"]
    print_table([r for r in rows if r["table"] == "overhead before any freeze"])
    print_table([r for r in rows if r["table"] == "step time as groups freeze"])
    env = environment(device)
    env.update({"model": name, "model_source": source, "batch": batch, "amp": "bf16" if cuda else "off"})
    paths = write_results("bench_adaptune", rows, env, notes=[
        "overhead_pct = (wrapped step + check time / check_every) / plain step - 1, interleaved runs",
        "lr = 0 in every variant so weights (and costs) stay identical; frozen groups chosen, not learned",
    ])
    print(f"wrote {paths['json']} and {paths['md']}")


if __name__ == "__main__":
    main()
