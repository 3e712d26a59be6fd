"""Feature-space adapters: VeFA and LoRFA (docs/methods.md section 8).

Weight-space PEFT methods (LoRA and friends) add a learned term to a pretrained weight. The
feature-space methods instead transform the *input features* of a pretrained ``nn.Linear`` and
keep its weight ``W0`` frozen, so the effective fine-tuned weight stays in the column space of
``W0`` and the pretrained map is preserved.

The formulation implemented here is docs/methods.md section 8, *inferred* from the
abstract of "Feature Space Adaptation for Robust Model Fine-Tuning" (Wang, Gu, Huang, 2025);
the paper's own code was not consulted. Implemented exactly as written there:

- **VeFA** (vector-based feature adaptation): ``y = W0 (s * x) + b`` with ``s`` in ``R^in``
  initialised to ones. Merges into ``W0 diag(s)``.
- **LoRFA** (low-rank feature adaptation): ``y = W0 (x + scaling * B A x) + b`` with ``A`` in
  ``R^{r x in}`` (random, kaiming-uniform like ``nn.Linear``'s default), ``B`` in ``R^{in x r}``
  (zeros) and ``scaling = alpha / r``. Merges into ``W0 (I + scaling * B A)``. docs/methods.md section 8 writes
  ``W0 (x + B A x)``, i.e. ``scaling = 1``; that is the default (``alpha = rank``).

Both start as the identity transform, so a freshly adapted model computes exactly what the base
model computed. The bias ``b`` is part of the frozen base.

Typical use::

    from fisheradaptune import adapters
    adapters.add_lorfa(model, rank=8)                     # every nn.Linear except the head
    adapters.print_trainable_parameters(model)
    # ... train (any optimizer; the FisherAdapTune wrapper works unchanged) ...
    torch.save(adapters.state_dict(model), "lorfa.pt")     # adapters (+ trained head) only
    adapters.merge(model)                                  # plain nn.Linear again, exact

Placement (``modules``):

- ``None``: every eligible ``nn.Linear`` except the head (see :func:`find_head`).
- ``"fisher:k"``: the ``k`` eligible non-head Linear layers with the largest Fisher mass (the
  sum of the diagonal Fisher of the weight, from :func:`fisheradaptune.fisher.estimate` over
  calibration ``batches`` with ``loss_fn(model, batch)``). Ties go to the earlier module.
- a list of module names: exactly those (the head too, if named).

*Eligible* means an ``nn.Linear`` (or a subclass that does not override ``forward``), not the
``base`` of an existing adapter, and not a child of ``nn.MultiheadAttention`` (which reads
``out_proj.weight`` directly and never calls its forward, so an adapter there would be ignored).
Adapter modules have no ``weight`` attribute on purpose (W0 is ``.base.weight``), so other code
that reads a Linear's weight instead of calling it fails loudly rather than skipping the adapter;
e.g. the inference fast path of ``nn.TransformerEncoderLayer`` (eval mode, ``batch_first``):
disable it with ``torch.backends.mha.set_fastpath_enabled(False)`` or :func:`merge` first.

The head rule (:func:`find_head`): the head is the *last* ``nn.Linear`` (in module registration
order) whose dotted name has a component, ignoring numeric ones, in :data:`HEAD_NAMES`
(``head``, ``heads``, ``fc``, ``classifier``, ``lm_head``, ``score``). This finds ``head``
(timm), ``heads.head`` (torchvision ViT), ``fc`` (torchvision ResNet), ``classifier`` and
``classifier.out_proj`` (Hugging Face), ``classifier.2`` (torchvision ConvNeXt), ``lm_head``.
A model with no such Linear has no head. Override with ``head=<name or list>`` or
``head=None`` (no head).

Trainability: after ``add_*`` only adapter parameters require grad, plus the head's parameters
when ``train_head=True`` (the default: fine-tuning for a new classification task needs a trained
head; pass ``train_head=False`` to train adapters alone). An adapted head keeps its base frozen.
"""
from __future__ import annotations

import abc
import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fisher as _fisher

__all__ = [
    "VeFAConfig", "LoRFAConfig", "FeatureAdapter", "VeFALinear", "LoRFALinear", "HEAD_NAMES",
    "add_vefa", "add_lorfa", "apply", "merge", "unmerge", "state_dict", "load_state_dict",
    "save", "load", "find_head", "named_adapters", "adapter_parameters", "count_parameters",
    "summary", "print_trainable_parameters",
]

#: Name components that mark a Linear as a task head (see :func:`find_head`).
HEAD_NAMES = ("head", "heads", "fc", "classifier", "lm_head", "score")

_FORMAT = "fisheradaptune.adapters"
_VERSION = 1
# Attribute names kept in a module's __dict__ (never registered: no parameters, no state_dict).
_INFO_ATTR = "_fisheradaptune_adapters"   # on the root: {"head": [...], "train_head": bool}
_STASH_ATTR = "_fisheradaptune_unmerge"   # on a merged nn.Linear: the adapter it came from

ModulesArg = Union[None, str, Sequence[str]]
HeadArg = Union[None, str, Sequence[str]]


# ---------------------------------------------------------------------------------------------
# Configs


def _modules_field():
    return field(default=None, metadata={"help": (
        "Where to put adapters: None (every eligible nn.Linear except the head), 'fisher:k' "
        "(the k non-head Linear layers with the largest Fisher mass; needs calibration data) "
        "or a list of module names.")})


def _head_field():
    return field(default="auto", metadata={"help": (
        "The task head: 'auto' (last nn.Linear whose name has a component in HEAD_NAMES), a "
        "module name or list of names, or None (the model has no head).")})


def _train_head_field():
    return field(default=True, metadata={"help": (
        "Keep the head's parameters trainable (default True: a new classification task needs "
        "a trained head). All other non-adapter parameters are frozen.")})


def _estimator_field():
    return field(default="per_sample", metadata={"help": (
        "Fisher estimator used for 'fisher:k' placement: 'per_sample', 'empirical' or 'kfac' "
        "(see fisheradaptune.fisher.estimate).")})


@dataclass
class VeFAConfig:
    """Vector-based feature adaptation: ``y = W0 (s * x) + b``, ``s`` initialised to ones."""

    modules: ModulesArg = _modules_field()
    head: HeadArg = _head_field()
    train_head: bool = _train_head_field()
    estimator: str = _estimator_field()

    method = "vefa"  # class attribute, not a field

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _validate_common(self)

    def to_dict(self) -> Dict[str, Any]:
        return _config_to_dict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "VeFAConfig":
        return _config_from_dict(cls, d)


@dataclass
class LoRFAConfig:
    """Low-rank feature adaptation: ``y = W0 (x + (alpha/rank) * B A x) + b``, ``B = 0`` at init."""

    rank: int = field(default=8, metadata={"help": "Rank r of A [r, in] and B [in, r]; >= 1."})
    alpha: Optional[float] = field(default=None, metadata={"help": (
        "Scaling numerator: the update is scaled by alpha / rank. Default None means alpha = "
        "rank, so the scaling is 1 and the layer is exactly y = W0 (x + B A x) + b.")})
    modules: ModulesArg = _modules_field()
    head: HeadArg = _head_field()
    train_head: bool = _train_head_field()
    estimator: str = _estimator_field()

    method = "lorfa"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            raise TypeError(f"argument 'rank': expected an int >= 1, got {self.rank!r}")
        if self.rank < 1:
            raise ValueError(f"argument 'rank': expected an int >= 1, got {self.rank}")
        if self.alpha is not None:
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
                raise TypeError(f"argument 'alpha': expected a positive number or None, got {self.alpha!r}")
            if not (math.isfinite(self.alpha) and self.alpha > 0):
                raise ValueError(f"argument 'alpha': expected a positive finite number, got {self.alpha}")
        _validate_common(self)

    @property
    def scaling(self) -> float:
        return (float(self.rank) if self.alpha is None else float(self.alpha)) / self.rank

    def to_dict(self) -> Dict[str, Any]:
        return _config_to_dict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LoRFAConfig":
        return _config_from_dict(cls, d)


AdapterConfig = Union[VeFAConfig, LoRFAConfig]


def _config_to_dict(cfg) -> Dict[str, Any]:
    d = dataclasses.asdict(cfg)
    for k in ("modules", "head"):
        if isinstance(d[k], tuple):
            d[k] = list(d[k])
    d["method"] = cfg.method
    return d


def _config_from_dict(cls, d: Dict[str, Any]):
    d = dict(d)
    method = d.pop("method", cls.method)
    if method != cls.method:
        raise ValueError(f"argument 'd': a {method!r} config cannot build {cls.__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"argument 'd': unknown {cls.__name__} fields {unknown}")
    return cls(**d)


_FISHER_RE = re.compile(r"^fisher:(-?\d+)$")


def _parse_fisher_k(modules: str) -> int:
    m = _FISHER_RE.match(modules.strip())
    if m is None:
        raise ValueError(f"argument 'modules': a string must be 'fisher:k' with an integer k >= 1 "
                         f"(pass module names as a list), got {modules!r}")
    k = int(m.group(1))
    if k < 1:
        raise ValueError(f"argument 'modules': 'fisher:k' needs k >= 1, got {modules!r}")
    return k


def _validate_names(value, arg: str) -> None:
    if isinstance(value, str) or value is None:
        return
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"argument '{arg}': expected a list of module names, got {type(value).__name__}")
    for n in value:
        if not isinstance(n, str):
            raise TypeError(f"argument '{arg}': module names must be str, got {n!r}")
    dup = sorted({n for n in value if list(value).count(n) > 1})
    if dup:
        raise ValueError(f"argument '{arg}': duplicate module names {dup}")


def _validate_common(cfg) -> None:
    if isinstance(cfg.modules, str):
        _parse_fisher_k(cfg.modules)
    else:
        _validate_names(cfg.modules, "modules")
        if cfg.modules is not None and len(cfg.modules) == 0:
            raise ValueError("argument 'modules': the list of module names is empty")
    _validate_names(cfg.head, "head")
    if not isinstance(cfg.train_head, bool):
        raise TypeError(f"argument 'train_head': expected a bool, got {cfg.train_head!r}")
    if cfg.estimator not in _fisher.CALIBRATION_ESTIMATORS:
        raise ValueError(f"argument 'estimator': expected one of {_fisher.CALIBRATION_ESTIMATORS}, got {cfg.estimator!r}")


# ---------------------------------------------------------------------------------------------
# Adapter modules


class FeatureAdapter(nn.Module, abc.ABC):
    """Base class of the adapters (use it with isinstance): holds the frozen ``base`` Linear."""

    method = ""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base

    # Deliberately no `weight`/`bias` attributes: code that reads a Linear's weight directly
    # instead of calling it (nn.MultiheadAttention's out_proj, the inference fast path of
    # nn.TransformerEncoderLayer) would silently skip the adapter; without them it fails loudly.
    # W0 is `.base.weight`; the effective weight is `merged_weight()`.
    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @abc.abstractmethod
    def adapter_parameters(self) -> List[nn.Parameter]:
        """The trainable adapter tensors."""

    @abc.abstractmethod
    def adapter_config(self) -> Dict[str, Any]:
        """What is needed to rebuild this adapter (method, shapes, hyper-parameters)."""

    @abc.abstractmethod
    def merged_weight(self) -> Tensor:
        """The effective weight, computed in float64 and cast to ``W0``'s dtype."""


class VeFALinear(FeatureAdapter):
    """``y = W0 (s * x) + b``: a per-input-feature scale ``vefa_s`` (ones at init) in front of
    the frozen ``base`` Linear. docs/methods.md section 8 as written (inferred from the paper's abstract).
    """

    method = "vefa"

    def __init__(self, base: nn.Linear):
        super().__init__(base)
        w = base.weight
        self.vefa_s = nn.Parameter(torch.ones(base.in_features, dtype=w.dtype, device=w.device))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x * self.vefa_s, self.base.weight, self.base.bias)

    def adapter_parameters(self) -> List[nn.Parameter]:
        return [self.vefa_s]

    def adapter_config(self) -> Dict[str, Any]:
        return {"method": "vefa", "in_features": self.in_features, "out_features": self.out_features}

    def merged_weight(self) -> Tensor:
        w0 = self.base.weight
        with torch.no_grad():
            return (w0.double() * self.vefa_s.double()[None, :]).to(w0.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class LoRFALinear(FeatureAdapter):
    """``y = W0 (x + scaling * B A x) + b`` with ``A = lorfa_A [r, in]`` (kaiming-uniform, as
    ``nn.Linear`` initialises its weight), ``B = lorfa_B [in, r]`` (zeros) and
    ``scaling = alpha / r``. docs/methods.md section 8 as written (inferred from the paper's abstract),
    with the LoRA-style ``alpha / r`` scaling added (``alpha = r`` gives docs/methods.md section 8 exactly).

    The forward never forms ``W0 (I + BA)``: it computes ``h = x + scaling * (x A^T) B^T`` (two
    thin GEMMs, ``O(r * in)`` per token) and then ``F.linear(h, W0, b)``.
    """

    method = "lorfa"

    def __init__(self, base: nn.Linear, rank: int, alpha: Optional[float] = None):
        super().__init__(base)
        w = base.weight
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / self.rank
        self.lorfa_A = nn.Parameter(torch.empty(self.rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lorfa_B = nn.Parameter(torch.zeros(base.in_features, self.rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lorfa_A, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.add(x, F.linear(F.linear(x, self.lorfa_A), self.lorfa_B), alpha=self.scaling)
        return F.linear(h, self.base.weight, self.base.bias)

    def adapter_parameters(self) -> List[nn.Parameter]:
        return [self.lorfa_A, self.lorfa_B]

    def adapter_config(self) -> Dict[str, Any]:
        return {"method": "lorfa", "in_features": self.in_features,
                "out_features": self.out_features, "rank": self.rank, "alpha": self.alpha}

    def merged_weight(self) -> Tensor:
        w0 = self.base.weight
        with torch.no_grad():
            w = w0.double()
            w = w + self.scaling * ((w @ self.lorfa_B.double()) @ self.lorfa_A.double())
            return w.to(w0.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, alpha={self.alpha:g}")


_ADAPTER_TYPES = {"vefa": VeFALinear, "lorfa": LoRFALinear}


# ---------------------------------------------------------------------------------------------
# Discovery


def _linear_candidates(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every Linear and every adapter (in place of its base), in order."""
    out = []
    skip: set = set()
    for name, m in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if isinstance(m, FeatureAdapter):
            out.append((name, m))
            skip.add(name)
        elif isinstance(m, nn.Linear):
            out.append((name, m))
    return out


def _is_head_name(name: str) -> bool:
    return any(c in HEAD_NAMES for c in name.split(".") if not c.isdigit())


def find_head(model: nn.Module) -> Optional[str]:
    """Name of the model's task head, or None.

    Rule: the last ``nn.Linear`` (in ``named_modules`` order; an adapted Linear counts under
    its own name) whose dotted name has a component, numeric components ignored, in
    :data:`HEAD_NAMES` (``head``, ``heads``, ``fc``, ``classifier``, ``lm_head``, ``score``).
    Examples: ``head``, ``heads.head``, ``head.fc``, ``fc``, ``classifier``,
    ``classifier.out_proj``, ``classifier.2``, ``lm_head``. ``fc1``/``fc2`` do not match.
    """
    head = None
    for name, _ in _linear_candidates(model):
        if _is_head_name(name):
            head = name
    return head


def _mha_children(model: nn.Module) -> set:
    names = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            prefix = name + "." if name else ""
            names.update(prefix + n for n, _ in m.named_modules() if n)
    return names


def _adapter_bases(model: nn.Module) -> set:
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, FeatureAdapter):
            prefix = name + "." if name else ""
            out.update(prefix + n for n, _ in m.named_modules() if n)
    return out


def _resolve_head(model: nn.Module, head: HeadArg) -> List[str]:
    if head is None:
        return []
    if isinstance(head, str) and head == "auto":
        h = find_head(model)
        return [] if h is None else [h]
    names = [head] if isinstance(head, str) else list(head)
    found = dict(_linear_candidates(model))
    modules = dict(model.named_modules())
    for n in names:
        if n not in modules:
            raise ValueError(f"argument 'head': the model has no module named {n!r}")
        if n not in found:
            raise TypeError(f"argument 'head': {n!r} is a {type(modules[n]).__name__}, "
                            f"expected an nn.Linear")
    return names


def _eligible(model: nn.Module, head: List[str]) -> List[str]:
    """Default placement: plain (not adapted) Linear modules, minus head and MHA children."""
    mha = _mha_children(model)
    out = []
    for name, m in _linear_candidates(model):
        if isinstance(m, FeatureAdapter) or name in head or name in mha or name == "":
            continue
        if type(m).forward is not nn.Linear.forward:
            continue
        out.append(name)
    return out


def _check_explicit(model: nn.Module, names: Sequence[str]) -> None:
    modules = dict(model.named_modules())
    mha = _mha_children(model)
    bases = _adapter_bases(model)
    for n in names:
        if n not in modules:
            raise ValueError(f"argument 'modules': the model has no module named {n!r}")
        m = modules[n]
        if isinstance(m, FeatureAdapter):
            raise ValueError(f"argument 'modules': {n!r} already has a {m.method} adapter; a module "
                             f"takes one adapter (call unmerge/merge or use a fresh model)")
        if n in bases:
            raise ValueError(f"argument 'modules': {n!r} is inside an adapter (the frozen base "
                             f"of {n.rsplit('.', 1)[0]!r}); a module takes one adapter")
        if not isinstance(m, nn.Linear):
            raise TypeError(f"argument 'modules': {n!r} is a {type(m).__name__}, expected an nn.Linear")
        if type(m).forward is not nn.Linear.forward:
            raise TypeError(f"argument 'modules': {n!r} is a {type(m).__name__} with its own "
                            f"forward; the adapters compute F.linear with its weight and would "
                            f"change what it does")
        if n in mha:
            raise ValueError(f"argument 'modules': {n!r} belongs to an nn.MultiheadAttention, "
                             f"which reads its weight directly and never calls its forward; an "
                             f"adapter there would have no effect")


def _fisher_topk(model: nn.Module, candidates: List[str], k: int, batches, loss_fn,
                 estimator: str) -> Tuple[List[str], Dict[str, float]]:
    if k > len(candidates):
        raise ValueError(f"argument 'modules': 'fisher:{k}' asks for {k} layers but only "
                         f"{len(candidates)} eligible nn.Linear layers exist: {candidates}")
    modules = dict(model.named_modules())
    weights = [modules[n].weight for n in candidates]
    flags = [w.requires_grad for w in weights]
    # The estimators only see weights that take part in autograd: enable them for the pass.
    for w in weights:
        w.requires_grad_(True)
    try:
        fis = _fisher.estimate(model, batches, loss_fn, estimator=estimator, modules=candidates)
    finally:
        for w, f in zip(weights, flags):
            w.requires_grad_(f)
    mass = {n: float(fis[n].double().sum()) for n in candidates}
    order = sorted(range(len(candidates)), key=lambda i: (-mass[candidates[i]], i))
    chosen = sorted(order[:k])  # keep model order
    return [candidates[i] for i in chosen], mass


# ---------------------------------------------------------------------------------------------
# Adding adapters


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _info(model: nn.Module) -> Dict[str, Any]:
    return model.__dict__.get(_INFO_ATTR) or {"head": [], "train_head": False}


def _set_trainable(model: nn.Module, head: List[str], train_head: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter_parameters(model):
        p.requires_grad_(True)
    if train_head:
        modules = dict(model.named_modules())
        for n in head:
            m = modules[n]
            if not isinstance(m, FeatureAdapter):  # an adapted head keeps its base frozen
                for p in m.parameters():
                    p.requires_grad_(True)


def apply(model: nn.Module, config: AdapterConfig, *, batches: Optional[Iterable] = None,
          loss_fn: Optional[Callable] = None) -> nn.Module:
    """Add the adapters described by ``config`` (:class:`VeFAConfig` or :class:`LoRFAConfig`)
    to ``model`` in place and freeze everything else (see the module docstring). ``batches``
    and ``loss_fn(model, batch) -> loss`` are the calibration data for ``modules="fisher:k"``
    and are ignored otherwise. Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"argument 'model': expected an nn.Module, got {type(model).__name__}")
    if not isinstance(config, (VeFAConfig, LoRFAConfig)):
        raise TypeError(f"argument 'config': expected a VeFAConfig or LoRFAConfig, got {type(config).__name__}")
    if isinstance(model, (nn.Linear, FeatureAdapter)):
        raise TypeError("argument 'model': the model itself is an nn.Linear and cannot be "
                        "replaced in place; wrap it in a container (e.g. nn.Sequential)")
    config.validate()
    head = _resolve_head(model, config.head)
    mass = None
    if config.modules is None or isinstance(config.modules, str):
        candidates = _eligible(model, head)
        if not candidates:
            taken = [n for n, m in _linear_candidates(model) if isinstance(m, FeatureAdapter)]
            why = (f"every eligible one already has an adapter ({taken}); a module takes one "
                   f"adapter" if taken else "the model has none outside the head")
            raise ValueError(f"argument 'modules': no nn.Linear to adapt: {why}")
        if config.modules is None:
            names = candidates
        else:
            k = _parse_fisher_k(config.modules)
            if batches is None:
                raise ValueError(f"argument 'batches': modules={config.modules!r} places adapters "
                                 f"by Fisher mass and needs calibration data: pass batches=... "
                                 f"and loss_fn=...")
            if loss_fn is None or not callable(loss_fn):
                raise ValueError(f"argument 'loss_fn': modules={config.modules!r} needs "
                                 f"loss_fn(model, batch) -> scalar loss, got {loss_fn!r}")
            names, mass = _fisher_topk(model, candidates, k, batches, loss_fn, config.estimator)
    else:
        names = list(config.modules)
        _check_explicit(model, names)

    modules = dict(model.named_modules())
    for n in names:
        base = modules[n]
        if isinstance(config, LoRFAConfig):
            new = LoRFALinear(base, config.rank, config.alpha)
        else:
            new = VeFALinear(base)
        _replace(model, n, new)

    info = dict(_info(model))
    info.update(head=head, train_head=config.train_head)
    if mass is not None:
        info["fisher_mass"] = mass
    model.__dict__[_INFO_ATTR] = info
    _set_trainable(model, head, config.train_head)
    return model


def add_vefa(model: nn.Module, modules: ModulesArg = None, *, train_head: bool = True,
             head: HeadArg = "auto", batches: Optional[Iterable] = None,
             loss_fn: Optional[Callable] = None, estimator: str = "per_sample") -> nn.Module:
    """Wrap Linear layers of ``model`` in :class:`VeFALinear` (``y = W0 (s * x) + b``).

    Args:
        modules: ``None`` (every eligible Linear except the head), ``"fisher:k"`` (top ``k`` by
            Fisher mass; needs ``batches`` and ``loss_fn``) or a list of module names.
        train_head: keep the head trainable (default True). Everything else except the
            adapters gets ``requires_grad_(False)``.
        head: ``"auto"`` (:func:`find_head`), a name or list of names, or None.
        batches, loss_fn, estimator: calibration data, ``loss_fn(model, batch) -> loss`` and the
            Fisher estimator for ``"fisher:k"``.

    Returns ``model``, modified in place.
    """
    cfg = VeFAConfig(modules=modules, head=head, train_head=train_head, estimator=estimator)
    return apply(model, cfg, batches=batches, loss_fn=loss_fn)


def add_lorfa(model: nn.Module, rank: int = 8, modules: ModulesArg = None,
              alpha: Optional[float] = None, *, train_head: bool = True, head: HeadArg = "auto",
              batches: Optional[Iterable] = None, loss_fn: Optional[Callable] = None,
              estimator: str = "per_sample") -> nn.Module:
    """Wrap Linear layers of ``model`` in :class:`LoRFALinear`
    (``y = W0 (x + (alpha/rank) B A x) + b``; ``alpha`` defaults to ``rank``, scaling 1).

    Other arguments as in :func:`add_vefa`. Returns ``model``, modified in place.
    """
    cfg = LoRFAConfig(rank=rank, alpha=alpha, modules=modules, head=head, train_head=train_head,
                      estimator=estimator)
    return apply(model, cfg, batches=batches, loss_fn=loss_fn)


# ---------------------------------------------------------------------------------------------
# Introspection


def named_adapters(model: nn.Module) -> Iterator[Tuple[str, FeatureAdapter]]:
    """``(name, adapter module)`` for every live (unmerged) adapter."""
    for name, m in model.named_modules():
        if isinstance(m, FeatureAdapter):
            yield name, m


def adapter_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The adapter parameters (``vefa_s``, ``lorfa_A``, ``lorfa_B``) of every live adapter."""
    return [p for _, m in named_adapters(model) for p in m.adapter_parameters()]


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """``(trainable, total)`` element counts over ``model.parameters()`` (shared ones once)."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def summary(model: nn.Module, verbose: bool = False) -> str:
    """``"trainable params: X || all params: Y || trainable%: Z"`` (peft's format), and with
    ``verbose`` one line per adapter after it."""
    trainable, total = count_parameters(model)
    pct = 100.0 * trainable / total if total else 0.0
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"
    if not verbose:
        return line
    lines = [line]
    for name, m in named_adapters(model):
        n = sum(p.numel() for p in m.adapter_parameters())
        lines.append(f"  {name}: {m.method} ({m.extra_repr()}) adapter params: {n:,d}")
    info = _info(model)
    if info["head"]:
        lines.append(f"  head: {info['head']} (trainable: {info['train_head']})")
    else:
        lines.append("  head: none (pass head=<name> to name one)")
    return "\n".join(lines)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print :func:`summary` (one line, as peft's ``print_trainable_parameters``)."""
    print(summary(model))


# ---------------------------------------------------------------------------------------------
# Merge / unmerge


def merge(model: nn.Module, *, keep_unmerge: bool = True) -> List[str]:
    """Fold every adapter into its weight and put a plain ``nn.Linear`` back in its place.

    The merged weight is ``W0 diag(s)`` (VeFA) or ``W0 (I + scaling B A)`` (LoRFA), computed in
    float64 and cast to ``W0``'s dtype, so outputs before and after agree to rounding. The bias
    Parameter is shared with the base. The merged weight's ``requires_grad`` copies ``W0``'s.

    With ``keep_unmerge=True`` (default) the adapter module (``W0`` and the adapter tensors) is
    kept, outside the module tree, on the merged Linear so :func:`unmerge` is exact. Memory
    cost: a second copy of each adapted weight (``out * in`` elements) plus the adapter
    tensors; it appears in neither ``parameters()`` nor ``state_dict()``. Pass
    ``keep_unmerge=False`` to drop it (unmerge is then impossible).

    Returns the names of the merged modules.
    """
    if isinstance(model, FeatureAdapter):
        raise TypeError("argument 'model': the model itself is an adapter and cannot be "
                        "replaced in place; merge its container")
    merged = []
    for name, m in list(named_adapters(model)):
        w0 = m.base.weight
        lin = nn.Linear(m.in_features, m.out_features, bias=m.base.bias is not None,
                        device=w0.device, dtype=w0.dtype)
        lin.weight = nn.Parameter(m.merged_weight(), requires_grad=w0.requires_grad)
        if m.base.bias is not None:
            lin.bias = m.base.bias
        lin.train(m.training)
        if keep_unmerge:
            lin.__dict__[_STASH_ATTR] = m  # plain attribute: not a submodule
        _replace(model, name, lin)
        merged.append(name)
    return merged


def unmerge(model: nn.Module) -> List[str]:
    """Put back the adapter modules that :func:`merge` kept: the same ``W0`` and adapter tensors
    (bit for bit), so training can continue. Changes made to a merged weight are discarded.
    Returns the names of the restored modules (empty if none was merged with keep_unmerge)."""
    restored = []
    for name, m in list(model.named_modules()):
        adapter = m.__dict__.get(_STASH_ATTR)
        if adapter is None:
            continue
        adapter.train(m.training)
        _replace(model, name, adapter)
        restored.append(name)
    return restored


def _merged_names(model: nn.Module) -> List[str]:
    return [n for n, m in model.named_modules() if _STASH_ATTR in m.__dict__]


# ---------------------------------------------------------------------------------------------
# Save / load


def state_dict(model: nn.Module, *, include_head: bool = True) -> Dict[str, Any]:
    """The adapters alone, as a small dict::

        {"format": "fisheradaptune.adapters", "version": 1,
         "config": {module name: {"method", "in_features", "out_features"[, "rank", "alpha"]}},
         "head": {"names": [...], "train_head": bool},
         "tensors": {"<module>.vefa_s" | "<module>.lorfa_A" | "<module>.lorfa_B": Tensor,
                     and, if the head was trained and include_head, "<head>.<param>": Tensor}}

    Tensors are detached and share storage with the model, as with ``nn.Module.state_dict``.
    A trained head (``train_head=True``) is included by default because a model restored
    without it would not be the fine-tuned one; ``include_head=False`` leaves it out.
    """
    merged = _merged_names(model)
    if merged:
        raise ValueError(f"argument 'model': it has merged adapters {merged}; call "
                         f"unmerge(model) first")
    config, tensors = {}, {}
    for name, m in named_adapters(model):
        config[name] = m.adapter_config()
        for pname, p in m.named_parameters(recurse=False):
            tensors[f"{name}.{pname}"] = p.detach()
    info = _info(model)
    head_names = list(info["head"]) if (include_head and info["train_head"]) else []
    modules = dict(model.named_modules())
    saved_heads = []
    for h in head_names:
        m = modules.get(h)
        if m is None or isinstance(m, FeatureAdapter):
            continue
        saved_heads.append(h)
        for pname, p in m.named_parameters():
            tensors[f"{h}.{pname}"] = p.detach()
    return {"format": _FORMAT, "version": _VERSION, "config": config,
            "head": {"names": saved_heads, "train_head": bool(info["train_head"]),
                     "all": list(info["head"])},
            "tensors": tensors}


def _check_format(sd) -> None:
    if not isinstance(sd, dict) or sd.get("format") != _FORMAT:
        raise ValueError("argument 'state_dict': not an adapters state dict (made by "
                         "fisheradaptune.adapters.state_dict)")
    if sd.get("version") != _VERSION:
        raise ValueError(f"argument 'state_dict': version {sd.get('version')!r} is not supported "
                         f"(expected {_VERSION})")


def load_state_dict(model: nn.Module, state_dict: Dict[str, Any], *,
                    create: bool = False) -> nn.Module:
    """Load a dict made by :func:`state_dict` into ``model``.

    The model must carry the same adapters (same module names, methods, shapes, rank and
    alpha) — i.e. the same ``add_*`` applied — or a ``ValueError`` naming ``state_dict`` says
    what differs. With ``create=True`` the adapters listed in the dict that the model lacks are
    added first (at exactly those modules, e.g. to restore a ``fisher:k`` placement without
    calibration data) and parameters frozen as after ``add_*``. Values are copied in place
    (cast to each parameter's dtype and device). Returns ``model``.
    """
    _check_format(state_dict)
    config: Dict[str, Dict[str, Any]] = state_dict["config"]
    tensors: Dict[str, Tensor] = state_dict["tensors"]
    head_info = state_dict.get("head", {"names": [], "train_head": False, "all": []})
    if create:
        live = dict(named_adapters(model))
        for name, cfg in config.items():
            if name in live:
                continue
            if cfg["method"] == "lorfa":
                c = LoRFAConfig(rank=int(cfg["rank"]), alpha=float(cfg["alpha"]), modules=[name],
                                head=None, train_head=False)
            elif cfg["method"] == "vefa":
                c = VeFAConfig(modules=[name], head=None, train_head=False)
            else:
                raise ValueError(f"argument 'state_dict': unknown method {cfg['method']!r} for {name!r}")
            apply(model, c)
        heads = [h for h in head_info.get("all", []) if h in dict(model.named_modules())]
        model.__dict__[_INFO_ATTR] = {"head": heads, "train_head": bool(head_info["train_head"])}
        _set_trainable(model, heads, bool(head_info["train_head"]))

    live = dict(named_adapters(model))
    missing = sorted(set(live) - set(config))
    unexpected = sorted(set(config) - set(live))
    if missing or unexpected:
        raise ValueError(f"argument 'state_dict': adapters do not match the model: missing in "
                         f"state_dict {missing}, not in model {unexpected} (apply the same "
                         f"add_* first, or pass create=True)")
    for name, cfg in config.items():
        have = live[name].adapter_config()
        if have != cfg:
            raise ValueError(f"argument 'state_dict': adapter {name!r} is {cfg} in state_dict "
                             f"but {have} in the model")
    targets: Dict[str, Tensor] = {}
    for name, m in live.items():
        for pname, p in m.named_parameters(recurse=False):
            targets[f"{name}.{pname}"] = p
    modules = dict(model.named_modules())
    for h in head_info.get("names", []):
        m = modules.get(h)
        if m is None:
            raise ValueError(f"argument 'state_dict': it holds head {h!r}, which the model lacks")
        for pname, p in m.named_parameters():
            targets[f"{h}.{pname}"] = p
    missing = sorted(set(targets) - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise ValueError(f"argument 'state_dict': tensors do not match: missing {missing}, "
                         f"unexpected {unexpected}")
    for k, p in targets.items():
        t = tensors[k]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"argument 'state_dict': {k!r} has shape {tuple(t.shape)}, the model "
                             f"expects {tuple(p.shape)}")
    with torch.no_grad():
        for k, p in targets.items():
            p.copy_(tensors[k])
    return model


def save(model: nn.Module, path, *, include_head: bool = True) -> None:
    """``torch.save(state_dict(model, include_head=...), path)``."""
    torch.save(state_dict(model, include_head=include_head), path)


def load(model: nn.Module, path, *, create: bool = False, map_location=None) -> nn.Module:
    """Load a file written by :func:`save` (``weights_only`` loading) into ``model``."""
    sd = torch.load(path, map_location=map_location, weights_only=True)
    return load_state_dict(model, sd, create=create)
