"""DriftTracker: the per-group drift statistics FisherAdapTune's policies read.

Per group it keeps the smoothed JS drift ``jsema <- d * jsema + (1 - d) * jsd`` (starting at 0,
as in the paper) and the paper's scores: the total variation of ``jsema`` over the run, or its
mean (docs/methods.md section 3).
"""
from __future__ import annotations

import math
from typing import List

import torch
from torch import Tensor

__all__ = ["DriftTracker"]


class DriftTracker:
    """Per-group drift statistics, on the host (updated once per drift check).

    Attributes (float64 / int64 CPU tensors of length ``num_groups``):
        last: the last measured JS distance.
        jsema: the paper's EMA of the distance, starting at 0.
        checks: how many times each group was measured (a first visit only sets the
            reference and is not a measurement).
        total_variation: ``sum |jsema_t - jsema_{t-1}|`` over measurements.
        jsema_sum: the running sum of ``jsema``, for the mean score.
    """

    def __init__(self, num_groups: int, decay: float = 0.9):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"argument 'score_decay': expected a value in [0, 1), got {decay}")
        self.decay = float(decay)
        g = num_groups
        self.last = torch.zeros(g, dtype=torch.float64)
        self.jsema = torch.zeros(g, dtype=torch.float64)
        self.checks = torch.zeros(g, dtype=torch.int64)
        self.total_variation = torch.zeros(g, dtype=torch.float64)
        self.jsema_sum = torch.zeros(g, dtype=torch.float64)
        self.history: List[dict] = []  # one entry per check: step, jsd, jsema, active

    def record(self, step: int, jsd: Tensor, measured: Tensor, active: Tensor) -> None:
        """Fold the distances ``jsd`` of the ``measured`` groups in."""
        jsd = jsd.detach().to("cpu", torch.float64)
        m = measured & active
        new = self.decay * self.jsema + (1.0 - self.decay) * jsd
        self.total_variation = torch.where(m, self.total_variation + (new - self.jsema).abs(),
                                           self.total_variation)
        self.jsema = torch.where(m, new, self.jsema)
        self.jsema_sum = torch.where(m, self.jsema_sum + self.jsema, self.jsema_sum)
        self.last = torch.where(m, jsd, self.last)
        self.checks = self.checks + m.long()
        self.history.append({"step": step, "jsd": torch.where(m, jsd, torch.nan).float(),
                             "jsema": self.jsema.float().clone(),
                             "drift": self.corrected_jsema().float(), "active": active.clone()})

    def corrected_jsema(self) -> Tensor:
        """``jsema`` with the EMA's start-at-zero bias removed (``jsema / (1 - d**n)``)."""
        denom = 1.0 - torch.pow(torch.tensor(self.decay, dtype=torch.float64), self.checks)
        return torch.where(self.checks > 0, self.jsema / denom.clamp_min(1e-300),
                           torch.full_like(self.jsema, math.nan))

    def score(self, kind: str) -> Tensor:
        if kind == "total_variation":
            return self.total_variation.clone()
        if kind == "mean":
            return self.jsema_sum / self.checks.clamp_min(1)
        raise ValueError(f"argument 'score': expected \"total_variation\" or \"mean\", got {kind!r}")

    def reset(self, groups: Tensor) -> None:
        """Forget the statistics of ``groups`` (bool mask), e.g. after ``unfreeze``."""
        for t in (self.last, self.jsema, self.total_variation, self.jsema_sum):
            t[groups] = 0
        self.checks[groups] = 0

    def state_dict(self) -> dict:
        return {"decay": self.decay, "last": self.last.clone(), "jsema": self.jsema.clone(),
                "checks": self.checks.clone(), "total_variation": self.total_variation.clone(),
                "jsema_sum": self.jsema_sum.clone(), "history": list(self.history)}

    _KEYS = ("last", "jsema", "checks", "total_variation", "jsema_sum")

    def check_state_dict(self, sd) -> None:
        """Raise ``ValueError`` unless :meth:`load_state_dict` can load ``sd`` as it is."""
        want = ("decay", "history") + self._KEYS
        if not isinstance(sd, dict) or any(k not in sd for k in want):
            have = sorted(sd) if isinstance(sd, dict) else type(sd).__name__
            raise ValueError(f"argument 'state_dict': 'tracker' must have keys {list(want)}, "
                             f"got {have}")
        for k in self._KEYS:
            live, v = getattr(self, k), sd[k]
            if not isinstance(v, Tensor) or v.dtype != live.dtype or v.shape != live.shape:
                got = (f"{v.dtype} of shape {list(v.shape)}" if isinstance(v, Tensor)
                       else type(v).__name__)
                raise ValueError(f"argument 'state_dict': 'tracker.{k}' must be a {live.dtype} "
                                 f"tensor of shape {list(live.shape)}, got {got}")
            # Distances, their EMA and sums are finite and >= 0; so are counts.
            ok = torch.isfinite(v) & (v >= 0) if v.is_floating_point() else v >= 0
            if not bool(ok.all()):
                raise ValueError(f"argument 'state_dict': 'tracker.{k}' holds negative or "
                                 "non-finite values")
        if not isinstance(sd["history"], list):
            raise ValueError("argument 'state_dict': 'tracker.history' must be a list, got "
                             f"{type(sd['history']).__name__}")

    def load_state_dict(self, sd: dict) -> None:
        self.check_state_dict(sd)
        for k in self._KEYS:
            setattr(self, k, sd[k].clone())
        self.history = list(sd["history"])
