"""torch.compile and the FisherAdapTune step: compiled vs eager, no recompilation between checks.

    python benchmarks/bench_compile.py [--device cpu|cuda] [--steps N] [--check-every K]

A small ViT (``fisheradaptune.demo.models.TinyViT``, 32 px, 6 blocks of width 128) trains with
AdamW (``foreach``), plain and wrapped by FisherAdapTune, with ``opt.step`` run eagerly or
through ``torch.compile`` (forward and backward stay eager, so the rows isolate the optimizer
step). Reported per variant: median step time of the optimizer step over ``--steps`` steps
after warm-up, how many frames dynamo compiled over the whole run (a wrapper that recompiled on
its step counter would grow with the steps), and the compiled/eager ratio. Steps at drift
checks (every ``--check-every``) run the check eagerly by design and are included.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, print_table, write_results  # noqa: E402

import fisheradaptune as fat  # noqa: E402
from fisheradaptune.demo.models import TinyViT  # noqa: E402

CFG = dict(img_size=32, patch=4, in_chans=3, dim=128, depth=6, heads=4, mlp_ratio=4.0,
           num_classes=100)


def run(device, wrapped: bool, compiled: bool, steps: int, check_every: int, batch: int):
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyViT(**CFG).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, CFG["num_classes"], (batch,), device=device)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, foreach=True)
    opt = fat.FisherAdapTune(inner, model, check_every=check_every, policy=fat.Observe()) \
        if wrapped else inner
    counter = CompileCounterWithBackend("inductor")
    step = torch.compile(opt.step, backend=counter) if compiled else opt.step
    times = []
    warmup = 3
    for i in range(steps + warmup):
        F.cross_entropy(model(x), y).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
        opt.zero_grad(set_to_none=True)
    times.sort()
    return {"wrapper": "FisherAdapTune" if wrapped else "AdamW alone",
            "mode": "torch.compile(opt.step)" if compiled else "eager",
            "step_ms": times[len(times) // 2], "frames_compiled": counter.frame_count,
            "steps": steps}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--check-every", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="20 steps")
    args = ap.parse_args()
    device = torch.device(args.device)
    steps = 20 if args.quick else args.steps
    rows = []
    for wrapped in (False, True):
        eager = run(device, wrapped, False, steps, args.check_every, args.batch)
        comp = run(device, wrapped, True, steps, args.check_every, args.batch)
        comp["compiled_over_eager"] = comp["step_ms"] / eager["step_ms"]
        rows += [eager, comp]
    print_table(rows)
    env = environment(device)
    env.update({"model": "TinyViT 32px dim 128 depth 6", "batch": args.batch,
                "check_every": args.check_every})
    paths = write_results("bench_compile", rows, env, notes=[
        "optimizer step only (forward/backward eager); median over the steps after 3 warm-up steps",
        "frames_compiled counts dynamo compilations over the whole run, checks included",
        "FisherAdapTune runs with policy=Observe() so every variant keeps all parameters trainable",
    ])
    print(f"wrote {paths['json']} and {paths['md']}")


if __name__ == "__main__":
    main()
