"""Diagonal Fisher estimators (SPEC section 1).

- :class:`EmpiricalFisher` (``"empirical"``): ``F <- decay * F + scale * g**2`` from ``.grad``
  after backward, one fused op per step.
- :class:`KFACFisher` (``"kfac"``): for ``nn.Linear``, ``F[i, j] = S[i] * H[j]`` with ``H`` the
  mean squared layer input and ``S`` the mean squared output gradient, from hooks, each a real
  (bias-corrected) EMA over steps; other parameters fall back to the empirical estimate.
- :func:`per_sample_fisher` (``"per_sample"``): ``F = (1/N) sum_n g_n**2`` with per-sample
  gradients of Linear weights, computed tile by tile by ``ops.per_sample_grad_sq_``.
- :func:`estimate`: any of the three over calibration batches, returning per-parameter Fisher.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import distributed, ops
from .groups import GroupLayout

__all__ = ["EmpiricalFisher", "KFACFisher", "per_sample_fisher", "estimate", "make_estimator",
           "ESTIMATORS"]

ESTIMATORS = ("empirical", "kfac", "per_sample")


def _default_scale(decay: float) -> float:
    # decay < 1: an EMA, F <- decay F + (1 - decay) g^2. decay == 1: a plain running sum.
    return 1.0 - decay if decay < 1.0 else 1.0


def _check_decay(decay: float, arg: str = "decay") -> float:
    decay = float(decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"argument '{arg}': expected a value in [0, 1], got {decay}")
    return decay


class EmpiricalFisher:
    """Empirical diagonal Fisher of ``params``: ``F <- decay * F + scale * grad**2`` per step.

    Args:
        params: the tensors to track (their ``.grad`` is read by :meth:`update`).
        layout: a :class:`GroupLayout` over ``params``; :meth:`update` then also returns the
            per-group sums of the updated Fisher.
        decay: EMA decay ``beta`` in [0, 1].
        scale: weight of the new squared gradient; default ``1 - decay`` (``1`` when
            ``decay == 1``, giving a plain running sum).

    Buffers are float32, allocated at the first update. :meth:`release` frees the buffer of a
    tensor that will never be tracked again (e.g. frozen whole).
    """

    def __init__(self, params: Sequence[Tensor], layout: Optional[GroupLayout] = None, *,
                 decay: float = 0.9, scale: Optional[float] = None):
        self.params = list(params)
        self.decay = _check_decay(decay)
        self.scale = _default_scale(self.decay) if scale is None else float(scale)
        if layout is not None:
            layout.check_tensors(self.params, arg="params")
        self.layout = layout
        self.fisher: List[Optional[Tensor]] = [None] * len(self.params)
        self._released: set = set()
        self._active_layout: Optional[GroupLayout] = layout
        self._active = list(range(len(self.params)))
        self.steps = 0

    def _buffer(self, i: int) -> Tensor:
        if self.fisher[i] is None:
            p = self.params[i]
            self.fisher[i] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return self.fisher[i]

    def active(self) -> List[int]:
        """Indices of the tensors still tracked (a copy)."""
        return list(self._active)

    def _released_changed(self) -> None:
        # Derived once per release/restore rather than on every update.
        self._active = [i for i in range(len(self.params)) if i not in self._released]
        if self.layout is not None:
            self._active_layout = self.layout.subset(self._active)

    def update(self, grads: Optional[Sequence[Optional[Tensor]]] = None
               ) -> Tuple[Optional[Tensor], Tensor]:
        """Fold the current gradients in. Returns ``(group_sums, nonfinite)`` (see the op)."""
        idx = self._active
        if grads is None:
            grads = [p.grad for p in self.params]
        fisher = [self._buffer(i) for i in idx]
        sums, bad = ops.fisher_accumulate_(fisher, [grads[i] for i in idx], decay=self.decay,
                                           scale=self.scale, layout=self._active_layout)
        self.steps += 1
        return sums, bad

    def snapshot(self) -> List[Optional[Tensor]]:
        """The current Fisher of each tracked tensor (``None`` once released)."""
        return [None if i in self._released else self._buffer(i) for i in range(len(self.params))]

    def release(self, indices: Iterable[int]) -> None:
        """Stop tracking the tensors at ``indices`` and free their buffers."""
        for i in indices:
            self._released.add(int(i))
            self.fisher[int(i)] = None
        self._released_changed()

    def restore(self, indices: Iterable[int]) -> None:
        """Track released tensors again, from a zero Fisher."""
        for i in indices:
            self._released.discard(int(i))
        self._released_changed()

    def state_dict(self) -> dict:
        return {"fisher": list(self.fisher), "released": sorted(self._released),
                "steps": self.steps, "decay": self.decay, "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.release(state["released"])
        for i, f in enumerate(state["fisher"]):
            if f is not None:
                self._buffer(i).copy_(f)
        self.steps = int(state["steps"])


class KFACFisher:
    """Kronecker-factored diagonal Fisher for ``nn.Linear`` layers (SPEC section 1, ``kfac``).

    For a Linear layer with input ``x`` and output gradient ``delta``:
    ``H[j] = mean(x_j**2)`` and ``S[i] = mean(delta_i**2)`` over batch and tokens, each an EMA
    over steps with bias correction (``decay`` in [0, 1]), and ``F[i, j] = S[i] * H[j]``; the
    bias gets ``S``. Other parameters use :class:`EmpiricalFisher`. Unlike the public code, the
    EMA really advances and both factors are kept.

    ``delta`` is the gradient reaching the layer output, so it carries the loss reduction and
    any AMP loss scale; pass ``grad_scale`` to :meth:`update` to remove the latter.
    Forward passes made without grad (evaluation) are not recorded.

    With ``model`` a ``DistributedDataParallel`` module, each step's factor statistics are
    summed over its process group (one all-reduce of ``sum(in + out)`` floats) and ``delta`` is
    divided by the world size, as DDP's gradient averaging divides the gradient: every rank
    then holds the factors of one process that saw the global batch.
    """

    def __init__(self, model: nn.Module, params: Sequence[Tensor],
                 layout: Optional[GroupLayout] = None, *, decay: float = 0.9):
        if not isinstance(model, nn.Module):
            raise ValueError("argument 'model': the kfac estimator needs the model (for its hooks)")
        self.params = list(params)
        self.decay = _check_decay(decay)
        if layout is not None:
            layout.check_tensors(self.params, arg="params")
        self.layout = layout
        index = {id(p): i for i, p in enumerate(self.params)}
        self._linear: Dict[int, Tuple[nn.Linear, str]] = {}  # param index -> (module, "weight"|"bias")
        self._factors: Dict[nn.Linear, dict] = {}
        self._hooks = []
        for module in model.modules():
            if isinstance(module, nn.Linear) and id(module.weight) in index:
                self._linear[index[id(module.weight)]] = (module, "weight")
                if module.bias is not None and id(module.bias) in index:
                    self._linear[index[id(module.bias)]] = (module, "bias")
                self._factors[module] = {"h": None, "s": None, "h_acc": None, "s_acc": None,
                                         "nh": 0, "ns": 0}
                self._hooks.append(module.register_forward_hook(self._forward_hook))
        self._other = [i for i in range(len(self.params)) if i not in self._linear]
        other_layout = layout.subset(self._other) if layout is not None else None
        self._empirical = EmpiricalFisher([self.params[i] for i in self._other], other_layout,
                                          decay=decay)
        self._released: set = set()
        self.steps = 0
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self._group = model.process_group if ddp else None
        self._world = torch.distributed.get_world_size(self._group) if ddp else 1

    def _forward_hook(self, module, inputs, output):
        # Forward passes without grad (evaluation) are not part of training: not recorded.
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        x = inputs[0].detach()
        f = self._factors[module]
        h = x.float().square().reshape(-1, x.shape[-1]).sum(0)
        f["h_acc"] = h if f["h_acc"] is None else f["h_acc"] + h
        f["nh"] += x.numel() // x.shape[-1]
        # The gradient reaching this output is the layer's delta.
        output.register_hook(lambda d, f=f: self._output_grad(f, d))

    def _output_grad(self, f: dict, d: Tensor) -> None:
        s = d.detach().float().square().reshape(-1, d.shape[-1]).sum(0)
        f["s_acc"] = s if f["s_acc"] is None else f["s_acc"] + s
        f["ns"] += d.numel() // d.shape[-1]

    def update(self, grads: Optional[Sequence[Optional[Tensor]]] = None, *,
               grad_scale: float = 1.0) -> Tuple[Optional[Tensor], Tensor]:
        """Fold this step's hook statistics into the factor EMAs, and the gradients of
        non-Linear parameters into their empirical Fisher.

        Returns ``(None, nonfinite)``; per-group sums are computed from :meth:`snapshot`.
        """
        self.steps += 1
        beta = self.decay
        if self._world > 1:
            self._all_reduce_statistics()
        # DDP averages gradients over ranks; the factors must see that average's delta.
        inv = 1.0 / (float(grad_scale) * self._world) ** 2
        for module, f in self._factors.items():
            if f["h_acc"] is None or f["s_acc"] is None:
                f["h_acc"] = f["s_acc"] = None
                f["nh"] = f["ns"] = 0
                continue
            h = f["h_acc"] / max(f["nh"], 1)
            s = f["s_acc"] * (inv / max(f["ns"], 1))
            # A step with a non-finite factor (e.g. an AMP overflow) is left out, as the fused
            # op leaves out non-finite gradients.
            if torch.isfinite(s).all() and torch.isfinite(h).all():
                t = f.get("t", 0) + 1
                for key, v in (("h", h), ("s", s)):
                    if f[key] is None:
                        f[key] = v * (1 - beta) if beta < 1.0 else v
                    elif beta < 1.0:
                        f[key] = f[key] * beta + v * (1 - beta)
                    else:  # decay == 1: the running mean over steps
                        f[key] = f[key] + (v - f[key]) / t
                f["t"] = t
            f["h_acc"] = f["s_acc"] = None
            f["nh"] = f["ns"] = 0
        if grads is None:
            grads = [p.grad for p in self.params]
        _, bad = self._empirical.update([grads[i] for i in self._other])
        return None, bad

    def _all_reduce_statistics(self) -> None:
        """Sum this step's h/s accumulators and sample counts over the DDP group, in one call
        (float64, so counts stay exact). Every rank packs every layer (zeros where a layer did
        not run), so shapes agree; the counts go last, to be read back in one transfer."""
        if not self._factors:
            return
        device = next(iter(self._factors)).weight.device
        parts, counts = [], []
        for module, f in self._factors.items():
            for key, n in (("h_acc", module.in_features), ("s_acc", module.out_features)):
                v = f[key]
                parts.append(v.to(device, torch.float64) if v is not None else
                             torch.zeros(n, dtype=torch.float64, device=device))
            counts += [f["nh"], f["ns"]]
        parts.append(torch.tensor(counts, dtype=torch.float64, device=device))
        flat = torch.cat(parts)
        if torch.distributed.get_backend(self._group) != "nccl":
            flat = flat.cpu()
        torch.distributed.all_reduce(flat, group=self._group)
        totals = [int(c) for c in flat[flat.numel() - len(counts):].tolist()]
        at = 0
        for k, (module, f) in enumerate(self._factors.items()):
            a, b, dev = module.in_features, module.out_features, module.weight.device
            nh, ns = totals[2 * k], totals[2 * k + 1]
            f["h_acc"] = flat[at:at + a].to(dev, torch.float32) if nh else None
            f["s_acc"] = flat[at + a:at + a + b].to(dev, torch.float32) if ns else None
            f["nh"], f["ns"] = nh, ns
            at += a + b

    def _corrected(self, f: dict, key: str) -> Optional[Tensor]:
        if f[key] is None:
            return None
        t = f.get("t", 0)
        return f[key] / (1.0 - self.decay ** t) if self.decay < 1.0 else f[key]

    def snapshot(self) -> List[Optional[Tensor]]:
        """The Fisher of each tensor (materialised ``S ⊗ H`` for Linear weights)."""
        out: List[Optional[Tensor]] = [None] * len(self.params)
        emp = self._empirical.snapshot()
        for j, i in enumerate(self._other):
            out[i] = emp[j]
        for i, (module, kind) in self._linear.items():
            if i in self._released:
                continue
            f = self._factors[module]
            s, h = self._corrected(f, "s"), self._corrected(f, "h")
            p = self.params[i]
            if s is None or h is None:
                out[i] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            else:
                out[i] = torch.outer(s, h) if kind == "weight" else s.clone()
        return out

    def release(self, indices: Iterable[int]) -> None:
        indices = [int(i) for i in indices]
        self._released.update(indices)
        pos = {i: j for j, i in enumerate(self._other)}
        self._empirical.release([pos[i] for i in indices if i in pos])

    def restore(self, indices: Iterable[int]) -> None:
        """Track released tensors again (Linear factors were kept; others restart at zero)."""
        indices = [int(i) for i in indices]
        self._released.difference_update(indices)
        pos = {i: j for j, i in enumerate(self._other)}
        self._empirical.restore([pos[i] for i in indices if i in pos])

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def state_dict(self) -> dict:
        factors = [{k: self._factors[m].get(k) for k in ("h", "s", "t")}
                   for m in self._factors]
        return {"factors": factors, "empirical": self._empirical.state_dict(),
                "released": sorted(self._released), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        for m, f in zip(self._factors, state["factors"]):
            self._factors[m].update({k: (f[k].to(m.weight.device) if isinstance(f[k], Tensor)
                                         else f[k])
                                     for k in ("h", "s", "t") if f.get(k) is not None})
        self._empirical.load_state_dict(state["empirical"])
        self._released = set(state["released"])
        self.steps = int(state["steps"])


def make_estimator(name: str, params: Sequence[Tensor], layout: Optional[GroupLayout],
                   model: Optional[nn.Module], decay: float):
    """Build the step-wise estimator named ``name`` ("empirical" or "kfac")."""
    if name == "empirical":
        return EmpiricalFisher(params, layout, decay=decay)
    if name == "kfac":
        return KFACFisher(model, params, layout, decay=decay)
    raise ValueError(f"argument 'estimator': expected \"empirical\" or \"kfac\", got {name!r}")


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
        raise ValueError(f"argument 'estimator': expected one of {ESTIMATORS}, got {estimator!r}")
    linears = _linear_modules(model, modules)
    weights = [m.weight for m in linears.values()]
    # FSDP2: the empirical Fisher is accumulated on each rank's shards and gathered at the end
    # (kfac and per_sample read full activations from hooks and need nothing of the kind).
    sharding = (distributed.sharding_of(weights, list(linears), arg="model")
                if estimator == "empirical" else None)
    if sharding is None:
        est = make_estimator(estimator, weights, None, model, decay=1.0)
        update = est.update
    else:
        est = make_estimator(estimator, [distributed.local(w) for w in weights], None, model,
                             decay=1.0)
        update = lambda: est.update([distributed.local(w.grad) for w in weights])  # noqa: E731
    try:
        _backward_each(model, batches, loss_fn, after=update)
    finally:
        if isinstance(est, KFACFisher):
            est.remove_hooks()
    snap = est.snapshot()
    if sharding is not None:
        snap = [sharding.to_global(i, f).full_tensor() for i, f in enumerate(snap)]
    steps = max(est.steps, 1)
    return {n: (f / steps if estimator == "empirical" else f)
            for n, f in zip(linears, snap)}
