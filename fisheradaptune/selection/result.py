"""The Selection: a TR-PTS selection's fields, counts and summary, its file format (validated
against itself on load) and training (``apply`` in mask or compact mode, ``merge``), with the
model checked before anything changes (docs/methods.md section 5)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .checks import FORMAT, VERSION, check_fields, check_not_peft, check_state, check_untied
from .sparse_linear import SparseLinear

__all__ = ["Selection", "MODES"]

MODES = ("mask", "compact")


@dataclass
class Selection:
    """A TR-PTS selection: per chosen Linear module, the int64 ``[out, C_l]`` kept input indices.

    Fields:
        index: ``{module name: int64 [out, C_l]}``, each row sorted ascending.
        c: ``{module name: C_l}``.
        shapes: ``{module name: (out_features, in_features)}``.
        budget, c_min, estimator, skip_empty, train_bias, train_head: the configuration.
        head: the head module's name (None: no head).
        counts: parameter counts of the model at selection time: ``"total"`` (all parameters),
            ``"bias"`` (biases of the chosen modules), ``"head"`` (head parameters).
    """
    index: Dict[str, Tensor]
    c: Dict[str, int]
    shapes: Dict[str, Tuple[int, int]]
    budget: float
    c_min: int = 1
    estimator: str = "per_sample"
    skip_empty: bool = False
    train_bias: bool = True
    train_head: bool = True
    head: Optional[str] = None
    counts: Dict[str, int] = field(default_factory=dict)
    # Set by apply(): {module name: weight Parameter} for MaskedOptimizer. Not saved.
    _weights: Dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ counts and summary
    @property
    def selected(self) -> int:
        """Selected weight entries over all chosen modules."""
        return sum(self.shapes[n][0] * self.c[n] for n in self.index)

    def trainable_parameters(self) -> int:
        """Selected entries plus the dense biases and head (per the flags)."""
        n = self.selected
        if self.train_bias:
            n += self.counts.get("bias", 0)
        if self.train_head:
            n += self.counts.get("head", 0)
        return n

    def summary(self, per_layer: bool = True) -> str:
        """Per layer ``C_l`` and selected counts, then peft's
        ``trainable params: X || all params: Y || trainable%: Z``."""
        lines = []
        if per_layer:
            width = max([len(n) for n in self.index] + [5])
            lines.append(f"{'layer':<{width}}  {'shape':>13}  {'C_l':>5}  {'selected':>10}  {'%':>7}")
            for n, idx in self.index.items():
                out_f, in_f = self.shapes[n]
                sel = out_f * self.c[n]
                pct = 100.0 * sel / (out_f * in_f) if out_f * in_f else 0.0
                lines.append(f"{n:<{width}}  {f'[{out_f}, {in_f}]':>13}  {self.c[n]:>5d}  "
                             f"{sel:>10,d}  {pct:>7.3f}")
            lines.append(f"selected weight entries: {self.selected:,d} (budget {self.budget:g}, "
                         f"c_min {self.c_min}); head: {self.head} (dense: {self.train_head}); "
                         f"biases dense: {self.train_bias}")
        trainable = self.trainable_parameters()
        total = self.counts.get("total", 0)
        pct = 100.0 * trainable / total if total else 0.0
        lines.append(f"trainable params: {trainable:,d} || all params: {total:,d} || "
                     f"trainable%: {pct:.4f}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Selection({len(self.index)} layers, selected={self.selected}, "
                f"budget={self.budget:g}, c_min={self.c_min}, head={self.head!r})")

    # ------------------------------------------------------------------ persistence
    def _config(self) -> dict:
        return {"budget": self.budget, "c_min": self.c_min, "estimator": self.estimator,
                "skip_empty": self.skip_empty, "train_bias": self.train_bias,
                "train_head": self.train_head, "head": self.head}

    def state_dict(self) -> dict:
        """The selection as plain tensors and Python values (see :meth:`from_state_dict`)."""
        return {
            "format": FORMAT, "version": VERSION,
            "index": {n: t.detach().cpu().clone() for n, t in self.index.items()},
            "c": dict(self.c),
            "shapes": {n: [int(s) for s in v] for n, v in self.shapes.items()},
            "config": self._config(),
            "counts": dict(self.counts),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "Selection":
        """A Selection from :meth:`state_dict`'s output, checked against itself first: its
        keys, format and version, the same layer names in ``index``, ``c`` and ``shapes``,
        each index int64 ``[out, C_l]`` with values in ``[0, in_features)`` and no column twice
        in a row, ``0 <= C_l <= in_features``, ``budget`` in ``(0, 1]``, the configuration's
        types (``ValueError``/``TypeError`` naming the field)."""
        fields, cfg = check_state(state)
        return cls(**fields, **cfg)

    def save(self, path) -> None:
        """Write plain tensors and Python values (loadable with ``weights_only=True``)."""
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path, map_location=None) -> "Selection":
        """Read a file written by :meth:`save`, checked as :meth:`from_state_dict` does."""
        return cls.from_state_dict(torch.load(path, map_location=map_location, weights_only=True))

    # ------------------------------------------------------------------ training
    def _modules(self, model: nn.Module) -> Dict[str, nn.Linear]:
        """The chosen modules of ``model``, after checking the selection against itself and
        against the model: no peft adapters, every name an ``nn.Linear`` of the selection's
        shape, no selected weight shared with another module. Changes nothing."""
        check_fields(self.index, self.c, self.shapes, self._config(), self.counts,
                     arg="selection")
        check_not_peft(model)
        mods = dict(model.named_modules(remove_duplicate=False))
        out = {}
        for n in self.index:
            m = mods.get(n)
            if not isinstance(m, nn.Linear):
                what = "no such module" if m is None else f"a {type(m).__name__}"
                raise ValueError(f"argument 'model': {n!r} is not an nn.Linear of the model "
                                 f"({what})")
            if tuple(m.weight.shape) != tuple(self.shapes[n]):
                raise ValueError(f"argument 'model': {n!r} has weight shape "
                                 f"{list(m.weight.shape)}, the selection {list(self.shapes[n])}")
            out[n] = m
        check_untied(model, out)
        return out

    def apply(self, model: nn.Module, mode: str = "mask") -> List[Tensor]:
        """Make the model trainable per the selection and return the trainable parameters.

        ``mode="mask"``: every parameter gets ``requires_grad=False`` except the weights of the
        chosen modules with ``C_l > 0`` (train them through :class:`MaskedOptimizer`, which keeps
        their unselected entries fixed), their biases (``train_bias``) and the head's
        parameters (``train_head``).

        ``mode="compact"``: each chosen Linear is replaced by a :class:`SparseLinear` whose
        trainable ``values [out, C_l]`` are the selected entries (any optimizer; no wrapper
        needed); the returned parameters are those values, biases and head parameters per the
        flags. :meth:`merge` turns them back into plain ``nn.Linear`` modules.

        Everything is checked before the model changes (``ValueError`` naming what is wrong):
        the selection against itself, a peft model (refused: select on the plain model), each
        chosen module present with the selection's shape, no chosen weight tied to another
        module (refused, naming both modules), the head present.
        """
        if mode not in MODES:
            raise ValueError(f"argument 'mode': expected one of {MODES}, got {mode!r}")
        mods = self._modules(model)
        head = None
        if self.train_head and self.head is not None:
            head = dict(model.named_modules()).get(self.head)
            if head is None:
                raise ValueError(f"argument 'model': it has no head module {self.head!r}")
        for p in model.parameters():
            p.requires_grad_(False)
        params: List[Tensor] = []
        seen = set()

        def add(p):
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                p.requires_grad_(True)
                params.append(p)

        self._weights = {}
        for n, m in mods.items():
            if mode == "compact":
                m = SparseLinear.from_linear(m, self.index[n])
                _set_module(model, n, m)
                trained = m.values
            else:
                trained = m.weight
                if self.c[n] > 0:
                    self._weights[n] = m.weight
            if self.c[n] > 0:
                add(trained)
            if self.train_bias:
                add(m.bias)
        if head is not None:
            for p in head.parameters():
                add(p)
        return params

    def merge(self, model: nn.Module) -> nn.Module:
        """Write compact values back into dense weights: every :class:`SparseLinear` of the
        selection becomes a plain ``nn.Linear`` again (mask mode: nothing to do). Returns
        ``model``."""
        mods = dict(model.named_modules())
        for n in self.index:
            m = mods.get(n)
            if isinstance(m, SparseLinear):
                _set_module(model, n, m.to_linear())
            elif not isinstance(m, nn.Linear):
                raise ValueError(f"argument 'model': {n!r} is not a SparseLinear or nn.Linear")
        return model


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
