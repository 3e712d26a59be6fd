"""Make the ops' in-place writes visible to autograd.

A kernel registered in C++ for CPU/CUDA writes into its ``Tensor(a!)`` arguments, but nothing
bumps their version counters, so autograd would not notice that a tensor it saved for backward
was overwritten and would silently compute wrong gradients. An ``ADInplaceOrView`` kernel per
mutating op (the dispatch key where torch's own in-place ops do this) runs the op below that
key, then bumps the version of every tensor it wrote. It also refuses, as torch's in-place ops
do, to write into a leaf that requires grad while grad mode is on.

Registered once at import (``fisheradaptune/__init__.py``), so direct ``torch.ops`` calls are
covered as well as the typed wrappers.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch import Tensor

__all__ = ["register"]

_op = torch.ops.fisheradaptune


def _tensors(*items) -> List[Tensor]:
    out = []
    for it in items:
        if isinstance(it, Tensor):
            out.append(it)
        elif isinstance(it, (list, tuple)):
            out.extend(t for t in it if isinstance(t, Tensor))
    return out


def _check_leaves(op: str, targets: List[Tensor], arg: str) -> None:
    if not torch.is_grad_enabled():
        return
    for t in targets:
        if t.requires_grad and t.is_leaf:
            raise RuntimeError(f"fisheradaptune.{op}: argument '{arg}': a leaf tensor that "
                               "requires grad cannot be written in place (detach it, or call "
                               "under torch.no_grad())")


def _bump(targets: List[Tensor]) -> None:
    if targets:
        torch.autograd.graph.increment_version(targets)


def _fisher_accumulate_(fisher, grads, decay, scale, segments, group_sums, nonfinite):
    targets = _tensors(fisher)
    _check_leaves("fisher_accumulate_", targets, "fisher")
    with torch._C._AutoDispatchBelowADInplaceOrView():
        _op.fisher_accumulate_(fisher, grads, decay, scale, segments, group_sums, nonfinite)
    _bump(targets + [group_sums, nonfinite])


def _js_drift(current, reference, segments, num_groups, drift_mode, bins, lower_q, upper_q,
              min_log_range, base2, update_reference):
    targets = _tensors(reference) if update_reference is not None else []
    _check_leaves("js_drift", targets, "reference")
    with torch._C._AutoDispatchBelowADInplaceOrView():
        out = _op.js_drift(current, reference, segments, num_groups, drift_mode, bins, lower_q,
                           upper_q, min_log_range, base2, update_reference)
    _bump(targets)
    return out


def _js_mass_partial(current, reference, segments, num_groups, totals, update_reference):
    targets = _tensors(reference) if update_reference is not None else []
    _check_leaves("js_mass_partial", targets, "reference")
    with torch._C._AutoDispatchBelowADInplaceOrView():
        out = _op.js_mass_partial(current, reference, segments, num_groups, totals,
                                  update_reference)
    _bump(targets)
    return out


def _per_sample_grad_sq_(fisher, x, grad_out, scale, nonfinite):
    _check_leaves("per_sample_grad_sq_", [fisher], "fisher")
    with torch._C._AutoDispatchBelowADInplaceOrView():
        _op.per_sample_grad_sq_(fisher, x, grad_out, scale, nonfinite)
    _bump([fisher, nonfinite])


KERNELS: Dict[str, Callable] = {
    "fisher_accumulate_": _fisher_accumulate_,
    "js_drift": _js_drift,
    "js_mass_partial": _js_mass_partial,
    "per_sample_grad_sq_": _per_sample_grad_sq_,
}

_lib = None


def register() -> None:
    """Register the ADInplaceOrView kernels (idempotent)."""
    global _lib
    if _lib is not None:
        return
    lib = torch.library.Library("fisheradaptune", "IMPL")
    for name, fn in KERNELS.items():
        lib.impl(name, fn, "ADInplaceOrView")
    _lib = lib
