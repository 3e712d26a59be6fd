"""The GPU-check tooling, exercised on the CPU: tools/gpu_check.sh's plan fits the lease,
tools/gpu_edge_cases.py agrees with the reference on the CPU, tools/collect_bench.py merges and
records missing results."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from helpers import REPO_ROOT


def test_quick_plan_fits_the_lease():
    # PYTHON: the interpreter running this suite (python3 on PATH may be another torch).
    r = subprocess.run(["bash", "tools/gpu_check.sh", "quick", "--dry-run"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHON=sys.executable))
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"total timeout (\d+) s of a (\d+) s budget; (\d+) files", r.stdout)
    assert m, r.stdout
    total, budget, files = map(int, m.groups())
    assert total <= budget <= 540 and files <= 8
    assert re.search(r"cuda_tests selects: [1-9]\d*/\d+ tests collected", r.stdout), r.stdout


def test_edge_cases_pass_on_cpu():
    # PYTHONPATH: the checkout's package, not whichever one is installed (a script's sys.path
    # starts at its own folder, tools/).
    r = subprocess.run([sys.executable, "tools/gpu_edge_cases.py", "--device", "cpu"],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                           [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all cases ok" in r.stdout and r.stdout.count(" ok") >= 25


def test_collect_bench_records_missing(tmp_path):
    good = tmp_path / "bench_a-cuda.json"
    good.write_text(json.dumps({"name": "bench_a", "env": {"device": "x"}, "rows": [{"v": 1}]}))
    (tmp_path / "bench_a-cuda.md").write_text("# bench_a\n")
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "b.txt").write_text("Traceback: boom\n")
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, "tools/collect_bench.py", "--out", str(out), "--logs",
                        str(logs), str(good), str(tmp_path / "bench_b-cuda.json")],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "missing: bench_b-cuda" in r.stdout
    merged = json.loads((tmp_path / "bench.json").read_text())
    assert merged["env"] == {"device": "x"}
    assert merged["parts"]["bench_a-cuda"]["rows"] == [{"v": 1}]
    assert "boom" in merged["parts"]["bench_b-cuda"]["log_tail"]
    assert "# bench_a" in (tmp_path / "bench.md").read_text()
