"""Drift tracking and freeze policies of FisherAdapTune (SPEC sections 3 and 4).

:class:`DriftTracker` keeps, per group, the smoothed JS drift ``jsema <- d * jsema + (1 - d) * jsd``
(starting at 0, as in the paper) and the paper's scores (total variation of ``jsema`` over the
run, or its mean). Policies read it and return the groups to freeze; all are monotone (a frozen
group stays frozen unless the user calls ``unfreeze``).
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import Tensor

__all__ = ["DriftTracker", "Threshold", "PaperPolicy", "Policy"]


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

    def load_state_dict(self, sd: dict) -> None:
        for k in ("last", "jsema", "checks", "total_variation", "jsema_sum"):
            if sd[k].shape != getattr(self, k).shape:
                raise ValueError(f"argument 'state_dict': '{k}' has {sd[k].numel()} groups, "
                                 f"this wrapper has {getattr(self, k).numel()}")
            setattr(self, k, sd[k].clone())
        self.history = list(sd["history"])


@dataclass
class Context:
    """What a policy sees at a decision point."""

    step: int
    tracker: DriftTracker
    active: Tensor          # bool [G]: groups still trainable
    group_sizes: Tensor     # int64 [G]
    total_elements: int     # trainable elements at the start
    zero_fisher: Optional[Tensor] = None  # bool [G], at the first step only


class Policy(abc.ABC):
    """Base class: ``initial`` runs after the first Fisher update (before the first optimizer
    step), ``decide`` after each drift check. Both return a bool mask of groups to freeze."""

    def initial(self, ctx: Context) -> Tensor:
        return torch.zeros_like(ctx.active)

    @abc.abstractmethod
    def decide(self, ctx: Context) -> Tensor:
        """The groups to freeze now (bool mask over all groups)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        pass


@dataclass
class Threshold(Policy):
    """Freeze a group once its drift has settled (the recommended default).

    After ``warmup`` steps, a group is frozen once its smoothed drift (``jsema``, bias-corrected
    so that a group's first measurement is not read as near-zero) has stayed below ``tau`` for
    ``patience`` consecutive drift checks. Freezing never takes the active trainable elements
    below ``min_active_fraction`` of those at the start; when it would, the most settled groups
    (lowest drift) go first. ``tau`` is in the units of the distance (nats by default: range
    ``[0, sqrt(ln 2)] ~ [0, 0.83]``).
    """

    tau: float = 0.05
    patience: int = 3
    warmup: int = 0
    min_active_fraction: float = 0.05
    _below: Optional[Tensor] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.tau, (int, float)) and self.tau > 0 and math.isfinite(self.tau)):
            raise ValueError(f"argument 'tau': expected a finite number > 0, got {self.tau!r}")
        if not (isinstance(self.patience, int) and self.patience >= 1):
            raise ValueError(f"argument 'patience': expected an integer >= 1, got {self.patience!r}")
        if not (isinstance(self.warmup, int) and self.warmup >= 0):
            raise ValueError(f"argument 'warmup': expected an integer >= 0, got {self.warmup!r}")
        if not 0.0 <= self.min_active_fraction <= 1.0:
            raise ValueError("argument 'min_active_fraction': expected a fraction in [0, 1], got "
                             f"{self.min_active_fraction!r}")

    def decide(self, ctx: Context) -> Tensor:
        if self._below is None or self._below.numel() != ctx.active.numel():
            self._below = torch.zeros(ctx.active.numel(), dtype=torch.int64)
        drift = ctx.tracker.corrected_jsema()
        measured = ctx.tracker.checks > 0
        settled = measured & (drift < self.tau)
        self._below = torch.where(settled, self._below + 1, torch.zeros_like(self._below))
        if ctx.step < self.warmup:
            return torch.zeros_like(ctx.active)
        want = ctx.active & (self._below >= self.patience)
        budget = int(ctx.group_sizes[ctx.active].sum()) - math.ceil(
            self.min_active_fraction * ctx.total_elements)
        if int(ctx.group_sizes[want].sum()) <= budget:
            return want
        out = torch.zeros_like(want)
        order = torch.argsort(torch.where(want, drift, torch.inf), stable=True)
        for g in order.tolist():
            if not want[g]:
                break
            size = int(ctx.group_sizes[g])
            if size <= budget:
                out[g] = True
                budget -= size
        return out

    def state_dict(self) -> dict:
        return {"below": None if self._below is None else self._below.clone()}

    def load_state_dict(self, sd: dict) -> None:
        self._below = None if sd.get("below") is None else sd["below"].clone()


@dataclass
class PaperPolicy(Policy):
    """The FisherAdapTune paper's schedule (SPEC section 4).

    After the first Fisher update, every group whose Fisher is all zero is frozen. Then every
    ``every`` steps (at the first drift check at or after each multiple), the active groups with
    ``score >= mean(score) + lam * std(score)`` (population std over active groups) stay active
    and the rest freeze; if none qualifies, the highest-scoring group stays. ``score`` is the
    total variation of ``jsema`` over the run (default) or the mean of ``jsema``.

    ``lam=1`` is aggressive: for roughly normal scores it keeps about 16% of groups, and heavy
    tails can freeze more than 95% at the first decision.
    """

    lam: float = 1.0
    every: int = 3000
    score: str = "total_variation"
    _next: Optional[int] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam)):
            raise ValueError(f"argument 'lam': expected a finite number, got {self.lam!r}")
        if not (isinstance(self.every, int) and self.every >= 1):
            raise ValueError(f"argument 'every': expected an integer >= 1, got {self.every!r}")
        if self.score not in ("total_variation", "mean"):
            raise ValueError("argument 'score': expected \"total_variation\" or \"mean\", got "
                             f"{self.score!r}")

    def initial(self, ctx: Context) -> Tensor:
        return ctx.active & ctx.zero_fisher

    def decide(self, ctx: Context) -> Tensor:
        if self._next is None:
            self._next = self.every
        if ctx.step < self._next:
            return torch.zeros_like(ctx.active)
        while self._next <= ctx.step:
            self._next += self.every
        if not bool(ctx.active.any()):
            return torch.zeros_like(ctx.active)
        score = ctx.tracker.score(self.score)
        s = score[ctx.active]
        threshold = s.mean() + self.lam * s.std(unbiased=False)
        keep = ctx.active & (score >= threshold)
        if not bool(keep.any()):
            masked = torch.where(ctx.active, score, -torch.inf)
            keep[int(torch.argmax(masked))] = True
        return ctx.active & ~keep

    def state_dict(self) -> dict:
        return {"next": self._next}

    def load_state_dict(self, sd: dict) -> None:
        self._next = sd.get("next")
