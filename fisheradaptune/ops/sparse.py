"""The sparse family: ``sampled_grad``, the sampled weight gradient (SDDMM) of TR-PTS compact
training (:class:`fisheradaptune.selection.SparseLinear`; Note [Sampled gradient] in
csrc/sparse/sampled_grad.h).

The op's Python story in one place: the typed wrapper with its record of checked indices, the
fake kernel (the C++ checks, from :mod:`._checks`) and the autograd formula (the op is bilinear,
differentiated with differentiable ops so higher derivatives are right). Nothing is written in
place.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _checks, _library
from ._library import OPS as _ops

__all__ = ["sampled_grad"]


# ---------------------------------------------------------------------------------------------
# The record of checked indices (Note [Checked indices], csrc/sparse/sampled_grad_args.cpp)


class _IndexState(NamedTuple):
    """What an index's values depend on, short of reading them: a change of any of these (an
    in-place write bumps the version; a ``.data`` swap changes the data pointer) may have
    changed the values."""

    version: int
    data_ptr: int
    device: torch.device
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]


class _Record(NamedTuple):
    ref: "weakref.ref[Tensor]"
    state: _IndexState
    cols: int          # the op checked every value in [0, cols)


class _CheckedIndices:
    """Indices that a ``sampled_grad`` call has checked, each with the state it had and the
    ``in`` it was checked against; :meth:`covers` says whether a new call may skip the check.

    Bounded (least recently used dropped) and thread-safe. An entry holds only a weak reference:
    a freed index's entry never matches again (a new tensor at the same ``id`` is another
    object). Only plain tensors with a version counter are recorded: not inference tensors
    (none), not tensor subclasses (fake, functional), not while torch.compile traces.
    """

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._entries: "OrderedDict[int, _Record]" = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def state(index: object) -> Optional[_IndexState]:
        """``index``'s state, or None when it cannot be recorded."""
        if (torch.compiler.is_compiling() or type(index) is not Tensor
                or index.is_inference()):
            return None
        return _IndexState(index._version, index.data_ptr(), index.device, tuple(index.shape),
                           index.stride())

    def covers(self, index: object, cols: int) -> bool:
        """Whether ``index`` was checked in this very state against at most ``cols`` columns
        (then every value lies in ``[0, cols)``)."""
        state = self.state(index)
        if state is None:
            return False
        with self._lock:
            rec = self._entries.get(id(index))
            if rec is None or rec.ref() is not index or rec.state != state or cols < rec.cols:
                return False
            self._entries.move_to_end(id(index))
            return True

    def record(self, index: Tensor, state: _IndexState, cols: int) -> None:
        """Remembers that ``index``, in ``state``, passed the check against ``cols`` columns."""
        with self._lock:
            self._entries[id(index)] = _Record(weakref.ref(index), state, cols)
            self._entries.move_to_end(id(index))
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)


#: More than the Linear layers of common models (ViT-L: 96, a 7B LLaMA: 224), so that a
#: model's indices stay recorded from one backward to the next (beyond it, the least recently
#: used are checked again: correct, one synchronisation each on CUDA). An entry is a few small
#: tuples.
_CHECKED = _CheckedIndices(capacity=1024)


# ---------------------------------------------------------------------------------------------
# sampled_grad


def sampled_grad(grad_out: Tensor, x: Tensor, index: Tensor) -> Tensor:
    """Sampled weight gradient (SDDMM) of a Linear layer with a row-balanced index.

    ``out[i, c] = sum_t grad_out[t, i] * x[t, index[i, c]]`` for ``grad_out [T, out]``,
    ``x [T, in]`` (same dtype: float32, bfloat16, float16 or float64) and ``index`` int64
    ``[out, C]`` with values in ``[0, in)``: the entries of ``grad_out.T @ x`` that the index
    picks, without forming the dense gradient. Returns float32 ``[out, C]`` (float64 for float64
    inputs). Bitwise deterministic.

    The same contract on CPU and CUDA: an index value outside ``[0, in)`` is a ``ValueError``
    naming ``index`` (so with ``in == 0`` only ``C == 0`` is accepted); repeated columns in a
    row are allowed; ``T == 0`` gives zeros. On CUDA the range check reads the index's minimum
    and maximum back to the host, a synchronisation. This wrapper checks an index once per
    tensor and version: it remembers each index that passed the check, and calls the op with
    ``index_checked=True`` while that index is unchanged (an in-place write to it, a ``.data``
    swap or a narrower ``x`` forces a new check; inference tensors are checked at every call),
    so the static index of :class:`fisheradaptune.selection.SparseLinear` costs one
    synchronisation, not one per backward. A write that bypasses the version counter (through
    ``.data``) is not seen: the elements whose column is then out of range are NaN, never an
    out-of-bounds read (Note [Checked indices], csrc/sparse/sampled_grad_args.cpp). A raw
    ``torch.ops.fisheradaptune.sampled_grad`` call checks unless given ``index_checked=True``.
    The op cannot be captured in a CUDA graph (a clear error).
    """
    cols = x.shape[1] if isinstance(x, Tensor) and x.dim() == 2 else None
    if cols is not None and _CHECKED.covers(index, cols):
        return _ops.sampled_grad.default(grad_out, x, index, True)
    state = _CHECKED.state(index)
    out = _ops.sampled_grad.default(grad_out, x, index)
    if state is not None and cols is not None:
        _CHECKED.record(index, state, cols)
    return out


@torch.library.register_fake("fisheradaptune::sampled_grad")
def _sampled_grad_fake(grad_out: Tensor, x: Tensor, index: Tensor,
                       index_checked: bool = False) -> Tensor:
    _checks.validate_sampled_grad(grad_out, x, index)
    dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    return grad_out.new_empty((index.shape[0], index.shape[1]), dtype=dtype)


def _sampled_grad_setup(ctx, inputs, output):
    grad_out, x, index, _ = inputs
    ctx.save_for_backward(grad_out, x, index)


def _sampled_grad_backward(ctx, grad):
    # out[i, c] = sum_t grad_out[t, i] * x[t, index[i, c]] is bilinear. With the incoming
    # gradient scattered (added: a row may repeat a column) into a dense [out, in] matrix G,
    # d grad_out = x G^T and d x = grad_out G. Written with differentiable ops, so a graph
    # built through this backward (create_graph=True) is differentiated again correctly.
    # index and index_checked get no gradient.
    grad_out, x, index = ctx.saved_tensors
    dense = grad.new_zeros(index.shape[0], x.shape[1]).scatter_add(1, index, grad)
    d_grad_out = d_x = None
    if ctx.needs_input_grad[0]:
        d_grad_out = (x.to(grad.dtype) @ dense.T).to(grad_out.dtype)
    if ctx.needs_input_grad[1]:
        d_x = (grad_out.to(grad.dtype) @ dense).to(x.dtype)
    return d_grad_out, d_x, None, None


torch.library.register_autograd("fisheradaptune::sampled_grad", _sampled_grad_backward,
                                setup_context=_sampled_grad_setup)


# ---------------------------------------------------------------------------------------------
# Fallback kernels (pure PyTorch, the same contract as the compiled ones)
#
# Registered for the CPU and CUDA keys only when the compiled library is not in use
# (_library.register_fallbacks).

# Gathered x elements per tile of output rows ([rows, C, T]): bounds the fallback's memory.
_GATHER_ELEMS = 1 << 22


def _sampled_grad_fallback(grad_out: Tensor, x: Tensor, index: Tensor,
                           index_checked: bool = False) -> Tensor:
    """sampled_grad in PyTorch ops: the C++ checks and messages (the index's range included,
    read back to the host once per call, on CUDA too, unless ``index_checked``), then, per tile
    of output rows, the picked columns of ``x`` gathered and multiplied with ``grad_out`` in the
    accumulation type (float32, float64 for float64 inputs) and summed over the tokens (torch's
    fixed-order reduction: deterministic). Equal to the compiled op to rounding, a stale
    ``index_checked`` included: an element whose column is out of range is NaN (its gather reads
    a clamped, in-range column; Note [Checked indices], csrc/sparse/sampled_grad_args.cpp)."""
    op = "sampled_grad"
    if grad_out.device.type == "cuda":
        _library.check_not_capturing(op, "its index range check reads the index's min and max "
                                     "back to the host", grad_out.device)
    _checks.validate_sampled_grad(grad_out, x, index)
    tokens, rows = grad_out.shape
    cols, picks = x.shape[1], index.shape[1]
    if rows * picks > 0 and not index_checked:
        lo, hi = torch.aminmax(index)
        lo, hi = int(lo), int(hi)
        if not (lo >= 0 and hi < cols):
            raise ValueError(f"fisheradaptune.{op}: argument 'index': expected values in [0, in) "
                             f"= [0, {cols}), got values in [{lo}, {hi}]")
    dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    if tokens == 0 or rows * picks == 0:
        return torch.zeros((rows, picks), dtype=dtype, device=grad_out.device)
    outside = None
    if index_checked:   # unchecked: guard every read (no host read-back, so no sync)
        outside = (index < 0) | (index >= cols)
        index = index.clamp(0, cols - 1)
    gt = grad_out.t().to(dtype)                 # [out, T]
    xt = x.t().to(dtype).contiguous()           # [in, T]: each picked column one contiguous row
    out = torch.empty((rows, picks), dtype=dtype, device=grad_out.device)
    step = max(1, _GATHER_ELEMS // (picks * tokens))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        picked = xt[index[r0:r1]]               # [rows, C, T]
        torch.sum(picked.mul_(gt[r0:r1].unsqueeze(1)), dim=-1, out=out[r0:r1])
    if outside is not None:
        out.masked_fill_(outside, float("nan"))
    return out


#: The family's fallback kernels, by op name (registered by ops/__init__.py when needed).
FALLBACK_KERNELS = {"sampled_grad": _sampled_grad_fallback}
