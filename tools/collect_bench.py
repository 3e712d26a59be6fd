#!/usr/bin/env python3
"""Merge benchmark results into one JSON and one markdown file (tools/gpu_check.sh's bench step).

    python3 tools/collect_bench.py --out OUT/bench [--logs DIR] results/a.json results/b.json ...

``OUT/bench.json`` holds ``{"env": <first result's env>, "parts": {name: result}}``, where each
result is what ``benchmarks/common.write_results`` wrote; a result that is missing (its benchmark
failed or timed out) is recorded with the tail of its log from ``--logs`` instead, so the
failure comes back with the evidence. ``OUT/bench.md`` concatenates the markdown summaries.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional


def _log_tail(logs: Optional[str], name: str, lines: int = 40) -> str:
    if not logs or not os.path.isdir(logs):
        return ""
    key = name.split("-")[0].replace("bench_", "")
    for f in sorted(os.listdir(logs)):
        if f.startswith(key):
            with open(os.path.join(logs, f), errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
    return ""


def collect(paths: List[str], out: str, logs: Optional[str] = None) -> Dict:
    parts, md, env = {}, [], None
    for p in paths:
        name = os.path.splitext(os.path.basename(p))[0]
        if os.path.exists(p):
            with open(p) as f:
                result = json.load(f)
            env = env or result.get("env")
            parts[name] = result
            md_path = os.path.splitext(p)[0] + ".md"
            if os.path.exists(md_path):
                with open(md_path) as f:
                    md.append(f.read())
        else:
            tail = _log_tail(logs, name)
            parts[name] = {"missing": True, "log_tail": tail}
            md.append(f"# {name}\n\nmissing (benchmark failed or timed out); log tail:\n\n"
                      f"```\n{tail}\n```\n")
    merged = {"env": env, "parts": parts}
    with open(out + ".json", "w") as f:
        json.dump(merged, f, indent=1, default=str)
        f.write("\n")
    with open(out + ".md", "w") as f:
        f.write("\n\n".join(md))
    return merged


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="path prefix: writes OUT.json and OUT.md")
    ap.add_argument("--logs", default=None, help="folder of the benchmarks' console logs")
    ap.add_argument("results", nargs="+")
    args = ap.parse_args(argv)
    merged = collect(args.results, args.out, args.logs)
    missing = [k for k, v in merged["parts"].items() if v.get("missing")]
    print(f"collected {len(merged['parts']) - len(missing)} results"
          + (f"; missing: {', '.join(missing)}" if missing else ""))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
