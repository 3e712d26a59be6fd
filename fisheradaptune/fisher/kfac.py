"""KFACFisher: the Kronecker-factored diagonal Fisher of ``nn.Linear`` layers, from hooks
(docs/methods.md section 1, ``kfac``)."""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..distributed import comm
from ..groups import GroupLayout
from .base import Estimator, check_decay, register_estimator
from .empirical import EmpiricalFisher

__all__ = ["KFACFisher"]


@register_estimator("kfac")
class KFACFisher(Estimator):
    """Kronecker-factored diagonal Fisher for ``nn.Linear`` layers (docs/methods.md section 1, ``kfac``).

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

    def __init__(self, params: Sequence[Tensor], layout: Optional[GroupLayout] = None, *,
                 model: Optional[nn.Module] = None, decay: float = 0.9):
        if not isinstance(model, nn.Module):
            raise ValueError("argument 'model': the kfac estimator needs the model (for its hooks)")
        self.params = list(params)
        self.decay = check_decay(decay)
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
        self._group = comm.group_of(model)
        self._world = comm.world_size(self._group) if ddp else 1

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
        flat = comm.all_reduce_(torch.cat(parts), self._group)
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

    close = remove_hooks

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
