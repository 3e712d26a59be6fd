"""Makes ``torch.ops.fisheradaptune.*`` exist: the compiled libraries, or the pure-PyTorch
fallback.

:func:`load` (run once, by :mod:`fisheradaptune.ops` as ``import fisheradaptune`` imports it,
before any op is used) imports the compiled library ``fisheradaptune._C``, whose static
initialisers define every schema and register the C++ CPU kernels, and then, in a torch built
with CUDA, the CUDA kernels ``fisheradaptune._C_cuda`` (a separate library: it needs
libtorch_cuda, which a CPU torch lacks). Both are built on the LibTorch stable ABI for torch
>= :data:`TARGET_TORCH`, so one build loads into every such torch. When ``_C`` is missing or
cannot be loaded (built without a compiler, for another platform, a torch older than the
target), or when the environment variable ``FISHERADAPTUNE_FALLBACK=1`` asks for it, the same
schemas are defined
from :mod:`fisheradaptune.ops._schemas` (passed in by :mod:`fisheradaptune.ops`) instead, :mod:`fisheradaptune.ops` registers the
pure-PyTorch kernels of every family for the CPU and CUDA dispatch keys, and ONE
:class:`FallbackWarning` says why and how to get the compiled operators. Everything above the
kernels (fake kernels, autograd, in-place bookkeeping, the typed wrappers and the whole Python
API) is the same either way. :func:`has_compiled_ops` says which is running. When ``_C`` runs
but ``_C_cuda`` is absent (a CPU-only build) or cannot load, the pure-PyTorch kernels serve the
CUDA dispatch key instead (one :class:`FallbackWarning` when a GPU is visible or the library
failed to load); :func:`has_cuda_kernels` says whether the compiled CUDA kernels run.

This is the only module that touches ``fisheradaptune._C``; every other one asks it.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import warnings
from types import ModuleType
from typing import Mapping, Optional, Tuple

import torch

__all__ = ["FallbackWarning", "ENV_VAR", "TARGET_TORCH", "load", "has_compiled_ops",
           "has_cuda_kernels", "fallback_reason", "cuda_fallback_reason", "compiled_module"]

#: The environment variable that forces the pure-PyTorch fallback ("1"); "0" or empty: the
#: compiled library when it loads. Read once, when the package is imported.
ENV_VAR = "FISHERADAPTUNE_FALLBACK"

#: The oldest torch the compiled libraries load into (the LibTorch stable ABI version they are
#: built for; setup.py's TARGET_TORCH).
TARGET_TORCH = (2, 11)


class FallbackWarning(UserWarning):
    """Emitted once, at import, when the pure-PyTorch fallback operators are in use instead of
    the compiled ones (the message says why and how to get the compiled operators)."""


_module: Optional[ModuleType] = None  # fisheradaptune._C once loaded
_reason: Optional[str] = None         # why the fallback runs; None with the compiled library
_cuda_reason: Optional[str] = None    # why CUDA runs the fallback kernels; None with _C_cuda
_loaded = False
# The library that defines the schemas under the fallback (kept alive: dropping it undefines).
_def_lib: Optional[torch.library.Library] = None


def _forced() -> bool:
    value = os.environ.get(ENV_VAR, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"fisheradaptune: environment variable {ENV_VAR}={value!r}: expected "
                         "'1' (use the pure-PyTorch fallback operators), '0' or unset (use the "
                         "compiled operators)")
    return value == "1"


def _message(reason: str) -> str:
    how = (f"unset {ENV_VAR}" if reason.startswith(ENV_VAR) else
           "install fisheradaptune where a C++20 compiler is available (`pip install .` in the "
           "source tree, which compiles the operators, CUDA ones too when the CUDA toolkit is "
           "found), or install a prebuilt wheel for this platform and torch")
    return (f"fisheradaptune is using its pure-PyTorch fallback operators because {reason}. "
            "They meet the same contract (checks, results to rounding, non-finite skipping, "
            "determinism) but are slower. To get the compiled operators, " + how
            + f" (this is torch {torch.__version__}). fisheradaptune.has_compiled_ops() says "
            "which operators are running.")


def _torch_version() -> tuple:
    """(major, minor) of the running torch ("2.13.0+cpu" -> (2, 13))."""
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _load_cuda_kernels() -> Tuple[Optional[str], bool]:
    """Load ``fisheradaptune._C_cuda`` (the CUDA kernels) into the dispatcher. Returns (None,
    False) when they are registered, else (why not, whether a library was there but failed to
    load). It has no Python module of its own: it is loaded as a shared library
    (torch.ops.load_library), which runs its registrations."""
    if torch.version.cuda is None:
        return "this torch is built without CUDA", False
    spec = importlib.util.find_spec("fisheradaptune._C_cuda")
    if spec is None or spec.origin is None:
        return ("fisheradaptune was built without CUDA kernels (fisheradaptune._C_cuda is "
                "absent)", False)
    try:
        torch.ops.load_library(spec.origin)
    except (OSError, RuntimeError) as e:
        return f"fisheradaptune._C_cuda could not be loaded ({type(e).__name__}: {e})", True
    return None, False


def load(namespace: str, schemas: Mapping[str, str]) -> None:
    """Load the compiled operators, or define ``schemas`` (op name -> schema string) under
    ``namespace`` for the fallback (idempotent: later calls do nothing).

    Raises ``ValueError`` for a value of ``FISHERADAPTUNE_FALLBACK`` other than "1", "0" or
    empty. Emits one :class:`FallbackWarning` when the fallback is used (for every op, or for the
    CUDA kernels only, see the module docstring)."""
    global _module, _reason, _cuda_reason, _loaded, _def_lib
    if _loaded:
        return
    if _forced():
        reason = f"{ENV_VAR}=1 is set"
    elif _torch_version() < TARGET_TORCH:
        reason = (f"torch {torch.__version__} is older than {TARGET_TORCH[0]}.{TARGET_TORCH[1]}, "
                  "the oldest torch its compiled library supports (LibTorch stable ABI)")
    else:
        try:
            _module = importlib.import_module("fisheradaptune._C")
            reason = None
        except (ImportError, OSError) as e:
            reason = ("the compiled library fisheradaptune._C could not be loaded "
                      f"({type(e).__name__}: {e})")
    if reason is not None:
        lib = torch.library.Library(namespace, "DEF")
        for schema in schemas.values():
            lib.define(schema)
        _def_lib = lib
        _reason = reason
        warnings.warn(_message(reason), FallbackWarning, stacklevel=2)
    else:
        _cuda_reason, failed = _load_cuda_kernels()
        if _cuda_reason is not None and (failed or torch.cuda.is_available()):
            warnings.warn(
                f"fisheradaptune runs its compiled CPU kernels, but its pure-PyTorch fallback "
                f"kernels on CUDA tensors because {_cuda_reason}. They meet the same contract but "
                "are slower. To get the compiled CUDA kernels, install fisheradaptune where the "
                "CUDA toolkit is found (FORCE_CUDA=1 pip install .), or a wheel built with them. "
                "fisheradaptune.has_cuda_kernels() says which kernels run.",
                FallbackWarning, stacklevel=2)
    _loaded = True


def cuda_fallback_reason() -> Optional[str]:
    """Why tensors on CUDA run the pure-PyTorch kernels (the fallback for every op, or no
    compiled CUDA kernels), None when the compiled CUDA kernels run."""
    _require_loaded()
    return _reason if _reason is not None else _cuda_reason


def _require_loaded() -> None:
    if not _loaded:  # import fisheradaptune loads them before anything can ask
        raise RuntimeError("fisheradaptune's operators are not loaded yet (import fisheradaptune)")


def has_compiled_ops() -> bool:
    """True when the compiled operators (``fisheradaptune._C``) are running, False under the
    pure-PyTorch fallback (see :class:`FallbackWarning`)."""
    _require_loaded()
    return _reason is None


def fallback_reason() -> Optional[str]:
    """Why the fallback runs (the load error, or the environment variable), None when the
    compiled operators do."""
    _require_loaded()
    return _reason


def compiled_module() -> Optional[ModuleType]:
    """The loaded compiled library module, None under the fallback."""
    _require_loaded()
    return _module


def has_cuda_kernels() -> bool:
    """True when the compiled CUDA kernels (``fisheradaptune._C_cuda``) are loaded; False under
    the fallback, or where they were not built or could not load: then the pure-PyTorch kernels
    run on CUDA tensors, through torch's own CUDA ops."""
    _require_loaded()
    return _reason is None and _cuda_reason is None
