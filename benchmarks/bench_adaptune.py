"""FisherAdapTune wrapper: overhead before any freeze, and savings as groups freeze.

    python benchmarks/bench_adaptune.py [--device cpu|cuda] [--model vit_s|vit_b|tiny] [--batch B]
    python benchmarks/bench_adaptune.py --fisher-dtype [--device cpu|cuda]   # section 3 only

1. Overhead: a training step (forward, backward, AdamW) with and without the wrapper, before any
   freeze, interleaved so both see the same machine state. The wrapper's drift check runs every
   ``check_every`` steps; its cost is timed separately and amortised (check time / check_every).
   Target: at most 5% on a ViT-S step on a 2-core CPU, at most 3% on ViT-B on H100.
2. Savings: the same step after freezing 0, 25, 50, 75 and 95% of the groups, two ways:
   "input side first" (all groups of the earliest tensors: backward stops early) and "random
   slabs" (partial tensors everywhere). Reports step time and optimizer-state + gradient bytes.

3. ``fisher_dtype`` (``--fisher-dtype``, a separate run writing ``bench_adaptune_fisher_dtype``):
   float32 vs bfloat16 Fisher buffers and drift references. On the ViT-S parameter list (the
   model of 1. and 2., synthetic gradients, one thread on CPU): the wrapper's buffer bytes
   against AdamW's state, the Fisher update per step and the drift check, each timed both ways.
   Over the digits demo's quick configuration with the "FisherAdapTune (Threshold)" preset
   (fisher_decay 0.98, Threshold(tau=0.1, patience=2, min_active_fraction=0.1), a check every 12
   of 120 steps): the largest drift difference per check between a float32 and a bfloat16 run,
   once on one shared trajectory (policy Observe, so both runs see the same gradients) and once
   with the preset's decisions acting, and how many freeze decisions differ.

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


def _fisher_dtype_costs(name: str, device, iters: int) -> list:
    """Buffer bytes and per-step costs, float32 vs bfloat16 Fisher buffers, on model ``name``'s
    parameter list with fixed synthetic gradients (the wrapper's own work only: no forward or
    backward, which the dtype does not touch)."""
    rows = []
    torch.manual_seed(0)
    model, _ = build(name, device)
    params = [p for p in model.parameters()]
    n = sum(p.numel() for p in params)
    for gdtype in (torch.float32, torch.bfloat16):
        g = torch.Generator(device=device).manual_seed(1)
        grads = [torch.randn(p.shape, generator=g, device=device).mul_(1e-3).to(gdtype)
                 for p in params]
        for fdtype in (torch.float32, torch.bfloat16):
            inner = torch.optim.AdamW(params, lr=0.0)
            opt = fat.FisherAdapTune(inner, model, check_every=10 ** 9, policy=fat.Observe(),
                                     fisher_dtype=fdtype)
            update = lambda: opt.estimator.update(grads)  # noqa: E731
            update()
            opt._check()  # first visit: the references
            t_update = timeit(update, warmup=1, iters=iters, device=device)
            t_check = timeit(opt._check, warmup=1, iters=max(3, iters // 2), device=device)
            # AdamW's state (exp_avg, exp_avg_sq) is kept in the parameters' dtype.
            adamw = 2 * n * torch.tensor([], dtype=gdtype).element_size()
            rows.append({"table": "fisher_dtype: buffers and per-step cost", "model": name,
                         "params_M": n / 1e6, "param_and_grad_dtype": str(gdtype)[6:],
                         "fisher_dtype": str(fdtype)[6:],
                         "buffer_MiB": opt.buffer_bytes / 2 ** 20,
                         "adamw_state_MiB": adamw / 2 ** 20,
                         "buffer_vs_adamw": opt.buffer_bytes / adamw,
                         "update_ms": t_update.median_ms, "update_iqr_ms": t_update.iqr_ms,
                         "check_ms": t_check.median_ms})
            del opt, inner
    return rows


def _fisher_dtype_demo(device) -> list:
    """The digits demo (quick configuration, seed 0) fine-tuned twice from one pretrained model,
    float32 and bfloat16 Fisher buffers, with the same batches: per check, the largest drift
    difference over the groups measured in both runs, and the freeze decisions that differ."""
    import copy
    from fisheradaptune.demo.data import digits_transfer_task
    from fisheradaptune.demo.digits import QUICK, pretrain
    cfg = QUICK
    task = digits_transfer_task(labels_per_class=cfg.labels_per_class, seed=0)
    base = pretrain(cfg, task, 0, device)
    x, y = (t.to(device) for t in task.train)
    rows = []
    for policy_name, make_policy in (
            ("Observe (one shared trajectory)", fat.Observe),
            ("Threshold preset (decisions act)",
             lambda: fat.Threshold(tau=0.1, patience=2, min_active_fraction=0.1))):
        runs = {}
        for fdtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(1)
            model = copy.deepcopy(base)
            model.reset_head(task.num_classes)
            inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=cfg.lr, weight_decay=0.05)
            opt = fat.FisherAdapTune(inner, model, check_every=cfg.check_every, fisher_decay=0.98,
                                     policy=make_policy(), fisher_dtype=fdtype)
            frozen_after = []
            for step in range(cfg.finetune_steps):
                idx = torch.randint(0, len(y), (cfg.batch,), device=device)
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if (step + 1) % cfg.check_every == 0:
                    frozen_after.append(opt.frozen.clone())
            runs[fdtype] = (opt, frozen_after)
        (a, fa), (b, fb) = runs[torch.float32], runs[torch.bfloat16]
        G = a.layout.num_groups
        first = None
        for k, (ha, hb) in enumerate(zip(a.tracker.history, b.tracker.history)):
            both = ~torch.isnan(ha["jsd"]) & ~torch.isnan(hb["jsd"])
            diff = (ha["jsd"] - hb["jsd"]).abs()[both]
            differ = int((fa[k] != fb[k]).sum())
            if differ and first is None:
                first = k + 1
            rows.append({"table": "fisher_dtype: digits demo, drift and decisions per check",
                         "policy": policy_name, "check": k + 1, "step": ha["step"],
                         "groups_measured": int(both.sum()),
                         "max_drift_f32": float(ha["jsd"][both].max()) if both.any() else 0.0,
                         "max_abs_drift_diff": float(diff.max()) if diff.numel() else 0.0,
                         "frozen_f32": int(fa[k].sum()), "frozen_bf16": int(fb[k].sum()),
                         "groups_frozen_differently": differ})
        decisions = sum(int((p != q).sum()) for p, q in zip(fa, fb))
        rows.append({"table": "fisher_dtype: digits demo, summary", "policy": policy_name,
                     "groups": G, "checks": len(fa),
                     "max_abs_drift_diff": max(r["max_abs_drift_diff"] for r in rows
                                               if r.get("policy") == policy_name
                                               and "check" in r),
                     "group_decisions_differing": decisions,
                     "first_check_differing": first or 0,
                     "final_frozen_f32": int(fa[-1].sum()), "final_frozen_bf16": int(fb[-1].sum()),
                     "final_frozen_differently": int((fa[-1] != fb[-1]).sum()),
                     "buffer_MiB_f32": a.buffer_bytes / 2 ** 20,
                     "buffer_MiB_bf16": b.buffer_bytes / 2 ** 20})
    return rows


def fisher_dtype_main(args) -> None:
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # one thread: timings on a shared machine stay comparable
    name = "tiny" if args.quick else args.model or "vit_s"
    iters = args.iters or (3 if args.quick else 5)
    rows = _fisher_dtype_costs(name, device, iters)
    print_table(rows)
    demo = _fisher_dtype_demo(device)
    print_table([r for r in demo if r["table"].endswith("per check")])
    print_table([r for r in demo if r["table"].endswith("summary")])
    env = environment(device)
    env.update({"model": name, "demo": "digits, quick configuration, seed 0"})
    paths = write_results("bench_adaptune_fisher_dtype", rows + demo, env, notes=[
        "update_ms: the wrapper's per-step Fisher update (fisher_accumulate_ over every tensor); "
        "check_ms: one drift check (snapshot, js_drift mass mode with the reference update, "
        "policy), run every check_every steps",
        "buffer_MiB: metrics()['adaptune/buffer_bytes'] after one update and one check (Fisher "
        "and references of every tensor); adamw_state_MiB: exp_avg + exp_avg_sq in the "
        "parameters' dtype",
        "demo: max_abs_drift_diff over the groups measured in both runs at a check (JS distance, "
        "nats); groups_frozen_differently: groups frozen in one run and not the other after that "
        "check; under Observe nothing freezes and both runs see the same gradients",
    ])
    print(f"wrote {paths['json']} and {paths['md']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="vit_s (CPU default), vit_b (CUDA default) or tiny")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--check-every", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="tiny model, few iterations")
    ap.add_argument("--fisher-dtype", action="store_true",
                    help="only section 3: float32 vs bfloat16 Fisher buffers")
    args = ap.parse_args()
    if args.fisher_dtype:
        fisher_dtype_main(args)
        return
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
