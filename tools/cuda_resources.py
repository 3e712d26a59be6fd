#!/usr/bin/env python3
"""Per-block resources of every CUDA kernel in the built library, checked without a GPU.

    python tools/cuda_resources.py [--lib fisheradaptune/_C*.so] [--arch sm_80,sm_90]

A launch that asks for more than a block may have fails only when it runs, on a GPU (Note
[Launch resources], csrc/common/multi_tensor.cuh). This reads, for each kernel and architecture,
what ptxas compiled into the library (``cuobjdump --dump-resource-usage``: registers per thread,
stack and local memory, static shared memory; ``cuobjdump -elf``: the block size fixed by
``__launch_bounds__``; ``cuobjdump -sass``: local-memory stores and loads, i.e. spills) and fails
(exit 1) when

- a kernel has no ``__launch_bounds__`` (the block size it is launched with would be unknown);
- registers x threads per block exceed the 65536 registers of a block (registers are allocated
  per thread in multiples of 8);
- static + dynamic shared memory exceeds 48 KiB, the most a block gets without opting in (no
  launch of this library opts in); the dynamic part is ``DYNAMIC_SMEM`` below, the bound the
  sources give the few kernels that take any;
- a kernel spills registers (or uses local memory) without a comment that says why, in the
  comment block at its definition (or at its functor's, for the multi-tensor harness) containing
  the word "spill";
- an architecture asked for is missing from the library.

The block size is the kernel's own ``__launch_bounds__`` (ELF attribute EIATTR_MAX_THREADS):
tests/ops/test_cuda_contract.py checks in the sources that every launch uses the constant of its
kernel's bound, and that ``DYNAMIC_SMEM`` lists exactly the kernels that declare
``extern __shared__``. Prints one table row per kernel and architecture (kernel, arch, regs,
threads, smem, spills) and a summary line.

cuobjdump is looked up in ``$CUOBJDUMP``, on ``PATH``, in ``$CUDA_HOME/bin`` and
``/usr/local/cuda*/bin``, then in the copy that Triton ships (``triton/backends/nvidia/bin``),
which the CUDA toolkits of this project's machines lack.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Per-block limits of sm_80 and sm_90 (CUDA C Programming Guide, "Technical Specifications per
# Compute Capability"): the same for both.
MAX_REGS_PER_BLOCK = 65536
MAX_THREADS_PER_BLOCK = 1024
MAX_SMEM_NO_OPT_IN = 48 * 1024
REG_ALLOC_UNIT = 8  # registers per thread are allocated in multiples of 8

# The most dynamic shared memory a launch asks for: kMaxDynamicSmem in csrc/common/multi_tensor.cuh
# (tests/ops/test_cuda_contract.py checks that the two agree).
MAX_DYNAMIC_SMEM = 32 * 1024

# Kernels launched with dynamic shared memory, as (source file, pattern of the demangled name):
# each takes at most MAX_DYNAMIC_SMEM. Every other kernel is launched with none. The test checks
# this list against the sources' `extern __shared__` declarations.
DYNAMIC_SMEM: Tuple[Tuple[str, str], ...] = (
    ("token_prune_merge_cuda.cu", r"\bselect_kernel<"),
    ("bipartite_merge_cuda.cu", r"\bplan_kernel\("),
    ("drift_histogram_cuda.cu", r"\bchunk_kernel<.*\bBinCountOp>"),
)
# The names DYNAMIC_SMEM's patterns stand for (kernels, or the functor of a harness kernel).
DYNAMIC_SMEM_NAMES = ("select_kernel", "plan_kernel", "BinCountOp")


@dataclasses.dataclass
class Kernel:
    """One kernel of one architecture, as compiled."""

    arch: str                 # "sm_90"
    mangled: str
    source: str               # the .cu file (cuobjdump's "identifier")
    regs: int = 0
    stack: int = 0            # bytes of stack frame per thread (spills, local arrays, calls)
    local: int = 0            # bytes of local memory per thread
    static_smem: int = 0
    threads: Optional[int] = None   # __launch_bounds__ (None: not declared)
    spill_stores: int = 0     # STL instructions in the SASS
    spill_loads: int = 0      # LDL instructions in the SASS
    name: str = ""            # demangled

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0 or self.spill_stores > 0 or self.spill_loads > 0


# ---------------------------------------------------------------------------------------------
# cuobjdump output


_ARCH = re.compile(r"^arch = (sm_\d+)")
_IDENT = re.compile(r"^identifier = (.*)$")
_FUNC = re.compile(r"^\s*Function ([^\s:]+):\s*$")
_USAGE = re.compile(r"(\w+(?:\[\d+\])?):(\d+)")


def parse_resource_usage(text: str) -> Dict[Tuple[str, str], Kernel]:
    """``cuobjdump --dump-resource-usage`` -> {(arch, mangled): Kernel}."""
    out: Dict[Tuple[str, str], Kernel] = {}
    arch = source = ""
    func: Optional[str] = None
    for line in text.splitlines():
        if m := _ARCH.match(line):
            arch, func = m.group(1), None
        elif m := _IDENT.match(line):
            source = m.group(1).strip()
        elif m := _FUNC.match(line):
            func = m.group(1)
        elif func is not None and "REG:" in line:
            usage = dict(_USAGE.findall(line))
            out[(arch, func)] = Kernel(arch=arch, mangled=func, source=source,
                                       regs=int(usage.get("REG", 0)),
                                       stack=int(usage.get("STACK", 0)),
                                       local=int(usage.get("LOCAL", 0)),
                                       static_smem=int(usage.get("SHARED", 0)))
            func = None
    return out


_INFO = re.compile(r"^\.nv\.info\.(\S+)\s*$")


def parse_max_threads(text: str) -> Dict[Tuple[str, str], int]:
    """``cuobjdump -elf`` -> {(arch, mangled): threads of __launch_bounds__} (kernels without
    one have no EIATTR_MAX_THREADS and are absent)."""
    out: Dict[Tuple[str, str], int] = {}
    arch = ""
    func: Optional[str] = None
    want_value = False
    for line in text.splitlines():
        if m := _ARCH.match(line):
            arch, func = m.group(1), None
        elif m := _INFO.match(line):
            func, want_value = m.group(1), False
        elif line.startswith("."):
            func = None  # another section
        elif func is not None and "EIATTR_MAX_THREADS" in line:
            want_value = True
        elif want_value and "Value:" in line:
            dims = [int(v, 16) for v in line.split("Value:", 1)[1].split()]
            threads = 1
            for d in dims:
                threads *= d
            out[(arch, func)] = threads
            want_value = False
    return out


_SASS_FUNC = re.compile(r"^\s*Function : (\S+)\s*$")


def parse_sass_spills(text: str) -> Dict[Tuple[str, str], Tuple[int, int]]:
    """``cuobjdump -sass`` -> {(arch, mangled): (STL count, LDL count)}."""
    out: Dict[Tuple[str, str], Tuple[int, int]] = {}
    arch = ""
    func: Optional[str] = None
    for line in text.splitlines():
        if m := _ARCH.match(line):
            arch, func = m.group(1), None
        elif m := _SASS_FUNC.match(line):
            func = m.group(1)
            out.setdefault((arch, func), (0, 0))
        elif func is not None and "/*" in line:
            st, ld = out[(arch, func)]
            if re.search(r"\bSTL(\.\w+)*\b", line):
                st += 1
            if re.search(r"\bLDL(\.\w+)*\b", line):
                ld += 1
            out[(arch, func)] = (st, ld)
    return out


def demangle(names: Sequence[str]) -> Dict[str, str]:
    """Mangled -> demangled names (c++filt; names stay mangled without it)."""
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    r = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True,
                       check=True)
    return dict(zip(names, r.stdout.splitlines()))


# ---------------------------------------------------------------------------------------------
# The checks


def dynamic_smem(kernel: Kernel) -> int:
    """The most dynamic shared memory `kernel` is launched with (DYNAMIC_SMEM)."""
    for source, pattern in DYNAMIC_SMEM:
        if os.path.basename(kernel.source) == source and re.search(pattern, kernel.name):
            return MAX_DYNAMIC_SMEM
    return 0


def _comment_above(lines: List[str], index: int) -> str:
    """The comment lines directly above lines[index] (template lines skipped)."""
    k = index - 1
    while k >= 0 and lines[k].strip().startswith("template"):
        k -= 1
    block = []
    while k >= 0 and lines[k].strip().startswith("//"):
        block.append(lines[k])
        k -= 1
    return "\n".join(reversed(block))


def _definitions(lines: List[str]) -> Iterable[Tuple[int, str]]:
    """(line index, name) of each __global__ kernel and struct defined in a source file."""
    for i, line in enumerate(lines):
        text = line.strip()
        if text.startswith("__global__"):
            rest = re.sub(r"__launch_bounds__\s*\([^)]*\)", "", text)
            m = re.search(r"(\w+)\s*\(", rest)
            if m is None and i + 1 < len(lines):  # the name on the next line
                m = re.match(r"\s*(\w+)\s*\(", lines[i + 1])
            if m is not None:
                yield i, m.group(1)
        elif m := re.match(r"\s*struct\s+(\w+)\s*\{", line):
            yield i, m.group(1)


def spill_explained(kernel: Kernel, csrc: str) -> bool:
    """Whether a comment mentioning "spill" sits at the kernel's definition, or at the
    definition of a functor it is instantiated with (chunk_kernel<Desc, Op>, group_kernel<Op>)."""
    candidates = set(re.findall(r"(\w+)(?=[<(])", kernel.name)) | set(
        re.findall(r"::(\w+)(?=[,>])", kernel.name))
    for path in glob.glob(os.path.join(csrc, "**", "*.cu*"), recursive=True):
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        for i, name in _definitions(lines):
            if name in candidates and re.search(r"spill", _comment_above(lines, i), re.I):
                return True
    return False


def check(kernels: Iterable[Kernel], csrc: str) -> List[str]:
    """Every limit exceeded, one message per kernel and limit."""
    errors = []
    for k in kernels:
        where = f"{k.name} ({k.arch}, {os.path.basename(k.source)})"
        if k.threads is None:
            errors.append(f"{where}: no __launch_bounds__: its launch block size is unchecked")
            continue
        if k.threads > MAX_THREADS_PER_BLOCK:
            errors.append(f"{where}: {k.threads} threads > {MAX_THREADS_PER_BLOCK}")
        regs = -(-k.regs // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
        if regs * k.threads > MAX_REGS_PER_BLOCK:
            errors.append(f"{where}: {k.regs} registers x {k.threads} threads = "
                          f"{regs * k.threads} > {MAX_REGS_PER_BLOCK}")
        smem = k.static_smem + dynamic_smem(k)
        if smem > MAX_SMEM_NO_OPT_IN:
            errors.append(f"{where}: shared memory {k.static_smem} static + {dynamic_smem(k)} "
                          f"dynamic = {smem} B > {MAX_SMEM_NO_OPT_IN} B (no launch opts in)")
        if k.spills and not spill_explained(k, csrc):
            errors.append(f"{where}: spills (stack {k.stack} B, local {k.local} B, "
                          f"{k.spill_stores} STL / {k.spill_loads} LDL) with no comment at the "
                          "kernel saying why (fix it, or explain it in a comment that says "
                          "'spill')")
    return errors


def table(kernels: Sequence[Kernel]) -> str:
    rows = [("kernel", "arch", "regs", "threads", "smem", "spills")]
    for k in kernels:
        dyn = dynamic_smem(k)
        smem = f"{k.static_smem}+{dyn}" if dyn else str(k.static_smem)
        spills = (f"stack {k.stack} B, {k.spill_stores} st / {k.spill_loads} ld"
                  if k.spills else "0")
        rows.append((short_name(k), k.arch, str(k.regs), str(k.threads or "-"), smem, spills))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def short_name(k: Kernel) -> str:
    """The demangled name without namespaces, parameters and the harness's descriptor type."""
    name = re.sub(r"\(anonymous namespace\)::|fisheradaptune::|mt::|c10::|tok::", "", k.name)
    name = re.sub(r"\(.*\)$", "", name)
    name = name.removeprefix("void ")
    return f"{name} [{os.path.basename(k.source).removesuffix('.cu')}]"


# ---------------------------------------------------------------------------------------------
# Driver


def find_cuobjdump() -> Optional[str]:
    if os.environ.get("CUOBJDUMP"):
        return os.environ["CUOBJDUMP"]
    found = shutil.which("cuobjdump")
    if found:
        return found
    dirs = [os.path.join(os.environ[v], "bin") for v in ("CUDA_HOME", "CUDA_PATH")
            if os.environ.get(v)]
    dirs += sorted(glob.glob("/usr/local/cuda*/bin"), reverse=True)
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        dirs += [os.path.join(p, "backends", "nvidia", "bin")
                 for p in spec.submodule_search_locations]
    for d in dirs:
        path = os.path.join(d, "cuobjdump")
        if os.access(path, os.X_OK):
            return path
    return None


def load(lib: str, tool: str) -> List[Kernel]:
    def dump(*flags: str) -> str:
        return subprocess.run([tool, *flags, lib], capture_output=True, text=True,
                              check=True).stdout

    kernels = parse_resource_usage(dump("--dump-resource-usage"))
    for key, threads in parse_max_threads(dump("-elf")).items():
        if key in kernels:
            kernels[key].threads = threads
    for key, (st, ld) in parse_sass_spills(dump("-sass")).items():
        if key in kernels:
            kernels[key].spill_stores, kernels[key].spill_loads = st, ld
    names = demangle(sorted({k.mangled for k in kernels.values()}))
    for k in kernels.values():
        k.name = names.get(k.mangled, k.mangled)
    return sorted(kernels.values(), key=lambda k: (short_name(k), k.arch))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", help="the built library (default: fisheradaptune/_C*.so)")
    ap.add_argument("--arch", default="sm_80,sm_90",
                    help="architectures that must be in the library, comma-separated")
    ap.add_argument("--csrc", default=os.path.join(REPO_ROOT, "csrc"),
                    help="the sources, for the comments that explain spills")
    args = ap.parse_args(argv)
    lib = args.lib
    if lib is None:
        libs = sorted(glob.glob(os.path.join(REPO_ROOT, "fisheradaptune", "_C*.so")))
        if not libs:
            print("cuda_resources: no fisheradaptune/_C*.so: build it first", file=sys.stderr)
            return 1
        lib = libs[0]
    tool = find_cuobjdump()
    if tool is None:
        print("cuda_resources: no cuobjdump (set CUOBJDUMP, or put a CUDA toolkit's bin/ on PATH)",
              file=sys.stderr)
        return 1
    kernels = load(lib, tool)
    print(f"cuda_resources: {lib} ({tool})")
    if not kernels:
        print("cuda_resources: no CUDA kernels in the library (built without FORCE_CUDA=1?)",
              file=sys.stderr)
        return 1
    print(table(kernels))
    errors = check(kernels, args.csrc)
    archs = sorted({k.arch for k in kernels})
    for want in filter(None, args.arch.split(",")):
        if want not in archs:
            errors.append(f"architecture {want} is not in the library (it has {', '.join(archs)};"
                          " build with TORCH_CUDA_ARCH_LIST=\"8.0;9.0\")")
    names = {k.mangled for k in kernels}
    print(f"cuda_resources: {len(names)} kernels x {len(archs)} architectures ({', '.join(archs)});"
          f" max regs {max(k.regs for k in kernels)}, max static smem "
          f"{max(k.static_smem for k in kernels)} B, spilling kernels "
          f"{sum(k.spills for k in kernels)}")
    for e in errors:
        print(f"FAIL {e}")
    print("cuda_resources: " + ("FAILED" if errors else "ok"))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
