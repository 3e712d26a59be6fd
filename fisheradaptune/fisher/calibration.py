"""Fisher over calibration batches, for selection: per-sample (exact, tiled) and the step-wise
estimators run over a fixed set of batches (docs/methods.md sections 1 and 5)."""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import ops
from ..distributed import comm
from ..distributed.sharding import local, sharding_of
from .base import make_estimator

__all__ = ["per_sample_fisher", "estimate", "weights_requiring_grad", "CALIBRATION_ESTIMATORS"]

#: What :func:`estimate` (and TR-PTS selection) accepts as ``estimator``.
CALIBRATION_ESTIMATORS = ("per_sample", "empirical", "kfac")


def _linear_modules(model: nn.Module, modules: Optional[Sequence[str]]) -> Dict[str, nn.Linear]:
    found = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if modules is None:
        return found
    out = {}
    for n in modules:
        if n not in found:
            raise ValueError(f"argument 'modules': {n!r} is not an nn.Linear of the model")
        out[n] = found[n]
    return out


def per_sample_fisher(model: nn.Module, batches: Iterable, loss_fn: Callable, *,
                      modules: Optional[Sequence[str]] = None,
                      loss_reduction: str = "mean") -> Dict[str, Tensor]:
    """Per-sample Fisher ``(1/N) sum_n g_n**2`` of the weights of Linear ``modules``.

    For each batch, ``loss = loss_fn(model, batch)`` is back-propagated once; hooks hand each
    Linear's input ``x`` and output gradient to ``ops.per_sample_grad_sq_``, which squares
    per-sample gradients tile by tile. ``loss_reduction`` says how ``loss`` reduces over the
    batch ("mean" or "sum"), so that ``g_n`` is the gradient of sample ``n``'s own loss.
    Inputs of shape ``[N, ..., in]`` treat the middle dims as tokens. The model's ``.grad``
    fields are left as they were before the call.

    Returns: ``{module name: float32 Fisher [out, in]}``.
    """
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"argument 'loss_reduction': expected \"mean\" or \"sum\", got {loss_reduction!r}")
    linears = _linear_modules(model, modules)
    fisher = {n: torch.zeros(m.weight.shape, dtype=torch.float32, device=m.weight.device)
              for n, m in linears.items()}
    def hook_for(name):
        def hook(module, inputs, output):
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            x = inputs[0].detach()

            def on_grad(d):
                n = x.shape[0]
                # A mean-reduced loss scales each sample's gradient by 1/N: undo it.
                factor = float(n) if loss_reduction == "mean" else 1.0
                ops.per_sample_grad_sq_(fisher[name], x.reshape(n, -1, x.shape[-1]),
                                        d.detach().reshape(n, -1, d.shape[-1]),
                                        scale=factor * factor)

            output.register_hook(on_grad)
        return hook

    hooks = [m.register_forward_hook(hook_for(n)) for n, m in linears.items()]
    try:
        samples = _backward_each(model, batches, loss_fn)
    finally:
        for h in hooks:
            h.remove()
    if samples > 0:
        for f in fisher.values():
            f.div_(samples)
    return fisher


def _backward_each(model: nn.Module, batches: Iterable, loss_fn: Callable,
                   after: Optional[Callable[[], object]] = None) -> int:
    """Back-propagate ``loss_fn(model, batch)`` for each batch from a clean ``.grad`` (calling
    ``after()`` after each), then put every ``.grad`` back as it was. Returns the sample count."""
    params = [p for p in model.parameters() if p.requires_grad]
    old_grads = [p.grad for p in params]
    samples = 0
    try:
        for batch in batches:
            for p in params:
                p.grad = None
            loss_fn(model, batch).backward()
            samples += _batch_size(batch)
            if after is not None:
                after()
    finally:
        for p, g in zip(params, old_grads):
            p.grad = g
    return samples


def _batch_size(batch) -> int:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(x, dict):
        x = next(iter(x.values()))
    return int(x.shape[0])


@contextlib.contextmanager
def weights_requiring_grad(model: nn.Module, linears: Iterable[nn.Linear]) -> Iterator[None]:
    """The weights of ``linears`` require grad for the duration (the Fisher needs their
    gradients, also on a model whose weights are frozen); every parameter of ``model`` gets its
    own ``requires_grad`` back afterwards, also on error."""
    flags = {id(p): p.requires_grad for p in model.parameters()}
    try:
        for m in linears:
            m.weight.requires_grad_(True)
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])


def estimate(model: nn.Module, batches: Iterable, loss_fn: Callable, *,
             estimator: str = "per_sample", modules: Optional[Sequence[str]] = None,
             loss_reduction: str = "mean") -> Dict[str, Tensor]:
    """Fisher of the weights of Linear ``modules`` (default: all) over calibration batches.

    ``estimator`` is ``"per_sample"`` (exact per-sample squares), ``"empirical"`` (squared
    mini-batch gradients, averaged over batches) or ``"kfac"`` (``S ⊗ H`` from one pass).
    ``loss_fn(model, batch)`` returns the scalar loss. Returns ``{module name: Fisher}``.
    """
    if estimator == "per_sample":
        return per_sample_fisher(model, batches, loss_fn, modules=modules,
                                 loss_reduction=loss_reduction)
    if estimator not in ("empirical", "kfac"):
        raise ValueError(f"argument 'estimator': expected one of {CALIBRATION_ESTIMATORS}, got "
                         f"{estimator!r}")
    linears = _linear_modules(model, modules)
    weights = [m.weight for m in linears.values()]
    # FSDP2: the empirical Fisher is accumulated on each rank's shards and gathered at the end
    # (kfac and per_sample read full activations from hooks and need nothing of the kind).
    sharding = (sharding_of(weights, list(linears), arg="model")
                if estimator == "empirical" else None)
    if sharding is None:
        est = make_estimator(estimator, weights, None, model, decay=1.0)
        update = est.update
    else:
        est = make_estimator(estimator, [local(w) for w in weights], None, model, decay=1.0)
        update = lambda: est.update([local(w.grad) for w in weights])  # noqa: E731
    try:
        _backward_each(model, batches, loss_fn, after=update)
    finally:
        est.close()
    snap = est.snapshot()
    if sharding is not None:
        snap = [comm.full_tensor(sharding.to_global(i, f)) for i, f in enumerate(snap)]
    steps = max(est.steps, 1)
    return {n: (f / steps if estimator == "empirical" else f)
            for n, f in zip(linears, snap)}
