"""Typed Python entry points of the ``torch.ops.fisheradaptune`` operators, with fake kernels.

Each function validates what only Python knows (the layout), allocates the outputs and calls
the registered op; the C++ side validates every tensor argument before it writes anything.
Every op has a pure-PyTorch twin of the same name in :mod:`fisheradaptune.reference`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .groups import GroupLayout

__all__ = ["fisher_accumulate_", "js_drift", "per_sample_grad_sq_"]

_ops = torch.ops.fisheradaptune


def _segments(layout: Optional[GroupLayout], tensors: Sequence[Optional[Tensor]], arg: str):
    if layout is None:
        return None, 0
    if not isinstance(layout, GroupLayout):
        raise TypeError(f"argument 'layout': expected a GroupLayout, got {type(layout).__name__}")
    layout.check_tensors(tensors, arg=arg)
    # Kernels plan their work on the host, so the CPU copy is the one to pass (no sync).
    return layout.segments, layout.num_groups


def fisher_accumulate_(
    fisher: Sequence[Tensor],
    grads: Sequence[Optional[Tensor]],
    *,
    decay: float,
    scale: float,
    layout: Optional[GroupLayout] = None,
) -> Tuple[Optional[Tensor], Tensor]:
    """In place, for every i: ``fisher[i] = decay * fisher[i] + scale * grads[i] ** 2``.

    One fused pass over all tensors. ``fisher`` tensors are float32 (float64 on CPU) and
    contiguous; ``grads`` are float32, bfloat16 or float16 with matching shapes, or ``None`` to
    leave that tensor untouched. Empty tensors and lists are fine.

    Non-finite handling: an element whose update would not be finite (a NaN or Inf gradient,
    or a finite one whose square overflows) is skipped, keeping its Fisher entry, and counted.

    Returns:
        ``(group_sums, nonfinite)``: ``group_sums`` is float32 ``[layout.num_groups]`` holding
        the sum of each group's Fisher after the update (tensors whose gradient is ``None``
        contribute their current Fisher), or ``None`` without a layout. ``nonfinite`` is a 0-d
        int64 tensor on the Fisher's device counting skipped elements; it is a tensor, not an
        int, so that reading it is the caller's choice of when to synchronise.

    Both are deterministic: the same inputs give bitwise the same outputs on a given device,
    whatever the number of threads.
    """
    fisher = list(fisher)
    grads = list(grads)
    segments, num_groups = _segments(layout, fisher, "fisher")
    device = fisher[0].device if fisher else torch.device("cpu")
    group_sums = torch.empty(num_groups, dtype=torch.float32, device=device)
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)
    _ops.fisher_accumulate_(fisher, grads, float(decay), float(scale), segments, group_sums,
                            nonfinite)
    return (group_sums if layout is not None else None), nonfinite


def js_drift(
    current: Sequence[Tensor],
    reference: Sequence[Tensor],
    layout: GroupLayout,
    *,
    mode: str = "mass",
    bins: int = 64,
    lower_q: float = 0.01,
    upper_q: float = 0.99,
    min_log_range: float = 1e-3,
    base: str = "e",
    update_reference: Optional[float] = None,
) -> Tensor:
    """Jensen-Shannon distance between two Fisher snapshots, per group (SPEC section 3).

    ``JSD(p, q) = sqrt(0.5 KL(p||m) + 0.5 KL(q||m))``, ``m = (p + q) / 2``, in nats (range
    ``[0, sqrt(ln 2)]``) or, with ``base="2"``, bits (range ``[0, 1]``).

    Modes:
        ``"mass"``: ``p_i = |F_i| / sum |F|`` over the group's elements. Exact, no binning.
        ``"histogram"``: the paper's: ``log10(|x| + 1e-12)`` of both snapshots, ``bins`` equal
        bins between the ``lower_q`` and ``upper_q`` quantiles (numpy's linear interpolation)
        of the union of both snapshots' values in the group, widened to ``min_log_range`` if
        narrower; values outside dropped; ``1e-12`` added to every bin; normalised. Near-
        constant groups (norms, biases) collapse onto the ``min_log_range`` floor, where noise
        drives the distance towards its maximum; a larger floor avoids that.

    A group whose Fisher sums to 0 on either side has distance 0. Fisher values are taken by
    magnitude. ``current`` and ``reference`` share shapes and one floating dtype (float32, or
    float64 on CPU).

    Args:
        update_reference: if given as ``rho`` in [0, 1], also sets
            ``reference = rho * reference + (1 - rho) * current`` (every element of every tensor)
            after scoring, in the same call.

    Returns:
        float32 ``[layout.num_groups]`` on the tensors' device.
    """
    current = list(current)
    reference = list(reference)
    if not isinstance(layout, GroupLayout):
        raise TypeError(f"argument 'layout': expected a GroupLayout, got {type(layout).__name__}")
    if base not in ("e", "2"):
        raise ValueError(f"argument 'base': expected \"e\" or \"2\", got {base!r}")
    layout.check_tensors(current, arg="current")
    return _ops.js_drift(current, reference, layout.segments, layout.num_groups, mode, int(bins),
                         float(lower_q), float(upper_q), float(min_log_range), base == "2",
                         None if update_reference is None else float(update_reference))


def per_sample_grad_sq_(fisher: Tensor, x: Tensor, grad_out: Tensor, *, scale: float = 1.0) -> None:
    """Per-sample Fisher of a Linear weight: ``fisher += scale * sum_n (grad_out[n]^T x[n])**2``.

    ``x`` is the layer input ``[N, T, in]`` and ``grad_out`` the gradient of the loss with
    respect to the layer output ``[N, T, out]`` (2-D ``[N, features]`` inputs are read as
    ``T = 1``); ``fisher`` is ``[out, in]``, float32 (float64 on CPU). Per-sample gradients are
    formed one tile of samples at a time, each tile by one batched GEMM, so memory stays bounded
    and the cost is about one extra weight-gradient GEMM. Samples are accumulated in order
    (deterministic). To get SPEC's ``(1/N) sum_n g_n**2``, pass ``scale=1/N``; note that a
    ``grad_out`` taken from a mean-reduced loss carries an extra ``1/N`` per sample.
    """
    if x.dim() == 2 and grad_out.dim() == 2:
        x, grad_out = x.unsqueeze(1), grad_out.unsqueeze(1)
    _ops.per_sample_grad_sq_(fisher, x, grad_out, float(scale))


# ---------------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes and dtypes only, for torch.compile and FakeTensor tracing.


@torch.library.register_fake("fisheradaptune::fisher_accumulate_")
def _fisher_accumulate_fake(fisher, grads, decay, scale, segments, group_sums, nonfinite):
    return None


@torch.library.register_fake("fisheradaptune::js_drift")
def _js_drift_fake(current, reference, segments, num_groups, drift_mode, bins, lower_q, upper_q,
                   min_log_range, base2, update_reference):
    device = current[0].device if current else segments.device
    return torch.empty(num_groups, dtype=torch.float32, device=device)


@torch.library.register_fake("fisheradaptune::per_sample_grad_sq_")
def _per_sample_grad_sq_fake(fisher, x, grad_out, scale):
    return None
