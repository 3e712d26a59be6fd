"""Build fisheradaptune's C++/CUDA operator library (``fisheradaptune._C``).

CPU kernels are always built. CUDA kernels are built when a CUDA toolkit is found and torch
has CUDA support, or when ``FORCE_CUDA=1`` (e.g. a build host without a GPU). Set
``FORCE_CUDA=0`` to skip them. ``TORCH_CUDA_ARCH_LIST`` picks the target architectures.

Install with ``pip install --no-build-isolation .`` (or ``-e .``): the extension is compiled
against the torch that is already installed.
"""
import glob
import os
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _want_cuda() -> bool:
    force = os.environ.get("FORCE_CUDA")
    if force is not None and force.strip() != "":
        return force.strip() not in ("0", "false", "False")
    return torch.version.cuda is not None and CUDA_HOME is not None and torch.cuda.is_available()


def _sources(pattern: str):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, pattern)))


def make_extension():
    with_cuda = _want_cuda()
    # -ffp-contract=off: no silent a*b+c -> fma fusion, so each ISA clone of a CPU kernel
    # (csrc/cpu/simd.h) rounds alike, and exact identities hold (p == q gives p - q == 0).
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-DFISHERADAPTUNE_BUILD"]
    # Mirror torch's choice so at::parallel_for uses the same OpenMP runtime as libtorch.
    link_flags = ["-fopenmp"]
    sources = _sources("*.cpp") + _sources("cpu/*.cpp")
    kwargs = dict(
        name="fisheradaptune._C",
        sources=sources,
        include_dirs=[CSRC],
        extra_link_args=link_flags,
        py_limited_api=False,
    )
    if with_cuda:
        sources += _sources("cuda/*.cu")
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo",
                      "-DFISHERADAPTUNE_WITH_CUDA"]
        cxx_flags.append("-DFISHERADAPTUNE_WITH_CUDA")
        ext = CUDAExtension(extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **kwargs)
    else:
        ext = CppExtension(extra_compile_args={"cxx": cxx_flags}, **kwargs)
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "(torch default)") if with_cuda else "-"
    print(
        "fisheradaptune build configuration:\n"
        f"  torch         {torch.__version__} (CUDA {torch.version.cuda})\n"
        f"  python        {sys.version.split()[0]}\n"
        f"  CUDA kernels  {'on' if with_cuda else 'off'} (CUDA_HOME={CUDA_HOME}, FORCE_CUDA={os.environ.get('FORCE_CUDA', 'unset')})\n"
        f"  arch list     {arch}\n"
        f"  sources       {len(sources)} files",
        flush=True,
    )
    return ext


setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
