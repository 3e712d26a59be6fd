"""The demo's baselines that are not part of the library: LoRA (weight space) and a FISH-style
static mask."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fisheradaptune import WrappedOptimizer

__all__ = ["LoRALinear", "StaticMask"]


class LoRALinear(nn.Module):
    """Minimal LoRA baseline (weight space): ``y = W0 x + b + (alpha / r) B A x``, B zero-init."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


class StaticMask(WrappedOptimizer):
    """FISH-style baseline: train only the global top entries of the Fisher, all parameters
    ranked together (no row balance); the others are restored after each step."""

    def __init__(self, inner: torch.optim.Optimizer, masks: Dict[Tensor, Tensor]):
        super().__init__(inner)
        self.masks = masks
        self._saved = {p: p.detach().clone() for p in masks}

    def _prepare_grads(self) -> None:
        for p, m in self.masks.items():
            if p.grad is not None:
                p.grad.mul_(m)

    def _before_step(self) -> None:
        for p in self.masks:
            self._saved[p].copy_(p)

    def _after_step(self) -> None:
        for p, m in self.masks.items():
            p.copy_(torch.where(m, p, self._saved[p]))
