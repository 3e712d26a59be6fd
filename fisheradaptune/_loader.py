"""Loads the compiled operator library so that ``torch.ops.fisheradaptune.*`` exist."""
from __future__ import annotations

import importlib

import torch


def load() -> None:
    try:
        importlib.import_module("fisheradaptune._C")
    except ImportError as e:  # pragma: no cover - only on a broken install
        raise ImportError(
            "fisheradaptune's compiled operators (fisheradaptune._C) could not be loaded. "
            "Install the package with `pip install --no-build-isolation .` against the torch "
            f"you run with (this is torch {torch.__version__}). Original error: {e}"
        ) from e


def has_cuda_kernels() -> bool:
    """True when the CUDA kernels were compiled into this build."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fisheradaptune::js_drift", "CUDA")
