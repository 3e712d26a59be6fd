"""Build fisheradaptune's C++/CUDA operator library (``fisheradaptune._C``).

CPU kernels are always built. CUDA kernels are built when torch has CUDA, a GPU is visible and
a CUDA toolkit is found, or when ``FORCE_CUDA=1`` (e.g. a build host without a GPU; this fails
with a message saying what to set when it cannot be done). Set ``FORCE_CUDA=0`` to skip them.

The decisions live in ``tools/build_config.py`` (loaded by path; tested by
tests/ops/test_cuda_contract.py):

- CUDA toolkit: the first of ``$CUDA_HOME``, ``$CUDA_PATH``, the toolkit of the ``nvcc`` on
  ``PATH`` (symlinks resolved, wrapper scripts followed to the ``nvcc`` they ``exec``),
  ``/usr/local/cuda``, ``/usr/local/cuda-*`` that has ``bin/nvcc`` and ``libcudart.so`` (in
  ``lib64/``, ``lib/`` or ``targets/*/lib/``). It is set as ``CUDA_HOME`` for torch's extension
  builder, whose own guess (the folder above ``nvcc``) is wrong where ``nvcc`` is a wrapper.
- Architectures: ``TORCH_CUDA_ARCH_LIST`` when set; else torch's choice for the visible GPUs;
  with no GPU visible, ``"9.0+PTX"`` (sm_90 code, H100/H200, plus PTX for newer GPUs), where
  torch itself would fail.

Both are printed in the build configuration at the start of the build.

Install with ``pip install --no-build-isolation .`` (or ``-e .``): the extension is compiled
against the torch that is already installed.
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


def make_extension():
    try:
        config = build_config.resolve(os.environ, torch.version.cuda, torch.cuda.device_count())
    except build_config.BuildConfigError as e:
        sys.exit(f"error: {e}")
    build_config.apply(config, os.environ, cpp_extension)
    with_cuda = config.with_cuda
    # -ffp-contract=off: no silent a*b+c -> fma fusion, so each ISA clone of a CPU kernel
    # (csrc/common/simd.h) rounds alike, and exact identities hold (p == q gives p - q == 0).
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-DFISHERADAPTUNE_BUILD"]
    # Mirror torch's choice so at::parallel_for uses the same OpenMP runtime as libtorch.
    link_flags = ["-fopenmp"]
    sources = _sources(".cpp")
    kwargs = dict(
        name="fisheradaptune._C",
        sources=sources,
        include_dirs=[CSRC],
        extra_link_args=link_flags,
        py_limited_api=False,
    )
    if with_cuda:
        sources += _sources(".cu")
        # nvcc keeps its default --fmad=true: where a kernel must round as the CPU does, the
        # rounding is spelled out with __fmul_rn / __fadd_rn (Note [Uncontracted arithmetic],
        # csrc/drift/drift_math.h; Note [CPU-identical Fisher update],
        # csrc/fisher/fisher_accumulate_cuda.cu).
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo",
                      "-DFISHERADAPTUNE_WITH_CUDA", "-DUSE_CUDA"]
        cxx_flags.append("-DFISHERADAPTUNE_WITH_CUDA")
        kwargs["library_dirs"] = [config.toolkit.lib_dir]
        ext = CUDAExtension(extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **kwargs)
    else:
        ext = CppExtension(extra_compile_args={"cxx": cxx_flags}, **kwargs)
    print("\n".join([
        "fisheradaptune build configuration:",
        f"  torch         {torch.__version__} (CUDA {torch.version.cuda})",
        f"  python        {sys.version.split()[0]}",
        *build_config.describe(config),
        f"  FORCE_CUDA    {os.environ.get('FORCE_CUDA', 'unset')}",
        f"  sources       {len(sources)} files",
    ]), flush=True)
    return ext


setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
