"""ToMe token merging on a trained ViT, without retraining: train a small ViT on scikit-learn's
digits (all tokens), then merge ``r`` tokens per block with ``fisheradaptune.vit.token_merge``
and compare accuracy, token counts and speed (docs/methods.md section 7).

    python examples/token_merge_vit.py [--steps 300] [--threads 1]

Runs in about half a minute on a CPU.
"""
import argparse
import time

import torch
import torch.nn.functional as F

import fisheradaptune as fat
from fisheradaptune.demo.data import load_digits
from fisheradaptune.demo.models import TinyViT


def evaluate(model, x, y, repeats=5):
    """Accuracy and the median time of one pass over ``x``."""
    model.eval()
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t = time.perf_counter()
            pred = model(x).argmax(-1)
            times.append(time.perf_counter() - t)
    return (pred == y).float().mean().item(), sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = load_digits(img_size=16)
    perm = torch.randperm(len(x))
    x, y = x[perm], y[perm]
    split = int(0.8 * len(x))
    (xt, yt), (xv, yv) = (x[:split], y[:split]), (x[split:], y[split:])

    model = TinyViT(img_size=16, patch=2, dim=64, depth=6, heads=4, num_classes=10)  # 65 tokens
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.05)
    t0 = time.time()
    for step in range(args.steps):
        model.train()
        idx = torch.randint(0, len(xt), (32,))
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(f"trained on all tokens for {args.steps} steps in {time.time() - t0:.1f} s "
          f"(loss {loss.item():.3f})")

    acc0, t_full = evaluate(model, xv, yv)
    print(f"{'r':>12} {'tokens per block':>34} {'val acc':>8} {'ms':>7} {'speed-up':>8}")
    print(f"{'unpatched':>12} {'65 everywhere':>34} {acc0:8.3f} {t_full * 1e3:7.1f} {1.0:8.2f}")
    for r, schedule in ((4, "constant"), (8, "constant"), (8, "decreasing")):
        handle = fat.vit.token_merge(model, r=r, schedule=schedule)
        counts = []
        hooks = [b.register_forward_pre_hook(lambda m, a: counts.append(a[0].shape[1]))
                 for b in model.blocks]
        with torch.inference_mode():
            model(xv[:1])
        for h in hooks:
            h.remove()
        acc, t = evaluate(model, xv, yv)
        handle.remove()
        label = f"{r} {schedule[:3]}"
        print(f"{label:>12} {str(counts):>34} {acc:8.3f} {t * 1e3:7.1f} {t_full / t:8.2f}")
    # unpatch restored the model exactly
    assert evaluate(model, xv, yv, repeats=1)[0] == acc0


if __name__ == "__main__":
    main()
