"""Build fisheradaptune's operator libraries on the LibTorch stable ABI.

Two libraries, both on the stable C shim of libtorch only (Note [Stable ABI],
csrc/common/stable.h) and on the Python limited API, so one wheel (tag ``cp310-abi3``) loads into
every torch from :data:`TARGET_TORCH` on and every CPython from 3.10 on, without a rebuild:

- ``fisheradaptune._C``: every schema and the CPU kernels (needs libc10 and libtorch_cpu only, so
  it loads into CPU and CUDA builds of torch alike);
- ``fisheradaptune._C_cuda``: the CUDA kernels, built when CUDA is on (below). A CUDA library
  needs libtorch_cuda, which a CPU torch lacks: kept apart, the same wheel installs into both.

CUDA kernels are built when torch has CUDA, a GPU is visible and a CUDA toolkit is found, or
when ``FORCE_CUDA=1`` (e.g. a build host without a GPU; this fails with a message saying what to
set when it cannot be done). Set ``FORCE_CUDA=0`` to skip them. The decisions live in
``tools/build_config.py`` (loaded by path; tested by tests/test_build_config.py): the toolkit
(``$CUDA_HOME``, ``$CUDA_PATH``, the ``nvcc`` on ``PATH`` with wrappers followed,
``/usr/local/cuda*``) and the architectures (``TORCH_CUDA_ARCH_LIST``, else the visible GPUs, else
``"9.0+PTX"``). The build configuration, with the target torch and the wheel tag, is printed
first.

The extension is optional: where it cannot be compiled (no C++20 compiler, no torch headers),
``pip install .`` still installs the pure-Python package, says why, and ``import fisheradaptune``
then runs the pure-PyTorch fallback operators. ``FISHERADAPTUNE_BUILD_REQUIRED=1`` makes a failed
compile fail the install instead (CI and tools/setup.sh set it).

Install: ``pip install .`` (an isolated build; the torch it compiles against may differ from the
installed one, which the stable ABI allows), or ``pip install --no-build-isolation .`` to compile
against the installed torch (>= 2.10 headers needed). Build a wheel once with
``pip wheel --no-build-isolation --no-deps . -w dist`` and install that file anywhere.
"""
import glob
import importlib.util
import os
import sys

from setuptools import setup

import torch
import torch.utils.cpp_extension as cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _load_build_config():
    path = os.path.join(ROOT, "tools", "build_config.py")
    spec = importlib.util.spec_from_file_location("fisheradaptune_build_config", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it is executing
    spec.loader.exec_module(module)
    return module


build_config = _load_build_config()


def _sources(suffix: str):
    """Every ``csrc/**/*<suffix>``: the shared files at the top and each op family's folder
    (``csrc/<family>/``: validation, CPU kernel, CUDA kernel), so a new file needs no edit here."""
    pattern = os.path.join(CSRC, "**", "*" + suffix)
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(pattern, recursive=True))


#: The oldest torch the compiled libraries load into: the LibTorch stable ABI version they are
#: compiled for (TORCH_TARGET_VERSION, bytes [major][minor][patch][0 x5]). The GPU machines this
#: project is tested on run torch 2.11, and nothing the kernels use is newer (Note [Stable ABI],
#: csrc/common/stable.h). fisheradaptune/_loader.py refuses an older torch with the same number.
TARGET_TORCH = (2, 11)
TARGET_VERSION = f"0x{TARGET_TORCH[0]:02x}{TARGET_TORCH[1]:02x}000000000000"
#: The Python limited API: torch's extension builder compiles py_limited_api extensions with
#: Py_LIMITED_API = 3.10, so the wheel is tagged cp310-abi3.
ABI3_TAG = "cp310"
BUILD_REQUIRED_VAR = "FISHERADAPTUNE_BUILD_REQUIRED"


def _cpu_sources():
    """The schemas, the shared validation and every CPU kernel: all of csrc/**/*.cpp."""
    return _sources(".cpp")


def _cuda_sources():
    """The CUDA kernels and the host code they share with the CPU ones (validation, plans, the
    per-sample tiling): every .cu and every .cpp except the schemas and the CPU kernels
    (``*_cpu.cpp``, which register CPU implementations)."""
    shared = [p for p in _sources(".cpp")
              if os.path.basename(p) != "schemas.cpp" and not p.endswith("_cpu.cpp")]
    return _sources(".cu") + shared


def make_extensions():
    try:
        config = build_config.resolve(os.environ, torch.version.cuda, torch.cuda.device_count())
    except build_config.BuildConfigError as e:
        sys.exit(f"error: {e}")
    build_config.apply(config, os.environ, cpp_extension)
    target = f"-DTORCH_TARGET_VERSION={TARGET_VERSION}"
    # -ffp-contract=off: no silent a*b+c -> fma fusion, so each ISA clone of a CPU kernel
    # (csrc/common/simd.h) rounds alike, and exact identities hold (p == q gives p - q == 0).
    # -fopenmp-simd: the `omp simd` loops only; threads come from libtorch (st::parallel_for).
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp-simd", "-ffp-contract=off", target]
    extensions = [CppExtension(
        name="fisheradaptune._C", sources=_cpu_sources(), include_dirs=[CSRC],
        extra_compile_args={"cxx": cxx_flags}, py_limited_api=True)]
    if config.with_cuda:
        # nvcc keeps its default --fmad=true: where a kernel must round as the CPU does, the
        # rounding is spelled out with __fmul_rn / __fadd_rn (Note [Uncontracted arithmetic],
        # csrc/drift/drift_math.h; Note [CPU-identical Fisher update],
        # csrc/fisher/fisher_accumulate_cuda.cu). USE_CUDA enables the stable CUDA helpers
        # (STD_CUDA_CHECK, the current-stream shim).
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", target,
                      "-DUSE_CUDA"]
        extensions.append(CUDAExtension(
            name="fisheradaptune._C_cuda", sources=_cuda_sources(), include_dirs=[CSRC],
            library_dirs=[config.toolkit.lib_dir],
            extra_compile_args={"cxx": cxx_flags + ["-DUSE_CUDA"], "nvcc": nvcc_flags},
            # Every symbol resolved at link time: a kernel calling host code that lives only in
            # the CPU library would otherwise fail at load.
            extra_link_args=["-Wl,--no-undefined"],
            py_limited_api=True))
    print("\n".join([
        "fisheradaptune build configuration:",
        f"  torch         {torch.__version__} (CUDA {torch.version.cuda}), headers used to build",
        f"  target        torch >= {TARGET_TORCH[0]}.{TARGET_TORCH[1]} (LibTorch stable ABI, "
        f"TORCH_TARGET_VERSION={TARGET_VERSION})",
        f"  wheel tag     {ABI3_TAG}-abi3 (Python limited API, CPython >= 3.10)",
        f"  python        {sys.version.split()[0]}",
        *build_config.describe(config),
        f"  FORCE_CUDA    {os.environ.get('FORCE_CUDA', 'unset')}",
        f"  libraries     " + ", ".join(f"{e.name} ({len(e.sources)} files)" for e in extensions),
        f"  required      {os.environ.get(BUILD_REQUIRED_VAR) == '1'} ({BUILD_REQUIRED_VAR})",
    ]), flush=True)
    return extensions


class OptionalBuildExtension(BuildExtension):
    """torch's builder, with the extension optional: a failed compile installs the pure-Python
    package (the fallback operators) with a message, unless FISHERADAPTUNE_BUILD_REQUIRED=1.
    Every build also removes libraries of another ABI tag left by older builds in the source
    package and in the build folder a wheel is packed from (``_C.cpython-*.so`` would shadow
    ``_C.abi3.so`` on import)."""

    def build_extension(self, ext):
        short = ext.name.rsplit(".", 1)[1]
        for pkg in (os.path.join(ROOT, "fisheradaptune"),
                    os.path.join(self.build_lib, "fisheradaptune")):
            for stale in glob.glob(os.path.join(pkg, f"{short}.cpython-*.so")):
                os.remove(stale)
        try:
            super().build_extension(ext)
        except Exception as e:  # compiler missing, headers missing, compile or link error
            if os.environ.get(BUILD_REQUIRED_VAR) == "1":
                raise
            print(f"\nfisheradaptune: WARNING: could not build {ext.name} ({type(e).__name__}: "
                  f"{e}). Installing without it: import fisheradaptune will use the pure-PyTorch "
                  "fallback operators (slower, same results) and say so. To get the compiled "
                  "operators, install a C++20 compiler (and the CUDA toolkit for CUDA kernels) "
                  f"and reinstall; set {BUILD_REQUIRED_VAR}=1 to make this an error.\n",
                  flush=True)


setup(
    ext_modules=make_extensions(),
    cmdclass={"build_ext": OptionalBuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": ABI3_TAG}},
)
