#!/usr/bin/env python3
"""CPU kernels before and after the stable-ABI port, in one run on one machine.

    python benchmarks/bench_stable_abi.py --before DIR [--after DIR] [--rounds 3]
                                          [--max-load 3] [--wait-until HH:MM]

``--before`` and ``--after`` are source trees whose ``fisheradaptune`` package holds a built
``_C*.so`` (before: the classic libtorch build, ``_C.cpython-*.so``; after: the stable-ABI
build, ``_C.abi3.so``; default ``--after``: this checkout). Each child process gets one of them
first on ``PYTHONPATH`` with ``OMP_NUM_THREADS=1`` and checks, before timing anything, that
``fisheradaptune._loader.compiled_module().__file__`` is that tree's library (printed).

Every round runs, in ONE process per (library, benchmark) pair, ``bench_fisher.py`` (ViT-S,
20 calls, no thread sweep, 2 s per case), ``bench_tokens.py`` (no end to end, 20 calls, 1
thread) and ``bench_tome.py`` (the op table, 20 calls, 1 thread), and a micro benchmark of the
fixed per-call cost of one tiny call of each op. The order of the two libraries alternates
from round to round (before/after, after/before, ...), so a drift in the machine's load hits
both alike. The same benchmark scripts (this checkout's, copied into a scratch folder so that
nothing under benchmarks/results/ is overwritten) time both libraries; each run's own JSON and
log are kept in the scratch folder.

Metric: process CPU time per call (the benchmarks' ``cpu_ms``; on one thread it excludes the
time the OS gave to other processes, which wall time on this shared machine does not), the
median over rounds of each round's median. Rows that do not call the library (the eager, NumPy,
loop and ``_foreach`` baselines) are the control: their after/before ratios show the noise of
the run, against which the op rows' ratios are judged.

Results: ``benchmarks/results/bench_stable_abi-cpu.{json,md}``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

#: benchmark script -> its quickest honest arguments on this CPU (enough calls for a median of
#: the op rows, every shape of the op table; no end to end, no thread sweep: 1 thread).
BENCHES: Dict[str, List[str]] = {
    "bench_fisher": ["--models", "vit_s", "--iters", "20", "--no-thread-sweep",
                     "--max-seconds", "2"],
    "bench_tokens": ["--no-e2e", "--iters", "20", "--threads", "1"],
    "bench_tome": ["--iters", "20", "--threads", "1"],
}

#: Fields of a benchmark row that are measurements, not part of what identifies the case.
_MEASURES = {"ms", "iqr_ms", "iters", "cpu_ms", "GB/s", "copy_frac", "fused_speedup",
             "cpu_speedup", "op_speedup", "max_abs_diff", "mean_jsd", "dest_agree"}


# ---------------------------------------------------------------------------------------------
# Children (run with one library first on PYTHONPATH)


def _check_library(pkg_root: str) -> str:
    """The loaded compiled library's path; exits when it is not ``pkg_root``'s."""
    import fisheradaptune  # noqa: F401  (loads the operators)
    from fisheradaptune import _loader
    mod = _loader.compiled_module()
    if mod is None:
        sys.exit(f"child: no compiled library loaded (fallback: {_loader.fallback_reason()})")
    so = os.path.realpath(mod.__file__)
    want = os.path.realpath(os.path.join(pkg_root, "fisheradaptune"))
    print(f"LIBRARY {so}", flush=True)
    if os.path.dirname(so) != want:
        sys.exit(f"child: loaded {so}, expected a library in {want}")
    return so


def _micro_cases():
    """(name, raw call, wrapper call) of one tiny call of each op."""
    import torch
    import fisheradaptune
    from fisheradaptune import groups, ops
    T = torch.ops.fisheradaptune
    g = torch.Generator().manual_seed(0)
    # fisher_accumulate_ / js_drift: 3 tensors of 64 elements, one group per tensor.
    shapes = [(64,), (8, 8), (4, 16)]
    F = [torch.rand(s, generator=g) for s in shapes]
    G = [torch.randn(s, generator=g) for s in shapes]
    R = [torch.rand(s, generator=g) + 0.1 for s in shapes]
    C = [torch.rand(s, generator=g) + 0.1 for s in shapes]
    layout = groups.per_tensor([(f"p{i}", t) for i, t in enumerate(F)])
    seg, ng = layout.segments, layout.num_groups
    sums = torch.empty(ng, dtype=torch.float32)
    nonfinite = torch.zeros((), dtype=torch.int64)
    # token_prune_merge / bipartite_merge: B=1, N=17, C=8, one protected token.
    x = torch.randn(1, 17, 8, generator=g)
    scores = torch.rand(1, 16, generator=g)
    metric = torch.randn(1, 17, 8, generator=g)
    # sampled_grad: T=8, 64x64, C=4.
    go = torch.randn(8, 64, generator=g)
    xs = torch.randn(8, 64, generator=g)
    index = torch.randint(0, 64, (64, 4), generator=g)
    # per_sample_grad_sq_: N=2, T=4, 16x16.
    fs = torch.zeros(16, 16)
    px = torch.randn(2, 4, 16, generator=g)
    pg = torch.randn(2, 4, 16, generator=g)
    nf2 = torch.zeros((), dtype=torch.int64)
    return [
        ("fisher_accumulate_ (3 x 64)",
         lambda: T.fisher_accumulate_(F, G, 0.9, 0.1, seg, sums, nonfinite),
         lambda: ops.fisher_accumulate_(F, G, decay=0.9, scale=0.1, layout=layout)),
        ("js_drift mass (3 x 64)",
         lambda: T.js_drift(C, R, seg, ng, "mass", 64, 0.01, 0.99, 1e-3, False, None),
         lambda: ops.js_drift(C, R, layout, drift_mode="mass")),
        ("token_prune_merge (1x17x8, keep 11)",
         lambda: T.token_prune_merge(x, scores, None, 1, 11, True),
         lambda: ops.token_prune_merge(x, scores, 11, num_protected=1)),
        ("bipartite_merge (1x17x8, r 4)",
         lambda: T.bipartite_merge(x, metric, None, 1, 4),
         lambda: ops.bipartite_merge(x, metric, 4, num_protected=1)),
        ("sampled_grad (T 8, 64x64, C 4)",
         lambda: T.sampled_grad(go, xs, index),
         lambda: ops.sampled_grad(go, xs, index)),
        ("per_sample_grad_sq_ (N 2, T 4, 16x16)",
         lambda: T.per_sample_grad_sq_(fs, px, pg, 1.0, nf2),
         lambda: ops.per_sample_grad_sq_(fs, px, pg, scale=1.0)),
    ]


def _per_call_us(fn, calls: int = 200, batches: int = 31, warmup: int = 200) -> Dict[str, float]:
    """Median over ``batches`` batches of ``calls`` calls of the per-call process CPU time and
    wall time, in microseconds."""
    for _ in range(warmup):
        fn()
    cpu, wall = [], []
    gc.disable()
    try:
        for _ in range(batches):
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(calls):
                fn()
            t1, c1 = time.perf_counter(), time.process_time()
            cpu.append((c1 - c0) / calls * 1e6)
            wall.append((t1 - t0) / calls * 1e6)
    finally:
        gc.enable()
    return {"cpu_us": statistics.median(cpu), "wall_us": statistics.median(wall),
            "cpu_us_min": min(cpu)}


def child_micro(pkg_root: str, out: str) -> None:
    import torch
    torch.set_num_threads(1)
    so = _check_library(pkg_root)
    rows = []
    for name, raw, wrapped in _micro_cases():
        r = _per_call_us(raw)
        w = _per_call_us(wrapped)
        rows.append({"op": name, "raw_cpu_us": r["cpu_us"], "raw_wall_us": r["wall_us"],
                     "wrapper_cpu_us": w["cpu_us"], "wrapper_wall_us": w["wall_us"]})
        print(f"  {name:40s} raw {r['cpu_us']:8.2f} us  wrapper {w['cpu_us']:8.2f} us",
              flush=True)
    with open(out, "w") as f:
        json.dump({"library": so, "torch": torch.__version__, "rows": rows}, f, indent=1)


def child_bench(pkg_root: str, script: str, args: Sequence[str]) -> None:
    import runpy
    _check_library(pkg_root)
    # As `python script` would: its folder first on sys.path (bench_fisher imports `common`
    # from there), not this driver's folder, whose results/ is the repository's.
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


# ---------------------------------------------------------------------------------------------
# Driver


def _git(tree: Path, *args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _library_of(tree: Path) -> Path:
    libs = sorted((tree / "fisheradaptune").glob("_C*.so"))
    if len(libs) != 1:
        sys.exit(f"{tree}/fisheradaptune: expected one built _C*.so, found "
                 f"{[p.name for p in libs]}")
    return libs[0]


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _wait_for_quiet(max_load: float, until: Optional[_dt.datetime]) -> None:
    """Sleep a minute at a time while the 1-minute load is above ``max_load``, up to ``until``."""
    while _load() > max_load and until is not None and _dt.datetime.now(_dt.timezone.utc) < until:
        print(f"load {_load()} > {max_load}: waiting a minute", flush=True)
        time.sleep(60)


def _run_child(tag: str, tree: Path, argv: List[str], log: Path) -> Dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("FISHERADAPTUNE_FALLBACK", None)
    load = _load()
    c0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], env=env,
                              cwd=str(log.parent), stdout=f, stderr=subprocess.STDOUT)
    secs = time.perf_counter() - c0
    text = log.read_text()
    lib = next((ln.split(" ", 1)[1] for ln in text.splitlines() if ln.startswith("LIBRARY ")),
               None)
    print(f"  {tag}: rc {proc.returncode}, {secs:.0f} s, load {load}, library {lib}", flush=True)
    if proc.returncode != 0:
        sys.exit(f"{tag} failed; see {log}:\n{text[-3000:]}")
    return {"load_1m": load, "seconds": round(secs, 1), "library": lib}


def _case_key(row: Dict[str, Any]) -> Tuple[Tuple[str, Any], ...]:
    return tuple((k, v) for k, v in row.items() if k not in _MEASURES)


def _is_op(row: Dict[str, Any]) -> bool:
    return row.get("variant") in ("fused", "op") or row.get("impl") == "fused"


def _case_name(bench: str, row: Dict[str, Any]) -> str:
    r = row
    if bench == "bench_fisher" and r["table"] == "fisher_accumulate_":
        return f"fisher_accumulate_ {r['model']} {r['grads']} {r['variant']}"
    if bench == "bench_fisher":
        return f"js_drift {r['model']} {r['mode']} {r['impl']}"
    if bench == "bench_tokens":
        return f"token_prune_merge B{r['B']} {r['variant']} {r['pass']}"
    return f"bipartite_merge B{r['B']} C{r['C']} {r['variant']} {r['pass']}"


def _median(v: Sequence[float]) -> float:
    return statistics.median(v)


def summarise(runs: Dict[str, Dict[str, List[dict]]], micro: Dict[str, List[dict]]
              ) -> Dict[str, Any]:
    """``runs[bench][lib]``: each round's rows; ``micro[lib]``: each round's micro rows."""
    cases: List[dict] = []
    for bench, by_lib in runs.items():
        per: Dict[Tuple, Dict[str, Any]] = {}
        for lib, rounds in by_lib.items():
            for rows in rounds:
                for r in rows:
                    if r.get("cpu_ms") is None:
                        continue
                    k = _case_key(r)
                    c = per.setdefault(k, {"benchmark": bench, "case": _case_name(bench, r),
                                           "role": "op" if _is_op(r) else "control",
                                           "before": [], "after": [],
                                           "before_wall": [], "after_wall": []})
                    c[lib].append(r["cpu_ms"])
                    c[lib + "_wall"].append(r["ms"])
        for c in per.values():
            if not c["before"] or not c["after"]:
                continue
            c["before_ms"], c["after_ms"] = _median(c["before"]), _median(c["after"])
            c["ratio"] = c["after_ms"] / c["before_ms"]
            c["wall_ratio"] = _median(c["after_wall"]) / _median(c["before_wall"])
            cases.append(c)
    # Noise band of each benchmark: the 90th percentile of |log ratio| of its control rows
    # (cases that never call the library, so any difference is the machine's).
    bands: Dict[str, Dict[str, float]] = {}
    for bench in runs:
        ctl = sorted(abs(math.log(c["ratio"])) for c in cases
                     if c["benchmark"] == bench and c["role"] == "control")
        ratios = [c["ratio"] for c in cases if c["benchmark"] == bench and c["role"] == "control"]
        if ctl:
            p90 = ctl[min(len(ctl) - 1, int(math.ceil(0.9 * len(ctl))) - 1)]
            bands[bench] = {"controls": len(ctl), "median_ratio": _median(ratios),
                            "min_ratio": min(ratios), "max_ratio": max(ratios),
                            "band": math.exp(p90) - 1}
    for c in cases:
        band = bands.get(c["benchmark"], {}).get("band", 0.0)
        # Slower beyond noise: the ratio is outside the controls' band AND every after round is
        # slower than every before round.
        c["beyond_noise"] = (c["ratio"] > 1 + band and min(c["after"]) > max(c["before"]))
        c["faster_beyond_noise"] = (c["ratio"] < 1 / (1 + band)
                                    and max(c["after"]) < min(c["before"]))
    mrows = []
    if micro.get("before") and micro.get("after"):
        names = [r["op"] for r in micro["before"][0]]
        for name in names:
            row: Dict[str, Any] = {"op": name}
            for lib in ("before", "after"):
                for f in ("raw_cpu_us", "wrapper_cpu_us"):
                    row[f"{lib}_{f}"] = _median([next(r[f] for r in rows if r["op"] == name)
                                                 for rows in micro[lib]])
            row["raw_delta_us"] = row["after_raw_cpu_us"] - row["before_raw_cpu_us"]
            row["wrapper_delta_us"] = row["after_wrapper_cpu_us"] - row["before_wrapper_cpu_us"]
            mrows.append(row)
    return {"cases": cases, "bands": bands, "micro": mrows}


def _f(v: Optional[float], digits: int = 3) -> str:
    if v is None:
        return ""
    a = abs(v)
    if a >= 100:
        return f"{v:.1f}"
    return f"{v:.{digits}g}"


def write_markdown(path: Path, meta: Dict[str, Any], s: Dict[str, Any]) -> None:
    md = ["# bench_stable_abi (cpu): CPU kernels before and after the stable-ABI port", ""]
    for k in ("date", "machine", "cpu_count", "torch", "python", "before", "after", "rounds",
              "order", "threads", "metric", "load_1m_start", "load_1m_children",
              "load_1m_end", "seconds"):
        v = meta.get(k)
        md.append(f"- **{k}**: {', '.join(map(str, v)) if isinstance(v, list) else v}")
    md += ["", "## Op rows (process CPU ms per call, median over rounds)", "",
           "| benchmark | case | before ms | after ms | after/before | before rounds | "
           "after rounds | wall after/before | beyond noise |",
           "|---|---|---|---|---|---|---|---|---|"]
    for c in s["cases"]:
        if c["role"] != "op":
            continue
        verdict = ("slower" if c["beyond_noise"] else
                   "faster" if c["faster_beyond_noise"] else "no")
        md.append(f"| {c['benchmark']} | {c['case']} | {_f(c['before_ms'])} | "
                  f"{_f(c['after_ms'])} | {c['ratio']:.3f} | "
                  f"{' '.join(_f(v) for v in c['before'])} | "
                  f"{' '.join(_f(v) for v in c['after'])} | {c['wall_ratio']:.3f} | {verdict} |")
    md += ["", "## Controls (rows that do not call the library: the run's noise)", "",
           "| benchmark | control rows | median after/before | min | max | noise band (p90) |",
           "|---|---|---|---|---|---|"]
    for bench, b in s["bands"].items():
        md.append(f"| {bench} | {b['controls']} | {b['median_ratio']:.3f} | "
                  f"{b['min_ratio']:.3f} | {b['max_ratio']:.3f} | +-{100 * b['band']:.1f}% |")
    if s["micro"]:
        md += ["", "## Fixed per-call cost (one tiny call, process CPU us per call, median)", "",
               "| op | before raw | after raw | raw delta | before wrapper | after wrapper | "
               "wrapper delta |", "|---|---|---|---|---|---|---|"]
        for r in s["micro"]:
            md.append(f"| {r['op']} | {r['before_raw_cpu_us']:.2f} | {r['after_raw_cpu_us']:.2f}"
                      f" | {r['raw_delta_us']:+.2f} | {r['before_wrapper_cpu_us']:.2f} | "
                      f"{r['after_wrapper_cpu_us']:.2f} | {r['wrapper_delta_us']:+.2f} |")
    md += ["", "## Notes", ""] + [f"- {n}" for n in meta["notes"]]
    path.write_text("\n".join(md) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--before", type=Path, help="tree of the classic build")
    ap.add_argument("--after", type=Path, default=REPO_ROOT, help="tree of the stable-ABI build")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--benches", default=",".join(BENCHES),
                    help=f"comma-separated among {','.join(BENCHES)} (default: all)")
    ap.add_argument("--no-micro", action="store_true")
    ap.add_argument("--max-load", type=float, default=3.0,
                    help="before each round, wait (a minute at a time) while the 1-minute load "
                    "is above this, up to --wait-until")
    ap.add_argument("--wait-until", default=None, help="HH:MM UTC: stop waiting for quiet then")
    ap.add_argument("--scratch", type=Path, default=None,
                    help="folder for the runs' own outputs (default: a new temporary one)")
    ap.add_argument("--name", default="bench_stable_abi",
                    help="results' file name: benchmarks/results/<name>-cpu.{json,md}")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pkg", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    if args.child == "micro":
        child_micro(args.pkg, args.out)
        return 0
    if args.child is not None:
        child_bench(args.pkg, args.child, [a for a in rest if a != "--"])
        return 0
    if rest:
        ap.error(f"unrecognised arguments: {rest}")
    if args.before is None:
        ap.error("--before is required")
    benches = [b.strip() for b in args.benches.split(",") if b.strip()]
    bad = [b for b in benches if b not in BENCHES]
    if bad:
        ap.error(f"--benches: unknown {bad}; expected among {list(BENCHES)}")
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    libs = {lib: _library_of(t) for lib, t in trees.items()}
    until = None
    if args.wait_until:
        hh, mm = map(int, args.wait_until.split(":"))
        until = _dt.datetime.now(_dt.timezone.utc).replace(hour=hh, minute=mm, second=0,
                                                           microsecond=0)
    scratch = (args.scratch or Path(tempfile.mkdtemp(prefix="bench_stable_abi-"))).resolve()
    # The benchmark scripts run from a copy, so their results land in the scratch folder.
    sdir = scratch / "benchmarks"
    (sdir / "results").mkdir(parents=True, exist_ok=True)
    (scratch / "runs").mkdir(exist_ok=True)
    for p in BENCH_DIR.glob("*.py"):
        shutil.copy2(p, sdir / p.name)
    print(f"scratch {scratch}; before {libs['before']}; after {libs['after']}", flush=True)

    import torch
    meta: Dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(),
        "load_1m_start": _load(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            meta["machine"] = next(ln.split(":", 1)[1].strip() for ln in f
                                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    for lib, t in trees.items():
        commit = _git(t, "rev-parse", "--short", "HEAD")
        built = _dt.datetime.fromtimestamp(libs[lib].stat().st_mtime, _dt.timezone.utc)
        meta[lib] = f"{t} @ {commit}: {libs[lib].name} (built {built:%Y-%m-%d %H:%M} UTC)"
    meta["commit"] = _git(REPO_ROOT, "rev-parse", "--short", "HEAD")
    t_start = time.perf_counter()
    runs: Dict[str, Dict[str, List[dict]]] = {b: {"before": [], "after": []} for b in benches}
    micro: Dict[str, List[dict]] = {"before": [], "after": []}
    children: List[dict] = []
    orders = []
    for rnd in range(args.rounds):
        _wait_for_quiet(args.max_load, until)
        order = ["before", "after"] if rnd % 2 == 0 else ["after", "before"]
        orders.append("/".join(order))
        print(f"round {rnd + 1}/{args.rounds}: {' then '.join(order)}", flush=True)
        for bench in benches:
            for lib in order:
                tag = f"r{rnd + 1}-{lib}-{bench}"
                argv_ = ["--child", str(sdir / f"{bench}.py"), "--pkg", str(trees[lib]), "--",
                         *BENCHES[bench]]
                info = _run_child(tag, trees[lib], argv_, scratch / "runs" / f"{tag}.log")
                produced = sdir / "results" / f"{bench}-cpu.json"
                kept = scratch / "runs" / f"{tag}.json"
                shutil.move(str(produced), kept)
                (sdir / "results" / f"{bench}-cpu.md").unlink(missing_ok=True)
                runs[bench][lib].append(json.loads(kept.read_text())["rows"])
                children.append({"run": tag, **info})
        if not args.no_micro:
            for lib in order:
                tag = f"r{rnd + 1}-{lib}-micro"
                out = scratch / "runs" / f"{tag}.json"
                info = _run_child(tag, trees[lib], ["--child", "micro", "--pkg",
                                                    str(trees[lib]), "--out", str(out)],
                                  scratch / "runs" / f"{tag}.log")
                micro[lib].append(json.loads(out.read_text())["rows"])
                children.append({"run": tag, **info})
    meta["load_1m_end"] = _load()
    meta["seconds"] = round(time.perf_counter() - t_start)
    meta["rounds"] = args.rounds
    meta["order"] = orders
    meta["threads"] = "1 (OMP_NUM_THREADS=1; --threads 1 where the benchmark has it)"
    meta["metric"] = ("process CPU time per call (the benchmarks' cpu_ms), median over rounds "
                      "of each run's median; wall-time ratio shown alongside")
    loads = [c["load_1m"] for c in children]
    meta["load_1m_children"] = (f"min {min(loads)}, median {_median(loads):.2f}, max {max(loads)} "
                                f"over {len(loads)} child processes")
    meta["arguments"] = {b: BENCHES[b] for b in benches}
    meta["scratch"] = str(scratch)
    s = summarise(runs, micro)
    meta["notes"] = [
        "One process per (library, benchmark, round); the two libraries alternate in every "
        "round and their order alternates between rounds. Each child checks and prints that "
        "fisheradaptune._loader.compiled_module() is its tree's library.",
        "Both libraries are timed by the same benchmark scripts (this checkout's), each with "
        "its own tree's Python package, so the Python wrappers are each build's own.",
        "Arguments: " + "; ".join(f"{b} {' '.join(a)}" for b, a in meta["arguments"].items()),
        "beyond noise: 'slower' when the after/before ratio exceeds 1 + the benchmark's noise "
        "band (p90 of the control rows' |ratio - 1|, in log terms) AND every after round is "
        "slower than every before round ('faster' the mirror image); 'no' otherwise.",
        "Fixed per-call cost: median over rounds of the median per-call process CPU time of 31 "
        "batches of 200 calls after 200 warm-up calls, one thread, gc off. raw: the "
        "torch.ops.fisheradaptune call (the dispatcher and the kernel's calling path, "
        "where the port changed the boxing); wrapper: the public fisheradaptune.ops function "
        "of each tree (argument checks and output allocation in Python included).",
    ]
    meta["children"] = children
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    jpath = RESULTS_DIR / f"{args.name}-cpu.json"
    mpath = RESULTS_DIR / f"{args.name}-cpu.md"
    with open(jpath, "w") as f:
        json.dump({"name": args.name, "env": meta, **s}, f, indent=1, default=str)
        f.write("\n")
    write_markdown(mpath, meta, s)
    print(mpath.read_text())
    print(f"wrote {jpath} and {mpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
