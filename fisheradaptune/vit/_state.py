"""Per-forward state of the ViT hooks: what each token tensor stands for, kept with the tensor.

A token-reduction hook needs, at every block after the first reduction, the sizes of the tokens
it receives (how many patches each one stands for), and the pooling head needs the sizes of the
tokens it pools. Keeping "the current sizes" on the model would make separate forwards collide
(two forwards before one head call; a block recomputed by gradient checkpointing after another
forward ran). Instead the state travels with the token tensor it describes: a mapping keyed by
the tensor's storage (a weak reference), offset, shape, stride and dtype, written by each patched
block for its output and read by whoever receives that tensor next. A detached alias (reentrant
checkpointing) or the same tensor (non-reentrant checkpointing, a cached feature map) finds the
state of the forward that produced it; nothing is ever cleared by another forward; an entry dies
with its storage.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef


class TokenState(NamedTuple):
    """What a token tensor ``[B, N, C]`` stands for.

    Attributes:
        sizes: float32 ``[B, N]``, patches per token; None when no token was merged yet (all 1).
        rows: int64 bookkeeping of ``record=True`` (the method's own meaning), or None.
    """

    sizes: Optional[Tensor]
    rows: Optional[Tensor] = None


_Key = Tuple[StorageWeakRef, int, Tuple[int, ...], Tuple[int, ...], torch.dtype]


def _key(x: Tensor) -> _Key:
    return (StorageWeakRef(x.untyped_storage()), x.storage_offset(), tuple(x.shape),
            tuple(x.stride()), x.dtype)


class TokenStates:
    """``token tensor -> TokenState``, keyed by storage so that an entry cannot outlive (or be
    confused with) the tensor it describes: a live weak reference keeps the storage's identity
    from being reused, and expired entries are dropped as new ones come in.

    Lookups run eagerly under ``torch.compile`` (a graph break): they need the real storage.
    Copies of the owner (``deepcopy``, pickling) start empty: the state belongs to tensors of
    the original's forwards.
    """

    def __init__(self) -> None:
        self._map: Dict[_Key, TokenState] = {}
        self._limit = 64

    @torch.compiler.disable
    def get(self, x: Tensor) -> Optional[TokenState]:
        """The state of ``x``, or None if no patched forward produced it."""
        return self._map.get(_key(x))

    @torch.compiler.disable
    def put(self, x: Tensor, state: TokenState) -> None:
        """Records the state of ``x`` (replacing any earlier one for the same tensor)."""
        self._map[_key(x)] = state
        if len(self._map) > self._limit:
            for k in [k for k in self._map if k[0].expired()]:
                del self._map[k]
            # Amortised: sweep again only once the live entries have doubled.
            self._limit = max(64, 2 * len(self._map))

    def __len__(self) -> int:
        return sum(1 for k in self._map if not k[0].expired())

    def __deepcopy__(self, memo) -> "TokenStates":
        return TokenStates()

    def __reduce__(self):
        return (TokenStates, ())
