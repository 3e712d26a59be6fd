"""Makes ``torch.ops.fisheradaptune.*`` exist: the compiled library, or the pure-PyTorch
fallback.

:func:`load` (run once, by :mod:`fisheradaptune.ops` as ``import fisheradaptune`` imports it,
before any op is used) imports the
compiled library ``fisheradaptune._C``, whose static initialisers define every schema and
register the C++ CPU/CUDA kernels. When that library is missing or cannot be loaded (built
without a compiler, for another platform, against an incompatible torch), or when the
environment variable ``FISHERADAPTUNE_FALLBACK=1`` asks for it, the same schemas are defined
from :mod:`fisheradaptune.ops._schemas` (passed in by :mod:`fisheradaptune.ops`) instead, :mod:`fisheradaptune.ops` registers the
pure-PyTorch kernels of every family for the CPU and CUDA dispatch keys, and ONE
:class:`FallbackWarning` says why and how to get the compiled operators. Everything above the
kernels (fake kernels, autograd, in-place bookkeeping, the typed wrappers and the whole Python
API) is the same either way. :func:`has_compiled_ops` says which is running.

This is the only module that touches ``fisheradaptune._C``; every other one asks it.
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Mapping, Optional

import torch

__all__ = ["FallbackWarning", "ENV_VAR", "load", "has_compiled_ops", "has_cuda_kernels",
           "fallback_reason", "compiled_module"]

#: The environment variable that forces the pure-PyTorch fallback ("1"); "0" or empty: the
#: compiled library when it loads. Read once, when the package is imported.
ENV_VAR = "FISHERADAPTUNE_FALLBACK"


class FallbackWarning(UserWarning):
    """Emitted once, at import, when the pure-PyTorch fallback operators are in use instead of
    the compiled ones (the message says why and how to get the compiled operators)."""


_module: Optional[ModuleType] = None  # fisheradaptune._C once loaded
_reason: Optional[str] = None         # why the fallback runs; None with the compiled library
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


def load(namespace: str, schemas: Mapping[str, str]) -> None:
    """Load the compiled operators, or define ``schemas`` (op name -> schema string) under
    ``namespace`` for the fallback (idempotent: later calls do nothing).

    Raises ``ValueError`` for a value of ``FISHERADAPTUNE_FALLBACK`` other than "1", "0" or
    empty. Emits one :class:`FallbackWarning` when the fallback is used."""
    global _module, _reason, _loaded, _def_lib
    if _loaded:
        return
    if _forced():
        reason = f"{ENV_VAR}=1 is set"
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
    _loaded = True


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
    """True when the compiled CUDA kernels were built into the loaded library (False under the
    fallback, whose kernels run on CUDA through torch's own CUDA ops)."""
    return has_compiled_ops() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fisheradaptune::js_drift", "CUDA")
