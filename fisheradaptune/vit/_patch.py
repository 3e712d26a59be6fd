"""The patch base every token-reduction hook builds on: the saved attributes ``remove()``
restores, the patched block forwards, and the token state (sizes) carried with each token
tensor from block to block and to the pooling head (``_state.py``), so that any interleaving of
forwards, gradient-checkpointing recomputations and head calls sees its own tokens' sizes."""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, nn

from ._state import TokenState, TokenStates

if TYPE_CHECKING:  # pragma: no cover
    from ._registry import Match

ATTR = "_fisheradaptune_prune_merge"  # the model's marker: its handle


class Patch:
    """What a token-reduction patch shares, whichever the method (:class:`PruneMergeHandle`,
    :class:`TokenMergeHandle`).

    Token state: every patched block looks up the state of the tensor it receives
    (:class:`~fisheradaptune.vit._state.TokenStates`), runs, and records the state of the tensor
    it returns; the final norm carries it on, and an average-pooling head reads the state of the
    tensor it is given. A tensor no patched forward produced is a fresh input when it has the
    model's full token count, and is refused otherwise (its sizes are unknown).

    Attributes:
        sizes: float32 ``[B, N]`` token sizes after the last reducing block of the most recent
            forward (for inspection; the forwards themselves never read it). None before one.
    """

    api = ""  # the patching function's name, for messages

    def __init__(self, model: nn.Module, match: "Match", layers: Tuple[int, ...],
                 num_protected: int):
        self.model = model
        self.family = match.family
        self.layout = match.layout
        self.encoder = match.encoder
        self.layers = layers
        self.num_protected = int(num_protected)
        self.sizes: Optional[Tensor] = None
        self.record = False
        self._states = TokenStates()
        full = match.layout.full_tokens(match.encoder)
        # Token counts of unreduced inputs (the configured one, and each one a forward started
        # with): an unknown tensor of such a count is a fresh input, of another count a copy
        # of reduced tokens whose sizes are lost.
        self._full_counts: Set[int] = set() if full is None else {full}
        self._first = len(match.blocks)
        self._saved: List[Tuple[object, str, bool, object]] = []  # (obj, attr, had, old)
        self._removed = False

    # -- token state --------------------------------------------------------------------------

    @torch.compiler.disable
    def _state_in(self, i: int, x: Tensor) -> TokenState:
        """The state of the tokens entering patched block ``i``."""
        state = self._states.get(x)
        if state is not None:
            return state
        n = x.shape[1]
        if i == self._first or n in self._full_counts:
            self._full_counts.add(n)
            return TokenState(None)
        raise RuntimeError(
            f"fisheradaptune.vit.{self.api}: block {i} received {n} tokens that no forward of "
            "this patched model produced (a copy, e.g. .clone() or .to(), loses the token "
            "sizes that travel with the tensor), and the model's unreduced inputs have "
            f"{sorted(self._full_counts)} tokens. Pass the tensors the model's blocks return, "
            "or unpatch the model")

    @torch.compiler.disable
    def _state_out(self, y: Tensor, state: TokenState) -> None:
        self._states.put(y, state)

    @torch.compiler.disable
    def _head_sizes(self, x: Tensor) -> Optional[Tensor]:
        """The sizes of the tokens a pooling head receives (None: all 1)."""
        state = self._states.get(x)
        if state is not None:
            return state.sizes
        if x.dim() == 3 and x.shape[1] in self._full_counts:
            return None
        raise RuntimeError(
            f"fisheradaptune.vit.{self.api}: {type(self.encoder).__name__}.forward_head received "
            f"tokens of shape {tuple(x.shape)} that no forward of this patched model produced "
            "(a copy, e.g. .clone() or .to(), loses the token sizes that travel with the "
            "tensor); the size-weighted average pool needs them. Pass the tensor "
            "forward_features returned, or unpatch the model")

    def _pool_weights(self, x: Tensor) -> Tensor:
        """Average pool: scale pooled tokens by ``s_i * n / sum(s)`` so that the plain mean the
        library takes is the size-weighted mean."""
        sizes = self._head_sizes(x)
        if sizes is None:
            return x
        start = self.layout.pool_start(self.encoder)
        s = sizes[:, start:]
        factor = (s * (s.shape[1] / s.sum(1, keepdim=True))).unsqueeze(-1).to(x.dtype)
        return torch.cat([x[:, :start], x[:, start:] * factor], 1)

    # -- patching -----------------------------------------------------------------------------

    def _set(self, obj, attr: str, value) -> None:
        had = attr in obj.__dict__
        self._saved.append((obj, attr, had, obj.__dict__.get(attr)))
        setattr(obj, attr, value)

    def _install_blocks(self, blocks: Sequence[nn.Module], first: int, forward_cls) -> None:
        """Patches blocks ``first..`` (each carries the token state on, reducing or not), the
        tail and an average-pooling head, and marks the model."""
        self._first = first
        for i in range(first, len(blocks)):
            block = blocks[i]
            self._set(block, "forward", forward_cls(self, i, block, block.__dict__.get("forward")))
        if first < len(blocks) and self.layout.pool_start(self.encoder) is not None:
            for m in self.layout.tail(self.encoder):
                self._set(m, "forward", _TailForward(self, m, m.__dict__.get("forward")))
            obj, name = self.layout.head(self.encoder)
            self._set(obj, name, _WeightedHead(self, obj, name, obj.__dict__.get(name)))
        self._set(self.model, ATTR, self)

    def remove(self) -> None:
        """Restores the model exactly as it was before the patch."""
        if self._removed:
            return
        for obj, attr, had, old in reversed(self._saved):
            if had:
                obj.__dict__[attr] = old
            else:
                obj.__dict__.pop(attr, None)
        self._saved.clear()
        self.sizes = None
        self._removed = True


def in_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread (where gradient
    checkpointing recomputes forwards: those must not overwrite what the last forward left for
    inspection). False while tracing with torch.compile."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


# The patched methods are objects of module-level classes, not closures: `copy.deepcopy` of a
# patched model then gives a copy whose blocks call the copy's handle and the copy's blocks
# (deepcopy follows their attributes), and `torch.save(model)` can pickle them. They call the
# class's method (or a forward set on the instance before patching) at call time.


def original(obj, name: str, inner=None):
    """The method a patch wraps, resolved at call time: the one set on the instance before
    patching (``inner``), else the class's."""
    return inner if inner is not None else getattr(type(obj), name).__get__(obj)


class OutputCapture:
    """A module's ``forward`` that keeps its last output (token merging reads the attention keys
    from the key projection this way, with no second projection). The reader takes ``out`` at
    once, within the same call, and resets it: no other forward can run in between on this
    thread."""

    def __init__(self, module: nn.Module, inner=None):
        self.module, self.inner, self.out = module, inner, None

    def __call__(self, x):
        self.out = original(self.module, "forward", self.inner)(x)
        return self.out


class PatchedForward:
    """Base of a patched block's ``forward``: holds the handle and the block, refuses an
    attention mask and ``is_causal`` (neither can apply once the number and order of tokens
    change), and resolves the forward it wraps. Subclasses call the hook."""

    def __init__(self, handle: Patch, index: int, block: nn.Module, inner=None):
        self.handle, self.index, self.block, self.inner = handle, index, block, inner

    def _check(self, args, kwargs) -> None:
        api = self.handle.api
        if kwargs.get("attn_mask") is not None or kwargs.get("attention_mask") is not None or \
                (len(args) > 0 and args[0] is not None):
            raise ValueError(
                f"fisheradaptune.vit.{api}: a patched block received an attention mask (given "
                "to the model, or built for every call by a transformers attention "
                "implementation such as flex_attention); token reduction changes the number of "
                "tokens after this block, so a mask over the input tokens cannot apply to the "
                "next ones. Call the model without attn_mask / attention_mask (transformers: "
                "with eager or sdpa attention), or unpatch it")
        if kwargs.get("is_causal") or (len(args) > 1 and isinstance(args[1], bool) and args[1]):
            raise ValueError(
                f"fisheradaptune.vit.{api}: a patched block received is_causal=True; causal "
                "attention orders tokens by position, which token reduction changes (merged and "
                "fused tokens have no single position). Call the model without is_causal, or "
                "unpatch it")

    def run(self, x: Tensor, args, kwargs) -> Tensor:
        """The block's own forward on ``x``. Called as a plain function of the block (not a
        bound method resolved earlier), so that torch.compile, resuming after a graph break,
        cannot reconstruct it as ``block.forward`` (this patch)."""
        if self.inner is not None:
            return self.inner(x, *args, **kwargs)
        return type(self.block).forward(self.block, x, *args, **kwargs)

    def __call__(self, x, *args, **kwargs):
        self._check(args, kwargs)
        return self.handle._block(self.index, self.block, x, self, args, kwargs)


class _TailForward:
    """A token-wise module after the last block (the final norm): the state of its input
    travels to its output."""

    def __init__(self, handle: Patch, module: nn.Module, inner=None):
        self.handle, self.module, self.inner = handle, module, inner

    def __call__(self, x, *args, **kwargs):
        y = original(self.module, "forward", self.inner)(x, *args, **kwargs)
        state = self.handle._states.get(x)
        if state is not None and y.shape[:2] == x.shape[:2]:
            self.handle._state_out(y, state)
        return y


class _WeightedHead:
    """An average-pooling head (timm ``forward_head``) with the pooled tokens reweighted by
    the sizes that came with them."""

    def __init__(self, handle: Patch, obj: nn.Module, name: str, inner=None):
        self.handle, self.obj, self.name, self.inner = handle, obj, name, inner

    def __call__(self, x, *args, **kwargs):
        fwd = original(self.obj, self.name, self.inner)
        return fwd(self.handle._pool_weights(x), *args, **kwargs)
