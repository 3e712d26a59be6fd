"""The main job: fine-tune a pretrained model with every method, compare them honestly.

    python -m fisheradaptune.demo [--task digits|minilm] [--quick] [--seeds 3]
                                  [--device cpu|cuda] [--methods ...] [--out DIR]

``--task digits`` (the default, :mod:`fisheradaptune.demo.digits`): a TinyViT pretrained for
seconds on clean scikit-learn digits, fine-tuned on a shifted style with few labels.
``--task minilm`` (:mod:`fisheradaptune.demo.minilm`): the real pretrained
sentence-transformers/all-MiniLM-L6-v2 encoder, fine-tuned on a few hundred entries of the
VADER sentiment lexicon (human valence ratings), scored on held-out entries, zero-shot shifts
(sentence templates, negated templates, emoticons and slang) and forgetting (how far sentence
embeddings of unrelated text move).

Each method is scored on in-distribution (ID) accuracy, zero-shot transfer accuracy under
held-out shifts, trainable or active parameters, wall time and training-state memory, as
mean ± std over seeds. Writes a JSON of every figure, a plot of transfer against ID per method
and the task's own plots, and prints the table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import fisheradaptune as fat
from .methods import ALL_METHODS, METHODS
from .progress import tqdm
from .report import plot_transfer_vs_id, table
from .scoring import accuracy, state_bytes

__all__ = ["METHODS", "TASKS", "accuracy", "state_bytes", "finetune", "run", "table", "main"]


def _digits():
    from .digits import DigitsDemo
    return DigitsDemo()


def _minilm():
    from .minilm import MiniLMDemo
    return MiniLMDemo()


#: Task name -> a factory of its harness spec (see DigitsDemo for what a spec provides).
TASKS = {"digits": _digits, "minilm": _minilm}


def finetune(spec, name: str, base: nn.Module, cfg, task, seed: int, device: torch.device) -> dict:
    """Fine-tune a copy of ``base`` (with a new head) by method ``name``; score it."""
    torch.manual_seed(seed + 1)
    model = copy.deepcopy(base)
    model.reset_head(task.num_classes)  # a new task gets a new head
    opt, active = ALL_METHODS[name](model, cfg, task)
    x, y = (t.to(device) for t in task.train)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in tqdm(range(cfg.finetune_steps), desc=f"seed {seed}: {name}", leave=False):
        idx = torch.randint(0, len(y), (cfg.batch,), device=device)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    memory = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
              else state_bytes(model, opt))
    out = {
        "id_acc": accuracy(model, *(t.to(device) for t in task.test)),
        "transfer": {s: accuracy(model, *(t.to(device) for t in xy)) for s, xy in task.transfer.items()},
        "active_params": active(),
        "seconds": seconds,
        "memory_bytes": memory,
    }
    out["transfer_acc"] = statistics.mean(out["transfer"].values())
    out.update(spec.extra_metrics(model, base, task, device))
    if isinstance(opt, fat.FisherAdapTune):
        out["active_fraction"] = opt.active_fraction
        out["_opt"] = opt
    out["_model"] = model
    return out


def run(spec, cfg, seeds: int, device: torch.device, out_dir: str,
        methods: Optional[List[str]] = None) -> dict:
    methods = methods or list(spec.methods)
    results: Dict[str, List[dict]] = {m: [] for m in methods}
    pretrained = {}
    for seed in range(seeds):
        task, base, pretrained[seed] = spec.prepare(cfg, seed, device)
        for m in methods:
            r = finetune(spec, m, base, cfg, task, seed, device)
            spec.artifacts(m, r, task, seed, out_dir)
            r.pop("_opt", None)
            r.pop("_model", None)
            results[m].append(r)
    return {"results": results, "pretrained_no_finetune": pretrained}


def main(argv: Optional[List[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m fisheradaptune.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="digits", choices=list(TASKS),
                    help="digits (TinyViT pretrained here) or minilm (real pretrained MiniLM)")
    ap.add_argument("--quick", action="store_true", help="a short run (under 3 minutes on 2 CPU cores)")
    ap.add_argument("--large", action="store_true", help="digits only: a wider, deeper ViT and longer runs (GPU)")
    ap.add_argument("--seeds", type=int, default=None,
                    help="seeds per method (default 3; 1 for --task minilm --quick)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--methods", default=None, help=("comma-separated subset of: " + ", ".join(ALL_METHODS) +
                          " (digits: all but SHiRA; minilm: all but token reduction)").replace("%", "%%"))
    ap.add_argument("--out", default=None, help="folder for the JSON and plots "
                                                "(default results/demo, results/demo-minilm)")
    args = ap.parse_args(argv)
    spec = TASKS[args.task]()
    cfg = spec.config(args.quick, args.large)
    seeds = args.seeds or spec.default_seeds(args.quick)
    device = torch.device(args.device)
    out_dir = args.out or spec.default_out
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    for m in methods or []:
        if m not in spec.methods:
            ap.error(f"unknown method {m!r} for --task {args.task}; choose from {', '.join(spec.methods)}")
    if methods is None and hasattr(spec, "default_methods"):
        methods = spec.default_methods()
    start = time.perf_counter()
    out = run(spec, cfg, seeds, device, out_dir, methods)
    total = spec.total_params(cfg)
    description = spec.describe(cfg, seeds, device, total)
    print("\n" + description)
    print(table(out["results"], total, spec.columns))
    print("memory: " + ("peak CUDA memory" if device.type == "cuda" else
                        "parameters + gradients + optimizer state (+ Fisher buffers) at the end"))
    elapsed = time.perf_counter() - start
    print(f"total time {elapsed:.0f} s")
    os.makedirs(out_dir, exist_ok=True)
    record = {"task": args.task, "description": description, "config": cfg.__dict__, "seeds": seeds,
              "device": str(device),
              "torch": torch.__version__, "python": platform.python_version(),
              "total_params": total, "elapsed_s": elapsed, **out}
    path = os.path.join(out_dir, spec.json_name)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    plot_transfer_vs_id(out["results"], os.path.join(out_dir, "transfer_vs_id.png"),
                        title=f"{args.task}: transfer against ID, mean ± std over {seeds} seeds",
                        extra=[(h, k) for h, k in spec.columns if "%" not in h])
    print(f"wrote {path}, the transfer-against-ID plot and the task's plots in {out_dir}")
    return record


if __name__ == "__main__":
    main()
