"""What the demo measures on a fine-tuned model: accuracy and training-state memory."""
from __future__ import annotations

import torch
from torch import nn

import fisheradaptune as fat

__all__ = ["accuracy", "state_bytes"]


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Parameters + gradients + optimizer state, counted from the live tensors."""
    inner = opt.optimizer if isinstance(opt, fat.WrappedOptimizer) else opt
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    total += sum(v.numel() * v.element_size() for s in inner.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor))
    if isinstance(opt, fat.FisherAdapTune):
        total += sum(f.numel() * f.element_size() for f in opt.estimator.snapshot() if f is not None)
        total += sum(r.numel() * r.element_size() for r in opt.references if r is not None)
    return total


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            correct += int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum())
    model.train()
    return correct / max(len(y), 1)
