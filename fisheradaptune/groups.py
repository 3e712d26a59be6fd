"""Parameter groups: which elements of which tensors are tracked, scored and frozen together.

A :class:`GroupLayout` maps an ordered list of tensors to groups. Each group is one or more
contiguous element ranges ("segments") of the flattened tensors; the kernels receive the layout
as one small int64 tensor of rows ``(tensor_index, begin, end, group_id)`` (docs/methods.md section 2).

Builders (all take ``named_params``: an ``nn.Module`` or an iterable of ``(name, tensor)``; a
module contributes its parameters that require grad):

- :func:`per_tensor`: one group per tensor.
- :func:`slabs`: the paper's default; dim 0 split into ``k`` near-equal contiguous slabs, fused
  ``qkv`` projections first split into q, k and v.
- :func:`per_module`: all tensors of one module form one group.
- :func:`build`: resolves ``"slabs" | "per_tensor" | "per_module" | GroupLayout | callable``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Sequence, Tuple, Union

import torch
from torch import nn

NamedParams = Union[nn.Module, Iterable[Tuple[str, torch.Tensor]]]

__all__ = ["GroupLayout", "per_tensor", "slabs", "per_module", "build", "NamedParams",
           "name_aliases"]


@dataclass(eq=False)
class GroupLayout:
    """Groups over an ordered list of tensors.

    Attributes:
        tensor_names: names of the tensors, in the order the ops receive them.
        shapes: their shapes.
        names: one readable name per group, e.g. ``blocks.0.attn.qkv.weight.q.slab1``.
        segments: int64 CPU tensor ``[S, 4]`` of ``(tensor_index, begin, end, group_id)`` over
            the flattened (contiguous) tensors. Segments never overlap; elements in no segment
            belong to no group.
    """

    tensor_names: Tuple[str, ...]
    shapes: Tuple[torch.Size, ...]
    names: Tuple[str, ...]
    segments: torch.Tensor
    _on_device: Dict[torch.device, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.tensor_names = tuple(self.tensor_names)
        self.shapes = tuple(torch.Size(s) for s in self.shapes)
        self.names = tuple(self.names)
        seg = torch.as_tensor(self.segments, dtype=torch.int64).reshape(-1, 4).cpu().contiguous()
        self.segments = seg
        if len(self.tensor_names) != len(self.shapes):
            raise ValueError(
                f"GroupLayout: 'tensor_names' has {len(self.tensor_names)} entries but 'shapes' "
                f"has {len(self.shapes)}")
        numels = [s.numel() for s in self.shapes]
        rows = seg.tolist()
        for r, (t, b, e, g) in enumerate(rows):
            if not 0 <= t < len(numels):
                raise ValueError(f"GroupLayout: 'segments' row {r}: tensor_index {t} out of range "
                                 f"for {len(numels)} tensors")
            if not 0 <= b <= e <= numels[t]:
                raise ValueError(f"GroupLayout: 'segments' row {r}: range [{b}, {e}) out of bounds "
                                 f"for '{self.tensor_names[t]}' with {numels[t]} elements")
            if not 0 <= g < len(self.names):
                raise ValueError(f"GroupLayout: 'segments' row {r}: group_id {g} out of range for "
                                 f"{len(self.names)} groups")
        # Empty segments hold no element, so they cannot overlap (the kernels drop them too).
        ordered = sorted(r for r in rows if r[2] > r[1])
        for a, b in zip(ordered, ordered[1:]):
            if a[0] == b[0] and a[2] > b[1]:
                raise ValueError(f"GroupLayout: 'segments' [{a[1]}, {a[2]}) and [{b[1]}, {b[2]}) of "
                                 f"'{self.tensor_names[a[0]]}' overlap")
        sizes = [0] * len(self.names)
        for t, b, e, g in rows:
            sizes[g] += e - b
        self._group_sizes = torch.tensor(sizes, dtype=torch.int64)

    @property
    def num_groups(self) -> int:
        return len(self.names)

    @property
    def num_tensors(self) -> int:
        return len(self.tensor_names)

    @property
    def numels(self) -> List[int]:
        return [s.numel() for s in self.shapes]

    @property
    def group_sizes(self) -> torch.Tensor:
        """int64 ``[num_groups]``: the number of elements in each group."""
        return self._group_sizes

    def segments_on(self, device: Union[str, torch.device]) -> torch.Tensor:
        """The segments tensor on ``device``, copied once and cached."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.segments
        if device not in self._on_device:
            self._on_device[device] = self.segments.to(device)
        return self._on_device[device]

    def segments_of(self, group: int) -> List[Tuple[int, int, int]]:
        """``(tensor_index, begin, end)`` of every segment of ``group``."""
        return [(t, b, e) for t, b, e, g in self.segments.tolist() if g == group]

    def groups_of(self, tensor_index: int) -> List[int]:
        """Group ids with elements in tensor ``tensor_index``, in element order."""
        rows = sorted(r for r in self.segments.tolist() if r[0] == tensor_index)
        return list(dict.fromkeys(r[3] for r in rows))

    def subset(self, tensor_indices: Sequence[int]) -> "GroupLayout":
        """The layout restricted to ``tensor_indices`` (renumbered in the given order).

        Group ids and names are kept, so per-group results stay aligned with this layout;
        groups with no remaining elements simply have none (their sums and drifts are 0).
        """
        keep = {t: j for j, t in enumerate(tensor_indices)}
        rows = [(keep[t], b, e, g) for t, b, e, g in self.segments.tolist() if t in keep]
        return GroupLayout(tuple(self.tensor_names[t] for t in tensor_indices),
                           tuple(self.shapes[t] for t in tensor_indices), self.names,
                           torch.tensor(rows, dtype=torch.int64).reshape(-1, 4))

    def check_tensors(self, tensors: Sequence[torch.Tensor], arg: str = "tensors") -> None:
        """Raise ``ValueError`` naming ``arg`` unless ``tensors`` match this layout's shapes."""
        if len(tensors) != self.num_tensors:
            raise ValueError(f"argument '{arg}': expected {self.num_tensors} tensors to match the "
                             f"layout, got {len(tensors)}")
        for i, (t, shape) in enumerate(zip(tensors, self.shapes)):
            if t is not None and t.shape != shape:
                raise ValueError(f"argument '{arg}[{i}]': expected shape {tuple(shape)} of "
                                 f"'{self.tensor_names[i]}' in the layout, got {tuple(t.shape)}")

    def __repr__(self) -> str:
        return (f"GroupLayout({self.num_groups} groups over {self.num_tensors} tensors, "
                f"{int(self._group_sizes.sum())} elements)")


def _named(named_params: NamedParams) -> List[Tuple[str, torch.Tensor]]:
    if isinstance(named_params, nn.Module):
        return [(n, p) for n, p in named_params.named_parameters() if p.requires_grad]
    out = list(named_params)
    for i, item in enumerate(out):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"argument 'named_params[{i}]': expected a (name, tensor) pair, "
                            f"got {type(item).__name__}")
    return out


class _Builder:
    """Accumulates tensors, groups and segments in order."""

    def __init__(self, named: List[Tuple[str, torch.Tensor]]):
        self.named = named
        self.names: List[str] = []
        self.rows: List[Tuple[int, int, int, int]] = []

    def group(self, name: str) -> int:
        self.names.append(name)
        return len(self.names) - 1

    def add(self, tensor_index: int, begin: int, end: int, group: int) -> None:
        if end > begin:
            self.rows.append((tensor_index, begin, end, group))

    def layout(self) -> GroupLayout:
        return GroupLayout(tuple(n for n, _ in self.named), tuple(p.shape for _, p in self.named),
                           tuple(self.names), torch.tensor(self.rows, dtype=torch.int64).reshape(-1, 4))


def per_tensor(named_params: NamedParams) -> GroupLayout:
    """One group per (non-empty) tensor."""
    b = _Builder(_named(named_params))
    for i, (name, p) in enumerate(b.named):
        if p.numel() > 0:
            b.add(i, 0, p.numel(), b.group(name))
    return b.layout()


def _is_fused_qkv(name: str, p: torch.Tensor) -> bool:
    # timm: `*.attn.qkv.weight|bias`; torchvision / nn.MultiheadAttention: `*.in_proj_weight|bias`.
    fused = name.endswith(("qkv.weight", "qkv.bias", "in_proj_weight", "in_proj_bias"))
    return fused and p.dim() >= 1 and p.shape[0] % 3 == 0 and p.shape[0] >= 3


def _row_slabs(rows: int, k: int) -> List[Tuple[int, int]]:
    """``k`` near-equal contiguous row ranges (the first ``rows % k`` one longer), none empty."""
    k = min(k, rows)
    base, extra = divmod(rows, k)
    out, start = [], 0
    for j in range(k):
        stop = start + base + (1 if j < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def slabs(named_params: NamedParams, k: int = 4, split_qkv: bool = True) -> GroupLayout:
    """Split each tensor's dim 0 into ``k`` near-equal contiguous slabs (docs/methods.md section 2).

    Rows of a Linear weight, output channels of a conv, ranges of a vector. A fused attention
    ``qkv`` tensor (timm ``*.attn.qkv``, torchvision ``in_proj_weight``; rows divisible by 3)
    is first split into q, k and v when ``split_qkv``, then each part into ``k`` slabs. A tensor
    with fewer than ``k`` rows gets one slab per row; a 0-d tensor is one group. Names end in
    ``.slab{j}`` (``.q.slab{j}`` for fused qkv) unless the tensor is a single group.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"argument 'k': expected an integer >= 1, got {k!r}")
    b = _Builder(_named(named_params))
    for i, (name, p) in enumerate(b.named):
        if p.numel() == 0:
            continue
        if p.dim() == 0:
            b.add(i, 0, 1, b.group(name))
            continue
        row = p.numel() // p.shape[0]
        if split_qkv and _is_fused_qkv(name, p):
            part = p.shape[0] // 3
            parts = [(f"{name}.{tag}", j * part) for j, tag in enumerate("qkv")]
            rows_per_part = part
        else:
            parts = [(name, 0)]
            rows_per_part = p.shape[0]
        for prefix, first in parts:
            ranges = _row_slabs(rows_per_part, k)
            for j, (r0, r1) in enumerate(ranges):
                gname = prefix if len(ranges) == 1 and prefix == name else f"{prefix}.slab{j}"
                b.add(i, (first + r0) * row, (first + r1) * row, b.group(gname))
    return b.layout()


def per_module(model: nn.Module) -> GroupLayout:
    """All trainable parameters owned directly by one module form one group (named after it)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"argument 'model': expected an nn.Module, got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    index = {n: i for i, (n, _) in enumerate(named)}
    b = _Builder(named)
    for mname, module in model.named_modules():
        owned = [(f"{mname}.{pn}" if mname else pn) for pn, p in module.named_parameters(recurse=False)]
        owned = [n for n in owned if n in index and named[index[n]][1].numel() > 0]
        if owned:
            g = b.group(mname or "<root>")
            for n in owned:
                b.add(index[n], 0, named[index[n]][1].numel(), g)
    b.rows.sort()
    return b.layout()


GroupSpec = Union[str, GroupLayout, Callable[[List[Tuple[str, torch.Tensor]]], GroupLayout]]


def build(spec: GroupSpec, named_params: List[Tuple[str, torch.Tensor]],
          model: nn.Module = None) -> GroupLayout:
    """Resolve a group specification against ``named_params`` (the tensors, in op order).

    ``spec`` is ``"slabs"``, ``"per_tensor"``, ``"per_module"`` (needs ``model``), a
    :class:`GroupLayout` (checked against the shapes), or a callable taking the named parameters
    and returning a :class:`GroupLayout`.
    """
    named_params = list(named_params)
    if isinstance(spec, GroupLayout):
        layout = spec
    elif spec == "slabs":
        layout = slabs(named_params)
    elif spec == "per_tensor":
        layout = per_tensor(named_params)
    elif spec == "per_module":
        if model is None:
            raise ValueError("argument 'groups': \"per_module\" needs the model")
        full = per_module(model)
        wanted = [n for n, _ in named_params]
        if list(full.tensor_names) != wanted:
            raise ValueError("argument 'groups': \"per_module\" needs the optimizer to hold exactly "
                             "the model's trainable parameters, in model order")
        layout = full
    elif callable(spec):
        layout = spec(named_params)
        if not isinstance(layout, GroupLayout):
            raise TypeError(f"argument 'groups': the callable returned {type(layout).__name__}, "
                            "expected a GroupLayout")
    else:
        raise ValueError("argument 'groups': expected \"slabs\", \"per_tensor\", \"per_module\", a "
                         f"GroupLayout or a callable, got {spec!r}")
    layout.check_tensors([p for _, p in named_params], arg="groups")
    return layout


def _wrapper_free(name: str, model: nn.Module) -> str:
    """``name`` without the segments that wrapping adds: torch.compile's ``_orig_mod`` and,
    for a (Distributed)DataParallel ``model``, the leading ``module``."""
    parts = [s for s in name.split(".") if s != "_orig_mod"]
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) and \
            parts[:1] == ["module"]:
        parts = parts[1:]
    return ".".join(parts)


def name_aliases(model: nn.Module, layout: GroupLayout) -> Dict[str, str]:
    """Other names a user may type for the tensors and groups of ``layout`` (built over
    ``model``'s parameters under their ``named_parameters()`` names), mapped to the layout's.

    - a tied parameter (one tensor registered under several names, e.g. an ``lm_head`` sharing
      the input embedding) is listed once, under its first name: its other names are aliases;
    - names of a compiled or (Distributed)DataParallel model carry ``_orig_mod.`` or
      ``module.``: the names without them are aliases.

    Group names that start with a tensor's name (``slabs``, ``per_tensor``) get the same
    aliases with the same suffix; ``per_module`` group names lose the wrapper segments. An
    alias that would stand for two different names is left out.
    """
    canonical = set(layout.tensor_names)
    first = {id(p): n for n, p in model.named_parameters() if n in canonical}
    tensor_alias: Dict[str, set] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        c = first.get(id(p))
        if c is None:
            continue
        for a in {n, _wrapper_free(n, model)}:
            tensor_alias.setdefault(a, set()).add(c)
    out: Dict[str, set] = {a: set(cs) for a, cs in tensor_alias.items()}
    group_alias: Dict[str, set] = {}
    for g in layout.names:
        group_alias.setdefault(_wrapper_free(g, model), set()).add(g)
    by_tensor: Dict[str, List[str]] = {}
    for g in layout.names:
        for t in layout.tensor_names:
            if g == t or g.startswith(t + "."):
                by_tensor.setdefault(t, []).append(g)
    for a, cs in tensor_alias.items():
        for c in cs:
            for g in by_tensor.get(c, ()):
                group_alias.setdefault(a + g[len(c):], set()).add(g)
    for a, gs in group_alias.items():
        out.setdefault(a, set()).update(gs)
    return {a: next(iter(cs)) for a, cs in out.items() if len(cs) == 1 and a not in cs}
