"""Fine-tune a small ViT with FisherAdapTune on scikit-learn's digits (no download).

    python examples/adaptune_vit.py [--steps 300] [--out results/adaptune_vit.png]

A TinyViT (timm naming) is pretrained on clean digits, then fine-tuned on a shifted style with
few labels. The wrapper tracks each parameter slab's Fisher, scores its drift every
``--check-every`` steps and freezes slabs that have settled. Prints the summary table and writes
the drift curves and freeze timeline.
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import fisheradaptune as fat
from fisheradaptune.demo.data import digits_transfer_task
from fisheradaptune.demo.models import TinyViT


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train()
    return acc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--check-every", type=int, default=20)
    ap.add_argument("--tau", type=float, default=0.1,
                    help="drift below which a group counts as settled (see the plot to choose it)")
    ap.add_argument("--out", default="results/adaptune_vit.png")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    task = digits_transfer_task(labels_per_class=20, seed=args.seed)

    model = TinyViT(num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    x, y = task.pretrain
    for _ in tqdm(range(400), desc="pretrain (clean digits)"):
        idx = torch.randint(0, len(y), (128,))
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
    print(f"pretrained: accuracy on the shifted style before fine-tuning {accuracy(model, *task.test):.3f}")

    # Fine-tune: wrap any optimizer; the model gives readable group names.
    opt = fat.FisherAdapTune(torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05), model,
                             check_every=args.check_every, fisher_decay=0.98,
                             policy=fat.Threshold(tau=args.tau, patience=2, min_active_fraction=0.1))
    x, y = task.train
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="fine-tune (FisherAdapTune)")
    for step in bar:
        idx = torch.randint(0, len(y), (32,))
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
        bar.set_postfix(active=f"{opt.active_fraction:.2f}")
    elapsed = time.perf_counter() - start

    print(opt.summary(max_rows=24))
    print(f"in-distribution accuracy {accuracy(model, *task.test):.3f}; zero-shot transfer: " +
          ", ".join(f"{k} {accuracy(model, *v):.3f}" for k, v in task.transfer.items()))
    print(f"active fraction {opt.active_fraction:.3f}, fine-tuning time {elapsed:.1f} s")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    opt.plot(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
