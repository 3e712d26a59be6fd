"""Freeze policies of FisherAdapTune (docs/methods.md section 4).

A policy reads the drift statistics (:class:`~fisheradaptune.adaptune.DriftTracker`) at each
decision point and returns the groups to freeze. Every policy is monotone: a frozen group stays
frozen unless the user calls ``unfreeze``. A policy also tells the reports what to show
(:meth:`Policy.group_scores`, :meth:`Policy.thresholds`), so a user-defined subclass works with
``summary`` and ``plot`` without changes to the wrapper.

Groups whose drift is undefined (``Context.defined`` False: a 1-element group in ``"mass"``
mode, whose distribution is always ``[1]``) are never measured; the built-in policies never
freeze them for it (they freeze with their tensor, or by hand).
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from .tracker import DriftTracker

__all__ = ["Context", "Policy", "Threshold", "PaperPolicy", "Observe"]


@dataclass
class Context:
    """What a policy sees at a decision point."""

    step: int
    tracker: DriftTracker
    active: Tensor          # bool [G]: groups still trainable
    group_sizes: Tensor     # int64 [G]
    total_elements: int     # trainable elements at the start
    zero_fisher: Optional[Tensor] = None  # bool [G], at the first step only
    defined: Optional[Tensor] = None      # bool [G]: drift is defined (None: everywhere)

    def drift_defined(self) -> Tensor:
        """``defined``, or all True when the wrapper gave none."""
        return torch.ones_like(self.active) if self.defined is None else self.defined


class Policy(abc.ABC):
    """Base class of freeze policies; subclass it to write your own.

    Override :meth:`decide` (required) and, as needed, :meth:`initial`, :meth:`group_scores`,
    :meth:`thresholds` and the state-dict pair (for state that must survive a resume). Both
    decision methods return a bool mask over all groups of the groups to freeze now; the
    wrapper ignores groups already frozen, and under torch.distributed applies the first
    rank's decision on every rank.
    """

    def initial(self, ctx: Context) -> Tensor:
        """After the first Fisher update, before the first optimizer step."""
        return torch.zeros_like(ctx.active)

    @abc.abstractmethod
    def decide(self, ctx: Context) -> Tensor:
        """After each drift check: the groups to freeze now (bool mask over all groups)."""

    def group_scores(self, tracker: DriftTracker) -> Tensor:
        """The per-group score ``summary()`` shows (default: total variation of ``jsema``)."""
        return tracker.score("total_variation")

    def thresholds(self) -> Dict[str, float]:
        """Levels of the bias-corrected drift that ``plot()`` draws as labelled lines."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def check_state_dict(self, sd: Any, num_groups: int) -> None:
        """Raise ``ValueError`` unless :meth:`load_state_dict` can load ``sd`` (for a wrapper
        with ``num_groups`` groups) as it is; called before anything of a checkpoint is
        applied. Override it with :meth:`load_state_dict` (the default checks for a dict)."""
        if not isinstance(sd, dict):
            raise ValueError(f"argument 'state_dict': the state of {type(self).__name__} must "
                             f"be a dict, got {type(sd).__name__}")

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
        measured = (ctx.tracker.checks > 0) & ctx.drift_defined()
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

    def thresholds(self) -> Dict[str, float]:
        return {"tau": float(self.tau)}

    def state_dict(self) -> dict:
        return {"below": None if self._below is None else self._below.clone()}

    def check_state_dict(self, sd: Any, num_groups: int) -> None:
        super().check_state_dict(sd, num_groups)
        below = sd.get("below")
        if below is not None and not (isinstance(below, Tensor) and below.dtype == torch.int64
                                      and tuple(below.shape) == (num_groups,)
                                      and bool((below >= 0).all())):
            raise ValueError("argument 'state_dict': the Threshold state 'below' must be None "
                             f"or an int64 tensor of shape [{num_groups}] of counts >= 0, got "
                             f"{getattr(below, 'shape', below)!r}")

    def load_state_dict(self, sd: dict) -> None:
        self._below = None if sd.get("below") is None else sd["below"].clone()


@dataclass
class PaperPolicy(Policy):
    """The FisherAdapTune paper's schedule (docs/methods.md section 4).

    After the first Fisher update, every group whose Fisher is all zero is frozen. Then every
    ``every`` steps (at the first drift check at or after each multiple), the active groups with
    ``score >= mean(score) + lam * std(score)`` (population std over the active groups whose drift is defined) stay active
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
        # Groups with undefined drift have no score to compare: they stay active.
        ranked = ctx.active & ctx.drift_defined()
        if not bool(ranked.any()):
            return torch.zeros_like(ctx.active)
        score = self.group_scores(ctx.tracker)
        s = score[ranked]
        threshold = s.mean() + self.lam * s.std(unbiased=False)
        keep = ranked & (score >= threshold)
        if not bool(keep.any()):
            masked = torch.where(ranked, score, -torch.inf)
            keep[int(torch.argmax(masked))] = True
        return ranked & ~keep

    def group_scores(self, tracker: DriftTracker) -> Tensor:
        return tracker.score(self.score)

    def state_dict(self) -> dict:
        return {"next": self._next}

    def check_state_dict(self, sd: Any, num_groups: int) -> None:
        super().check_state_dict(sd, num_groups)
        nxt = sd.get("next")
        if nxt is not None and not (isinstance(nxt, int) and not isinstance(nxt, bool)
                                    and nxt >= 1):
            raise ValueError("argument 'state_dict': the PaperPolicy state 'next' must be None "
                             f"or an integer >= 1, got {nxt!r}")

    def load_state_dict(self, sd: dict) -> None:
        self._next = sd.get("next")


@dataclass
class Observe(Policy):
    """Never freeze: FisherAdapTune then only tracks the Fisher and its drift (``summary``,
    ``metrics``, ``plot`` work as usual), e.g. to choose ``tau`` before freezing for real."""

    def decide(self, ctx: Context) -> Tensor:
        return torch.zeros_like(ctx.active)
