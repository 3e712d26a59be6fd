"""Build configuration of fisheradaptune's extension: the CUDA toolkit and the architecture list.

``setup.py`` loads this file by path (it is not part of the installed package) and calls
:func:`resolve`; the tests load it the same way and drive it with fake toolkits. Every function
takes the environment and the facts about torch as arguments, so nothing here reads global state
unless asked to, and nothing is modified: ``setup.py`` applies the result
(:func:`apply`).

CUDA toolkit (``find_cuda_toolkit``). torch guesses ``CUDA_HOME`` as the folder above the
``nvcc`` found on ``PATH``; where that ``nvcc`` is a wrapper script (``exec /usr/local/cuda-13.0
/bin/nvcc "$@"`` in ``/usr/local/bin``) the guess is ``/usr/local``, which holds no CUDA runtime,
and the link fails. Here the toolkit is the first candidate that has ``bin/nvcc`` and a
``libcudart.so*`` in ``lib64/`` (or ``lib/``, or ``targets/*/lib/``), in this order:
``$CUDA_HOME``, ``$CUDA_PATH``, the toolkit of the ``nvcc`` on ``PATH`` with symlinks resolved
and wrapper scripts followed to the ``nvcc`` they ``exec``, ``/usr/local/cuda``, then
``/usr/local/cuda-*`` (newest version first). Candidates that fail are reported with the reason.

Architectures (``arch_list``). ``TORCH_CUDA_ARCH_LIST`` when set. Otherwise torch targets the
visible GPUs; with no GPU visible it has nothing to go on (its ``_get_cuda_arch_flags`` fails with
an IndexError), so the default is :data:`DEFAULT_ARCH_LIST`, ``"9.0+PTX"``: native code for sm_90
(H100/H200) plus PTX that newer GPUs compile at load time.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

#: The architecture list used when CUDA kernels are built, no GPU is visible and
#: ``TORCH_CUDA_ARCH_LIST`` is unset: sm_90 code plus PTX for later architectures.
DEFAULT_ARCH_LIST = "9.0+PTX"

#: Where toolkits are looked for after the environment and PATH.
SYSTEM_ROOTS = ("/usr/local/cuda",)
SYSTEM_GLOBS = ("/usr/local/cuda-*",)

HOW_TO_FIX = ("set CUDA_HOME to the CUDA toolkit's root (the folder holding bin/nvcc and "
              "lib64/libcudart.so), or FORCE_CUDA=0 to build the CPU kernels only")


class BuildConfigError(RuntimeError):
    """The build cannot be configured as asked; the message says what to set."""


@dataclass
class Toolkit:
    root: str      #: the toolkit's root, what CUDA_HOME must be
    lib_dir: str   #: the folder holding libcudart
    origin: str    #: where the candidate came from, e.g. "CUDA_HOME" or "nvcc on PATH (...)"


@dataclass
class BuildConfig:
    with_cuda: bool
    reason: str                              #: why CUDA kernels are on or off
    toolkit: Optional[Toolkit] = None
    arch_list: Optional[str] = None          #: None: torch decides (visible GPUs)
    arch_origin: str = "-"
    skipped: List[str] = field(default_factory=list)  #: toolkit candidates rejected, with why


# ---------------------------------------------------------------------------------------------
# Toolkit


def cudart_dir(root: str) -> Optional[str]:
    """The folder of ``root`` that holds ``libcudart.so*``: ``lib64``, ``lib`` or
    ``targets/*/lib``; None when there is none."""
    for sub in [os.path.join(root, "lib64"), os.path.join(root, "lib")] + \
            sorted(glob.glob(os.path.join(root, "targets", "*", "lib"))):
        if glob.glob(os.path.join(sub, "libcudart.so*")):
            return sub
    return None


_EXEC = re.compile(r"""^\s*exec\s+(?:-a\s+\S+\s+)?(?:"([^"]+)"|'([^']+)'|(\S+))""")


def wrapper_target(path: str) -> Optional[str]:
    """If ``path`` is a shell script that ``exec``s another ``nvcc``, that program's path
    (relative paths taken from the script's folder); else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    for line in head.decode("utf-8", "replace").splitlines()[1:]:
        m = _EXEC.match(line)
        if not m:
            continue
        target = next(g for g in m.groups() if g is not None)
        if os.path.basename(target) != "nvcc":
            continue
        if not os.path.isabs(target):
            target = os.path.join(os.path.dirname(path), target)
        return target
    return None


def resolve_nvcc(nvcc: str, max_depth: int = 8) -> str:
    """``nvcc`` with symlinks resolved and wrapper scripts followed (at most ``max_depth``)."""
    path = os.path.realpath(nvcc)
    for _ in range(max_depth):
        target = wrapper_target(path)
        if target is None:
            break
        path = os.path.realpath(target)
    return path


def _version_key(path: str) -> Tuple:
    nums = re.findall(r"\d+", os.path.basename(path))
    return tuple(int(n) for n in nums)


def toolkit_candidates(env: Mapping[str, str],
                       which: Callable[[str], Optional[str]],
                       system_roots: Sequence[str] = SYSTEM_ROOTS,
                       system_globs: Sequence[str] = SYSTEM_GLOBS) -> List[Tuple[str, str]]:
    """``(origin, root)`` pairs in the order they are tried (duplicates kept once)."""
    out: List[Tuple[str, str]] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            out.append((var, env[var]))
    nvcc = which("nvcc")
    if nvcc:
        real = resolve_nvcc(nvcc)
        note = "" if real == nvcc else f" -> {real}"
        out.append((f"nvcc on PATH ({nvcc}{note})", os.path.dirname(os.path.dirname(real))))
    out += [("system", r) for r in system_roots]
    for pattern in system_globs:
        out += [("system", r) for r in sorted(glob.glob(pattern), key=_version_key, reverse=True)]
    seen, unique = set(), []
    for origin, root in out:
        key = os.path.realpath(root)
        if key not in seen:
            seen.add(key)
            unique.append((origin, root))
    return unique


def find_cuda_toolkit(env: Optional[Mapping[str, str]] = None,
                      which: Optional[Callable[[str], Optional[str]]] = None,
                      system_roots: Sequence[str] = SYSTEM_ROOTS,
                      system_globs: Sequence[str] = SYSTEM_GLOBS,
                      skipped: Optional[List[str]] = None) -> Toolkit:
    """The first candidate (module docstring) with ``bin/nvcc`` and ``libcudart``; raises
    :class:`BuildConfigError` listing every candidate and why it was rejected otherwise.
    Rejected candidates are appended to ``skipped`` when given."""
    env = os.environ if env is None else env
    if which is None:
        def which(cmd):
            return shutil.which(cmd, path=env.get("PATH"))
    reasons: List[str] = []
    for origin, root in toolkit_candidates(env, which, system_roots, system_globs):
        if not os.path.isdir(root):
            reasons.append(f"{root} ({origin}): no such folder")
            continue
        root = os.path.realpath(root)
        if not os.path.exists(os.path.join(root, "bin", "nvcc")):
            reasons.append(f"{root} ({origin}): no bin/nvcc")
            continue
        lib = cudart_dir(root)
        if lib is None:
            reasons.append(f"{root} ({origin}): no libcudart.so in lib64/, lib/ or "
                           "targets/*/lib/")
            continue
        if skipped is not None:
            skipped.extend(reasons)
        return Toolkit(root=root, lib_dir=lib, origin=origin)
    tried = "; ".join(reasons) if reasons else "no candidate (CUDA_HOME, CUDA_PATH, nvcc on " \
        "PATH, /usr/local/cuda, /usr/local/cuda-*)"
    raise BuildConfigError(f"fisheradaptune: no usable CUDA toolkit found (tried: {tried}); "
                           f"{HOW_TO_FIX}")


# ---------------------------------------------------------------------------------------------
# Architectures


def arch_list(env: Mapping[str, str], gpu_count: int) -> Tuple[Optional[str], str]:
    """``(TORCH_CUDA_ARCH_LIST to use or None for torch's choice, where it comes from)``."""
    value = (env.get("TORCH_CUDA_ARCH_LIST") or "").strip()
    if value and value != "native":
        return value, "TORCH_CUDA_ARCH_LIST"
    if gpu_count > 0:
        return None, f"torch's choice for the {gpu_count} visible GPU(s)"
    why = "TORCH_CUDA_ARCH_LIST=native" if value else "TORCH_CUDA_ARCH_LIST unset"
    return DEFAULT_ARCH_LIST, f"default: no GPU visible and {why} (sm_90 code + PTX)"


# ---------------------------------------------------------------------------------------------
# The whole decision


def _force_cuda(env: Mapping[str, str]) -> Optional[bool]:
    force = (env.get("FORCE_CUDA") or "").strip()
    if force == "":
        return None
    return force not in ("0", "false", "False", "no", "off")


def resolve(env: Mapping[str, str], torch_cuda: Optional[str], gpu_count: int,
            which: Optional[Callable[[str], Optional[str]]] = None,
            system_roots: Sequence[str] = SYSTEM_ROOTS,
            system_globs: Sequence[str] = SYSTEM_GLOBS) -> BuildConfig:
    """Whether to build the CUDA kernels, with which toolkit and architectures.

    ``torch_cuda`` is ``torch.version.cuda`` (None for a CPU build of torch), ``gpu_count``
    ``torch.cuda.device_count()``. ``FORCE_CUDA=1`` builds them or raises
    :class:`BuildConfigError` saying what to set; ``FORCE_CUDA=0`` skips them; unset, they are
    built when torch has CUDA, a GPU is visible and a toolkit is found.
    """
    force = _force_cuda(env)
    if force is False:
        return BuildConfig(False, "FORCE_CUDA=0")
    if torch_cuda is None:
        if force:
            raise BuildConfigError(
                "fisheradaptune: FORCE_CUDA=1 but this torch is a CPU build "
                "(torch.version.cuda is None): CUDA kernels link against torch's CUDA "
                "libraries; install a CUDA build of torch, or set FORCE_CUDA=0")
        return BuildConfig(False, "torch is a CPU build")
    if not force and gpu_count == 0:
        return BuildConfig(False, "no GPU visible (FORCE_CUDA=1 builds the CUDA kernels anyway)")
    skipped: List[str] = []
    try:
        toolkit = find_cuda_toolkit(env, which, system_roots, system_globs, skipped)
    except BuildConfigError as e:
        if force:
            raise
        return BuildConfig(False, f"no usable CUDA toolkit ({e}); FORCE_CUDA=1 makes this an "
                                  "error")
    arch, origin = arch_list(env, gpu_count)
    reason = "FORCE_CUDA=1" if force else f"torch CUDA {torch_cuda}, {gpu_count} GPU(s) visible"
    return BuildConfig(True, reason, toolkit, arch, origin, skipped)


def apply(config: BuildConfig, environ=None, cpp_extension=None) -> None:
    """Make torch's extension builder use ``config``: ``CUDA_HOME`` (in ``environ`` and as
    ``cpp_extension.CUDA_HOME``) and ``TORCH_CUDA_ARCH_LIST``. Nothing for a CPU-only build."""
    if not config.with_cuda:
        return
    environ = os.environ if environ is None else environ
    environ["CUDA_HOME"] = config.toolkit.root
    if config.arch_list is not None:
        environ["TORCH_CUDA_ARCH_LIST"] = config.arch_list
    if cpp_extension is not None:
        cpp_extension.CUDA_HOME = config.toolkit.root


def describe(config: BuildConfig) -> List[str]:
    """Lines for setup.py's printed build configuration."""
    if not config.with_cuda:
        return [f"  CUDA kernels  off ({config.reason})", "  arch list     -"]
    lines = [f"  CUDA kernels  on ({config.reason})",
             f"  CUDA toolkit  {config.toolkit.root} (from {config.toolkit.origin}; "
             f"libcudart in {config.toolkit.lib_dir})"]
    lines += [f"                skipped {s}" for s in config.skipped]
    lines.append(f"  arch list     {config.arch_list or '(torch: visible GPUs)'} "
                 f"({config.arch_origin})")
    return lines
