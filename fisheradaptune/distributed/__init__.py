"""torch.distributed support: FSDP2-sharded parameters, cross-rank reductions, checkpoints.

- :mod:`.comm`: every collective the library issues (device choice, decisions agreed on every
  rank).
- :mod:`.sharding`: which part of every tracked tensor this rank holds (:class:`Sharding`,
  :func:`sharding_of` for FSDP2, :func:`row_sharding` for DDP ``shard_state``) and
  :func:`local_layout`.
- :func:`js_drift`: drift over shards, exact (all-reduced totals and JS partial sums).
- :func:`save` / :func:`load`: checkpoints of a model and its (FisherAdapTune-wrapped)
  optimizer with ``torch.distributed.checkpoint``.
"""
from . import comm
from .comm import agreed, all_reduce_, initialized
from .sharding import Sharding, is_dtensor, local, local_layout, row_sharding, sharding_of
from .drift import js_drift
from .checkpoint import load, save

__all__ = ["comm", "Sharding", "sharding_of", "row_sharding", "local", "local_layout",
           "is_dtensor", "js_drift", "agreed", "all_reduce_", "initialized", "save", "load"]
