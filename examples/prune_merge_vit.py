"""Token prune-merge in a small ViT: train on scikit-learn's digits, then compare accuracy,
token counts and speed with and without ``fisheradaptune.vit.prune_merge`` (docs/methods.md
section 6).

    python examples/prune_merge_vit.py [--steps 250] [--keep 0.7] [--threads 1]

Training uses an EViT-style warm-up of the keep fraction (1.0 down to ``--keep``), advanced
with ``handle.set_step``. Runs in well under 30 s on a CPU.
"""
import argparse
import time

import torch
import torch.nn.functional as F

import fisheradaptune as fat
from fisheradaptune.demo.data import load_digits
from fisheradaptune.demo.models import TinyViT


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=250)
    # A model this small runs fastest on one thread (and a shared machine makes more worse).
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", type=float, default=0.7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = load_digits(img_size=16)
    perm = torch.randperm(len(x))
    x, y = x[perm], y[perm]
    split = int(0.8 * len(x))
    (xt, yt), (xv, yv) = (x[:split], y[:split]), (x[split:], y[split:])

    model = TinyViT(img_size=16, patch=2, dim=64, depth=6, heads=4, num_classes=10)  # 65 tokens
    warmup = args.steps // 3
    handle = fat.vit.prune_merge(
        model, keep=lambda s: 1.0 - (1.0 - args.keep) * min(1.0, s / max(warmup, 1)),
        layers=(1, 3, 4))
    print(handle)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.05)
    t0 = time.time()
    for step in range(args.steps):
        handle.set_step(step)
        model.train()
        idx = torch.randint(0, len(xt), (32,))
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  keep {handle.keep_fraction:.2f}  loss {loss.item():.3f}")
    print(f"trained in {time.time() - t0:.1f} s")

    counts = []
    hooks = [b.register_forward_pre_hook(lambda m, a: counts.append(a[0].shape[1]))
             for b in model.blocks]
    acc_merged = accuracy(model, xv, yv)
    print(f"tokens entering each block: {counts[:len(model.blocks)]}; "
          f"sizes of the last tokens (sample 0): {handle.sizes[0, -3:].tolist()}")
    for h in hooks:
        h.remove()

    def timed():
        t = time.perf_counter()
        for _ in range(5):
            accuracy(model, xv, yv)
        return (time.perf_counter() - t) / 5

    t_merged = timed()
    handle.remove()
    acc_full = accuracy(model, xv, yv)
    t_full = timed()
    print(f"validation accuracy: all tokens {acc_full:.3f}, prune-merge {acc_merged:.3f}")
    print(f"inference on {len(xv)} images: all tokens {t_full * 1e3:.1f} ms, prune-merge "
          f"{t_merged * 1e3:.1f} ms ({t_full / t_merged:.2f}x)")


if __name__ == "__main__":
    main()
