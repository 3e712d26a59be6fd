"""The drift family: ``js_drift`` (Jensen-Shannon distance between two Fisher snapshots per
group, docs/methods.md section 3) and its two sharded halves ``js_mass_totals`` and
``js_mass_partial``.

Each op's Python story in one place: the typed wrapper, the fake kernel (the C++ checks, from
:mod:`._checks`), the ``ADInplaceOrView`` kernel of the ops that write ``reference`` on request
(Note [In-place writes] in :mod:`._library`) and the ``Autograd`` kernel refusing inputs that
require grad (the distances have no derivative: Note [No derivative] there).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import _checks, _library
from ._library import OPS as _ops, segments as _segments
from ..groups import GroupLayout

__all__ = ["js_drift", "js_mass_totals", "js_mass_partial"]


# ---------------------------------------------------------------------------------------------
# js_drift


def js_drift(
    current: Sequence[Tensor],
    reference: Sequence[Tensor],
    layout: GroupLayout,
    *,
    drift_mode: str = "mass",
    bins: int = 64,
    lower_q: float = 0.01,
    upper_q: float = 0.99,
    min_log_range: float = 1e-3,
    base: str = "e",
    update_reference: Optional[float] = None,
) -> Tensor:
    """Jensen-Shannon distance between two Fisher snapshots, per group (docs/methods.md section 3).

    Mutates: ``reference`` only when ``update_reference`` is given (after scoring).

    ``JSD(p, q) = sqrt(0.5 KL(p||m) + 0.5 KL(q||m))``, ``m = (p + q) / 2``, in nats (range
    ``[0, sqrt(ln 2)]``) or, with ``base="2"``, bits (range ``[0, 1]``).

    ``drift_mode``:
        ``"mass"``: ``p_i = |F_i| / sum |F|`` over the group's elements. Exact, no binning.
        ``"histogram"``: the paper's: ``log10(|x| + 1e-12)`` of both snapshots, ``bins`` equal
        bins between the ``lower_q`` and ``upper_q`` quantiles (numpy's linear interpolation)
        of the union of both snapshots' values in the group, widened to ``min_log_range`` if
        narrower; values outside dropped; ``1e-12`` added to every bin; normalised. Near-
        constant groups (norms, biases) collapse onto the ``min_log_range`` floor, where noise
        drives the distance towards its maximum; a larger floor avoids that. The range is never
        empty: when ``min_log_range`` is below half an ulp of ``lo`` (e.g. ``1e-17`` with
        values near 10, ``lo ~ 1``), ``lo + min_log_range`` rounds back to ``lo``, and ``hi``
        is then the next float64 above ``lo`` (values equal to ``lo`` fall in the first bin,
        values equal to ``hi`` in the last), on both backends and in
        :func:`fisheradaptune.reference.js_drift`.

    A group whose Fisher sums to 0 on either side has distance 0. Fisher values are taken by
    magnitude. ``current`` and ``reference`` share shapes and one floating dtype (float32, or
    float64 on CPU).

    Args:
        update_reference: if given as ``rho`` in [0, 1], also sets
            ``reference = rho * reference + (1 - rho) * current`` (every element of every tensor)
            after scoring, in the same call. Outside [0, 1] (or NaN) is a ``ValueError``. With an
            update, no ``reference`` tensor may share memory with another one (the same tensor
            twice included) or with any ``current`` tensor (a ``ValueError`` naming the later
            argument, raised before anything is written): the update runs in parallel chunks
            that would race with the scoring and with each other. Without an update nothing is
            written and any sharing is fine.

    Returns:
        float32 ``[layout.num_groups]`` on the tensors' device.
    """
    current = list(current)
    reference = list(reference)
    segments, num_groups = _segments(layout, current, "current", required=True)
    if base not in ("e", "2"):
        raise ValueError(f"argument 'base': expected \"e\" or \"2\", got {base!r}")
    return _ops.js_drift(current, reference, segments, num_groups, drift_mode, int(bins),
                         float(lower_q), float(upper_q), float(min_log_range), base == "2",
                         None if update_reference is None else float(update_reference))


@torch.library.register_fake("fisheradaptune::js_drift")
def _js_drift_fake(current: List[Tensor], reference: List[Tensor], segments: Tensor,
                   num_groups: int, drift_mode: str, bins: int, lower_q: float, upper_q: float,
                   min_log_range: float, base2: bool, update_reference: Optional[float]) -> Tensor:
    device = _checks.validate_js_drift(current, reference, segments, num_groups, drift_mode, bins,
                                       lower_q, upper_q, min_log_range, base2, update_reference)
    return torch.empty(num_groups, dtype=torch.float32, device=device)


@_library.impl("js_drift", "ADInplaceOrView")
def _js_drift_inplace(current, reference, segments, num_groups, drift_mode, bins, lower_q,
                      upper_q, min_log_range, base2, update_reference):
    targets = _library.tensors(reference) if update_reference is not None else []
    _library.check_leaves("js_drift", targets, "reference")
    with _library.below_inplace():
        out = _ops.js_drift(current, reference, segments, num_groups, drift_mode, bins, lower_q,
                            upper_q, min_log_range, base2, update_reference)
    _library.bump(targets)
    return out


_library.register_not_differentiable("js_drift")


# ---------------------------------------------------------------------------------------------
# js_mass_totals and js_mass_partial (Note [Sharded drift] in csrc/drift_math.h)


def js_mass_totals(current: Sequence[Tensor], reference: Sequence[Tensor],
                   layout: GroupLayout) -> Tensor:
    """Per group, ``sum |current|`` and ``sum |reference|`` over the elements given: float64
    ``[2, layout.num_groups]``. The first half of :func:`js_drift`'s ``"mass"`` mode.

    With :func:`js_mass_partial` it scores a group whose elements are spread over several
    tensors or processes (FSDP shards): both results add over any split of the elements, so
    sum (all-reduce) the totals, pass them to :func:`js_mass_partial`, sum its results, and
    ``sqrt`` gives the distance (see Note [Sharded drift] in csrc/drift_math.h and
    :func:`fisheradaptune.distributed.js_drift`).
    """
    current, reference = list(current), list(reference)
    segments, num_groups = _segments(layout, current, "current", required=True)
    return _ops.js_mass_totals(current, reference, segments, num_groups)


@torch.library.register_fake("fisheradaptune::js_mass_totals")
def _js_mass_totals_fake(current: List[Tensor], reference: List[Tensor], segments: Tensor,
                         num_groups: int) -> Tensor:
    device = _checks.validate_js_mass_totals(current, reference, segments, num_groups)
    return torch.empty(2, num_groups, dtype=torch.float64, device=device)


_library.register_not_differentiable("js_mass_totals")


def js_mass_partial(current: Sequence[Tensor], reference: Sequence[Tensor], layout: GroupLayout,
                    totals: Tensor, *, update_reference: Optional[float] = None) -> Tensor:
    """Per group, the sum of the JS^2 terms (nats) of the elements given, float64
    ``[layout.num_groups]``, with ``p = |current| / totals[0]`` and
    ``q = |reference| / totals[1]``; a group with a zero total gives 0. The second half of
    :func:`js_drift`'s ``"mass"`` mode: with ``totals = js_mass_totals(...)`` over the same
    tensors, ``sqrt`` of the result is ``js_drift(..., drift_mode="mass")``.

    Mutates: ``reference`` only when ``update_reference`` is given (as :func:`js_drift`).

    Args:
        totals: float64 ``[2, layout.num_groups]`` on the tensors' device, typically
            :func:`js_mass_totals` summed over shards.
        update_reference: as in :func:`js_drift`: ``reference = rho * reference +
            (1 - rho) * current`` after scoring, in the same pass; ``rho`` in [0, 1], and with
            an update no ``reference`` tensor may share memory with another one, with any
            ``current`` tensor or with ``totals`` (``ValueError``, nothing written).
    """
    current, reference = list(current), list(reference)
    segments, num_groups = _segments(layout, current, "current", required=True)
    if not isinstance(totals, Tensor):
        raise TypeError(f"argument 'totals': expected a Tensor, got {type(totals).__name__}")
    return _ops.js_mass_partial(current, reference, segments, num_groups, totals,
                                None if update_reference is None else float(update_reference))


@torch.library.register_fake("fisheradaptune::js_mass_partial")
def _js_mass_partial_fake(current: List[Tensor], reference: List[Tensor], segments: Tensor,
                          num_groups: int, totals: Tensor,
                          update_reference: Optional[float]) -> Tensor:
    device = _checks.validate_js_mass_partial(current, reference, segments, num_groups, totals,
                                              update_reference)
    return torch.empty(num_groups, dtype=torch.float64, device=device)


@_library.impl("js_mass_partial", "ADInplaceOrView")
def _js_mass_partial_inplace(current, reference, segments, num_groups, totals, update_reference):
    targets = _library.tensors(reference) if update_reference is not None else []
    _library.check_leaves("js_mass_partial", targets, "reference")
    with _library.below_inplace():
        out = _ops.js_mass_partial(current, reference, segments, num_groups, totals,
                                   update_reference)
    _library.bump(targets)
    return out


_library.register_not_differentiable("js_mass_partial")


# ---------------------------------------------------------------------------------------------
# Fallback kernels (pure PyTorch, the same contract as the compiled ones)
