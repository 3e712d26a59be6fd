"""FisherAdapTune: an optimizer wrapper that progressively freezes settled parameter groups.

Each step the wrapper folds the gradients into a diagonal Fisher estimate; every
``check_every`` steps it scores each active group's drift (the JS distance between its current
Fisher and a reference EMA), and a policy freezes the groups that have settled
(docs/methods.md sections 1-4). This file is the orchestration; the pieces live beside it:
``freezing`` (what a freeze does), ``tracker`` and ``policies`` (drift statistics and
decisions), ``state`` (checkpoints), ``report`` (metrics, summary, plot).
"""
from __future__ import annotations

import difflib
import warnings
from typing import Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .. import groups as groups_mod
from .. import ops
from .._wrapped import WrappedOptimizer, check_optimizer
from ..distributed import comm
from ..distributed.drift import js_drift
from ..distributed.sharding import local_layout, row_sharding, sharding_of
from ..fisher.base import EstimatorSpec, estimator_class, make_estimator
from ..fisher.empirical import FISHER_DTYPES, EmpiricalFisher
from . import report, state
from .freezing import Freezer
from .policies import Context, Policy, Threshold
from .support import check_supported
from .tracker import DriftTracker

__all__ = ["FisherAdapTune"]

DRIFT_MODES = ("mass", "histogram")


class FisherAdapTune(WrappedOptimizer):
    """Wrap an optimizer so that parameter groups whose Fisher has stopped drifting freeze.

    Args:
        optimizer: a ``torch.optim`` optimizer of a verified class (``SGD``, ``Adam``,
            ``AdamW``, ``Adamax``, ``NAdam``, ``RAdam``, ``RMSprop``, ``Rprop``, ``Adagrad``,
            ``Adadelta``, ``ASGD``, any of their ``foreach``/``fused``/``capturable``/...
            variants), already built. ``LBFGS``, ``Adafactor``, ``Muon`` and ``SparseAdam``
            are refused (see ``adaptune.support``), and so is any other class unless
            ``allow_unverified_optimizer``. Its ``param_groups`` and ``state`` are the
            wrapper's (the same objects), so LR schedulers and ``GradScaler`` work attached to
            either.
        model: the model owning the parameters; gives readable names and is needed for the
            ``"kfac"`` estimator, ``groups="per_module"`` and qkv splitting by name. Every
            optimizer parameter must belong to it.
        groups: ``"slabs"`` (default; dim 0 in 4 slabs, fused qkv split first),
            ``"per_tensor"``, ``"per_module"``, a :class:`GroupLayout` or a callable taking
            the ``(name, param)`` list and returning one.
        estimator: a registered name (``"empirical"``: ``F <- decay F + (1-decay) g**2``, one
            fused op per step; ``"kfac"``: Linear layers ``S ⊗ H`` from hooks) or an
            :class:`~fisheradaptune.fisher.Estimator` subclass.
        drift_mode: ``"mass"`` (exact, default) or ``"histogram"`` (the paper's); see
            ``ops.js_drift``. In ``"mass"`` mode a 1-element group's drift is undefined: it
            is never measured and never frozen for its drift (docs/methods.md section 4).
        fisher_decay, reference_decay, score_decay: EMA decays of the Fisher, of the drift
            reference (``ref <- rho ref + (1-rho) cur`` after scoring) and of ``jsema``.
        check_every: steps between drift checks (the paper uses 300).
        policy: a :class:`Threshold` (default), :class:`PaperPolicy`, :class:`Observe` (track
            drift, never freeze) or any :class:`Policy` subclass.
        drift_kwargs: extra keyword arguments of ``ops.js_drift`` (``bins``, ``lower_q``,
            ``upper_q``, ``min_log_range``, ``base``).
        shard_state: under DDP (``model`` a ``DistributedDataParallel``, an estimator that
            supports sharding), ``True`` makes each rank keep and update the Fisher and drift
            references of only ``1/world`` of every tensor's rows, dividing that work and
            memory by the world size, with sums all-reduced as under FSDP2. Checkpoint it with
            :func:`fisheradaptune.distributed.save` (or one :meth:`state_dict` per rank).
            ``False`` (default) keeps a full replica on every rank, so "save on rank 0" works.
        fisher_dtype: dtype of the Fisher buffers and of the drift references:
            ``torch.float32`` (default) or ``torch.bfloat16`` (half the memory; the ops read
            bfloat16, compute in float32 and round once on store; with
            ``estimator="empirical"`` only). The measured effect on drift values and freeze
            decisions is in docs/methods.md ("Fisher buffers in bfloat16"). A checkpoint
            loads only into a wrapper with the same ``fisher_dtype``.
        allow_unverified_optimizer: accept an optimizer class that is not verified (a
            subclass, a third-party optimizer), asserting that it updates each element from
            its own gradient and state only, never moves a parameter whose ``.grad`` is None
            and keeps only scalar or parameter-shaped state (docs/methods.md section 4).

    Frozen ranges of partially frozen tensors have zero gradients as soon as backward has
    accumulated them (a hook on each such tensor), so gradient clipping, logging and
    ``GradScaler.unscale_`` count the trainable elements only; tensors frozen whole have no
    gradient at all. Names passed to :meth:`freeze` / :meth:`unfreeze` may be any name the
    model shows for a tensor: tied aliases, or names with or without ``_orig_mod.``
    (``torch.compile``) and ``module.`` (DDP).

    Only parameters with ``requires_grad`` at construction are tracked. A freeze decided at a
    check takes effect from the next step.

    Distributed training: under ``DistributedDataParallel`` wrap the model with
    ``find_unused_parameters=True`` (tensors frozen whole stop receiving gradients) and pass
    it as ``model``. Under FSDP2 (``fully_shard``) each rank tracks its own shards. Per-group
    sums and the JS partial sums are all-reduced, so every rank scores the unsharded drift,
    and decisions are broadcast from the first rank, so all ranks freeze the same groups.
    """

    _state_key = "adaptune"

    def __init__(self, optimizer: torch.optim.Optimizer, model: Optional[nn.Module] = None, *,
                 groups: groups_mod.GroupSpec = "slabs", estimator: EstimatorSpec = "empirical",
                 drift_mode: str = "mass", fisher_decay: float = 0.9,
                 reference_decay: float = 0.9, score_decay: float = 0.9,
                 check_every: int = 100, policy: Optional[Policy] = None,
                 drift_kwargs: Optional[dict] = None, shard_state: bool = False,
                 fisher_dtype: torch.dtype = torch.float32,
                 allow_unverified_optimizer: bool = False):
        if isinstance(optimizer, FisherAdapTune):
            raise ValueError("argument 'optimizer': already a FisherAdapTune")
        check_optimizer(optimizer)
        check_supported(optimizer, allow_unverified_optimizer)
        super().__init__(optimizer)
        policy = Threshold() if policy is None else policy
        est_cls = self._check_args(model, estimator, drift_mode, fisher_decay, reference_decay,
                                   score_decay, check_every, policy, drift_kwargs)
        self._check_fisher_dtype(fisher_dtype, est_cls)
        named = self._named_params(optimizer, model)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self.model = model
        self.layout = groups_mod.build(groups, named, model)
        # Other names the user may type for tensors and groups (tied, compiled, DDP).
        self._aliases = {} if model is None else groups_mod.name_aliases(model, self.layout)

        # Which part of each tensor this rank's Fisher covers: its FSDP2 shard, a row split
        # under DDP (shard_state), or all of it.
        self.sharding = sharding_of(self.params, self.names)
        fsdp = self.sharding is not None
        if fsdp and not est_cls.supports_sharding:
            raise ValueError(f"argument 'estimator': {est_cls.name or est_cls.__name__!r} does "
                             "not support sharded (FSDP2) parameters; use \"empirical\"")
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        if not fsdp and shard_state and ddp and est_cls.supports_sharding:
            self.sharding = row_sharding(self.params, model.process_group)
        # The ranks that must agree on every decision.
        self._group = self.sharding.group if self.sharding is not None else comm.group_of(model)
        # The layout over this rank's part of the Fisher (the layout itself when unsharded),
        # and over the part of each parameter this rank updates, where frozen ranges are
        # masked: its shard under FSDP2, the whole (replicated) tensor otherwise.
        self.local_layout = local_layout(self.layout, self.sharding)
        mask_layout = self.local_layout if fsdp else self.layout

        self.drift_mode = drift_mode
        self.drift_kwargs = dict(drift_kwargs or {})
        self.reference_decay = float(reference_decay)
        self.check_every = check_every
        self.policy = policy
        self.estimator_name = est_cls.name or est_cls.__name__
        self.fisher_dtype = fisher_dtype
        self.estimator = make_estimator(est_cls, [self.part(i, p.detach()) for i, p in
                                                  enumerate(self.params)],
                                        self.local_layout, model, float(fisher_decay),
                                        None if fisher_dtype == torch.float32 else fisher_dtype)
        G = self.layout.num_groups
        self.tracker = DriftTracker(G, float(score_decay))
        self.freezer = Freezer(self.params, self.layout, mask_layout, optimizer)
        self.references: List[Optional[Tensor]] = [None] * len(self.params)
        self.step_count = 0
        self.total_elements = int(self.layout.group_sizes.sum())
        # A 1-element group's mass distribution is always [1]: its drift is 0 by construction,
        # which says nothing about whether it settled.
        self.drift_defined = (self.layout.group_sizes > 1) if drift_mode == "mass" else \
            torch.ones(G, dtype=torch.bool)
        self._nonfinite: Optional[Tensor] = None
        self._refresh_active()

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _check_args(model, estimator, drift_mode, fisher_decay, reference_decay, score_decay,
                    check_every, policy, drift_kwargs):
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"argument 'model': expected an nn.Module, got {type(model).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel) and \
                not model.find_unused_parameters:
            # A tensor frozen whole stops receiving gradients; DDP's reducer then waits for it
            # forever unless it looks for unused parameters.
            raise ValueError("argument 'model': wrap the model with DistributedDataParallel(..., "
                             "find_unused_parameters=True) so that tensors frozen whole can stop "
                             "receiving gradients")
        if drift_mode not in DRIFT_MODES:
            raise ValueError(f"argument 'drift_mode': expected \"mass\" or \"histogram\", got "
                             f"{drift_mode!r}")
        if not (isinstance(check_every, int) and check_every >= 1):
            raise ValueError(f"argument 'check_every': expected an integer >= 1, got {check_every!r}")
        for name, v in (("fisher_decay", fisher_decay), ("reference_decay", reference_decay),
                        ("score_decay", score_decay)):
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"argument '{name}': expected a value in [0, 1], got {v!r}")
        if float(score_decay) >= 1.0:
            raise ValueError(f"argument 'score_decay': expected a value in [0, 1), got {score_decay!r}")
        try:  # the op validates its own arguments: call it once on nothing
            ops.js_drift([], [], groups_mod.GroupLayout((), (), (), torch.zeros(0, 4)),
                         drift_mode=drift_mode, **dict(drift_kwargs or {}))
        except TypeError as e:
            raise TypeError(f"argument 'drift_kwargs': {e}") from None
        except ValueError as e:
            raise ValueError(f"argument 'drift_kwargs': {e}") from None
        if not isinstance(policy, Policy):
            raise TypeError("argument 'policy': expected a Policy (Threshold, PaperPolicy, "
                            f"Observe or a subclass), got {type(policy).__name__}")
        return estimator_class(estimator)

    @staticmethod
    def _check_fisher_dtype(fisher_dtype, est_cls) -> None:
        # Allow-list: the dtypes the ops write (Note [bfloat16 state], csrc/fisher/
        # common/state.h); bfloat16 only with the estimator whose buffers the ops write
        # directly (K-FAC materialises float32 snapshots from its factors).
        if not isinstance(fisher_dtype, torch.dtype) or fisher_dtype not in FISHER_DTYPES:
            raise ValueError("argument 'fisher_dtype': expected torch.float32 or torch.bfloat16, "
                             f"got {fisher_dtype!r}")
        if fisher_dtype != torch.float32 and est_cls is not EmpiricalFisher:
            raise ValueError("argument 'fisher_dtype': torch.bfloat16 is supported with "
                             "estimator=\"empirical\" only, got estimator "
                             f"{est_cls.name or est_cls.__name__!r}")

    @staticmethod
    def _named_params(optimizer, model) -> List[Tuple[str, Tensor]]:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if not params:
            raise ValueError("argument 'optimizer': it holds no parameter that requires grad")
        if model is None:
            return [(f"param_groups.{gi}.{pi}", p) for gi, g in enumerate(optimizer.param_groups)
                    for pi, p in enumerate(g["params"]) if p.requires_grad]
        names = {id(p): n for n, p in model.named_parameters()}
        missing = [i for i, p in enumerate(params) if id(p) not in names]
        if missing:
            raise ValueError(f"argument 'model': {len(missing)} optimizer parameter(s) are not "
                             f"parameters of the model (first: shape {tuple(params[missing[0]].shape)})")
        return [(names[id(p)], p) for p in params]

    # ------------------------------------------------------------------ the step
    # Note [Compiled step]: between drift checks a step runs only tensor work (a foreach mask,
    # the fused Fisher op, foreach save/restore) and integer bookkeeping, with no host read of
    # a tensor, so torch.compile traces it without a graph break of ours (the wrapped torch
    # optimizer may break on its own, as it does without the wrapper). Checks and decisions
    # read the drift on the host, change Python state that a compiled graph would guard on,
    # and run once per `check_every` steps: they are kept out of compilation.
    def _prepare_grads(self) -> None:
        self.freezer.partial.mask_grads()

    def mask_frozen_grads(self) -> None:
        """Zero the gradients of frozen elements now, in place (``step`` does it anyway).

        Backward already zeroes them (a post-accumulate-grad hook on each partially frozen
        tensor), so clipping after ``backward`` counts trainable elements only. Call this when
        gradients reach ``.grad`` another way: assigned by hand, or under FSDP2, which writes
        sharded gradients after its reduce-scatter without accumulating into them. With
        gradient accumulation, the Fisher is updated once per ``step`` from the accumulated
        ``.grad`` (the sum over micro-batches), not per micro-batch.
        """
        self.freezer.partial.mask_grads()

    def _before_step(self) -> None:
        if self.sharding is None:
            grads = [p.grad for p in self.params]
        else:
            grads = [self.part(i, p.grad) for i, p in enumerate(self.params)]
        sums, bad = self.estimator.update(grads)
        if self._nonfinite is None:
            self._nonfinite = bad.clone()
        else:
            self._nonfinite.add_(bad)  # in place: no allocation per step
        if self.step_count == 0:
            self._first_step(sums)
        self.freezer.partial.save()

    def _after_step(self) -> None:
        self.freezer.partial.restore()
        self.step_count += 1
        if self.step_count % self.check_every == 0:
            self._check()

    @torch.compiler.disable
    def _first_step(self, sums: Optional[Tensor]) -> None:
        if sums is None:
            sums = self.estimator.group_sums(self.local_layout)
        zero = comm.all_reduce_(sums.detach().to(torch.float64).clone(), self._sum_group).cpu() == 0
        self._decide(self.policy.initial(self._context(zero_fisher=zero)))

    @property
    def _sum_group(self):
        # Per-group sums are partial on each rank only when the Fisher is sharded.
        return self.sharding.group if self.sharding is not None else None

    def _context(self, zero_fisher: Optional[Tensor] = None) -> Context:
        return Context(step=self.step_count, tracker=self.tracker, active=~self.frozen,
                       group_sizes=self.layout.group_sizes, total_elements=self.total_elements,
                       zero_fisher=zero_fisher, defined=self.drift_defined.clone())

    def _refresh_active(self) -> None:
        """What derives from the released set, rebuilt only when it changes: the tensors still
        tracked, their sub-layouts for js_drift, and the groups with elements in them."""
        released = self.freezer.released
        self._active = [i for i in range(len(self.params)) if i not in released]
        self._active_layout = self.local_layout.subset(self._active)
        self._active_global_layout = self.layout.subset(self._active)
        self._in_active = torch.zeros(self.layout.num_groups, dtype=torch.bool)
        for i in self._active:
            self._in_active[self.freezer.tensor_groups[i]] = True

    @torch.compiler.disable
    def _check(self) -> None:
        """Score drift of the active tensors' groups, update references, apply the policy."""
        active = self._active
        snap = self.estimator.snapshot()
        measured = self._in_active & self.drift_defined
        if active:
            # A non-finite Fisher (a custom estimator's, or written by hand) would score drift
            # 0 and look settled: its groups are not measured at this check. One host read.
            finite = torch.stack([torch.isfinite(snap[i]).all() for i in active]).cpu().tolist()
            for i, ok in zip(active, finite):
                if not ok:
                    measured[self.freezer.tensor_groups[i]] = False
                    warnings.warn(f"FisherAdapTune: the Fisher of {self.names[i]!r} is not "
                                  "finite; its groups are not measured at this check",
                                  RuntimeWarning, stacklevel=3)
        for i in active:
            if self.references[i] is None:
                # First visit: ref := cur, and the groups of this tensor are not measured yet.
                self.references[i] = snap[i].detach().clone()
                measured[self.freezer.tensor_groups[i]] = False
        jsd = torch.zeros(self.layout.num_groups, dtype=torch.float32)
        if active:
            jsd = js_drift(
                [snap[i] for i in active], [self.references[i] for i in active],
                self._active_layout, self.sharding, drift_mode=self.drift_mode,
                update_reference=self.reference_decay, global_layout=self._active_global_layout,
                tensors=active, **self.drift_kwargs).cpu()
        self.tracker.record(self.step_count, jsd, measured, ~self.frozen)
        self._decide(self.policy.decide(self._context()))

    # ------------------------------------------------------------------ freezing
    def _decide(self, to_freeze: Tensor) -> None:
        if not isinstance(to_freeze, Tensor) or to_freeze.shape != self.frozen.shape \
                or to_freeze.dtype != torch.bool:
            raise TypeError(f"{type(self.policy).__name__} returned "
                            f"{getattr(to_freeze, 'shape', to_freeze)!r}: a policy must return a "
                            f"bool tensor of shape [{self.layout.num_groups}]")
        self._freeze(comm.agreed(to_freeze.cpu(), self._group))

    def _freeze(self, groups: Tensor) -> None:
        if not bool((groups & ~self.frozen).any()):
            return
        released = self.freezer.freeze(groups, self.step_count)
        if released:
            self.estimator.release(released)
            for i in released:
                self.references[i] = None
        self._refresh_active()

    def _resolve(self, names: Union[str, Iterable[str]], arg: str) -> Tensor:
        if isinstance(names, str):
            names = [names]
        mask = torch.zeros(self.layout.num_groups, dtype=torch.bool)
        gindex = {n: g for g, n in enumerate(self.layout.names)}
        tindex = {n: i for i, n in enumerate(self.names)}
        for n in names:
            if not isinstance(n, str):
                raise TypeError(f"argument '{arg}': expected names (str), got {type(n).__name__}")
            c = self._aliases.get(n, n)
            if c in gindex:
                mask[gindex[c]] = True
            elif c in tindex:
                mask[self.freezer.tensor_groups[tindex[c]]] = True
            else:
                close = difflib.get_close_matches(n, list(tindex) + list(gindex) +
                                                  list(self._aliases), n=3, cutoff=0.6)
                hint = f"; did you mean {close}?" if close else \
                    "; parameter names are in opt.names, group names in opt.layout.names"
                raise ValueError(f"argument '{arg}': {n!r} is neither a group nor a parameter "
                                 f"name{hint}")
        return mask

    def freeze(self, names: Union[str, Iterable[str]]) -> None:
        """Freeze groups (by group name) or whole parameters (by parameter name) now."""
        self._freeze(self._resolve(names, "names"))

    def unfreeze(self, names: Union[str, Iterable[str]]) -> None:
        """Make frozen groups trainable again; their drift statistics start afresh."""
        mask = self._resolve(names, "names") & self.frozen
        if not bool(mask.any()):
            return
        self.tracker.reset(mask)
        back = self.freezer.thaw(mask)
        if back:
            self.estimator.restore(back)
        self._refresh_active()

    def set_frozen(self, frozen: Tensor) -> None:
        """Make exactly ``frozen`` (bool ``[num_groups]``) frozen, thawing groups not in it."""
        thaw = self.frozen & ~frozen
        if bool(thaw.any()):
            self.unfreeze([self.layout.names[g] for g in torch.nonzero(thaw).flatten().tolist()])
        self._freeze(frozen.clone())

    # ------------------------------------------------------------------ inspection
    @property
    def frozen(self) -> Tensor:
        """Bool ``[num_groups]``: which groups are frozen."""
        return self.freezer.frozen

    @property
    def frozen_at(self) -> Tensor:
        """Int64 ``[num_groups]``: the step each group froze at (-1: active)."""
        return self.freezer.frozen_at

    @property
    def released(self) -> set:
        """Indices (into ``names``/``params``) of the tensors frozen whole."""
        return self.freezer.released

    @property
    def active_fraction(self) -> float:
        """Trainable elements still active / trainable elements at the start."""
        if self.total_elements == 0:
            return 1.0
        return float(self.layout.group_sizes[~self.frozen].sum()) / self.total_elements

    def frozen_mask(self, param: Tensor) -> Tensor:
        """Bool tensor shaped like ``param``: True where frozen. For a sharded (FSDP2)
        parameter, shaped like this rank's shard of it (``param.to_local()``)."""
        i = self._index.get(id(param))
        if i is None:
            raise ValueError("argument 'param': not a parameter tracked by this FisherAdapTune")
        return self.freezer.frozen_mask(i)

    @property
    def nonfinite(self) -> int:
        """Gradient elements skipped so far for not being finite (reading it synchronises).
        With a sharded Fisher (FSDP2, ``shard_state``) each rank counts its own part."""
        return 0 if self._nonfinite is None else int(self._nonfinite)

    @property
    def buffer_bytes(self) -> int:
        """Bytes of the Fisher buffers and drift references this wrapper holds now (this
        rank's parts when sharded; freed ones not counted). See ``fisher_dtype``."""
        return report.buffer_bytes(self)

    def metrics(self, per_group: bool = False) -> dict:
        """A flat dict for TensorBoard or W&B (``adaptune/buffer_bytes``: :attr:`buffer_bytes`)."""
        return report.metrics(self, per_group)

    def summary(self, max_rows: Optional[int] = 40) -> str:
        """A readable table: group, size, drift, score, state."""
        return report.summary(self, max_rows)

    def plot(self, path: str) -> None:
        """Write drift curves and the freeze timeline to ``path`` (needs matplotlib)."""
        report.plot(self, path)

    # ------------------------------------------------------------------ checkpointing
    # state_dict() / load_state_dict() are WrappedOptimizer's: {"optimizer": ..., "adaptune":
    # this wrapper's state}. Under FSDP2, or DDP with shard_state, the Fisher and references
    # are this rank's shards: save one file per rank, or use fisheradaptune.distributed.save.
    def _own_state_dict(self) -> dict:
        return state.state_dict(self)

    def _check_state_dict(self, own: dict, inner: dict) -> None:
        state.check_payload(self, own)
        state.check_inner_state_dict(self.optimizer, inner)

    def _load_own_state_dict(self, payload: dict) -> None:
        state.load_state_dict(self, payload, checked=True)

    def distributed_state_dict(self) -> dict:
        """This wrapper's state (not the wrapped optimizer's) for ``torch.distributed.checkpoint``."""
        return state.distributed_state_dict(self)

    def distributed_template(self, packed_meta: bytes) -> dict:
        """Apply the saved frozen set; a template for DCP to fill (see ``state``)."""
        return state.distributed_template(self, packed_meta)

    def load_distributed_state_dict(self, payload: dict) -> None:
        """Restore what :meth:`distributed_state_dict` gave (after DCP filled a template)."""
        state.load_distributed_state_dict(self, payload)

    # ------------------------------------------------------------------ sharded coordinates
    def part(self, i: int, t: Optional[Tensor]) -> Optional[Tensor]:
        """The part of parameter ``i`` (or of its gradient) that this rank's Fisher covers."""
        if t is None or self.sharding is None:
            return t
        return self.sharding.to_local(i, t)

    def to_global(self, i: int, buffer: Tensor) -> Tensor:
        return buffer if self.sharding is None else self.sharding.to_global(i, buffer)

    def to_local(self, i: int, value: Tensor) -> Tensor:
        return value if self.sharding is None else self.sharding.to_local(i, value)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # Keyed by id(): a copy's parameters are other objects.
        self._index = {id(p): i for i, p in enumerate(self.params)}

    def __repr__(self) -> str:
        return (f"FisherAdapTune({type(self.optimizer).__name__}, {self.layout}, "
                f"active_fraction={self.active_fraction:.3f}, policy={self.policy})")
