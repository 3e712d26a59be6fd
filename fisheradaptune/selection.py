"""TR-PTS parameter selection (docs/methods.md section 5): Fisher-ranked, row-balanced sparse fine-tuning.

Usage::

    sel = selection.select_connections(model, batches, loss_fn, budget=0.005)
    print(sel.summary())
    params = sel.apply(model, mode="mask")
    opt = MaskedOptimizer(torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05), sel)

Algorithm (:func:`select_from_fisher`), over the weights of the chosen Linear modules:

1. ``F`` is a diagonal Fisher over calibration batches (:func:`fisheradaptune.fisher.estimate`).
2. The global top ``budget`` fraction of all their entries, ``k = max(1, round(budget * total))``
   entries, ties to the earlier entry (module order, then row-major index); ``k_l`` of them lie
   in layer ``l``.
3. ``C_l = min(in_features, max(c_min, round(k_l / out_features)))`` (round half up): layer
   ``l`` keeps as many entries as the top set holds in it, spread evenly over its rows, with at
   least ``c_min`` per row; a layer with ``k_l = 0`` gets ``min(c_min, in_features)``, or 0
   with ``skip_empty=True``.
4. Each output row of layer ``l`` keeps its top ``C_l`` input connections by ``F`` (ties: lower
   index). ``index[l]`` is int64 ``[out, C_l]``, each row sorted ascending.

So ``budget`` is the fraction of the chosen weights' entries selected: ``sum_l out_l * C_l``
equals ``k`` up to the rounding of each layer to whole rows (at most ``out_l / 2`` entries per
layer either way) and what the ``c_min`` floor adds; ``budget=1`` selects every entry. A
larger budget never selects less, and its selection contains the smaller one's: the top-k sets
are nested (one fixed order), so every ``k_l``, hence every ``C_l``, is non-decreasing in
``budget``, and a row's top ``C_l`` is a prefix of one fixed order.

Trainability (:meth:`Selection.apply`): the selected entries of the chosen weights; the chosen
modules' biases (``train_bias``) and the head's parameters (``train_head``) densely; everything
else (norms, embeddings, other modules) frozen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import fisher as fisher_mod
from .distributed import comm
from . import ops
from .adapters import find_head

__all__ = ["Selection", "SparseLinear", "select_connections", "select_from_fisher", "MODES"]

MODES = ("mask", "compact")
_FORMAT = "fisheradaptune.selection"
_VERSION = 1


def _check_budget(budget) -> float:
    b = float(budget)
    if not (0.0 < b <= 1.0) or math.isnan(b):
        raise ValueError(f"argument 'budget': expected a fraction in (0, 1], got {budget!r}")
    return b


def _check_c_min(c_min) -> int:
    if isinstance(c_min, bool) or int(c_min) != c_min or int(c_min) < 1:
        raise ValueError(f"argument 'c_min': expected an integer >= 1, got {c_min!r}")
    return int(c_min)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def select_from_fisher(fisher: Dict[str, Tensor], budget: float = 0.005, c_min: int = 1,
                       skip_empty: bool = False) -> Tuple[Dict[str, Tensor], Dict[str, int]]:
    """Steps 2-4 of the algorithm on a given Fisher ``{name: [out, in]}`` (see the module doc).

    ``budget`` in ``(0, 1]`` is the fraction of all the layers' entries to select (up to
    rounding to whole rows and the ``c_min`` floor, see the module doc); a larger budget selects
    a superset, ``1`` selects everything. ``c_min`` is the least number of connections per row
    of any layer that gets some; ``skip_empty`` gives layers with no entry in the global top
    set ``C_l = 0`` instead of ``min(c_min, in_features)``.

    Returns ``(index, c)``: ``{name: int64 [out, C_l]}`` (rows sorted ascending, on the Fisher's
    device) and ``{name: C_l}``.
    """
    budget = _check_budget(budget)
    c_min = _check_c_min(c_min)
    if not fisher:
        raise ValueError("argument 'fisher': expected at least one layer, got none")
    flats = []
    for name, f in fisher.items():
        if not isinstance(f, Tensor) or f.dim() != 2:
            raise ValueError(f"argument 'fisher': {name!r}: expected a 2-D tensor [out, in], got "
                             f"{tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__}")
        if not f.is_floating_point():
            raise TypeError(f"argument 'fisher': {name!r}: expected a floating tensor, got {f.dtype}")
        if f.numel() and not bool(torch.isfinite(f).all()):
            raise ValueError(f"argument 'fisher': {name!r}: contains non-finite values")
        # float32 (float64 kept): exact for the Fisher's own values, half the memory of float64.
        dtype = torch.float64 if f.dtype == torch.float64 else torch.float32
        flats.append(f.detach().reshape(-1).to(dtype))
    names = list(fisher)
    numels = [f.numel() for f in flats]
    total = sum(numels)
    if total == 0:
        raise ValueError("argument 'fisher': every layer is empty")
    k = min(total, max(1, _round_half_up(budget * total)))

    # Step 2: the k-th largest value is the threshold; entries above it are in, ties at it are
    # taken in flat order (module order, then row-major) until k are in.
    wide = torch.float64 if any(f.dtype == torch.float64 for f in flats) else torch.float32
    flats = [f.cpu().to(wide) for f in flats]
    allv = torch.cat(flats)
    thresh = float(torch.kthvalue(-allv, k).values.neg())
    counts = []
    need = k - int((allv > thresh).sum())
    for f in flats:
        above = int((f > thresh).sum())
        ties = int((f == thresh).sum())
        take = min(ties, need)
        need -= take
        counts.append(above + take)

    # Step 3. Rows of whole entries: C_l depends on budget only through k_l, which only grows
    # with it, so C_l (and the selection) is monotone in budget.
    index: Dict[str, Tensor] = {}
    c: Dict[str, int] = {}
    for name, kl in zip(names, counts):
        f = fisher[name]
        out_f, in_f = f.shape
        if kl > 0:
            cl = min(in_f, max(c_min, _round_half_up(kl / out_f)))
        else:
            cl = 0 if skip_empty else min(c_min, in_f)
        c[name] = cl
        # Step 4: stable sort on -F, so ties go to the lower index.
        if cl == 0 or out_f == 0:
            idx = torch.empty(out_f, cl, dtype=torch.int64, device=f.device)
        else:
            order = torch.sort(-flats[names.index(name)].view(out_f, in_f), dim=1,
                               stable=True).indices.to(f.device)
            idx = order[:, :cl].sort(dim=1).values.contiguous()
        index[name] = idx
    return index, c


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
    def state_dict(self) -> dict:
        return {
            "format": _FORMAT, "version": _VERSION,
            "index": {n: t.detach().cpu().clone() for n, t in self.index.items()},
            "c": dict(self.c),
            "shapes": {n: [int(s) for s in v] for n, v in self.shapes.items()},
            "config": {"budget": self.budget, "c_min": self.c_min, "estimator": self.estimator,
                       "skip_empty": self.skip_empty, "train_bias": self.train_bias,
                       "train_head": self.train_head, "head": self.head},
            "counts": dict(self.counts),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "Selection":
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError("argument 'state': not a fisheradaptune selection")
        if state.get("version") != _VERSION:
            raise ValueError(f"argument 'state': unsupported version {state.get('version')!r}")
        cfg = state["config"]
        return cls(index=dict(state["index"]), c={n: int(v) for n, v in state["c"].items()},
                   shapes={n: (int(v[0]), int(v[1])) for n, v in state["shapes"].items()},
                   counts={n: int(v) for n, v in state["counts"].items()}, **cfg)

    def save(self, path) -> None:
        """Write plain tensors and Python values (loadable with ``weights_only=True``)."""
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path, map_location=None) -> "Selection":
        return cls.from_state_dict(torch.load(path, map_location=map_location, weights_only=True))

    # ------------------------------------------------------------------ training
    def _modules(self, model: nn.Module) -> Dict[str, nn.Linear]:
        mods = dict(model.named_modules())
        out = {}
        for n in self.index:
            m = mods.get(n)
            if not isinstance(m, nn.Linear):
                raise ValueError(f"argument 'model': {n!r} is not an nn.Linear of the model")
            if tuple(m.weight.shape) != tuple(self.shapes[n]):
                raise ValueError(f"argument 'model': {n!r} has weight shape "
                                 f"{list(m.weight.shape)}, the selection {list(self.shapes[n])}")
            out[n] = m
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
        """
        if mode not in MODES:
            raise ValueError(f"argument 'mode': expected one of {MODES}, got {mode!r}")
        mods = self._modules(model)
        head = None
        if self.train_head and self.head is not None:
            # Checked before anything is changed.
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


class _SparseLinearFn(torch.autograd.Function):
    """``y = x W'^T + b`` with ``W' = weight`` except ``W'[i, index[i, c]] = values[i, c]``.
    The gradient of ``values`` is the sampled weight gradient (``ops.sampled_grad``); the frozen
    dense ``weight`` gets none. With ``synced=True`` the caller guarantees that ``weight``
    already holds ``values`` at ``index`` (SparseLinear keeps it so), and no copy is made."""

    @staticmethod
    def forward(ctx, x, weight, values, index, bias, synced=False):
        w = weight if synced else weight.scatter(1, index, values.to(weight.dtype))
        ctx.save_for_backward(x, w, index)
        ctx.values_dtype = values.dtype
        return nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        x, w, index = ctx.saved_tensors
        gx = gv = gb = None
        g2 = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[0]:
            gx = grad @ w.to(grad.dtype)
        if ctx.needs_input_grad[2]:
            x2 = x.reshape(-1, x.shape[-1])
            gv = ops.sampled_grad(g2.to(x2.dtype), x2, index).to(ctx.values_dtype)
        if ctx.needs_input_grad[4]:
            gb = g2.sum(0)
        return gx, None, gv, None, gb, None


class _WeightAlias(torch.autograd.Function):
    """``weight`` (which already holds ``values`` at ``index``) as a tensor differentiable in
    ``values``: forward returns the buffer itself (autograd wraps it as a view, no copy);
    backward gathers the dense gradient that reaches it at ``index``. Lets code that reads a
    Linear's ``weight`` instead of calling the module train the selected entries."""

    @staticmethod
    def forward(ctx, weight, values, index):
        ctx.save_for_backward(index)
        ctx.values_dtype = values.dtype
        return weight

    @staticmethod
    def backward(ctx, grad):
        index, = ctx.saved_tensors
        return None, grad.gather(1, index).to(ctx.values_dtype), None


def _check_sparse_args(weight, index, bias) -> None:
    """Refuse, at construction, what would otherwise fail only at the first backward (a wrong
    row count) or train silently wrong (a repeated column: ``scatter`` keeps only one of the
    two values while both get optimizer state)."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"argument 'weight': expected a Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"argument 'weight': expected a 2-D tensor [out_features, in_features], "
                         f"got shape {list(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"argument 'weight': expected a floating dtype, got {weight.dtype}")
    out_f, in_f = weight.shape
    if not isinstance(index, Tensor):
        raise TypeError(f"argument 'index': expected a Tensor, got {type(index).__name__}")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"argument 'index': expected an integer dtype, got {index.dtype}")
    if index.dim() != 2 or index.shape[0] != out_f or index.shape[1] > in_f:
        raise ValueError(f"argument 'index': expected shape [out_features={out_f}, C] with "
                         f"0 <= C <= in_features={in_f}, got {list(index.shape)}")
    if index.numel():
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= in_f:
            raise ValueError(f"argument 'index': values must lie in [0, {in_f}), got "
                             f"min {lo}, max {hi}")
        srt = index.sort(dim=1).values
        dup = (srt[:, 1:] == srt[:, :-1]).any(dim=1)
        if bool(dup.any()):
            row = int(dup.nonzero()[0, 0])
            raise ValueError(f"argument 'index': row {row} repeats a column "
                             f"({index[row].tolist()}); each row must name distinct columns")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"argument 'bias': expected a Tensor or None, got "
                            f"{type(bias).__name__}")
        if tuple(bias.shape) != (out_f,):
            raise ValueError(f"argument 'bias': expected shape [{out_f}], got {list(bias.shape)}")
        if not bias.is_floating_point():
            raise TypeError(f"argument 'bias': expected a floating dtype, got {bias.dtype}")


#: Linear classes that ``to_linear`` rebuilds as themselves: nn.MultiheadAttention's
#: ``out_proj`` type (same constructor as nn.Linear), so merging leaves the model's module
#: types as they were (quantization tools treat that class apart).
_LINEAR_TYPES = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


class SparseLinear(nn.Module):
    """A Linear layer that trains only ``values [out, C]`` at ``index [out, C]`` of its weight.

    ``weight`` (a buffer, saved as ``weight`` in the state dict) is the dense weight the layer
    multiplies by: the frozen pretrained entries, with the selected entries kept equal to
    ``values`` (trainable, the only ones with optimizer state). They are written into the
    buffer in place, ``out x C`` elements, before a forward or a read of ``weight`` that follows
    a change of ``values`` (an optimizer step, a load) or of the buffer, so no dense weight copy
    is made per forward. ``bias`` is the usual bias. The backward of :meth:`forward` computes
    only the sampled weight gradient (SDDMM, ``ops.sampled_grad``).

    Reading ``weight`` directly also works, because some modules do that instead of calling
    the Linear: ``nn.MultiheadAttention`` passes ``out_proj.weight`` to its functional form
    and ``nn.TransformerEncoderLayer``'s inference fast path reads ``linear1/linear2.weight``.
    The read returns the synced buffer; with grad mode on and ``values`` trainable it is
    differentiable into ``values`` (the dense gradient that reaches it is gathered at
    ``index``). That path forms the dense ``[out, in]`` weight gradient the reading module
    computes, so it costs what a dense Linear's backward costs; optimizer state stays
    ``[out, C]``.

    Construction checks the arguments (``_check_sparse_args``): ``weight`` 2-D floating,
    ``index`` integer ``[out_features, C]`` with ``C <= in_features``, values in
    ``[0, in_features)`` and distinct within each row, ``bias`` ``[out_features]``.
    """

    def __init__(self, weight: Tensor, index: Tensor, bias: Optional[Tensor] = None):
        super().__init__()
        _check_sparse_args(weight, index, bias)
        self.out_features, self.in_features = weight.shape
        # Stored straight into _buffers: register_buffer refuses a name the class already
        # defines, and `weight` is the property below. It is a buffer like any other for
        # state_dict, load_state_dict and .to().
        self._buffers["weight"] = weight.detach().clone()
        self.register_buffer("index", index.to(weight.device, torch.int64).contiguous())
        self.values = nn.Parameter(self._dense.gather(1, self.index))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self._synced: Optional[tuple] = None  # what the buffer held values of, see _sync
        self._linear_type: type = nn.Linear

    @classmethod
    def from_linear(cls, linear: nn.Linear, index: Tensor) -> "SparseLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"argument 'linear': expected an nn.Linear, got "
                            f"{type(linear).__name__}")
        sp = cls(linear.weight, index, linear.bias)
        if type(linear) in _LINEAR_TYPES:
            sp._linear_type = type(linear)
        return sp

    @property
    def _dense(self) -> Tensor:
        """The dense weight buffer itself (no sync, no autograd)."""
        return self._buffers["weight"]

    @property
    def weight(self) -> Tensor:
        """The dense weight, selected entries synced; differentiable into ``values`` when grad
        mode is on and ``values`` requires grad (see the class doc)."""
        self._sync()
        if torch.is_grad_enabled() and self.values.requires_grad:
            return _WeightAlias.apply(self._dense, self.values, self.index)
        return self._dense

    def _state(self) -> tuple:
        # In-place updates (optimizer steps, load_state_dict's copy_) bump _version; a new
        # tensor (module.to(), assignment) has another storage.
        w = self._dense
        return (self.values.data_ptr(), self.values._version, w.data_ptr(),
                w._version, self.index.data_ptr(), self.index._version)

    def _sync(self) -> None:
        """Write ``values`` into the buffer at ``index`` unless it already holds them. Skipped
        when nothing changed, so several forwards before one backward leave the weight saved
        for backward untouched."""
        if self._synced != self._state():
            with torch.no_grad():
                self._dense.scatter_(1, self.index, self.values.detach().to(self._dense.dtype))
            self._synced = self._state()

    def dense_weight(self) -> Tensor:
        """A detached copy of the dense weight with the current ``values``."""
        w = self._dense
        return w.scatter(1, self.index, self.values.detach().to(w.dtype))

    def to_linear(self) -> nn.Linear:
        w = self._dense
        lin = self._linear_type(self.in_features, self.out_features, bias=self.bias is not None,
                                device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
                lin.bias.requires_grad_(self.bias.requires_grad)
        return lin

    def forward(self, x: Tensor) -> Tensor:
        self._sync()
        return _SparseLinearFn.apply(x, self._dense, self.values, self.index, self.bias, True)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"connections={self.index.shape[1]}, bias={self.bias is not None}")


def _counts(model: nn.Module, linears: Dict[str, nn.Linear], head: Optional[str]) -> Dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    bias = sum(m.bias.numel() for m in linears.values() if m.bias is not None)
    head_n = 0
    if head is not None:
        head_n = sum(p.numel() for p in dict(model.named_modules())[head].parameters())
    return {"total": total, "bias": bias, "head": head_n}


def _average_across_ranks(fisher: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """Under an initialised process group, each layer's Fisher averaged over the ranks that
    train ``model``, so that every rank ranks the same values. Exact for the global Fisher
    when every rank saw as many calibration samples."""
    group = comm.group_of(model)
    world = comm.world_size(group)
    if world == 1:
        return fisher
    out = {n: comm.all_reduce_(fisher[n].clone(), group) / world
           for n in sorted(fisher)}  # one order on every rank
    return {n: out[n] for n in fisher}


def _broadcast_from_rank0(index: Dict[str, Tensor], model: nn.Module) -> None:
    """Make the first rank's selection every rank's. The ranks rank identical all-reduced
    values, so their C_l (the shapes) agree; the broadcast guarantees the indices do too."""
    group = comm.group_of(model)
    for n in sorted(index):
        comm.broadcast_(index[n], group)


#: Path components of the adapter layers peft inserts (LoRA and its variants).
_ADAPTER_PARTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                            "lora_magnitude_vector"})


def _adapter_part(name: str) -> bool:
    return any(part in _ADAPTER_PARTS for part in name.split("."))


def select_connections(model: nn.Module, batches: Iterable, loss_fn: Callable, *,
                       budget: float = 0.005, c_min: int = 1, estimator: str = "per_sample",
                       modules: Optional[Sequence[str]] = None, train_bias: bool = True,
                       train_head: bool = True, skip_empty: bool = False,
                       loss_reduction: str = "mean") -> Selection:
    """TR-PTS selection of ``model``'s Linear connections (docs/methods.md section 5; see the module doc).

    ``modules``: names of ``nn.Linear`` modules (default: every ``nn.Linear`` except the head,
    :func:`fisheradaptune.adapters.find_head`, and the adapter layers a peft model adds:
    ``lora_A``/``lora_B`` and the like are not pretrained weights; the base layers peft wraps,
    ``*.base_layer``, are selected as any Linear). ``loss_fn(model, batch)`` returns the scalar
    loss; ``estimator`` is one of :data:`fisheradaptune.fisher.CALIBRATION_ESTIMATORS`.
    ``budget`` is the fraction of the chosen weights' entries selected, ``c_min`` the least
    number per row (:func:`select_from_fisher`); a larger budget selects a superset.

    Distributed: under an initialised process group (e.g. a DDP-wrapped ``model`` with each
    rank calibrating on its own shard), the Fisher is averaged over ranks before the top-k and
    rank 0's indices are broadcast, so every rank trains the same connections.
    """
    budget = _check_budget(budget)
    c_min = _check_c_min(c_min)
    if estimator not in fisher_mod.CALIBRATION_ESTIMATORS:
        raise ValueError(f"argument 'estimator': expected one of {fisher_mod.CALIBRATION_ESTIMATORS}, "
                         f"got {estimator!r}")
    head = find_head(model)
    all_mods = dict(model.named_modules())
    if modules is None:
        names = [n for n, m in all_mods.items()
                 if isinstance(m, nn.Linear) and n != head and not _adapter_part(n)]
        if not names:
            raise ValueError("argument 'modules': the model has no nn.Linear besides the head")
    else:
        names = [modules] if isinstance(modules, str) else list(modules)
        if not names:
            raise ValueError("argument 'modules': expected at least one module name")
        for n in names:
            if n not in all_mods:
                raise ValueError(f"argument 'modules': the model has no module {n!r}")
            if not isinstance(all_mods[n], nn.Linear):
                raise ValueError(f"argument 'modules': {n!r} is a {type(all_mods[n]).__name__}, "
                                 f"expected an nn.Linear")
        if len(set(names)) != len(names):
            raise ValueError("argument 'modules': contains duplicates")
    linears = {n: all_mods[n] for n in names}
    if head in linears:   # a chosen head is trained sparsely like the other chosen modules
        head = None
    # The Fisher needs gradients of the chosen weights; restore requires_grad afterwards.
    flags = {id(p): p.requires_grad for p in model.parameters()}
    try:
        for m in linears.values():
            m.weight.requires_grad_(True)
        fisher = fisher_mod.estimate(model, batches, loss_fn, estimator=estimator, modules=names,
                                     loss_reduction=loss_reduction)
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    fisher = _average_across_ranks({n: fisher[n] for n in names}, model)
    index, c = select_from_fisher(fisher, budget, c_min, skip_empty)
    _broadcast_from_rank0(index, model)
    return Selection(index=index, c=c,
                     shapes={n: tuple(int(s) for s in m.weight.shape) for n, m in linears.items()},
                     budget=budget, c_min=c_min, estimator=estimator, skip_empty=skip_empty,
                     train_bias=bool(train_bias), train_head=bool(train_head), head=head,
                     counts=_counts(model, linears, head))
