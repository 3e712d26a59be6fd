"""SparseLinear: TR-PTS compact mode, a Linear layer that trains only the selected entries of
its weight (docs/methods.md section 5).

One source of truth: ``values`` holds the selected entries, ``base`` the frozen dense weight;
every forward, every read of ``weight`` and every ``state_dict()`` builds the dense weight from
the two (``base`` with ``values`` scattered in at ``index``). Nothing is cached, so whatever
writes ``values`` (an optimizer, fused or not; ``.data``; ``load_state_dict``) is what the
next forward and the next state dict use.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .checks import check_index

__all__ = ["SparseLinear"]


def _dense(base: Tensor, values: Tensor, index: Tensor) -> Tensor:
    """``base`` with ``values`` at ``index`` (a new tensor; differentiable in ``values``)."""
    return base.scatter(1, index, values.to(base.dtype))


class _SparseLinearFn(torch.autograd.Function):
    """``y = x W^T + b`` with ``W = base`` except ``W[i, index[i, c]] = values[i, c]``.

    The gradient of ``values`` is the sampled weight gradient (``ops.sampled_grad``, an SDDMM:
    the dense ``[out, in]`` weight gradient is never formed); ``base`` gets none. The backward
    is written with differentiable ops (``sampled_grad`` has its own autograd), so a graph
    built through it (``create_graph=True``: gradient penalties, Hessian-vector products)
    differentiates correctly to any order.
    """

    @staticmethod
    def forward(ctx, x, base, values, index, bias):
        ctx.save_for_backward(x, base, values, index)
        return F.linear(x, _dense(base, values, index), bias)

    @staticmethod
    def backward(ctx, grad):
        x, base, values, index = ctx.saved_tensors
        gx = gv = gb = None
        g2 = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[0]:
            # The dense weight is rebuilt rather than saved: no [out, in] copy is held per
            # forward between forward and backward.
            gx = grad @ _dense(base, values, index).to(grad.dtype)
        if ctx.needs_input_grad[2]:
            x2 = x.reshape(-1, x.shape[-1])
            gv = ops.sampled_grad(g2.to(x2.dtype), x2, index).to(values.dtype)
        if ctx.needs_input_grad[4]:
            gb = g2.sum(0)
        return gx, None, gv, None, gb


def _check_sparse_args(weight, index, bias) -> None:
    """Refuse, at construction, what would otherwise fail only at the first backward (a wrong
    row count) or train silently wrong (a repeated column)."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"argument 'weight': expected a Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"argument 'weight': expected a 2-D tensor [out_features, in_features], "
                         f"got shape {list(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"argument 'weight': expected a floating dtype, got {weight.dtype}")
    out_f, in_f = weight.shape
    check_index(index, out_f, in_f, arg="index")
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

    Tensors: ``values`` (trainable; the only weight tensor with optimizer state), ``bias`` (the
    usual bias), and two non-persistent buffers: ``base``, the frozen dense weight (its entries
    at ``index`` are never read), and ``index`` (int64). The dense weight is derived, never
    stored: the forward, :attr:`weight` and :meth:`state_dict` build it from ``base`` and the
    current ``values``, so it is right whatever wrote ``values``.

    The forward's weight gradient is the sampled product (``ops.sampled_grad``, SDDMM), and the
    backward is differentiable again (``create_graph=True`` works to any order).

    State dict: exactly a plain ``nn.Linear``'s, ``weight`` (dense, with the current values)
    and ``bias``, so a compact model's checkpoint loads into the merged (plain) model and vice
    versa. Loading one sets ``base`` to the loaded weight and ``values`` to its entries at
    ``index``. (A checkpoint that also holds ``values`` and ``index``, as this class used to
    write, loads too: ``values`` wins at ``index``, which must be this layer's.)

    Reading ``weight`` directly also works, because some modules do that instead of calling
    the Linear: ``nn.MultiheadAttention`` passes ``out_proj.weight`` to its functional form
    and ``nn.TransformerEncoderLayer``'s inference fast path reads ``linear1/linear2.weight``.
    The read builds the dense weight, differentiable into ``values`` under grad mode; the
    reading module then forms the dense ``[out, in]`` weight gradient (what a dense Linear's
    backward costs); optimizer state stays ``[out, C]``.

    Construction checks the arguments: ``weight`` 2-D floating, ``index`` integer
    ``[out_features, C]`` with ``C <= in_features``, values in ``[0, in_features)`` and
    distinct within each row, ``bias`` ``[out_features]``.
    """

    def __init__(self, weight: Tensor, index: Tensor, bias: Optional[Tensor] = None):
        super().__init__()
        _check_sparse_args(weight, index, bias)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("base", weight.detach().clone(), persistent=False)
        self.register_buffer("index", index.to(weight.device, torch.int64).contiguous(),
                             persistent=False)
        self.values = nn.Parameter(self.base.gather(1, self.index))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self._linear_type: type = nn.Linear

    @classmethod
    def from_linear(cls, linear: nn.Linear, index: Tensor) -> "SparseLinear":
        """A SparseLinear with ``linear``'s weight and bias, training the entries at ``index``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"argument 'linear': expected an nn.Linear, got "
                            f"{type(linear).__name__}")
        sp = cls(linear.weight, index, linear.bias)
        if type(linear) in _LINEAR_TYPES:
            sp._linear_type = type(linear)
        return sp

    @property
    def weight(self) -> Tensor:
        """The dense weight built from ``base`` and the current ``values`` (a new tensor);
        differentiable into ``values`` under grad mode."""
        return _dense(self.base, self.values, self.index)

    def dense_weight(self) -> Tensor:
        """A detached dense weight with the current ``values``."""
        return _dense(self.base, self.values.detach(), self.index)

    def to_linear(self) -> nn.Linear:
        """A plain Linear (of the class this layer was made from) with the current weight."""
        w = self.base
        lin = self._linear_type(self.in_features, self.out_features, bias=self.bias is not None,
                                device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
                lin.bias.requires_grad_(self.bias.requires_grad)
        return lin

    def forward(self, x: Tensor) -> Tensor:
        return _SparseLinearFn.apply(x, self.base, self.values, self.index, self.bias)

    # ------------------------------------------------------------------ state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # nn.Linear's keys; `weight` derived from the current values (see the class doc).
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Translate nn.Linear's keys into this module's tensors, then let nn.Module load
        # `values` and `bias` (its shape checks, hooks, `assign`, missing/unexpected keys).
        wkey, vkey, ikey = prefix + "weight", prefix + "values", prefix + "index"
        weight = state_dict.pop(wkey, None)
        index = state_dict.pop(ikey, None)
        shape = (self.out_features, self.in_features)
        if weight is None:
            missing_keys.append(wkey)
        elif not isinstance(weight, Tensor) or tuple(weight.shape) != shape:
            error_msgs.append(f"size mismatch for {wkey}: copying a param with shape "
                              f"{list(getattr(weight, 'shape', []))} from checkpoint, the shape "
                              f"in current model is {list(shape)}.")
            weight = None
        if index is not None and not torch.equal(index.cpu(), self.index.cpu()):
            error_msgs.append(f"{ikey}: the checkpoint's index differs from this layer's")
            weight = None
        if weight is not None and vkey not in state_dict:
            state_dict[vkey] = weight.detach().gather(1, self.index.to(weight.device))
        n_err = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if vkey in missing_keys:   # reported as `weight` (the key the state dict has)
            missing_keys.remove(vkey)
        if weight is not None and len(error_msgs) == n_err:
            with torch.no_grad():
                if local_metadata.get("assign_to_params_buffers", False):
                    self.base = weight.detach().to(self.base.dtype)
                else:
                    self.base.copy_(weight.detach())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"connections={self.index.shape[1]}, bias={self.bias is not None}")
