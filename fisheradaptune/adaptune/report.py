"""What FisherAdapTune reports: flat metrics for loggers, a summary table, a drift plot.

Everything policy-specific (the score column, the levels drawn on the plot) comes from the
policy's :meth:`~fisheradaptune.adaptune.Policy.group_scores` and
:meth:`~fisheradaptune.adaptune.Policy.thresholds`, so user-defined policies report too.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .optimizer import FisherAdapTune

__all__ = ["metrics", "summary", "plot", "buffer_bytes"]


def buffer_bytes(opt: "FisherAdapTune") -> int:
    """Bytes of the Fisher buffers (what the estimator exposes through ``buffers()``; K-FAC's
    factors are not among them) and the drift references that ``opt`` holds now: this rank's
    parts when sharded, released tensors' freed buffers not counted."""
    held = [t for t in list(opt.estimator.buffers()) + list(opt.references) if t is not None]
    return sum(t.numel() * t.element_size() for t in held)


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.2f} MiB"


def metrics(opt: "FisherAdapTune", per_group: bool = False) -> Dict[str, float]:
    """A flat dict for TensorBoard or W&B."""
    t = opt.tracker
    frozen = opt.frozen
    active = ~frozen
    measured = active & (t.checks > 0)
    out = {
        "adaptune/step": float(opt.step_count),
        "adaptune/active_fraction": opt.active_fraction,
        "adaptune/frozen_groups": float(frozen.sum()),
        "adaptune/active_groups": float(active.sum()),
        "adaptune/mean_drift": float(t.last[measured].mean()) if measured.any() else 0.0,
        "adaptune/max_drift": float(t.last[measured].max()) if measured.any() else 0.0,
        "adaptune/nonfinite": float(opt.nonfinite),
        "adaptune/buffer_bytes": float(buffer_bytes(opt)),
    }
    if per_group:
        for g, name in enumerate(opt.layout.names):
            out[f"adaptune/drift/{name}"] = float(t.last[g])
    return out


def summary(opt: "FisherAdapTune", max_rows: Optional[int] = 40) -> str:
    """A readable table: group, size, drift, score, state (``undefined`` drift: see
    docs/methods.md section 4)."""
    t = opt.tracker
    layout = opt.layout
    frozen, frozen_at = opt.frozen, opt.frozen_at
    score = opt.policy.group_scores(t)
    header = (f"FisherAdapTune: step {opt.step_count}, {int((~frozen).sum())}/"
              f"{layout.num_groups} groups active, active fraction {opt.active_fraction:.3f}, "
              f"estimator {opt.estimator_name}, drift {opt.drift_mode}, policy {opt.policy}")
    width = min(60, max((len(n) for n in layout.names), default=5))
    dtype = str(opt.fisher_dtype).replace("torch.", "")
    buffers = (f"buffers: Fisher and drift references in {dtype}, "
               f"{_mib(buffer_bytes(opt))} held")
    lines = [header, buffers, f"{'group':<{width}} {'size':>10} {'drift':>8} {'jsema':>8} "
                              f"{'score':>8}  state"]
    rows = list(range(layout.num_groups))
    if max_rows is not None:
        rows = rows[:max_rows]
    for g in rows:
        name = layout.names[g]
        name = name if len(name) <= width else "…" + name[-(width - 1):]
        state = f"frozen@{int(frozen_at[g])}" if frozen[g] else "active"
        if not opt.drift_defined[g]:
            state += " (drift undefined)"
        lines.append(f"{name:<{width}} {int(layout.group_sizes[g]):>10} "
                     f"{float(t.last[g]):>8.4f} {float(t.jsema[g]):>8.4f} "
                     f"{float(score[g]):>8.4f}  {state}")
    if len(rows) < layout.num_groups:
        lines.append(f"... {layout.num_groups - len(rows)} more groups "
                     "(summary(max_rows=None) lists all)")
    return "\n".join(lines)


def plot(opt: "FisherAdapTune", path: str) -> None:
    """Write drift curves and the freeze timeline to ``path`` (needs matplotlib).

    Uses matplotlib's object API with the Agg canvas: pyplot and the global backend are left
    alone, so this is safe in notebooks and GUI sessions.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("FisherAdapTune.plot needs matplotlib: pip install matplotlib") from e
    layout = opt.layout
    hist = opt.tracker.history
    fig = Figure(figsize=(9, 7))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    if hist:
        steps = [h["step"] for h in hist]
        # The bias-corrected EMA: what Threshold compares with tau.
        drift = torch.stack([torch.where(h["active"], h["drift"], torch.nan) for h in hist]).numpy()
        for g in range(drift.shape[1]):
            ax1.plot(steps, drift[:, g], lw=0.6, alpha=0.5)
        sizes = layout.group_sizes.double()
        frac = [float(sizes[h["active"]].sum() / max(opt.total_elements, 1)) for h in hist]
        ax2.step(steps, frac, where="post", label="active fraction")
    ax1.set_ylabel("smoothed JS drift (bias-corrected jsema)")
    ax1.set_title("Fisher drift per group")
    levels = opt.policy.thresholds()
    for k, (label, level) in enumerate(levels.items()):
        ax1.axhline(level, color="k", ls=("--", ":", "-.")[k % 3], lw=0.8, label=label)
    if levels:
        ax1.legend(loc="upper right")
    frozen_steps = opt.frozen_at[opt.frozen].tolist()
    if frozen_steps:
        ax2.hist(frozen_steps, bins=min(30, len(set(frozen_steps)) + 1), alpha=0.3,
                 weights=[1.0 / layout.num_groups] * len(frozen_steps),
                 label="groups frozen (fraction)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("fraction")
    ax2.set_ylim(0, 1.05)
    if ax2.get_legend_handles_labels()[0]:  # nothing to label before the first check
        ax2.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
