"""What the ViT hooks need to know of a host library, as one interface (:class:`Layout`); each
library's knowledge is written once, in its own module (``_timm.py``, ``_torchvision.py``,
``_transformers.py``), and the registry (``_registry.py``) says which exact classes use it."""
from __future__ import annotations

import abc
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

API_NAMES = ("prune_merge", "token_merge")


def refusal(api: str, arg: str, msg: str, cls=ValueError) -> Exception:
    """The hooks' one error format: the function, the argument, what is wrong and supported."""
    return cls(f"fisheradaptune.vit.{api}: argument '{arg}': {msg}")


class Prefix(NamedTuple):
    """The leading tokens a model adds before its patch tokens (all protected: never pruned or
    merged, because a head or a pool reads them by position)."""

    cls: int = 1
    dist: int = 0
    registers: int = 0

    @property
    def count(self) -> int:
        return self.cls + self.dist + self.registers

    def describe(self) -> str:
        parts = [f"{n} {w}" for n, w in ((self.cls, "class"), (self.dist, "distillation"),
                                        (self.registers, "register")) if n]
        return " + ".join(parts) + " token(s)" if parts else "no prefix tokens"


class QK(NamedTuple):
    """What the class-attention row needs from one block, gathered by each layout from its own
    modules: the pre-attention norm, the q and k projections (row slices where q, k and v are
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


def packed_qk(w: Tensor, bias: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor], Tensor,
                                                          Optional[Tensor]]:
    """q and k weights and biases as row slices of a packed ``[3C, C]`` qkv projection."""
    d = w.shape[0] // 3
    if bias is None:
        return w[:d], None, w[d:2 * d], None
    return w[:d], bias[:d], w[d:2 * d], bias[d:2 * d]


class Layout(abc.ABC):
    """One host library's ViT layout. Given the model's encoder (the module holding the blocks),
    it says where the blocks, attention, MLP, prefix tokens and pooling are. What is done with
    them is written once, in the patch base and the two methods.

    ``token_merge`` is True when the layout provides the two block halves token merging runs
    (:meth:`attend`, :meth:`mlp`); adding a library to token merging means writing those two
    and :meth:`prepare` here, nothing else."""

    library = ""
    token_merge = False

    # -- structure ----------------------------------------------------------------------------

    @abc.abstractmethod
    def blocks(self, enc: nn.Module) -> List[nn.Module]:
        """The transformer blocks, in order."""

    @abc.abstractmethod
    def attention(self, block: nn.Module) -> nn.Module:
        """The block's self-attention module (its class is checked against the family)."""

    @abc.abstractmethod
    def prefix(self, enc: nn.Module) -> Prefix:
        """The leading tokens of the model, counted from its own parameters."""

    def check(self, enc: nn.Module, api: str) -> None:
        """Raises ValueError (naming the argument) for a configuration of a registered class that
        the hooks cannot serve exactly (a pool, an attention implementation, inconsistent prefix
        token counts), at patch time."""

    @abc.abstractmethod
    def qk(self, block: nn.Module) -> QK:
        """The block's query/key projection (for the class-attention row)."""

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

    # -- pooling ------------------------------------------------------------------------------

    def pool_start(self, enc: nn.Module) -> Optional[int]:
        """Where an average pool over the tokens starts (it then needs the token sizes: the
        size-weighted mean), or None when the head reads protected tokens only."""
        return None

    def head(self, enc: nn.Module) -> Optional[Tuple[nn.Module, str]]:
        """``(module, method)`` that receives the final tokens and pools them (wrapped when
        :meth:`pool_start` is not None)."""
        return None

    def tail(self, enc: nn.Module) -> Sequence[nn.Module]:
        """Token-wise modules between the last block and the head (the final norm): the token
        state is carried through them."""
        return ()

    def full_tokens(self, enc: nn.Module) -> Optional[int]:
        """Tokens entering the first block for the model's configured input, or None when it
        depends on the input (dynamic image size)."""
        return None

    # -- token merging (layouts with token_merge = True) ---------------------------------------

    def check_token_merge(self, blocks: Sequence[nn.Module], api: str) -> None:
        """Raises ValueError when a block lacks what :meth:`attend` / :meth:`mlp` call."""

    def prepare(self, handle, block: nn.Module) -> None:
        """Wraps what :meth:`attend` reads inside the block (through ``handle._set``, so that
        ``remove()`` restores it)."""

    def attend(self, block: nn.Module, x: Tensor, bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """The block's attention half with ``bias [B, 1, 1, N]`` added to the logits: the
        residual stream after attention, and the metric (keys averaged over heads)."""
        raise NotImplementedError

    def mlp(self, block: nn.Module, x: Tensor) -> Tensor:
        """The block's MLP half, residual included."""
        raise NotImplementedError

    def checkpoint(self, block: nn.Module) -> Optional[Callable]:
        """``fn(function, x)`` that runs both halves under activation checkpointing when the
        library would checkpoint this block's own forward now (transformers' gradient
        checkpointing lives in the class's forward, which the merging path replaces); None
        when the block is not checkpointed, or is checkpointed by its caller (timm)."""
        return None
