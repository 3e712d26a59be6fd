"""The ViT hooks' shared machinery: each host library's layout (the families) and the patch
base every token-reduction hook builds on (saved attributes, token sizes across blocks and
under gradient checkpointing, timm's size-weighted average pooling). The hooks themselves:
:mod:`fisheradaptune.vit` (prune-merge) and :mod:`fisheradaptune._token_merge` (ToMe)."""
from __future__ import annotations

import abc
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ATTR = "_fisheradaptune_prune_merge"
_SUPPORTED_POOLS = ("token", "avg", "")


# ---------------------------------------------------------------------------------------------
# Model families


class _QK(NamedTuple):
    """What the CLS attention row needs from one block, gathered by each family from its own
    layout: the pre-attention norm, the q and k projections (row slices where q, k and v are
    packed into one matrix), heads, the logit scale, and per-head q/k norms where the block has
    them (timm's qk-norm)."""

    norm: Callable[[Tensor], Tensor]
    q_weight: Tensor
    q_bias: Optional[Tensor]
    k_weight: Tensor
    k_bias: Optional[Tensor]
    heads: int
    scale: float
    q_norm: Optional[Callable[[Tensor], Tensor]] = None
    k_norm: Optional[Callable[[Tensor], Tensor]] = None


class _Family(abc.ABC):
    """One library's ViT layout. The families differ only in where things live (the blocks,
    the q/k weights, the protected tokens); what is done with them is written once, here and
    in :class:`PruneMergeHandle`."""

    name = ""

    @abc.abstractmethod
    def blocks(self, model: nn.Module) -> List[nn.Module]:
        """The transformer blocks, in order."""

    @abc.abstractmethod
    def num_protected(self, model: nn.Module) -> int:
        """Leading tokens that are never pruned (class, register, distillation)."""

    @abc.abstractmethod
    def qk(self, block: nn.Module) -> _QK:
        """The block's query/key projection."""

    def check(self, model: nn.Module) -> None:
        """Raises ValueError for a model of this family that prune-merge cannot serve (so that
        it is refused at patch time, not at its first forward)."""

    def cls_logits(self, block: nn.Module, x: Tensor) -> Tensor:
        """``q_cls K^T * scale`` as float32 ``[B, heads, N]``, from the block's own weights on
        its normed input (the library's attention kernel is never asked for its weights)."""
        qk = self.qk(block)
        xn = qk.norm(x)
        q = F.linear(xn[:, :1], qk.q_weight, qk.q_bias)
        k = F.linear(xn, qk.k_weight, qk.k_bias)
        b, n, d = k.shape
        hd = d // qk.heads
        q = q.reshape(b, 1, qk.heads, hd).transpose(1, 2)
        k = k.reshape(b, n, qk.heads, hd).transpose(1, 2)
        if qk.q_norm is not None:
            q = qk.q_norm(q)
        if qk.k_norm is not None:
            k = qk.k_norm(k)
        return (q.float() * qk.scale @ k.float().transpose(-1, -2))[:, :, 0]


def _packed_qk(w: Tensor, bias: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor], Tensor,
                                                           Optional[Tensor]]:
    """q and k weights and biases as row slices of a packed ``[3C, C]`` qkv projection."""
    d = w.shape[0] // 3
    if bias is None:
        return w[:d], None, w[d:2 * d], None
    return w[:d], bias[:d], w[d:2 * d], bias[d:2 * d]


class _Timm(_Family):
    name = "timm"

    def blocks(self, model):
        return list(model.blocks)

    def num_protected(self, model):
        return int(getattr(model, "num_prefix_tokens", 1))

    def qk(self, block):
        attn = block.attn
        wq, bq, wk, bk = _packed_qk(attn.qkv.weight, attn.qkv.bias)
        if bq is None and getattr(attn, "q_bias", None) is not None:
            bq = attn.q_bias  # BEiT-style separate biases, no k bias
        heads = attn.num_heads
        return _QK(block.norm1, wq, bq, wk, bk, heads,
                   float(getattr(attn, "scale", (wq.shape[0] // heads) ** -0.5)),
                   getattr(attn, "q_norm", None), getattr(attn, "k_norm", None))

    def check(self, model):
        if getattr(model, "has_class_token", True) is False or \
                (hasattr(model, "cls_token") and model.cls_token is None):
            # Scoring needs the class token's attention row; token 0 of such a model is a
            # patch or a register, which must neither score the others nor be fused away.
            raise ValueError(
                "fisheradaptune.vit.prune_merge: argument 'model': it has no class token "
                "(class_token=False, a *_gap_* or register-only model), and prune-merge scores "
                "tokens by the class token's attention. Use a model with a class token")
        pool = getattr(model, "global_pool", "token")
        if getattr(model, "attn_pool", None) is not None or pool not in _SUPPORTED_POOLS:
            raise ValueError("fisheradaptune.vit.prune_merge: argument 'model': global_pool "
                             f"{pool!r} is not supported (expected one of {_SUPPORTED_POOLS})")


class _Torchvision(_Family):
    name = "torchvision"

    def blocks(self, model):
        return list(model.encoder.layers)

    def num_protected(self, model):
        return 1

    def qk(self, block):
        mha = block.self_attention
        if not getattr(mha, "batch_first", False) or getattr(mha, "in_proj_weight", None) is None:
            raise TypeError("fisheradaptune.vit: expected torchvision's batch-first "
                            "nn.MultiheadAttention with a packed in_proj_weight")
        wq, bq, wk, bk = _packed_qk(mha.in_proj_weight, mha.in_proj_bias)
        return _QK(block.ln_1, wq, bq, wk, bk, mha.num_heads,
                   (wq.shape[0] // mha.num_heads) ** -0.5)


# Attention implementations whose layers get no mask when the model is called without one. The
# others (flex_attention) build a mask over the input tokens for every call, which no longer
# fits once a block has reduced them.
_HF_ATTENTION = ("eager", "sdpa")


class _Transformers(_Family):
    """transformers ``ViTModel`` / ``ViTForImageClassification`` (the ``model.layers`` layout,
    separate ``q_proj`` / ``k_proj``). One class token, no registers."""

    name = "transformers"

    @staticmethod
    def vit(model: nn.Module) -> Optional[nn.Module]:
        """The ``ViTModel`` holding the blocks: ``model`` itself or its ``vit``; None if
        neither has the layout."""
        for m in (model, getattr(model, "vit", None)):
            layers = getattr(m, "layers", None)
            if hasattr(m, "embeddings") and isinstance(layers, nn.ModuleList) and len(layers) > 0:
                b0 = layers[0]
                if hasattr(b0, "layernorm_before") and \
                        hasattr(getattr(b0, "attention", None), "k_proj"):
                    return m
        return None

    def blocks(self, model):
        return list(self.vit(model).layers)

    def num_protected(self, model):
        return 1

    def qk(self, block):
        attn = block.attention
        return _QK(block.layernorm_before, attn.q_proj.weight, attn.q_proj.bias,
                   attn.k_proj.weight, attn.k_proj.bias, int(attn.num_attention_heads),
                   float(attn.scaling))

    def check(self, model):
        if self.vit(model) is not model and not hasattr(model, "classifier"):
            # ViTForMaskedImageModeling reshapes every patch token back into an image.
            raise ValueError(
                "fisheradaptune.vit.prune_merge: argument 'model': "
                f"{type(model).__name__} has a head that reads every patch token; prune-merge "
                "supports transformers' ViTModel and ViTForImageClassification")
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if impl not in _HF_ATTENTION:
            raise ValueError(
                "fisheradaptune.vit.prune_merge: argument 'model': attention implementation "
                f"{impl!r} is not supported: it passes each layer a mask over the input tokens, "
                "which no longer fits once tokens are reduced (expected one of "
                f"{_HF_ATTENTION}; see model.set_attn_implementation)")


def _family(model: nn.Module, api: str = "prune_merge") -> _Family:
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0:
        b0 = blocks[0]
        if hasattr(b0, "norm1") and hasattr(getattr(b0, "attn", None), "qkv"):
            return _Timm()
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if isinstance(layers, (nn.Sequential, nn.ModuleList)) and len(layers) > 0:
        b0 = layers[0]
        if hasattr(b0, "ln_1") and isinstance(getattr(b0, "self_attention", None),
                                              nn.MultiheadAttention):
            return _Torchvision()
    if _Transformers.vit(model) is not None:
        return _Transformers()
    raise TypeError(
        f"fisheradaptune.vit.{api}: argument 'model': expected a timm VisionTransformer "
        "(blocks[i].norm1, blocks[i].attn.qkv), a torchvision VisionTransformer "
        "(encoder.layers[i].ln_1, .self_attention) or a transformers ViTModel / "
        "ViTForImageClassification ([vit.]layers[i].layernorm_before, .attention.k_proj), "
        f"got {type(model).__name__}")


# ---------------------------------------------------------------------------------------------
# The patch base


class _Patch:
    """What a token-reduction patch shares, whichever the method (:class:`PruneMergeHandle`,
    :class:`~fisheradaptune.vit.TokenMergeHandle`): the saved attributes that ``remove()``
    restores, the token sizes carried from block to block, their bookkeeping under gradient
    checkpointing, and timm's size-weighted average pooling."""

    api = ""  # the patching function's name, for messages

    def __init__(self, model: nn.Module, family: _Family, layers: Tuple[int, ...],
                 num_protected: int):
        self.model = model
        self.family = family
        self.layers = layers
        self.num_protected = int(num_protected)
        self.sizes: Optional[Tensor] = None
        self.record = False
        self._saved: List[Tuple[object, str, bool, object]] = []  # (obj, attr, had, old)
        self._inputs: dict = {}  # (block index, input data_ptr) -> sizes: Note [Checkpointed blocks]
        self._hooks = []
        self._removed = False

    def _clear(self) -> None:
        """Per-forward state of the method, reset at the first block."""

    def _reset(self, module, args, kwargs=None):
        if _in_backward():
            return  # gradient checkpointing recomputes blocks during backward: not a new forward
        self.sizes = None
        self._inputs.clear()
        self._clear()

    def _sizes_in(self, i: int, x_in: Tensor) -> Tuple[Optional[Tensor], bool]:
        """The token sizes entering patched block ``i``, and whether this call recomputes a
        forward (gradient checkpointing) rather than running a new one.

        Note [Checkpointed blocks]: sizes flow from block to block on the handle, so a block
        recomputed during backward would read the *last* block's sizes. Each forward therefore
        records the sizes each patched block received, keyed by its input's storage (the
        recomputation gets the same input tensor, or a detached alias of it), and a
        recomputation reads them back and leaves the forward's state alone. (transformers
        checkpoints inside the class's ``forward``, which the patched forward calls, so its
        recomputation never reaches the reduction.)
        """
        if _in_backward():
            key = (i, x_in.data_ptr())
            if key not in self._inputs:
                raise RuntimeError(
                    f"fisheradaptune.vit.{self.api}: block {i} is recomputed during backward "
                    "(gradient checkpointing) but its forward was not recorded in this "
                    "forward pass")
            return self._inputs[key], True
        sizes = self.sizes
        # Also without grad: reentrant checkpointing runs the forward under no_grad.
        if not torch.compiler.is_compiling():
            self._inputs[(i, x_in.data_ptr())] = sizes
        return sizes, False

    def _pool_weights(self, x: Tensor) -> Tensor:
        """timm avg pool: scale pooled tokens by ``s_i * n / sum(s)`` so that the plain mean
        timm takes is the size-weighted mean."""
        sizes = self.sizes
        if sizes is None or x.dim() != 3 or sizes.shape[0] != x.shape[0] or \
                sizes.shape[1] != x.shape[1]:
            return x
        start = 0 if getattr(self.model, "pool_include_prefix", False) else \
            int(getattr(self.model, "num_prefix_tokens", self.num_protected))
        s = sizes[:, start:]
        factor = (s * (s.shape[1] / s.sum(1, keepdim=True))).unsqueeze(-1).to(x.dtype)
        return torch.cat([x[:, :start], x[:, start:] * factor], 1)

    # -- patching -----------------------------------------------------------------------------

    def _set(self, obj, attr: str, value) -> None:
        had = attr in obj.__dict__
        self._saved.append((obj, attr, had, obj.__dict__.get(attr)))
        setattr(obj, attr, value)

    def _install_common(self, blocks: Sequence[nn.Module]) -> None:
        """The first block's reset hook, timm's weighted avg pool, and the model's marker."""
        self._hooks.append(blocks[0].register_forward_pre_hook(self._reset))
        if self.family.name == "timm" and getattr(self.model, "global_pool", "token") == "avg" \
                and hasattr(self.model, "forward_head"):
            self._set(self.model, "forward_head",
                      _WeightedForwardHead(self, self.model, self.model.__dict__.get("forward_head")))
        self._set(self.model, _ATTR, self)

    def remove(self) -> None:
        """Restores the model exactly as it was before the patch."""
        if self._removed:
            return
        for h in self._hooks:
            h.remove()
        for obj, attr, had, old in reversed(self._saved):
            if had:
                obj.__dict__[attr] = old
            else:
                obj.__dict__.pop(attr, None)
        self._hooks.clear()
        self._saved.clear()
        self.sizes = None
        self._removed = True


def _in_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread (where gradient
    checkpointing recomputes forwards). False while tracing with torch.compile."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


# The patched methods are objects of module-level classes, not closures: `copy.deepcopy` of a
# patched model then gives a copy whose blocks call the copy's handle and the copy's blocks
# (deepcopy follows their attributes), and `torch.save(model)` can pickle them. They call the
# class's method (or a forward set on the instance before patching) at call time.


def _original(obj, name: str, inner=None):
    """The method a patch wraps, resolved at call time: the one set on the instance before
    patching (``inner``), else the class's."""
    return inner if inner is not None else getattr(type(obj), name).__get__(obj)


class _PatchedForward:
    """Base of a patched block's ``forward``: holds the handle and the block, refuses an
    attention mask (a mask over the input tokens cannot apply once their number changes), and
    resolves the forward it wraps. Subclasses say why in ``mask_message`` and call the hook."""

    mask_message = ""

    def __init__(self, handle: "_Patch", index: int, block: nn.Module, inner=None):
        self.handle, self.index, self.block, self.inner = handle, index, block, inner

    def _wrapped(self, args, kwargs):
        if kwargs.get("attn_mask") is not None or (len(args) > 0 and args[0] is not None):
            raise ValueError(self.mask_message)
        return _original(self.block, "forward", self.inner)


class _WeightedForwardHead:
    """timm ``forward_head`` with the pooled tokens reweighted by their sizes."""

    def __init__(self, handle: "_Patch", model: nn.Module, inner=None):
        self.handle, self.model, self.inner = handle, model, inner

    def __call__(self, x, *args, **kwargs):
        fwd = _original(self.model, "forward_head", self.inner)
        return fwd(self.handle._pool_weights(x), *args, **kwargs)
