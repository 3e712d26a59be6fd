"""FisherAdapTune: an optimizer wrapper that progressively freezes settled parameter groups.

Each step the wrapper folds the gradients into a diagonal Fisher estimate (one fused op); every
``check_every`` steps it scores each active group's drift (the JS distance between its current
Fisher and a reference EMA), and a policy freezes the groups that have settled (SPEC sections
1-4). Freezing is exact and saves real work:

- a tensor frozen whole gets ``requires_grad_(False)`` and ``grad = None``, and its optimizer
  state, Fisher and reference buffers are released: backward no longer computes its weight
  gradient and the memory is returned;
- in a partially frozen tensor, the frozen ranges' gradients are zeroed in place, their
  optimizer state is zeroed at the freeze, and their values are restored bit for bit after the
  wrapped optimizer's step (so no optimizer, whatever its weight decay, momentum or fused
  implementation, can move them).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import distributed
from . import fisher as fisher_mod
from . import groups as groups_mod
from . import ops
from ._wrapping import check_optimizer, share_optimizer
from .adaptune import Context, DriftTracker, PaperPolicy, Policy, Threshold
from .groups import GroupLayout

__all__ = ["FisherAdapTune"]


class _PartialFreeze:
    """The frozen element ranges of partially frozen tensors, with a preallocated save buffer.

    Built once per freeze event; per step it costs two ``_foreach_copy_`` calls and one
    ``_foreach_zero_`` with no allocation beyond the views.
    """

    def __init__(self, params: List[Tensor], ranges: Dict[int, List[Tuple[int, int]]]):
        self.ranges = {i: r for i, r in ranges.items() if r}
        self.params = params
        self.index = sorted(self.ranges)
        self.param_views: List[Tensor] = []
        self.buffer_views: List[Tensor] = []
        self._build()

    def _build(self) -> None:
        self.param_views.clear()
        self.buffer_views.clear()
        offsets: Dict[Tuple[torch.device, torch.dtype], int] = {}
        sizes: Dict[Tuple[torch.device, torch.dtype], int] = {}
        for i in self.index:
            p = distributed.local(self.params[i])
            key = (p.device, p.dtype)
            sizes[key] = sizes.get(key, 0) + sum(e - b for b, e in self.ranges[i])
        self.buffers = {k: torch.empty(n, dtype=k[1], device=k[0]) for k, n in sizes.items()}
        self._ptrs = []
        for i in self.index:
            p = distributed.local(self.params[i])
            flat = p.detach().view(-1)
            key = (p.device, p.dtype)
            for b, e in self.ranges[i]:
                o = offsets.get(key, 0)
                self.param_views.append(flat[b:e])
                self.buffer_views.append(self.buffers[key][o:o + e - b])
                offsets[key] = o + e - b
            self._ptrs.append(p.data_ptr())

    def _fresh(self) -> None:
        # A user may replace a parameter's storage (e.g. model.to(), load_state_dict(assign)):
        # then the cached views would point at the old storage.
        if [distributed.local(self.params[i]).data_ptr() for i in self.index] != self._ptrs:
            self._build()

    def mask_grads(self) -> None:
        views = []
        for i in self.index:
            g = distributed.local(self.params[i].grad)
            if g is None:
                continue
            if not g.is_contiguous():
                # Ranges are flat offsets: mask a contiguous copy and write it back in place
                # (a DTensor's local shard cannot be swapped for another tensor).
                tmp = g.contiguous()
                for b, e in self.ranges[i]:
                    tmp.view(-1)[b:e].zero_()
                g.copy_(tmp)
                continue
            flat = g.view(-1)
            views.extend(flat[b:e] for b, e in self.ranges[i])
        if views:
            torch._foreach_zero_(views)

    def save(self) -> None:
        # Saved every step rather than once at the freeze: a user who loads weights into the
        # model later (model.load_state_dict copies in place) must not see them overwritten by
        # values captured before.
        self._fresh()
        if self.param_views:
            torch._foreach_copy_(self.buffer_views, self.param_views)

    def restore(self) -> None:
        if self.param_views:
            torch._foreach_copy_(self.param_views, self.buffer_views)


class FisherAdapTune(torch.optim.Optimizer):
    """Wrap an optimizer so that parameter groups whose Fisher has stopped drifting freeze.

    Args:
        optimizer: any ``torch.optim`` optimizer, already built. Its ``param_groups`` and
            ``state`` are shared with the wrapper, so LR schedulers keep working (attach them
            to either object).
        model: the model owning the parameters; gives readable names and is needed for the
            ``"kfac"`` estimator, ``groups="per_module"`` and qkv splitting by name. Every
            optimizer parameter must belong to it.
        groups: ``"slabs"`` (default; dim 0 in 4 slabs, fused qkv split first),
            ``"per_tensor"``, ``"per_module"``, a :class:`GroupLayout` or a callable taking
            the ``(name, param)`` list and returning one.
        estimator: ``"empirical"`` (``F <- decay F + (1-decay) g**2``, one fused op per step)
            or ``"kfac"`` (Linear layers: ``S ⊗ H`` from hooks).
        drift: ``"mass"`` (exact, default) or ``"histogram"`` (the paper's); see ``ops.js_drift``.
        fisher_decay, reference_decay, score_decay: EMA decays of the Fisher, of the drift
            reference (``ref <- rho ref + (1-rho) cur`` after scoring) and of ``jsema``.
        check_every: steps between drift checks (the paper uses 300).
        policy: a :class:`Threshold` (default) or :class:`PaperPolicy`.
        drift_kwargs: extra keyword arguments of ``ops.js_drift`` (``bins``, ``lower_q``,
            ``upper_q``, ``min_log_range``, ``base``).
        shard_state: under DDP (``model`` a ``DistributedDataParallel``, empirical
            estimator), ``True`` makes each rank keep and update the Fisher and drift
            references of only ``1/world`` of every tensor's rows (a ``Shard(0)`` split),
            dividing that work and memory by the world size, with sums all-reduced as under
            FSDP2. Checkpoint such a wrapper with :func:`fisheradaptune.distributed.save` (or
            one :meth:`state_dict` file per rank): rank 0's state alone no longer holds all of
            it. ``False`` (default) keeps a full replica on every rank, so the usual "save on
            rank 0" works.

    Only parameters with ``requires_grad`` at construction are tracked.

    Distributed training (see README "Distributed"): under ``DistributedDataParallel`` the
    gradients are already averaged, so the Fisher is the global batch's; wrap the model with
    ``find_unused_parameters=True`` (tensors frozen whole stop receiving gradients) and pass it
    as ``model``. Under FSDP2 (``fully_shard``) each rank tracks its own shards. In both cases
    (see ``shard_state``) per-group sums and the JS partial sums are all-reduced, so every rank
    scores the unsharded drift, and decisions are broadcast from the first rank, so all ranks
    freeze the same groups.
    :func:`fisheradaptune.distributed.save` / ``load`` checkpoint the wrapper with
    ``torch.distributed.checkpoint``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: Optional[nn.Module] = None, *,
                 groups: groups_mod.GroupSpec = "slabs", estimator: str = "empirical",
                 drift: str = "mass", fisher_decay: float = 0.9, reference_decay: float = 0.9,
                 score_decay: float = 0.9, check_every: int = 100,
                 policy: Optional[Policy] = None, drift_kwargs: Optional[dict] = None,
                 shard_state: bool = False):
        check_optimizer(optimizer)
        if isinstance(optimizer, FisherAdapTune):
            raise ValueError("argument 'optimizer': already a FisherAdapTune")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"argument 'model': expected an nn.Module, got {type(model).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel) and \
                not model.find_unused_parameters:
            # A tensor frozen whole stops receiving gradients; DDP's reducer then waits for it
            # forever unless it looks for unused parameters.
            raise ValueError("argument 'model': wrap the model with DistributedDataParallel(..., "
                             "find_unused_parameters=True) so that tensors frozen whole can stop "
                             "receiving gradients")
        if drift not in ("mass", "histogram"):
            raise ValueError(f"argument 'drift': expected \"mass\" or \"histogram\", got {drift!r}")
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
                         mode=drift, **dict(drift_kwargs or {}))
        except TypeError as e:
            raise TypeError(f"argument 'drift_kwargs': {e}") from None
        except ValueError as e:
            raise ValueError(f"argument 'drift_kwargs': {e}") from None
        policy = Threshold() if policy is None else policy
        if not isinstance(policy, Policy):
            raise TypeError(f"argument 'policy': expected a Threshold, PaperPolicy or Policy, got "
                            f"{type(policy).__name__}")

        self.optimizer = optimizer
        share_optimizer(self, optimizer)

        named = self._named_params(optimizer, model)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        # Which part of each tensor this rank's Fisher covers: its FSDP2 shard, a row split
        # under DDP (shard_state), or all of it.
        self.sharding = distributed.sharding_of(self.params, self.names)
        self._dtensor_params = self.sharding is not None
        if self._dtensor_params and estimator != "empirical":
            raise ValueError(f"argument 'estimator': {estimator!r} does not support sharded "
                             "(FSDP2) parameters; use \"empirical\"")
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        if self.sharding is None and shard_state and estimator == "empirical" and ddp:
            self.sharding = distributed.row_sharding(self.params, model.process_group)
        # The ranks that must agree on every decision.
        self._group = (self.sharding.group if self.sharding is not None else
                       model.process_group if ddp else None)
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self.model = model
        self.layout = groups_mod.build(groups, named, model)
        # The layout over this rank's part of the Fisher (the layout itself when unsharded) ...
        self.local_layout = distributed.local_layout(self.layout, self.sharding)
        # ... and over the part of each parameter this rank updates, where frozen ranges are
        # masked: its shard under FSDP2, the whole (replicated) tensor otherwise.
        self.mask_layout = self.local_layout if self._dtensor_params else self.layout
        self.drift_mode = drift
        self.drift_kwargs = dict(drift_kwargs or {})
        self.reference_decay = float(reference_decay)
        self.check_every = check_every
        self.policy = policy
        self.estimator_name = estimator
        local_params = [self._part(i, p.detach()) for i, p in enumerate(self.params)]
        self.estimator = fisher_mod.make_estimator(estimator, local_params, self.local_layout,
                                                   model, float(fisher_decay))
        G = self.layout.num_groups
        self.tracker = DriftTracker(G, float(score_decay))
        self.frozen = torch.zeros(G, dtype=torch.bool)
        self.frozen_at = torch.full((G,), -1, dtype=torch.int64)
        self.references: List[Optional[Tensor]] = [None] * len(self.params)
        self.released: set = set()  # tensor indices frozen whole
        self.step_count = 0
        self.total_elements = int(self.layout.group_sizes.sum())
        self._nonfinite = None
        self._partial = _PartialFreeze(self.params, {})
        self._tensor_groups = [self.layout.groups_of(i) for i in range(len(self.params))]
        self._group_segments = [self.layout.segments_of(g) for g in range(G)]
        self._mask_segments = [self.mask_layout.segments_of(g) for g in range(G)]
        self._refresh_active()

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _named_params(optimizer, model) -> List[Tuple[str, Tensor]]:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if not params:
            raise ValueError("argument 'optimizer': it holds no parameter that requires grad")
        if model is None:
            out = []
            for gi, g in enumerate(optimizer.param_groups):
                for pi, p in enumerate(g["params"]):
                    if p.requires_grad:
                        out.append((f"param_groups.{gi}.{pi}", p))
            return out
        names = {id(p): n for n, p in model.named_parameters()}
        missing = [i for i, p in enumerate(params) if id(p) not in names]
        if missing:
            raise ValueError(f"argument 'model': {len(missing)} optimizer parameter(s) are not "
                             f"parameters of the model (first: shape {tuple(params[missing[0]].shape)})")
        return [(names[id(p)], p) for p in params]

    def add_param_group(self, param_group: dict) -> None:
        raise RuntimeError("FisherAdapTune: add parameter groups to the optimizer before wrapping it "
                           "(the group layout is fixed at construction)")

    # ------------------------------------------------------------------ training loop API
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Accumulate the Fisher, step the wrapped optimizer with frozen elements held fixed,
        and every ``check_every`` steps score drift and apply the policy."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._partial.mask_grads()
        if self.sharding is None:
            grads = [p.grad for p in self.params]
        else:
            grads = [self._part(i, p.grad) for i, p in enumerate(self.params)]
        sums, bad = self.estimator.update(grads)
        if self._nonfinite is None:
            self._nonfinite = bad.clone()
        else:
            self._nonfinite.add_(bad)  # in place: no allocation per step
        if self.step_count == 0:
            zero = self._group_fisher_sums(sums) == 0
            self._apply(self._agreed(self.policy.initial(self._context(zero_fisher=zero))))
        self._partial.save()
        self.optimizer.step()
        self._partial.restore()
        self.step_count += 1
        if self.step_count % self.check_every == 0:
            self._check()
        return loss

    def _group_fisher_sums(self, sums: Optional[Tensor]) -> Tensor:
        if sums is not None:
            return distributed.all_reduce_(sums.detach().clone(), self.sharding).cpu()
        # kfac: compute from the materialised Fisher.
        snap = self.estimator.snapshot()
        out = torch.zeros(self.layout.num_groups, dtype=torch.float64)
        for g, segs in enumerate(self._group_segments):
            for t, b, e in segs:
                if snap[t] is not None:
                    out[g] += float(snap[t].reshape(-1)[b:e].double().sum())
        return out

    def _context(self, zero_fisher: Optional[Tensor] = None) -> Context:
        return Context(step=self.step_count, tracker=self.tracker, active=~self.frozen,
                       group_sizes=self.layout.group_sizes, total_elements=self.total_elements,
                       zero_fisher=zero_fisher)

    def _refresh_active(self) -> None:
        """What derives from the released set, rebuilt only when it changes: the tensors still
        tracked, their sub-layout for js_drift, and the groups with elements in them."""
        self._active = [i for i in range(len(self.params)) if i not in self.released]
        self._active_layout = self.local_layout.subset(self._active)
        self._active_global_layout = self.layout.subset(self._active)
        self._in_active = torch.zeros(self.layout.num_groups, dtype=torch.bool)
        for i in self._active:
            self._in_active[self._tensor_groups[i]] = True

    def _check(self) -> None:
        """Score drift of the active tensors' groups, update references, apply the policy."""
        active = self._active
        snap = self.estimator.snapshot()
        measured = torch.ones(self.layout.num_groups, dtype=torch.bool)
        for i in active:
            if self.references[i] is None:
                # First visit: ref := cur, and the groups of this tensor are not measured yet.
                self.references[i] = snap[i].detach().clone()
                measured[self._tensor_groups[i]] = False
        jsd = torch.zeros(self.layout.num_groups, dtype=torch.float32)
        if active:
            jsd = distributed.js_drift(
                [snap[i] for i in active], [self.references[i] for i in active],
                self._active_layout, self.sharding, mode=self.drift_mode,
                update_reference=self.reference_decay, global_layout=self._active_global_layout,
                tensors=active, **self.drift_kwargs).cpu()
        self.tracker.record(self.step_count, jsd, measured & self._in_active, ~self.frozen)
        self._apply(self._agreed(self.policy.decide(self._context())))

    def _agreed(self, decision: Tensor) -> Tensor:
        return distributed.agreed(decision, self._group)

    # ------------------------------------------------------------------ freezing
    def _apply(self, to_freeze: Tensor) -> None:
        to_freeze = to_freeze & ~self.frozen
        if not bool(to_freeze.any()):
            return
        self.frozen |= to_freeze
        self.frozen_at[to_freeze] = self.step_count
        self._rebuild()

    def _rebuild(self) -> None:
        """Release tensors frozen whole and rebuild the partial-freeze ranges."""
        ranges: Dict[int, List[Tuple[int, int]]] = {}
        newly_whole = []
        for i, p in enumerate(self.params):
            frozen_groups = [g for g in self._tensor_groups[i] if self.frozen[g]]
            covered = sum(e - b for g in frozen_groups for t, b, e in self._group_segments[g]
                          if t == i)
            if frozen_groups and covered == p.numel():
                if i not in self.released:
                    newly_whole.append(i)
            elif frozen_groups:
                # In this rank's coordinates (its shard of the tensor under FSDP2).
                local_ranges = sorted((b, e) for g in frozen_groups
                                      for t, b, e in self._mask_segments[g] if t == i)
                if local_ranges:
                    ranges[i] = _merge(local_ranges)
        for i in newly_whole:
            p = self.params[i]
            p.requires_grad_(False)
            p.grad = None
            self.optimizer.state.pop(p, None)
            self.references[i] = None
            self.released.add(i)
        if newly_whole:
            self.estimator.release(newly_whole)
        for i, rs in ranges.items():
            # Zero the optimizer state of frozen ranges: momentum must not carry over.
            p = self.params[i]
            for v in self.optimizer.state.get(p, {}).values():
                if isinstance(v, Tensor) and v.shape == p.shape:
                    flat = distributed.local(v).view(-1)
                    for b, e in rs:
                        flat[b:e].zero_()
        self._partial = _PartialFreeze(self.params, ranges)
        self._refresh_active()

    def _resolve(self, names: Union[str, Iterable[str]], arg: str) -> Tensor:
        if isinstance(names, str):
            names = [names]
        mask = torch.zeros(self.layout.num_groups, dtype=torch.bool)
        gindex = {n: g for g, n in enumerate(self.layout.names)}
        tindex = {n: i for i, n in enumerate(self.names)}
        for n in names:
            if n in gindex:
                mask[gindex[n]] = True
            elif n in tindex:
                mask[self._tensor_groups[tindex[n]]] = True
            else:
                raise ValueError(f"argument '{arg}': {n!r} is neither a group nor a parameter name")
        return mask

    def freeze(self, names: Union[str, Iterable[str]]) -> None:
        """Freeze groups (by group name) or whole parameters (by parameter name) now."""
        self._apply(self._resolve(names, "names"))

    def unfreeze(self, names: Union[str, Iterable[str]]) -> None:
        """Make frozen groups trainable again; their drift statistics start afresh."""
        mask = self._resolve(names, "names") & self.frozen
        if not bool(mask.any()):
            return
        self.frozen &= ~mask
        self.frozen_at[mask] = -1
        self.tracker.reset(mask)
        back = [i for i in sorted(self.released) if any(mask[g] for g in self._tensor_groups[i])]
        for i in back:
            self.params[i].requires_grad_(True)
            self.released.discard(i)
        if back:
            self.estimator.restore(back)
        self._rebuild()

    # ------------------------------------------------------------------ inspection
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
        part = distributed.local(param)
        mask = torch.zeros(part.numel(), dtype=torch.bool, device=part.device)
        for g in self._tensor_groups[i]:
            if self.frozen[g]:
                for t, b, e in self._mask_segments[g]:
                    if t == i:
                        mask[b:e] = True
        return mask.view(part.shape)

    @property
    def nonfinite(self) -> int:
        """Gradient elements skipped so far for not being finite (reading it synchronises).
        With a sharded Fisher (FSDP2, ``shard_state``) each rank counts its own part."""
        return 0 if self._nonfinite is None else int(self._nonfinite)

    def metrics(self, per_group: bool = False) -> Dict[str, float]:
        """A flat dict for TensorBoard or W&B."""
        t = self.tracker
        active = ~self.frozen
        measured = active & (t.checks > 0)
        out = {
            "adaptune/step": float(self.step_count),
            "adaptune/active_fraction": self.active_fraction,
            "adaptune/frozen_groups": float(self.frozen.sum()),
            "adaptune/active_groups": float(active.sum()),
            "adaptune/mean_drift": float(t.last[measured].mean()) if measured.any() else 0.0,
            "adaptune/max_drift": float(t.last[measured].max()) if measured.any() else 0.0,
            "adaptune/nonfinite": float(self.nonfinite),
        }
        if per_group:
            for g, name in enumerate(self.layout.names):
                out[f"adaptune/drift/{name}"] = float(t.last[g])
        return out

    def summary(self, max_rows: Optional[int] = 40) -> str:
        """A readable table: group, size, drift, score, state."""
        t = self.tracker
        score = t.score(self.policy.score if isinstance(self.policy, PaperPolicy) else "total_variation")
        header = (f"FisherAdapTune: step {self.step_count}, {int((~self.frozen).sum())}/"
                  f"{self.layout.num_groups} groups active, active fraction "
                  f"{self.active_fraction:.3f}, estimator {self.estimator_name}, drift "
                  f"{self.drift_mode}, policy {self.policy}")
        width = min(60, max((len(n) for n in self.layout.names), default=5))
        lines = [header, f"{'group':<{width}} {'size':>10} {'drift':>8} {'jsema':>8} "
                         f"{'score':>8}  state"]
        order = range(self.layout.num_groups)
        rows = list(order) if max_rows is None else list(order)[:max_rows]
        for g in rows:
            name = self.layout.names[g]
            name = name if len(name) <= width else "…" + name[-(width - 1):]
            state = f"frozen@{int(self.frozen_at[g])}" if self.frozen[g] else "active"
            lines.append(f"{name:<{width}} {int(self.layout.group_sizes[g]):>10} "
                         f"{float(t.last[g]):>8.4f} {float(t.jsema[g]):>8.4f} "
                         f"{float(score[g]):>8.4f}  {state}")
        if len(rows) < self.layout.num_groups:
            lines.append(f"... {self.layout.num_groups - len(rows)} more groups "
                         "(summary(max_rows=None) lists all)")
        return "\n".join(lines)

    def plot(self, path: str) -> None:
        """Write drift curves and the freeze timeline to ``path`` (needs matplotlib)."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("FisherAdapTune.plot needs matplotlib: pip install matplotlib") from e
        hist = self.tracker.history
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
        if hist:
            steps = [h["step"] for h in hist]
            # The bias-corrected EMA: what Threshold compares with tau.
            drift = torch.stack([torch.where(h["active"], h["drift"], torch.nan) for h in hist]).numpy()
            for g in range(drift.shape[1]):
                ax1.plot(steps, drift[:, g], lw=0.6, alpha=0.5)
            sizes = self.layout.group_sizes.double()
            frac = [float(sizes[h["active"]].sum() / max(self.total_elements, 1)) for h in hist]
            ax2.step(steps, frac, where="post", label="active fraction")
        ax1.set_ylabel("smoothed JS drift (bias-corrected jsema)")
        ax1.set_title("Fisher drift per group")
        if isinstance(self.policy, Threshold):
            ax1.axhline(self.policy.tau, color="k", ls="--", lw=0.8, label="tau")
            ax1.legend(loc="upper right")
        frozen_steps = self.frozen_at[self.frozen].tolist()
        if frozen_steps:
            ax2.hist(frozen_steps, bins=min(30, len(set(frozen_steps)) + 1), alpha=0.3,
                     weights=[1.0 / self.layout.num_groups] * len(frozen_steps),
                     label="groups frozen (fraction)")
        ax2.set_xlabel("step")
        ax2.set_ylabel("fraction")
        ax2.set_ylim(0, 1.05)
        if ax2.get_legend_handles_labels()[0]:  # nothing to label before the first check
            ax2.legend(loc="upper right")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    # ------------------------------------------------------------------ checkpointing
    def _meta(self) -> dict:
        """Everything but the per-tensor Fisher and reference buffers."""
        est = self.estimator.state_dict()
        if isinstance(self.estimator, fisher_mod.EmpiricalFisher):
            est = {k: v for k, v in est.items() if k != "fisher"}  # travels as buffers
        return {
            "names": list(self.names),
            "group_names": list(self.layout.names),
            "step": self.step_count,
            "frozen": self.frozen.clone(),
            "frozen_at": self.frozen_at.clone(),
            "estimator": est,
            "tracker": self.tracker.state_dict(),
            "policy": self.policy.state_dict(),
            "nonfinite": self.nonfinite,
            "shards": self._shard_key(),
        }

    def _shard_key(self) -> Optional[dict]:
        """Which part of each tensor this rank's buffers hold (None: all of it)."""
        if self.sharding is None:
            return None
        return {"world": int(self.sharding.mesh.size()),
                "rank": int(self.sharding.mesh.get_local_rank()),
                "offsets": list(self.sharding.offsets)}

    def _adopt(self, i: int, value: Optional[Tensor], full: bool) -> Optional[Tensor]:
        """A saved Fisher or reference buffer of tensor ``i`` as this rank's part of it: a
        DTensor is resharded, a ``full`` (global-shaped) buffer sliced, and a shard kept."""
        if value is None:
            return None
        if distributed.is_dtensor(value):
            return value.full_tensor() if self.sharding is None else self.sharding.to_local(i, value)
        want = self.params[i].shape if full else self._part(i, self.params[i].detach()).shape
        if value.shape != want:
            raise ValueError(f"argument 'state_dict': the buffer of {self.names[i]!r} has "
                             f"shape {tuple(value.shape)}, expected {tuple(want)}")
        return self._part(i, value) if full else value

    def _fisher_buffers(self) -> List[Optional[Tensor]]:
        if isinstance(self.estimator, fisher_mod.EmpiricalFisher):
            return list(self.estimator.fisher)
        return [None] * len(self.params)

    def _check_meta(self, meta: dict) -> None:
        if list(meta["group_names"]) != list(self.layout.names) or list(meta["names"]) != self.names:
            raise ValueError("argument 'state_dict': saved by a FisherAdapTune with other "
                             "parameters or groups")

    def _set_frozen(self, frozen: Tensor) -> None:
        """Make exactly ``frozen`` frozen (groups frozen now but not in it are unfrozen)."""
        thaw = self.frozen & ~frozen
        if bool(thaw.any()):
            self.unfreeze([self.layout.names[g] for g in torch.nonzero(thaw).flatten().tolist()])
        self._apply(frozen.clone())

    def _load(self, meta: dict, fisher: List[Optional[Tensor]],
              references: List[Optional[Tensor]], shards: Optional[dict]) -> None:
        """Restore from ``meta`` and the buffers, which hold the parts of the tensors that
        ``shards`` names (a :meth:`_shard_key`)."""
        self._check_meta(meta)
        # Every buffer is checked before anything changes. Shards pair only with the same rank
        # of the same world: anything else would silently match rows with the wrong ones.
        ours = self._shard_key()
        if shards is not None and shards != ours:
            mine = "unsharded" if ours is None else f"rank {ours['rank']} of {ours['world']}"
            raise ValueError(
                f"argument 'state_dict': holds the Fisher shards of rank {shards['rank']} "
                f"of {shards['world']}, this wrapper is {mine}. Load each rank's own "
                "state_dict, or checkpoint with fisheradaptune.distributed.save / load "
                "(which reshards)")
        fisher = [self._adopt(i, f, shards is None) for i, f in enumerate(fisher)]
        references = [self._adopt(i, r, shards is None) for i, r in enumerate(references)]
        self._set_frozen(meta["frozen"])
        self.frozen_at = meta["frozen_at"].clone()
        self.step_count = int(meta["step"])
        est = dict(meta["estimator"])
        if isinstance(self.estimator, fisher_mod.EmpiricalFisher):
            est["fisher"] = fisher
        self.estimator.load_state_dict(est)
        self.references = [None if (r is None or i in self.released) else
                           r.to(distributed.local(self.params[i]).device).clone()
                           for i, r in enumerate(references)]
        self.tracker.load_state_dict(meta["tracker"])
        self.policy.load_state_dict(meta["policy"])
        self._nonfinite = torch.tensor(int(meta["nonfinite"]), dtype=torch.int64,
                                       device=distributed.local(self.params[0]).device)

    def state_dict(self) -> dict:
        """The wrapped optimizer's state plus Fisher, references, scores, history and the
        frozen set, for ``torch.save``. Under FSDP2, or DDP with ``shard_state``, the Fisher
        and references are this rank's shards: save one file per rank (and load it into the
        same world size), or use :func:`fisheradaptune.distributed.save`."""
        meta = self._meta()
        est = dict(meta.pop("estimator"))
        if isinstance(self.estimator, fisher_mod.EmpiricalFisher):
            est["fisher"] = [None if f is None else f.clone() for f in self._fisher_buffers()]
        meta["estimator"] = est
        meta["references"] = [None if r is None else r.clone() for r in self.references]
        return {"optimizer": self.optimizer.state_dict(), "adaptune": meta}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`; the model's parameter values are loaded separately."""
        a = dict(state_dict["adaptune"])
        self._check_meta(a)
        est = a["estimator"]
        fisher = list(est.get("fisher", [None] * len(self.params)))
        self._load(a, fisher, list(a["references"]), a.get("shards"))
        self.optimizer.load_state_dict(state_dict["optimizer"])

    # The three methods below serve fisheradaptune.distributed.save/load: per-tensor buffers are
    # keyed by parameter name (DTensors under FSDP2, so DCP saves each shard once and can
    # reshard), the rest travels as one opaque item.
    def distributed_state_dict(self) -> dict:
        """This wrapper's state (not the wrapped optimizer's) for ``torch.distributed.checkpoint``."""
        def named(buffers):
            return {self.names[i]: self._global(i, b) for i, b in enumerate(buffers)
                    if b is not None}
        meta = self._meta()
        meta["has_fisher"] = [b is not None for b in self._fisher_buffers()]
        meta["has_reference"] = [r is not None for r in self.references]
        return {"meta": distributed._pack(meta), "fisher": named(self._fisher_buffers()),
                "reference": named(self.references)}

    def distributed_template(self, packed_meta: bytes) -> dict:
        """Apply the saved frozen set, and return a template shaped like the saved
        :meth:`distributed_state_dict` for DCP to fill."""
        meta = distributed._unpack(packed_meta)
        self._check_meta(meta)
        self._set_frozen(meta["frozen"])

        def zeros(flags):
            out = {}
            for i, present in enumerate(flags):
                if present:
                    part = self._part(i, self.params[i].detach())
                    out[self.names[i]] = self._global(
                        i, torch.zeros(part.shape, dtype=torch.float32, device=part.device))
            return out
        return {"meta": b"", "fisher": zeros(meta["has_fisher"]),
                "reference": zeros(meta["has_reference"])}

    def load_distributed_state_dict(self, state: dict) -> None:
        """Restore what :meth:`distributed_state_dict` gave (after DCP filled a template)."""
        meta = distributed._unpack(state["meta"])

        def buffers(named):
            return [None if n not in named else self._local(i, named[n])
                    for i, n in enumerate(self.names)]
        # The buffers were read into this wrapper's own template: they are its parts.
        self._load(meta, buffers(state["fisher"]), buffers(state["reference"]),
                   self._shard_key())

    def _part(self, i: int, t: Optional[Tensor]) -> Optional[Tensor]:
        """The part of parameter ``i`` (or of its gradient) that this rank's Fisher covers."""
        if t is None or self.sharding is None:
            return t
        return self.sharding.to_local(i, t)

    def _global(self, i: int, buffer: Tensor) -> Tensor:
        return buffer if self.sharding is None else self.sharding.to_global(i, buffer)

    def _local(self, i: int, value: Tensor) -> Tensor:
        return value if self.sharding is None else self.sharding.to_local(i, value)

    def __repr__(self) -> str:
        return (f"FisherAdapTune({type(self.optimizer).__name__}, {self.layout}, "
                f"active_fraction={self.active_fraction:.3f}, policy={self.policy})")


def _merge(ranges: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    out: List[List[int]] = []
    for b, e in ranges:
        if out and out[-1][1] == b:
            out[-1][1] = e
        else:
            out.append([b, e])
    return [(b, e) for b, e in out]
