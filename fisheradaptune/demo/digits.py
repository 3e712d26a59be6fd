"""The digits task of the demo (``--task digits``, the default): a TinyViT pretrained for
seconds on clean scikit-learn digits, fine-tuned on a shifted style with few labels.

Transfer = zero-shot accuracy under held-out shifts (noise, blur, rotation, inversion), each
and their mean (see :mod:`fisheradaptune.demo.data`). Seed 0 also writes the drift/freeze plot
of a FisherAdapTune (Threshold) run and the patches kept by TR-PTS token reduction.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import fisheradaptune as fat
from .data import digits_transfer_task
from .methods import METHODS
from .models import TinyViT
from .scoring import accuracy
from .progress import tqdm

__all__ = ["Config", "QUICK", "LARGE", "DigitsDemo", "pretrain", "plot_kept_tokens"]


@dataclass
class Config:
    pretrain_steps: int = 600
    finetune_steps: int = 400
    batch: int = 32
    lr: float = 5e-4
    check_every: int = 25
    dim: int = 64
    depth: int = 4
    labels_per_class: int = 20


QUICK = Config(pretrain_steps=200, finetune_steps=120, check_every=12)
LARGE = Config(pretrain_steps=1500, finetune_steps=800, dim=192, depth=6, batch=64, check_every=40)


def pretrain(cfg: Config, task, seed: int, device: torch.device) -> TinyViT:
    torch.manual_seed(seed)
    model = TinyViT(dim=cfg.dim, depth=cfg.depth, heads=4, num_classes=task.num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.pretrain_steps)
    x, y = (t.to(device) for t in task.pretrain)
    for _ in tqdm(range(cfg.pretrain_steps), desc=f"seed {seed}: pretrain", leave=False):
        idx = torch.randint(0, len(y), (128,), device=device)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    return model


def plot_kept_tokens(model: nn.Module, task, path: str, n_images: int = 6) -> None:
    """Show which patches survive the token reductions on a few test images (red = merged)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    handle = fat.vit.handle_of(model)
    device = next(model.parameters()).device
    x = task.test[0][:n_images].to(device)
    handle.record = True
    model.eval()
    with torch.no_grad():
        model(x)
    model.train()
    handle.record = False
    kept = handle.kept_patches.cpu()
    patch = model.patch_embed.proj.kernel_size[0]
    side = x.shape[-1] // patch
    fig, axes = plt.subplots(1, n_images, figsize=(2 * n_images, 2.3))
    for i, ax in enumerate(axes):
        merged = torch.ones(side * side, dtype=torch.bool)
        merged[kept[i][kept[i] >= 0]] = False
        merged = merged.view(side, side).repeat_interleave(patch, 0).repeat_interleave(patch, 1)
        rgb = x[i, 0].cpu().clamp(0, 1).unsqueeze(-1).repeat(1, 1, 3)
        tint = torch.tensor([0.8, 0.1, 0.1])
        rgb[merged] = 0.45 * rgb[merged] + 0.55 * tint  # merged patches in red
        ax.imshow(rgb.numpy())
        ax.set_title(f"{int((kept[i] >= 0).sum())}/{side * side} kept", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"patches kept after blocks {handle.layers} (keep {handle.keep_fraction})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class DigitsDemo:
    """The harness's view of the digits task (see :mod:`fisheradaptune.demo.run`)."""

    name = "digits"
    json_name = "demo.json"
    default_out = "results/demo"
    methods = tuple(METHODS)
    #: (header, result key): the per-task score columns of the table, in percent.
    columns = (("ID acc %", "id_acc"), ("transfer acc %", "transfer_acc"))

    def config(self, quick: bool, large: bool) -> Config:
        return LARGE if large else QUICK if quick else Config()

    def default_seeds(self, quick: bool) -> int:
        return 3

    def prepare(self, cfg: Config, seed: int, device: torch.device):
        """(task data, pretrained model, what the pretrained model scores) for ``seed``."""
        task = digits_transfer_task(labels_per_class=cfg.labels_per_class, seed=seed)
        base = pretrain(cfg, task, seed, device)
        return task, base, {"id_acc": accuracy(base, *(t.to(device) for t in task.test))}

    def extra_metrics(self, model, base, task, device) -> dict:
        return {}

    def artifacts(self, method: str, result: dict, task, seed: int, out_dir: str) -> None:
        if seed != 0:
            return
        if method == "FisherAdapTune (Threshold)" and "_opt" in result:
            os.makedirs(out_dir, exist_ok=True)
            result["_opt"].plot(os.path.join(out_dir, "adaptune_drift.png"))
        if fat.vit.handle_of(result["_model"]) is not None:
            os.makedirs(out_dir, exist_ok=True)
            plot_kept_tokens(result["_model"], task, os.path.join(out_dir, "kept_tokens.png"))

    def total_params(self, cfg: Config) -> int:
        return sum(p.numel() for p in TinyViT(dim=cfg.dim, depth=cfg.depth).parameters())

    def describe(self, cfg: Config, seeds: int, device, total: int) -> str:
        return (f"fisheradaptune demo: TinyViT dim {cfg.dim} depth {cfg.depth} ({total:,} params), "
                f"{seeds} seed{'s' if seeds != 1 else ''}, {cfg.finetune_steps} fine-tuning steps, "
                f"{cfg.labels_per_class} labels "
                f"per class, device {device}")
