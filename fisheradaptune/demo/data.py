"""Small image tasks built from scikit-learn's bundled digits (no download), for demos and tests.

The 8x8 digits are upsampled to 16x16. :func:`digits_transfer_task` makes a pretraining domain
(clean digits), a shifted downstream domain with few labels (bold, slightly translated strokes)
and held-out shifts of the downstream test set that fine-tuning never sees (noise, blur,
rotation, inversion), so in-distribution accuracy and zero-shot transfer can be measured.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["load_digits", "shift", "SHIFTS", "DigitsTask", "digits_transfer_task"]

SHIFTS = ("noise", "blur", "rotate", "invert")


def load_digits(img_size: int = 16) -> Tuple[Tensor, Tensor]:
    """All 1797 digits as float32 ``[N, 1, img_size, img_size]`` in [0, 1], labels int64 ``[N]``."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as e:  # pragma: no cover
        raise ImportError("the digits tasks need scikit-learn: pip install scikit-learn") from e
    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return x.clamp_(0, 1), torch.tensor(d.target, dtype=torch.int64)


def _bold(x: Tensor, g: torch.Generator) -> Tensor:
    """The downstream style: thicker strokes, translated by up to 2 pixels."""
    x = F.max_pool2d(x, 3, stride=1, padding=1)
    dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def shift(x: Tensor, name: str, seed: int = 0) -> Tensor:
    """Apply a held-out shift: "noise", "blur", "rotate" or "invert"."""
    g = torch.Generator().manual_seed(seed)
    if name == "noise":
        return (x + 0.35 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    if name == "blur":
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :]) / 16.0
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.view(1, 1, 3, 3).to(x))
    if name == "rotate":
        angle = math.radians(25.0)
        theta = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0],
                              [math.sin(angle), math.cos(angle), 0.0]], dtype=x.dtype)
        grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False)
    if name == "invert":
        return 1.0 - x
    raise ValueError(f"argument 'name': expected one of {SHIFTS}, got {name!r}")


@dataclass
class DigitsTask:
    pretrain: Tuple[Tensor, Tensor]
    train: Tuple[Tensor, Tensor]
    test: Tuple[Tensor, Tensor]
    transfer: Dict[str, Tuple[Tensor, Tensor]]
    num_classes: int = 10


def digits_transfer_task(labels_per_class: int = 10, seed: int = 0, img_size: int = 16) -> DigitsTask:
    """Pretrain on clean digits (half the data); fine-tune on the other half's bold style with
    ``labels_per_class`` labels per class; test in-distribution on the rest of that half and,
    zero-shot, under each held-out shift of it."""
    x, y = load_digits(img_size)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    half = len(y) // 2
    pre, down = perm[:half], perm[half:]
    xd = torch.cat([_bold(x[i:i + 1], g) for i in down.tolist()])
    yd = y[down]
    train_idx = []
    for c in range(10):
        idx = (yd == c).nonzero().flatten()
        train_idx.append(idx[torch.randperm(len(idx), generator=g)[:labels_per_class]])
    train_idx = torch.cat(train_idx)
    test_mask = torch.ones(len(yd), dtype=torch.bool)
    test_mask[train_idx] = False
    xt, yt = xd[test_mask], yd[test_mask]
    transfer = {name: (shift(xt, name, seed + i), yt) for i, name in enumerate(SHIFTS)}
    return DigitsTask(pretrain=(x[pre], y[pre]), train=(xd[train_idx], yd[train_idx]),
                      test=(xt, yt), transfer=transfer)
