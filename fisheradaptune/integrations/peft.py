"""Fisher-selected masks for peft's SHiRA adapters (docs/methods.md section 5, "SHiRA masks").

peft's SHiRA trains, in each target ``nn.Linear`` of weight ``[out, in]``, a fixed sparse set
of ``r * (in + out)`` weight entries (as many as a rank-``r`` LoRA), chosen by a *mask
function* ``mask_fn(base_layer, r, **kwargs) -> 0/1 tensor of the weight's shape``; peft ships
a random one. :func:`shira_mask_fn` estimates the per-sample Fisher of the model's Linear
weights once, on calibration batches, and returns a mask function that keeps, in each layer,
the entries with the most Fisher, row-balanced as TR-PTS selection keeps them::

    from peft import ShiraConfig, get_peft_model
    from fisheradaptune.integrations.peft import shira_mask_fn

    mask_fn = shira_mask_fn(model, calibration_batches, loss_fn)   # before get_peft_model
    config = ShiraConfig(r=8, target_modules=["q_proj", "v_proj"], mask_type="fisher")
    config.mask_fn = mask_fn                                         # peft's documented hook
    peft_model = get_peft_model(model, config)

Everything after is plain peft (training, ``save_pretrained`` / ``PeftModel.from_pretrained``,
which restore the saved indices without calling the mask function, ``merge_and_unload``,
several adapters). peft itself is never imported here.
"""
from __future__ import annotations

import numbers
import weakref
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import fisher as fisher_mod

__all__ = ["shira_mask_fn", "ShiraFisherMask", "row_balanced_mask"]


def _is_peft_module(m: nn.Module) -> bool:
    return type(m).__module__.split(".")[0] == "peft"


def _check_r(r) -> int:
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or int(r) < 1:
        raise ValueError(f"argument 'r': expected an integer >= 1, got {r!r}")
    return int(r)


def row_balanced_mask(fisher: Tensor, count: int) -> Tensor:
    """The ``count`` entries of ``fisher [out, in]`` a SHiRA layer trains, as a bool mask.

    Every row keeps its ``count // out`` entries with the most Fisher (ties: the lower column).
    The ``count % out`` remaining entries go one each to the rows whose next entry (their
    ``count // out + 1``-th largest) has the most Fisher (ties: the lower row), so each row
    keeps ``count // out`` or ``count // out + 1`` entries and the total is exactly ``count``.
    """
    if fisher.dim() != 2:
        raise ValueError(f"argument 'fisher': expected a 2-D tensor [out, in], got shape "
                         f"{list(fisher.shape)}")
    out_f, in_f = fisher.shape
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or \
            not 0 <= count <= out_f * in_f:
        raise ValueError(f"argument 'count': expected an integer in [0, {out_f * in_f}], got "
                         f"{count!r}")
    mask = torch.zeros(out_f, in_f, dtype=torch.bool, device=fisher.device)
    if count == 0:
        return mask
    per_row, extra = divmod(int(count), out_f)
    f = fisher.detach()
    if f.dtype not in (torch.float32, torch.float64):  # the Fisher is float32: no copy
        f = f.float()
    # Stable sort on -F: ties go to the lower column, whatever the platform's sort does.
    order = torch.sort(-f, dim=1, stable=True).indices
    take = torch.full((out_f,), per_row, dtype=torch.int64, device=fisher.device)
    if extra:
        # per_row < in_f here (count <= out * in and extra > 0), so every row has a next entry.
        nxt = f.gather(1, order[:, per_row:per_row + 1]).squeeze(1)
        rows = torch.sort(-nxt, stable=True).indices[:extra]
        take[rows] += 1
    keep = torch.arange(in_f, device=fisher.device).unsqueeze(0) < take.unsqueeze(1)
    mask.scatter_(1, order, keep)
    return mask


class _Layer:
    """What the mask function knows of one calibrated layer: its name, weak references to the
    module and its weight (the mask function must not keep the model alive), its Fisher."""

    __slots__ = ("name", "module", "weight", "fisher", "shape")

    def __init__(self, name: str, module: nn.Linear, fisher: Tensor):
        self.name = name
        self.module = weakref.ref(module)
        self.weight = weakref.ref(module.weight)
        self.fisher = fisher
        self.shape = tuple(int(s) for s in module.weight.shape)


class ShiraFisherMask:
    """The mask function :func:`shira_mask_fn` returns: ``mask = self(base_layer, r, **kwargs)``.

    ``base_layer`` must be one of the calibrated ``nn.Linear`` modules (the same object, or a
    module holding the same weight ``Parameter``); anything else is refused by name rather
    than given a mask that no Fisher supports. ``kwargs`` (peft passes ``bias`` and, for some
    configurations, quantization or seed entries) are accepted and ignored. The mask has the
    weight's shape, dtype and device, 0s and exactly ``r * (in + out)`` 1s
    (:func:`row_balanced_mask` on the layer's Fisher).

    Attributes: ``names`` (the calibrated layers, in model order), ``estimator``,
    ``fisher(name)`` (a layer's Fisher, float32 ``[out, in]``).
    """

    def __init__(self, layers: List[_Layer], estimator: str):
        self._layers = layers
        self.estimator = estimator

    @property
    def names(self) -> List[str]:
        return [layer.name for layer in self._layers]

    def fisher(self, name: str) -> Tensor:
        for layer in self._layers:
            if layer.name == name:
                return layer.fisher
        raise KeyError(f"no calibrated layer {name!r}; calibrated: {self.names}")

    # peft deep-copies configurations; the Fisher is read-only here, so copies share it.
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def _find(self, base_layer: nn.Module) -> _Layer:
        for layer in self._layers:
            if layer.module() is base_layer:
                return layer
        weight = getattr(base_layer, "weight", None)
        same = [layer for layer in self._layers
                if weight is not None and layer.weight() is weight]
        if len(same) == 1:
            return same[0]
        listed = ", ".join(repr(n) for n in self.names[:8]) + (", ..." if len(self.names) > 8 else "")
        why = (f"its weight is shared by the calibrated layers {[l.name for l in same]}"
               if len(same) > 1 else "it is not one of the calibrated modules (nor holds one's "
                                     "weight)")
        raise ValueError(
            f"argument 'base_layer': no Fisher for {base_layer!r}: {why}. Calibrated layers: "
            f"{listed}. Call shira_mask_fn on the very model you pass to peft (not a copy or "
            f"a reloaded one), with this layer in `modules`, before get_peft_model")

    def __call__(self, base_layer: nn.Module, r: int, **kwargs) -> Tensor:
        r = _check_r(r)
        if type(base_layer) is not nn.Linear:
            raise ValueError(f"argument 'base_layer': expected a torch.nn.Linear (the layers "
                             f"shira_mask_fn calibrates), got {type(base_layer).__name__}")
        layer = self._find(base_layer)
        weight = base_layer.weight
        out_f, in_f = (int(s) for s in weight.shape)
        if (out_f, in_f) != layer.shape:
            raise ValueError(f"argument 'base_layer': {layer.name!r} has weight shape "
                             f"{[out_f, in_f]} now, but {list(layer.shape)} when calibrated")
        count = r * (in_f + out_f)
        if count > in_f * out_f:
            raise ValueError(
                f"argument 'r': r * (in + out) = {r} * ({in_f} + {out_f}) = {count} entries "
                f"exceed the {in_f * out_f} of {layer.name!r} (weight [{out_f}, {in_f}]); "
                f"the largest r for it is {in_f * out_f // (in_f + out_f)}")
        if not bool(layer.fisher.any()):
            raise ValueError(
                f"argument 'base_layer': the Fisher of {layer.name!r} is zero everywhere: no "
                f"gradient reached it on the calibration batches (unused by loss_fn, or "
                f"detached), so there is nothing to select by; leave it out of "
                f"target_modules")
        mask = row_balanced_mask(layer.fisher, count)
        return mask.to(device=weight.device, dtype=weight.dtype)


def _linear_names(model: nn.Module, modules: Optional[Sequence[str]]) -> List[str]:
    all_mods = dict(model.named_modules())
    if modules is None:
        names = [n for n, m in all_mods.items() if type(m) is nn.Linear]
        if not names:
            raise ValueError(f"argument 'model': {type(model).__name__} has no torch.nn.Linear")
        return names
    names = [modules] if isinstance(modules, str) else list(modules)
    if not names:
        raise ValueError("argument 'modules': expected at least one module name")
    for n in names:
        if not isinstance(n, str) or n not in all_mods:
            raise ValueError(f"argument 'modules': the model has no module {n!r}")
        if type(all_mods[n]) is not nn.Linear:
            raise ValueError(f"argument 'modules': {n!r} is a {type(all_mods[n]).__name__}, "
                             f"expected a torch.nn.Linear (the only layer SHiRA adapts)")
    if len(set(names)) != len(names):
        raise ValueError("argument 'modules': contains duplicates")
    return names


def shira_mask_fn(model: nn.Module, batches: Iterable, loss_fn: Callable, *,
                  estimator: str = "per_sample", modules: Optional[Sequence[str]] = None,
                  loss_reduction: str = "mean") -> ShiraFisherMask:
    """A peft SHiRA ``mask_fn`` that trains, in each layer, the entries with the most Fisher.

    The Fisher of the weights of ``modules`` (names of ``torch.nn.Linear`` modules; default:
    every one of the model) is estimated once, now, over ``batches`` with ``loss =
    loss_fn(model, batch)`` (:func:`fisheradaptune.fisher.estimate`; ``estimator`` is one of
    :data:`fisheradaptune.fisher.CALIBRATION_ESTIMATORS`, ``"per_sample"`` being TR-PTS's exact
    per-sample Fisher through ``ops.per_sample_grad_sq_``; ``loss_reduction`` says how
    ``loss`` reduces over a batch). The model runs in the mode it is in (``model.eval()``
    turns dropout off for calibration); its weights, ``.grad`` fields and ``requires_grad``
    flags are left as they were.

    The returned :class:`ShiraFisherMask` gives peft, for a base layer and ``r``, a 0/1 mask of
    the weight's shape, dtype and device with exactly ``r * (in + out)`` ones: each row's top
    entries by Fisher, the remainder to the rows with the most Fisher in their next entry
    (:func:`row_balanced_mask`). Set it as ``config.mask_fn`` of a ``ShiraConfig`` (with a
    ``mask_type`` other than ``"random"``, which would replace it) before ``get_peft_model``
    or ``add_adapter``; it serves any number of adapters and ``r`` values.

    Refused before anything runs (``ValueError``): a peft model (its adapted layers do not run
    their base Linear's forward, so their Fisher would be zero: calibrate the plain model
    before ``get_peft_model``; the mask function keeps working for adapters added later),
    names in ``modules`` that are not ``nn.Linear`` modules of the model, an unknown
    ``estimator``, a non-callable ``loss_fn``, and calibration that leaves every Fisher zero
    (no batches, or no gradient). Refused when peft calls it: a layer it has no Fisher for,
    ``r * (in + out) > in * out``, a layer that got no gradient in calibration.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"argument 'model': expected a torch.nn.Module, got "
                         f"{type(model).__name__}")
    if estimator not in fisher_mod.CALIBRATION_ESTIMATORS:
        raise ValueError(f"argument 'estimator': expected one of "
                         f"{fisher_mod.CALIBRATION_ESTIMATORS}, got {estimator!r}")
    if not callable(loss_fn):
        raise ValueError(f"argument 'loss_fn': expected a callable loss_fn(model, batch), got "
                         f"{type(loss_fn).__name__}")
    for name, m in model.named_modules():
        if _is_peft_module(m):
            where = f" (module {name!r}, a {type(m).__name__})" if name else ""
            raise ValueError(
                f"argument 'model': {type(model).__name__} is a peft model{where}; its adapted "
                "layers do not call their base Linear, so no Fisher would reach them. Call "
                "shira_mask_fn on the plain model before peft.get_peft_model(...); the mask "
                "function it returns also serves adapters added later (add_adapter)")
    names = _linear_names(model, modules)
    all_mods = dict(model.named_modules())
    linears: Dict[str, nn.Linear] = {n: all_mods[n] for n in names}
    with fisher_mod.calibration.weights_requiring_grad(model, linears.values()):
        fisher = fisher_mod.estimate(model, batches, loss_fn, estimator=estimator, modules=names,
                                     loss_reduction=loss_reduction)
    for n in names:
        if not bool(torch.isfinite(fisher[n]).all()):
            raise ValueError(f"argument 'batches': the Fisher of {n!r} is not finite (a "
                             f"non-finite loss or activation in calibration)")
    if not any(bool(fisher[n].any()) for n in names):
        raise ValueError("argument 'batches': the Fisher is zero for every layer (no "
                         "calibration batch, or no gradient reached the chosen Linear layers)")
    layers = [_Layer(n, linears[n], fisher[n].detach()) for n in names]
    return ShiraFisherMask(layers, estimator)
