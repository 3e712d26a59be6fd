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


# ---------------------------------------------------------------------------------------------
# tools/cuda_resources.py: the launch-resource check (Note [Launch resources]), on cuobjdump
# output written here (the real library is checked by .ci/integration.sh after its CUDA build).

def _resources_tool():
    import importlib.util
    path = os.path.join(REPO_ROOT, "tools", "cuda_resources.py")
    spec = importlib.util.spec_from_file_location("fisheradaptune_cuda_resources_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cr = _resources_tool()

_USAGE = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]
identifier = /src/csrc/drift/drift_histogram_cuda.cu

Resource usage:
 Common:
  GLOBAL:0
 Function _Z4fastv:
  REG:32 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:592 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z6greedyv:
  REG:255 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:592 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z7spilledv:
  REG:40 STACK:16 SHARED:0 LOCAL:0 CONSTANT[0]:592 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z7unboundv:
  REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:592 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

_ELF = """
arch = sm_90
.section .nv.info
.nv.info._Z4fastv
	Attribute:	EIATTR_MAX_THREADS
	Format:	EIFMT_SVAL
	Value:	0x100 0x1 0x1 
.nv.info._Z6greedyv
	Attribute:	EIATTR_MAX_THREADS
	Format:	EIFMT_SVAL
	Value:	0x200 0x1 0x1 
.nv.info._Z7spilledv
	Attribute:	EIATTR_MAX_THREADS
	Format:	EIFMT_SVAL
	Value:	0x100 0x1 0x1 
.nv.info._Z7unboundv
	Attribute:	EIATTR_CRS_STACK_SIZE
	Format:	EIFMT_SVAL
	Value:	0x0 
"""

_SASS = """
arch = sm_90
identifier = /src/csrc/drift/drift_histogram_cuda.cu
	code for sm_90
		Function : _Z7spilledv
        /*0010*/                   STL [R1], R2 ;                 /* 0x000000 */
        /*0020*/                   LDL R2, [R1] ;                 /* 0x000000 */
        /*0030*/                   LDL.64 R4, [R1+0x8] ;          /* 0x000000 */
"""


def _kernels(names):
    kernels = cr.parse_resource_usage(_USAGE)
    for key, threads in cr.parse_max_threads(_ELF).items():
        kernels[key].threads = threads
    for key, (st, ld) in cr.parse_sass_spills(_SASS).items():
        kernels[key].spill_stores, kernels[key].spill_loads = st, ld
    for k in kernels.values():
        k.name = names.get(k.mangled, k.mangled)
    return kernels


def test_cuda_resources_parses_cuobjdump():
    k = _kernels({})
    fast = k[("sm_90", "_Z4fastv")]
    assert (fast.regs, fast.static_smem, fast.threads, fast.spills) == (32, 1024, 256, False)
    assert fast.source.endswith("drift_histogram_cuda.cu")
    assert k[("sm_90", "_Z6greedyv")].threads == 512
    assert k[("sm_90", "_Z7unboundv")].threads is None
    spilled = k[("sm_90", "_Z7spilledv")]
    assert (spilled.stack, spilled.spill_stores, spilled.spill_loads) == (16, 1, 2)


def test_cuda_resources_fails_each_exceeded_limit(tmp_path):
    # greedy: 256 registers (255 rounded up to 8) x 512 threads > 65536; unbound: no
    # __launch_bounds__; spilled: spills with no comment at the kernel; a BinCountOp functor with
    # 17 KiB of static shared memory plus its 32 KiB of dynamic shared memory > 48 KiB.
    names = {"_Z6greedyv": "void greedy()", "_Z7spilledv": "void spilled_kernel(int)",
             "_Z7unboundv": "void unbound()",
             "_Z4fastv": "void fisheradaptune::mt::chunk_kernel<fisheradaptune::DriftChunk, "
                         "fisheradaptune::(anonymous namespace)::BinCountOp>(int)"}
    kernels = _kernels(names)
    kernels[("sm_90", "_Z4fastv")].static_smem = 17 * 1024
    errors = cr.check(kernels.values(), str(tmp_path))
    assert len(errors) == 4, errors
    text = "\n".join(errors)
    assert re.search(r"greedy\(\).*255 registers x 512 threads = 131072 > 65536", text)
    assert re.search(r"unbound\(\).*no __launch_bounds__", text)
    assert re.search(r"spilled_kernel\(int\).*spills \(stack 16 B.*1 STL / 2 LDL\)", text)
    assert re.search(r"BinCountOp.*17408 static \+ 32768 dynamic = 50176 B > 49152 B", text)
    # A comment at the kernel that explains the spill clears it.
    (tmp_path / "k.cu").write_text("// Spills 16 B: a local array indexed at run time.\n"
                                   "template <int N>\n__global__ void __launch_bounds__(kThreads)\n"
                                   "    spilled_kernel(int x) {}\n")
    assert not any("spilled_kernel" in e for e in cr.check(kernels.values(), str(tmp_path)))


def test_cuda_resources_runs_in_the_integration_stage():
    # After the CUDA build, on the library it built, for both architectures.
    text = (REPO_ROOT / ".ci" / "integration.sh").read_text()
    build = text.index("TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}")
    check = text.index("\"$PY\" tools/cuda_resources.py --arch sm_80,sm_90")
    assert build < check
    # on the CUDA library of the wheel it built
    assert "--lib \"$(ls \"$WORK\"/unpacked/fisheradaptune/_C_cuda*.so)\"" in text[check:]
