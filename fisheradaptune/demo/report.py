"""The demo's report: the mean ± std table over seeds and the transfer-against-ID plot."""
from __future__ import annotations

import statistics
from typing import Dict, List, Sequence, Tuple

__all__ = ["fmt", "table", "plot_transfer_vs_id"]

#: The digits task's score columns: (header, result key).
_DIGITS_COLUMNS = (("ID acc %", "id_acc"), ("transfer acc %", "transfer_acc"))


def fmt(values: List[float], scale: float = 1.0, digits: int = 1) -> str:
    v = [x * scale for x in values]
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.mean(v):.{digits}f} ± {sd:.{digits}f}"


def _score(r: dict, key: str) -> float:
    """A result's score by key: top-level, or ``transfer.<shift>``."""
    if key.startswith("transfer."):
        return r["transfer"][key.split(".", 1)[1]]
    return r[key]


def table(results: Dict[str, List[dict]], total_params: int,
          columns: Sequence[Tuple[str, str]] = _DIGITS_COLUMNS) -> str:
    """Markdown table, one row per method. ``columns``: (header, key) of the task's scores,
    shown in percent, except headers without ``%``, shown as they are with 3 decimals (e.g.
    a cosine similarity); then active params, time and memory."""
    rows = [("method",) + tuple(h for h, _ in columns) + ("active params", "time s", "memory MiB")]
    for m, rs in results.items():
        active = statistics.mean(r["active_params"] for r in rs)
        scores = tuple(fmt([_score(r, k) for r in rs], 100) if "%" in h else
                       fmt([_score(r, k) for r in rs], 1, 3) for h, k in columns)
        rows.append((m,) + scores + (f"{active:,.0f} ({100 * active / total_params:.1f}%)",
                                     fmt([r["seconds"] for r in rs]),
                                     fmt([r["memory_bytes"] for r in rs], 2 ** -20, 2)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] +
                     [line(r) for r in rows[1:]])


def plot_transfer_vs_id(results: Dict[str, List[dict]], path: str, title: str = "",
                        extra: Sequence[Tuple[str, str]] = ()) -> None:
    """One panel per transfer shift, and one per ``extra`` (header, key) score: each method's
    mean score against its mean ID accuracy, with ± std bars over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shifts = list(next(iter(results.values()))[0]["transfer"])
    panels = [(f"{s} accuracy %", f"transfer.{s}", 100.0) for s in shifts] + \
        [(h, k, 1.0) for h, k in extra]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), squeeze=False)
    markers = "osD^vP*Xhp<>"
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    for ax, (label, key, scale) in zip(axes[0], panels):
        for i, (m, rs) in enumerate(results.items()):
            xs = [100 * r["id_acc"] for r in rs]
            ys = [scale * _score(r, key) for r in rs]
            ax.errorbar(statistics.mean(xs), statistics.mean(ys), xerr=sd(xs), yerr=sd(ys),
                        fmt=markers[i % len(markers)], capsize=2, label=m)
        ax.set_xlabel("ID accuracy %")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
