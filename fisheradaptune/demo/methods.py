"""The fine-tuning methods the demo compares, for any task whose model has a ``head``.

Each method prepares the pretrained model in place and returns ``(optimizer, active_params)``,
where ``active_params()`` reports the parameters being trained at the end. They read
``cfg.lr``, ``cfg.batch``, ``cfg.check_every`` and ``cfg.finetune_steps`` and the task's
``train`` tensors ``(x, y)`` (for the Fisher-based selections' calibration batches); a model may
name the Linear layers LoRA adapts (``model.lora_modules``: name suffixes) and the methods that
only apply to some models are listed per task (:data:`VIT_ONLY`). peft's SHiRA (random and
Fisher masks, :data:`SHIRA_METHODS`) is offered by the MiniLM task only and needs ``peft``.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

import fisheradaptune as fat
from .baselines import LoRALinear, StaticMask

__all__ = ["METHODS", "VIT_ONLY", "SHIRA_METHODS", "ALL_METHODS", "SHIRA_R", "peft_available",
           "trainable"]


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _adamw(params, cfg, lr_scale=1.0):
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=cfg.lr * lr_scale,
                             weight_decay=0.05)


def linear_probe(model, cfg, task):
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.head.parameters():
        p.requires_grad_(True)
    return _adamw(model.parameters(), cfg, lr_scale=10.0), lambda: trainable(model)


def full_finetune(model, cfg, task):
    return _adamw(model.parameters(), cfg), lambda: trainable(model)


def _adaptune(policy_fn):
    def method(model, cfg, task):
        opt = fat.FisherAdapTune(_adamw(model.parameters(), cfg), model, check_every=cfg.check_every,
                                 fisher_decay=0.98, policy=policy_fn(cfg))
        tracked = sum(p.numel() for p in opt.params)
        return opt, lambda: round(opt.active_fraction * tracked)
    return method


adaptune_paper = _adaptune(lambda cfg: fat.PaperPolicy(lam=1.0, every=max(cfg.finetune_steps // 3,
                                                                          cfg.check_every)))
# With fisher_decay=0.98 the bias-corrected mass-mode drift of the digits task's slabs plateaus
# between about 0.06 and 0.2 (chosen from the drift curves, not from accuracy): tau=0.1 freezes
# the groups whose Fisher shape is the most stable. The MiniLM task keeps the same preset.
adaptune_threshold = _adaptune(lambda cfg: fat.Threshold(tau=0.1, patience=2, min_active_fraction=0.1))


def vefa(model, cfg, task):
    fat.adapters.add_vefa(model)
    return _adamw(model.parameters(), cfg, lr_scale=10.0), lambda: trainable(model)


def lorfa(model, cfg, task):
    fat.adapters.add_lorfa(model, rank=4)
    return _adamw(model.parameters(), cfg, lr_scale=4.0), lambda: trainable(model)


def _target_names(model: nn.Module):
    """Full names of the Linear layers LoRA adapts (see :func:`_lora_targets`)."""
    names = {id(m): n for n, m in model.named_modules()}
    return [f"{names[id(parent)]}.{child_name}" if names[id(parent)] else child_name
            for parent, child_name, _ in _lora_targets(model)]


def _lora_targets(model: nn.Module):
    """(parent, child name) of each Linear LoRA adapts: those whose name ends with one of
    ``model.lora_modules`` when the model says, else every Linear but the head."""
    suffixes = getattr(model, "lora_modules", None)
    out = []
    for name, module in list(model.named_modules()):
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear) or full == "head":
                continue
            if suffixes is None or full.split(".")[-1] in suffixes:
                out.append((module, child_name, child))
    return out


def lora(model, cfg, task):
    """LoRA (rank 4) on the model's LoRA targets (default every Linear but the head); head
    trained densely."""
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, name, child in _lora_targets(model):
        setattr(parent, name, LoRALinear(child, rank=4, alpha=4.0))
    for p in model.head.parameters():
        p.requires_grad_(True)
    return _adamw(model.parameters(), cfg, lr_scale=4.0), lambda: trainable(model)


def _calibration(task, cfg, n_batches: int = 4):
    """A few labelled batches of the fine-tuning set, for Fisher-based selection."""
    x, y = task.train
    g = torch.Generator().manual_seed(0)
    return [(x[idx], y[idx]) for idx in (torch.randint(0, len(y), (cfg.batch,), generator=g)
                                         for _ in range(n_batches))]


def _ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x.to(next(model.parameters()).device)),
                           y.to(next(model.parameters()).device))


def tr_pts(model, cfg, task, tokens: bool = False):
    """TR-PTS parameter selection (docs/methods.md section 5): per-sample Fisher, M = 2%, c_min = 1.

    M is the fraction of the Linear weights (head aside) selected, at least c_min per row, plus the
    dense head and biases; the "active params" column reports the total."""
    sel = fat.selection.select_connections(model, _calibration(task, cfg), _ce, budget=0.02, c_min=1)
    params = sel.apply(model, mode="mask")
    if tokens:
        # EViT reduces after blocks 3, 6 and 9 of 12: the same relative depths here.
        depth = len(model.blocks)
        layers = sorted({round(i * depth / 12) for i in (3, 6, 9)} & set(range(depth)))
        fat.vit.prune_merge(model, keep=0.7, layers=tuple(layers))
    opt = fat.MaskedOptimizer(_adamw(params, cfg, lr_scale=4.0), sel)
    return opt, sel.trainable_parameters


def tr_pts_tokens(model, cfg, task):
    return tr_pts(model, cfg, task, tokens=True)


def fish_mask(model, cfg, task, budget: float = 0.02):
    fisher = fat.fisher.estimate(model, _calibration(task, cfg), _ce, estimator="empirical",
                                 modules=[n for n, m in model.named_modules()
                                          if isinstance(m, nn.Linear) and n != "head"])
    named = dict(model.named_modules())
    flat = torch.cat([f.flatten() for f in fisher.values()])
    k = max(1, int(budget * flat.numel()))
    threshold = torch.topk(flat, k).values[-1]
    masks = {named[n].weight: (f >= threshold) for n, f in fisher.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in list(masks) + list(model.head.parameters()):
        p.requires_grad_(True)
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    count = sum(int(m.sum()) for m in masks.values()) + sum(p.numel() for p in model.head.parameters())
    return StaticMask(_adamw(trainable_params, cfg, lr_scale=4.0), masks), lambda: count


#: SHiRA's r: r * (in + out) trained entries per adapted layer, as many as LoRA (r=4) trains.
SHIRA_R = 4


def peft_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("peft") is not None


def _shira(fisher_mask: bool):
    """peft's SHiRA at r = :data:`SHIRA_R` on the LoRA targets (same trainable count as LoRA
    r=4), head trained densely. The random mask is peft's own (``random_seed`` from the
    demo's seed; peft seeds every layer alike, so same-shaped layers share one pattern); the
    Fisher mask is :func:`fisheradaptune.integrations.peft.shira_mask_fn` on the same
    calibration batches as TR-PTS (per-sample Fisher, row-balanced top entries)."""
    def method(model, cfg, task):
        try:
            import peft
        except ImportError as e:
            raise ImportError("the SHiRA methods need peft: pip install peft (or bash "
                              "tools/setup.sh)") from e
        import warnings
        from fisheradaptune.integrations.peft import shira_mask_fn
        names = _target_names(model)
        with warnings.catch_warnings():
            # peft warns that a mask_type other than "random" needs a mask_fn: it gets one.
            warnings.simplefilter("ignore", UserWarning)
            if fisher_mask:
                config = peft.ShiraConfig(r=SHIRA_R, target_modules=names, mask_type="fisher")
                config.mask_fn = shira_mask_fn(model, _calibration(task, cfg), _ce, modules=names)
            else:
                config = peft.ShiraConfig(r=SHIRA_R, target_modules=names,
                                          random_seed=torch.initial_seed())
            peft.get_peft_model(model, config)  # replaces the targets in place, freezes the rest
        for p in model.head.parameters():
            p.requires_grad_(True)
        return _adamw(model.parameters(), cfg, lr_scale=4.0), lambda: trainable(model)
    return method


METHODS: Dict[str, Callable] = {
    "linear probe": linear_probe,
    "full fine-tuning": full_finetune,
    "LoRA (r=4)": lora,
    "FISH static mask (2%)": fish_mask,
    "TR-PTS params (M=2%)": tr_pts,
    "TR-PTS params + tokens": tr_pts_tokens,
    "FisherAdapTune (paper preset)": adaptune_paper,
    "FisherAdapTune (Threshold)": adaptune_threshold,
    "VeFA": vefa,
    "LoRFA (r=4)": lorfa,
}

#: Methods that need a ViT with a class token (the prune-merge hook).
VIT_ONLY = ("TR-PTS params + tokens",)

#: peft's SHiRA, random mask against Fisher masks at the same r (the MiniLM task's).
SHIRA_METHODS: Dict[str, Callable] = {
    f"SHiRA random mask (r={SHIRA_R})": _shira(fisher_mask=False),
    f"SHiRA Fisher mask (r={SHIRA_R})": _shira(fisher_mask=True),
}

#: Every method by name, whichever task offers it.
ALL_METHODS: Dict[str, Callable] = {**METHODS, **SHIRA_METHODS}
