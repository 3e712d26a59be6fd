"""The TR-PTS selection formula (docs/methods.md section 5): from a diagonal Fisher over the
chosen Linear weights to each layer's row-balanced index. Pure tensor math, no model."""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
from torch import Tensor

from .checks import check_budget, check_c_min

__all__ = ["select_from_fisher"]


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def select_from_fisher(fisher: Dict[str, Tensor], budget: float = 0.005, c_min: int = 1,
                       skip_empty: bool = False) -> Tuple[Dict[str, Tensor], Dict[str, int]]:
    """Steps 2-4 of the algorithm on a given Fisher ``{name: [out, in]}`` (see the module doc).

    ``budget`` in ``(0, 1]`` is the fraction of all the layers' entries to select (up to
    rounding to whole rows and the ``c_min`` floor, see the module doc); a larger budget selects
    a superset, ``1`` selects everything. ``c_min`` is the least number of connections per row
    of any layer that gets some; ``skip_empty`` gives layers with no entry in the global top
    set ``C_l = 0`` instead of ``min(c_min, in_features)``.

    Returns ``(index, c)``: ``{name: int64 [out, C_l]}`` (rows sorted ascending, on the Fisher's
    device) and ``{name: C_l}``.
    """
    budget = check_budget(budget)
    c_min = check_c_min(c_min)
    if not fisher:
        raise ValueError("argument 'fisher': expected at least one layer, got none")
    flats = []
    for name, f in fisher.items():
        if not isinstance(f, Tensor) or f.dim() != 2:
            raise ValueError(f"argument 'fisher': {name!r}: expected a 2-D tensor [out, in], got "
                             f"{tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__}")
        if not f.is_floating_point():
            raise TypeError(f"argument 'fisher': {name!r}: expected a floating tensor, got {f.dtype}")
        if f.numel() and not bool(torch.isfinite(f).all()):
            raise ValueError(f"argument 'fisher': {name!r}: contains non-finite values")
        # float32 (float64 kept): exact for the Fisher's own values, half the memory of float64.
        dtype = torch.float64 if f.dtype == torch.float64 else torch.float32
        flats.append(f.detach().reshape(-1).to(dtype))
    names = list(fisher)
    numels = [f.numel() for f in flats]
    total = sum(numels)
    if total == 0:
        raise ValueError("argument 'fisher': every layer is empty")
    k = min(total, max(1, _round_half_up(budget * total)))

    # Step 2: the k-th largest value is the threshold; entries above it are in, ties at it are
    # taken in flat order (module order, then row-major) until k are in.
    wide = torch.float64 if any(f.dtype == torch.float64 for f in flats) else torch.float32
    flats = [f.cpu().to(wide) for f in flats]
    allv = torch.cat(flats)
    thresh = float(torch.kthvalue(-allv, k).values.neg())
    counts = []
    need = k - int((allv > thresh).sum())
    for f in flats:
        above = int((f > thresh).sum())
        ties = int((f == thresh).sum())
        take = min(ties, need)
        need -= take
        counts.append(above + take)

    # Step 3. Rows of whole entries: C_l depends on budget only through k_l, which only grows
    # with it, so C_l (and the selection) is monotone in budget.
    index: Dict[str, Tensor] = {}
    c: Dict[str, int] = {}
    for name, kl in zip(names, counts):
        f = fisher[name]
        out_f, in_f = f.shape
        if kl > 0:
            cl = min(in_f, max(c_min, _round_half_up(kl / out_f)))
        else:
            cl = 0 if skip_empty else min(c_min, in_f)
        c[name] = cl
        # Step 4: stable sort on -F, so ties go to the lower index.
        if cl == 0 or out_f == 0:
            idx = torch.empty(out_f, cl, dtype=torch.int64, device=f.device)
        else:
            order = torch.sort(-flats[names.index(name)].view(out_f, in_f), dim=1,
                               stable=True).indices.to(f.device)
            idx = order[:, :cl].sort(dim=1).values.contiguous()
        index[name] = idx
    return index, c
