"""Shared timing, environment and reporting utilities for every benchmark of the project.

Conventions (used by all ``bench_*.py`` scripts):

- Times are wall time per call in milliseconds, reported as the median and the inter-quartile
  range (IQR = q75 - q25) of ``iters`` timed calls after ``warmup`` untimed ones.
- On CUDA each call is bracketed by CUDA events recorded on the current stream, with a
  ``torch.cuda.synchronize()`` before the first call and after each call, so one call's time is
  what a training step would wait for it: GPU time plus any host launch overhead that the GPU
  sits idle through. On CPU each call is timed with ``time.perf_counter``.
- Bandwidths are in bytes per second (reported as GB/s = 1e9 B/s): bytes read + bytes written.
- Results go to ``benchmarks/results/<name>-<device_kind>.json`` and ``.md``, where
  ``device_kind`` is ``cpu`` or ``cuda``, with the environment (device, torch, commit) attached.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence

import torch

__all__ = ["Timing", "timeit", "d2d_copy_bandwidth", "environment", "write_results",
           "print_table", "format_value", "device_kind", "RESULTS_DIR", "REPO_ROOT"]

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


class Timing(NamedTuple):
    """Result of :func:`timeit`. All times in milliseconds."""

    median_ms: float
    iqr_ms: float
    min_ms: float
    iters: int  # calls actually timed (fewer than asked when ``max_seconds`` cut it short)
    # CPU only: median process CPU time per call (all threads, spin-waits included). On one
    # thread it excludes time the OS gave to other processes, so it stays meaningful on a
    # shared, busy machine where wall time does not. None on CUDA.
    cpu_ms: Optional[float] = None


def device_kind(device: Any) -> str:
    """``"cuda"`` for a CUDA device, else ``"cpu"``."""
    return "cuda" if torch.device(device).type == "cuda" else "cpu"


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    # numpy's default (linear) interpolation, without needing numpy here.
    n = len(sorted_vals)
    h = (n - 1) * q
    i = math.floor(h)
    if i + 1 >= n:
        return sorted_vals[-1]
    return sorted_vals[i] + (sorted_vals[i + 1] - sorted_vals[i]) * (h - i)


def timeit(fn: Callable[[], Any], *, warmup: int, iters: int, device: Any,
           max_seconds: Optional[float] = None, min_iters: int = 3) -> Timing:
    """Time ``fn()`` and return the median and IQR of the per-call wall times in ms.

    ``warmup`` untimed calls, then up to ``iters`` timed ones. With ``max_seconds``, timing stops
    early once at least ``min_iters`` calls were timed and ``max_seconds`` of wall time have
    passed since the first timed call (so slow host baselines keep the whole run short; the
    number of calls actually timed is returned in ``Timing.iters``). On CPU the median process
    CPU time per call is returned too (``Timing.cpu_ms``).
    """
    if iters < 1:
        raise ValueError(f"argument 'iters': expected >= 1, got {iters}")
    cuda = device_kind(device) == "cuda"
    times: List[float] = []
    if cuda:
        # Events are recorded on the current stream of `device` (where `fn` launches its work).
        with torch.cuda.device(torch.device(device)):
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()
            start_ev = torch.cuda.Event(enable_timing=True)
            end_ev = torch.cuda.Event(enable_timing=True)
            t_begin = time.perf_counter()
            for i in range(iters):
                start_ev.record()
                fn()
                end_ev.record()
                torch.cuda.synchronize()
                times.append(start_ev.elapsed_time(end_ev))
                if max_seconds is not None and i + 1 >= min_iters and \
                        time.perf_counter() - t_begin > max_seconds:
                    break
    else:
        for _ in range(warmup):
            fn()
        cpu_times: List[float] = []
        t_begin = time.perf_counter()
        for i in range(iters):
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            t1, c1 = time.perf_counter(), time.process_time()
            times.append((t1 - t0) * 1e3)
            cpu_times.append((c1 - c0) * 1e3)
            if max_seconds is not None and i + 1 >= min_iters and t1 - t_begin > max_seconds:
                break
    s = sorted(times)
    cpu_ms = None if cuda else _quantile(sorted(cpu_times), 0.5)
    return Timing(median_ms=_quantile(s, 0.5), iqr_ms=_quantile(s, 0.75) - _quantile(s, 0.25),
                  min_ms=s[0], iters=len(s), cpu_ms=cpu_ms)


def d2d_copy_bandwidth(nbytes: int, device: Any, *, warmup: int = 3, iters: int = 20) -> float:
    """Bandwidth of a same-device copy ``dst.copy_(src)`` of ``nbytes`` bytes, in bytes/second.

    Counts bytes read + bytes written (``2 * nbytes`` per copy), the same accounting the
    benchmarks use for their kernels, so ``kernel_bandwidth / d2d_copy_bandwidth`` is the
    fraction of the attainable streaming bandwidth a kernel reaches. Meant for CUDA (device-to-
    device); on CPU it measures a host memcpy through ``torch`` with the current thread count,
    which is only a rough reference.
    """
    nbytes = int(nbytes)
    if nbytes <= 0:
        raise ValueError(f"argument 'nbytes': expected > 0, got {nbytes}")
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), warmup=warmup, iters=iters, device=device)
    del src, dst
    return 2.0 * n * 4 / (t.median_ms * 1e-3)


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    # Only trailing whitespace: porcelain lines start with a status column that may be a space.
    return out.stdout.rstrip() if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: Any = "cpu") -> Dict[str, Any]:
    """What the numbers depend on: device, versions, threads, commit (and whether it is dirty).

    ``dirty`` ignores ``benchmarks/results`` (which the run itself writes); ``dirty_paths`` lists
    what else differs from the commit, so a reader can tell what was actually measured.
    """
    device = torch.device(device)
    kind = device_kind(device)
    env: Dict[str, Any] = {
        "device": str(device),
        "device_kind": kind,
        "device_name": _cpu_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        # Other processes on the machine skew CPU timings (and multi-thread ones badly).
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    try:
        import numpy
        env["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover
        env["numpy"] = None
    if kind == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["cpu_name"] = _cpu_name()
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["device_memory_gib"] = round(props.total_memory / 2**30, 1)
    try:
        import fisheradaptune
        env["fisheradaptune"] = fisheradaptune.__version__
        env["has_cuda_kernels"] = bool(fisheradaptune.has_cuda_kernels())
        # The compiled library may predate HEAD (the package is often installed editable).
        so = next(Path(fisheradaptune.__file__).parent.glob("_C*.so"), None)
        if so is not None:
            env["extension_built"] = _dt.datetime.fromtimestamp(
                so.stat().st_mtime, _dt.timezone.utc).replace(microsecond=0).isoformat()
    except Exception as e:  # pragma: no cover - report, do not fail the environment dump
        env["fisheradaptune"] = f"import failed: {e}"
    env["commit"] = _git("rev-parse", "--short", "HEAD")
    status = _git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    env["dirty"] = None if status is None else bool(status)
    if status:
        env["dirty_paths"] = [line[3:] for line in status.splitlines()][:20]
    env["date"] = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    return env


def timing_fields(t: Timing) -> Dict[str, Any]:
    """A result row's timing columns: ms, iqr_ms, iters and, on CPU, cpu_ms."""
    row: Dict[str, Any] = {"ms": t.median_ms, "iqr_ms": t.iqr_ms, "iters": t.iters}
    if t.cpu_ms is not None:
        row["cpu_ms"] = t.cpu_ms
    return row


def set_speedup(row: Dict[str, Any], base: Timing, key: str = "op_speedup") -> None:
    """``row[key]`` = row's ms / ``base``'s (above 1: ``base`` is faster), and ``cpu_speedup``,
    the same ratio of process CPU times, where both have one."""
    row[key] = row["ms"] / base.median_ms
    if base.cpu_ms is not None and "cpu_ms" in row:
        row["cpu_speedup"] = row["cpu_ms"] / base.cpu_ms


def announce(env: Dict[str, Any], device: Any) -> None:
    """Print the run's environment in one line (and a warning when a loaded CPU makes wall
    times unreliable)."""
    print(f"device {env['device_name']} ({device}), torch {env['torch']}, threads "
          f"{env['threads']}/{env['cpu_count']}, commit {env['commit']}"
          f"{' (dirty)' if env['dirty'] else ''}, load {env['loadavg_1m']}")
    if device_kind(device) == "cpu" and (env.get("loadavg_1m") or 0) > 2:
        print("WARNING: load average above 2: CPU timings are unreliable; trust cpu_speedup")


def format_value(v: Any) -> str:
    """Compact, column-friendly rendering: 3 significant digits for floats."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:.0f}"
        if a >= 1e-3:
            return f"{v:.3g}" if a < 100 else f"{v:.1f}"
        return f"{v:.2e}"
    return str(v)


def _columns(rows: Sequence[Dict[str, Any]], columns: Optional[Sequence[str]]) -> List[str]:
    if columns is not None:
        return list(columns)
    seen: Dict[str, None] = {}
    for r in rows:
        for k in r:
            if k != "table":
                seen.setdefault(k, None)
    return list(seen)


def _render(rows: Sequence[Dict[str, Any]], columns: Sequence[str]) -> List[List[str]]:
    return [[format_value(r.get(c)) for c in columns] for r in rows]


def print_table(rows: Sequence[Dict[str, Any]], columns: Optional[Sequence[str]] = None,
                title: Optional[str] = None) -> None:
    """Print ``rows`` (dicts) as an aligned text table of ``columns`` (default: all keys)."""
    columns = _columns(rows, columns)
    cells = _render(rows, columns)
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    if title:
        print(f"\n== {title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


def _markdown_table(rows: Sequence[Dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in _render(rows, columns):
        lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines)


def _tables(rows: Sequence[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    """Rows grouped by their optional ``"table"`` key, in order of first appearance."""
    out: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(str(r.get("table", "results")), []).append(r)
    return out


def write_results(name: str, rows: Sequence[Dict[str, Any]], env: Dict[str, Any], *,
                  notes: Iterable[str] = (), columns: Optional[Dict[str, Sequence[str]]] = None,
                  ) -> Dict[str, Path]:
    """Write ``benchmarks/results/<name>-<device_kind>.json`` and a markdown summary ``.md``.

    ``rows`` are flat dicts; a row's optional ``"table"`` key puts it in a separate markdown
    table of that title (the JSON keeps every row as given). ``columns`` optionally maps a table
    title to the columns it shows. ``notes`` are free-text lines printed under the tables.
    Returns the two paths.
    """
    kind = env.get("device_kind", "cpu")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS_DIR / f"{name}-{kind}.json"
    md_path = RESULTS_DIR / f"{name}-{kind}.md"
    notes = list(notes)
    with open(json_path, "w") as f:
        json.dump({"name": name, "env": env, "notes": notes, "rows": list(rows)}, f, indent=1,
                  default=str)
        f.write("\n")
    md = [f"# {name} ({kind})", ""]
    for k, v in env.items():
        md.append(f"- **{k}**: {', '.join(map(str, v)) if isinstance(v, list) else v}")
    for title, trows in _tables(rows).items():
        cols = (columns or {}).get(title) or _columns(trows, None)
        md += ["", f"## {title}", "", _markdown_table(trows, cols)]
    if notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    with open(md_path, "w") as f:
        f.write("\n".join(md) + "\n")
    return {"json": json_path, "md": md_path}
