#!/usr/bin/env python3
"""FisherAdapTune under torch.distributed: sharded drift checks and the wrapper's step overhead.

    python benchmarks/bench_distributed.py [--world 2] [--model vit_s_64px|tiny] [--batch 8]
                                           [--iters 10] [--quick]

Spawns ``--world`` processes (gloo on CPU; NCCL on CUDA when that many GPUs are visible) and
measures, on rank 0, in one run:

1. ``drift``: a drift check over a ViT-S/16-shaped Fisher list (22 M elements, 794 slab groups)
   whose tensors are ``Shard(0)``-split over the ranks, as FSDP2 holds them:
   ``fisheradaptune.distributed.js_drift`` in "mass" mode (two all-reduces of per-group partial
   sums) and "histogram" mode (all-gathers the snapshots), against ``ops.js_drift`` on the whole
   tensors in one process (the other ranks wait meanwhile). The max difference is reported.
2. ``step``: a training step (forward, backward, AdamW) of a ViT under FSDP2 (``fully_shard``
   per block and at the root) and under DDP (``find_unused_parameters=True``; the wrapper with
   a replicated Fisher, and with ``shard_state=True``: each rank 1/world of it), with the plain
   optimizer and with FisherAdapTune before any freeze (no drift check inside the timed steps:
   its cost is table 1's, once every ``check_every`` steps), interleaved so both see the same
   machine state. ``overhead`` = wrapper step / plain step - 1.

The default model, ``vit_s_64px``, is ViT-S/16 (22 M parameters) at 64 px: 17 tokens, so the
step is dominated by per-parameter work (gradient communication, AdamW, the Fisher update):
the worst case for the wrapper's relative overhead. Results: ``benchmarks/results/
bench_distributed-<cpu|cuda>.{json,md}`` (``-quick`` variants git-ignored).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, print_table, timeit, write_results  # noqa: E402
from bench_fisher import MODELS as SHAPE_MODELS, layout_for, vit_param_shapes  # noqa: E402

import fisheradaptune as fat  # noqa: E402
from fisheradaptune import distributed as fdist  # noqa: E402
from fisheradaptune.demo.models import TinyViT  # noqa: E402

MODELS = {
    "tiny": dict(img_size=32, patch=4, in_chans=3, dim=128, depth=6, heads=4, mlp_ratio=4.0,
                 num_classes=100),
    "vit_s_64px": dict(img_size=64, patch=16, in_chans=3, dim=384, depth=12, heads=6,
                       mlp_ratio=4.0, num_classes=1000),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_drift(rank: int, world: int, device: torch.device, args) -> List[dict]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh(device.type, (world,))
    named = vit_param_shapes(*SHAPE_MODELS["vit_s"])
    layout = layout_for(named)
    g = torch.Generator().manual_seed(0)
    full_c = [(torch.rand(s, generator=g) * torch.exp(2 * torch.randn(s, generator=g))).to(device)
              for _, s in named]
    full_r = [(torch.rand(s, generator=g) * torch.exp(2 * torch.randn(s, generator=g))).to(device)
              for _, s in named]
    dt = [distribute_tensor(c, mesh, [Shard(0)]) for c in full_c]
    sharding = fdist.sharding_of(dt)
    local = fdist.local_layout(layout, sharding)
    cur = [t.to_local() for t in dt]
    ref = [distribute_tensor(r, mesh, [Shard(0)]).to_local() for r in full_r]
    tensors = list(range(len(named)))
    rows = []
    for mode in ("mass", "histogram"):
        def sharded():
            return fdist.js_drift(cur, ref, local, sharding, drift_mode=mode, global_layout=layout,
                                  tensors=tensors)
        got = sharded()
        dist.barrier()
        t = timeit(sharded, warmup=1, iters=args.iters, device=device)
        dist.barrier()
        if rank == 0:
            single = lambda: fat.ops.js_drift(full_c, full_r, layout, drift_mode=mode)  # noqa: E731
            want = single()
            t1 = timeit(single, warmup=1, iters=args.iters, device=device)
            diff = float((got.cpu() - want.cpu()).abs().max())
            for name, tt in ((f"sharded over {world} ranks", t), ("one process, whole tensors", t1)):
                rows.append({"table": "drift", "mode": mode, "variant": name,
                             "elements": sum(c.numel() for c in full_c), "groups": layout.num_groups,
                             "ms": tt.median_ms, "iqr_ms": tt.iqr_ms, "iters": tt.iters,
                             "max_abs_diff": diff})
        dist.barrier()
    return rows


def bench_step(rank: int, world: int, device: torch.device, args) -> List[dict]:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP
    cfg = MODELS[args.model]
    per_rank = args.batch // world
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(per_rank, cfg["in_chans"], cfg["img_size"], cfg["img_size"], generator=g).to(device)
    y = torch.randint(0, cfg["num_classes"], (per_rank,), generator=g).to(device)
    rows = []
    for kind in ("fsdp2", "ddp", "ddp+shard_state"):
        runs = {}
        for wrapper in ("plain", "fisheradaptune"):
            torch.manual_seed(0)
            model = TinyViT(**cfg).to(device)
            if kind == "fsdp2":
                for block in model.blocks:
                    fully_shard(block)
                fully_shard(model)
                fwd = model
            else:
                fwd = DDP(model, find_unused_parameters=True)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
            if wrapper == "fisheradaptune":
                opt = fat.FisherAdapTune(opt, fwd, check_every=10 ** 9,
                                         shard_state=kind == "ddp+shard_state")

            def step(fwd=fwd, opt=opt):
                F.cross_entropy(fwd(x), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            runs[wrapper] = step
        # Interleaved: plain, wrapper, plain, wrapper, ... each timed on its own.
        times = {w: [] for w in runs}
        for w, fn in runs.items():
            fn()  # warm-up (also creates optimizer state)
        for _ in range(args.iters):
            for w, fn in runs.items():
                dist.barrier()
                times[w].append(timeit(fn, warmup=0, iters=1, device=device).median_ms)
        if rank == 0:
            med = {w: sorted(v)[len(v) // 2] for w, v in times.items()}
            for w in runs:
                rows.append({"table": "step", "parallel": kind, "model": args.model,
                             "global_batch": args.batch, "optimizer": w, "ms": med[w],
                             "iters": args.iters,
                             "overhead": (med[w] / med["plain"] - 1.0) if w != "plain" else None})
    return rows


def worker(rank: int, world: int, port: int, args, out: str) -> None:
    cuda = args.device == "cuda"
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        rows = bench_drift(rank, world, device, args) + bench_step(rank, world, device, args)
        if rank == 0:
            torch.save(rows, out)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def parse_args(argv: Optional[Sequence[str]] = None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--model", choices=sorted(MODELS), default="vit_s_64px")
    ap.add_argument("--batch", type=int, default=8, help="global batch")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="tiny model, 3 iterations")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.iters = "tiny", 3
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        ap.error(f"--device cuda needs {args.world} GPUs, {torch.cuda.device_count()} visible")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    env = environment(args.device)
    env.update({"world": args.world, "backend": "nccl" if args.device == "cuda" else "gloo",
                "threads_per_rank": max(1, (os.cpu_count() or 1) // args.world)})
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", ".bench_distributed.pt")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    mp.spawn(worker, args=(args.world, _free_port(), args, out), nprocs=args.world, join=True)
    rows = torch.load(out)
    os.remove(out)
    for title in ("drift", "step"):
        print_table([r for r in rows if r["table"] == title], title=title)
    notes = [
        "drift: ViT-S/16-shaped Fisher and reference lists (random log-normal), slab groups "
        "(k=4, qkv split); sharded rows include the all-reduces (mass) or all-gathers "
        "(histogram) and are timed on rank 0; max_abs_diff = largest per-group difference "
        "from the one-process result.",
        "step: medians of interleaved single-step timings on rank 0 after a barrier; "
        "FisherAdapTune before any freeze, check_every=1e9 (the drift check's own cost is the "
        "drift table's).",
    ]
    paths = write_results("bench_distributed" + ("-quick" if args.quick else ""), rows, env,
                          notes=notes)
    print(f"wrote {paths['json']} and {paths['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
