"""Feature-space adapters (VeFA, LoRFA) on scikit-learn's digits: a runnable tour (< 30 s, CPU).

1. Pretrain a small MLP on clean 8x8 digits (the "pretrained model").
2. Build a shifted target domain (a fixed random gain per pixel, plus noise) with only a few
   labelled examples.
3. Fine-tune with VeFA (every Linear except the head) and with LoRFA placed on the 2 layers of
   largest Fisher mass ("fisher:2", per-sample Fisher over a few calibration batches).
4. Report target and source accuracy, trainable parameters, adapter checkpoint size, and check
   that merging into plain nn.Linear layers is exact and that unmerge restores the adapters.

Run: python examples/feature_adapters.py
"""
import copy
import io
import time

import torch
import torch.nn.functional as F
from torch import nn

import fisheradaptune  # noqa: F401  (loads the compiled ops)
from fisheradaptune import adapters


def load_digits():
    try:
        from sklearn.datasets import load_digits as sk_load
        d = sk_load()
        x = torch.tensor(d.data, dtype=torch.float32) / 16.0
        y = torch.tensor(d.target, dtype=torch.long)
    except ImportError:  # synthetic stand-in: 10 noisy prototypes
        g = torch.Generator().manual_seed(0)
        protos = torch.rand(10, 64, generator=g)
        y = torch.randint(0, 10, (1797,), generator=g)
        x = (protos[y] + 0.3 * torch.randn(1797, 64, generator=g)).clamp(0, 1)
    return x, y


def shift_domain(x, seed=1):
    """A "sensor" shift: a fixed random gain per pixel (0.2x to 2x) plus noise. A per-feature
    effect of this kind is what feature-space adaptation is meant to compensate."""
    g = torch.Generator().manual_seed(seed)
    gain = 0.2 + 1.8 * torch.rand(64, generator=g)
    return x * gain + 0.1 * torch.randn(x.shape, generator=g)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 128)
        self.fc3 = nn.Linear(128, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = F.gelu(self.fc1(x))
        x = F.gelu(self.fc2(x))
        return self.head(F.gelu(self.fc3(x)))


def train(model, x, y, steps, lr, bs=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (bs,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def main():
    t0 = time.time()
    torch.set_num_threads(1)  # tiny matrices: threading costs more than it saves
    torch.manual_seed(0)
    x, y = load_digits()
    perm = torch.randperm(len(x))
    tr, te = perm[:1200], perm[1200:]

    base = MLP()
    train(base, x[tr], y[tr], steps=600, lr=3e-3)
    print(f"pretrained: source test acc {accuracy(base, x[te], y[te]):.3f}")

    xt = shift_domain(x)
    few = tr[:200]  # few labelled target examples
    print(f"pretrained on shifted target: acc {accuracy(base, xt[te], y[te]):.3f}\n")

    calib = [(xt[few[i:i + 50]], y[few[i:i + 50]]) for i in range(0, 200, 50)]

    def loss_fn(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    runs = {
        "VeFA  (all but head)": lambda m: adapters.add_vefa(m),
        "LoRFA r=4 (fisher:2)": lambda m: adapters.add_lorfa(
            m, rank=4, modules="fisher:2", batches=calib, loss_fn=loss_fn),
    }
    for label, add in runs.items():
        model = copy.deepcopy(base)
        add(model)
        placed = [n for n, _ in adapters.named_adapters(model)]
        print(f"== {label}: adapters on {placed}")
        adapters.print_trainable_parameters(model)
        train(model, xt[few], y[few], steps=300, lr=1e-2, seed=1)
        print(f"target acc {accuracy(model, xt[te], y[te]):.3f} | "
              f"source acc {accuracy(model, x[te], y[te]):.3f}")

        buf = io.BytesIO()
        torch.save(adapters.state_dict(model), buf)
        full = io.BytesIO()
        torch.save(model.state_dict(), full)
        print(f"adapter checkpoint {buf.tell() / 1024:.1f} KiB (adapters + head) vs full model "
              f"{full.tell() / 1024:.1f} KiB")

        before = model(xt[te])
        adapters.merge(model)
        after = model(xt[te])
        kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.Linear)})
        print(f"merged -> {kinds}; max |out diff| {(after - before).abs().max().item():.2e}")
        adapters.unmerge(model)
        assert torch.equal(model(xt[te]), before)
        print("unmerge restored the adapters exactly\n")
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
