"""The pure-PyTorch fallback as a user meets it (fisheradaptune/_loader.py): ``import
fisheradaptune`` works without a loadable compiled library, warns once saying why and how to get
the compiled operators, registers every op under the same names, and
``fisheradaptune.has_compiled_ops()`` says which operators run. Each case runs in a fresh
interpreter, since the choice is made once per process, at import."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import fisheradaptune
from fisheradaptune import _loader
from fisheradaptune.ops import _library, _schemas

from helpers import REPO_ROOT

PKG = pathlib.Path(fisheradaptune.__file__).parent

# Imports the package recording warnings, exercises one op through its wrapper and reports
# what a user would see, as JSON on the last line of stdout.
PROBE = r"""
import json, sys, warnings
# Only the package under PYTHONPATH: an editable install's finder would otherwise supply a
# compiled library from its own checkout when this copy has none.
sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, "__module__", "").startswith("__editable__")]
{prelude}
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    import fisheradaptune as f
    import fisheradaptune.ops, fisheradaptune.selection, fisheradaptune.vit
    f.has_compiled_ops(); f.has_cuda_kernels()
import torch
from fisheradaptune import groups
from fisheradaptune.ops import _schemas
fisher, grads = [torch.ones(3)], [torch.tensor([1.0, float("nan"), 2.0])]
sums, count = f.ops.fisher_accumulate_(fisher, grads, decay=0.5, scale=1.0,
                                       layout=groups.per_tensor([("w", fisher[0])]))
kernels = {}
for name in _schemas.SCHEMAS:
    kernel = {key: torch._C._dispatch_has_kernel_for_dispatch_key(f"fisheradaptune::{name}", key)
              for key in ("CPU", "CUDA")}
    kernels[name] = kernel
from fisheradaptune.ops import _library
stubs = sorted(n for (n, k), fn in _library._REGISTERED.items()
               if k == "CPU" and fn.__qualname__.startswith("_missing_"))
print(json.dumps({
    "compiled": f.has_compiled_ops(), "cuda": f.has_cuda_kernels(),
    "warnings": [(w.category.__name__, issubclass(w.category, f.FallbackWarning), str(w.message))
                 for w in seen if issubclass(w.category, UserWarning)],
    "fisher": fisher[0].tolist(), "sums": sums.tolist(), "count": int(count),
    "kernels": kernels, "stubs": stubs,
    "schemas": {n: str(getattr(torch.ops.fisheradaptune, n).default._schema) for n in _schemas.SCHEMAS},
    "constants": [getattr(f._loader.compiled_module(), "CHUNK", None),
                  getattr(f._loader.compiled_module(), "BLOCK", None)],
}))
"""


def _probe(env_value=None, root=None, prelude=""):
    """Run PROBE with FISHERADAPTUNE_FALLBACK set to ``env_value`` (None: unset), importing the
    package from ``root`` (default: this checkout), after running ``prelude``. Returns the
    report."""
    env = dict(os.environ)
    env.pop(_loader.ENV_VAR, None)
    if env_value is not None:
        env[_loader.ENV_VAR] = env_value
    root = root or PKG.parent
    env["PYTHONPATH"] = str(root)
    done = subprocess.run([sys.executable, "-c", PROBE.replace("{prelude}", prelude)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fallback_warning(report):
    """The one FallbackWarning of the report (failing on none or more than one)."""
    fallback = [w for w in report["warnings"] if w[1]]
    assert len(fallback) == 1, report["warnings"]
    assert fallback[0][0] == "FallbackWarning"
    return fallback[0][2]


def _works(report):
    """The fallback ran the op: the NaN skipped and counted, the group sum of the update."""
    assert report["compiled"] is False and report["cuda"] is False
    assert report["fisher"] == [1.5, 1.0, 4.5] and report["count"] == 1
    assert report["sums"] == [7.0]
    for name, keys in report["kernels"].items():
        assert keys == {"CPU": True, "CUDA": True}, name


def test_the_public_api_names_the_backend():
    assert {"has_compiled_ops", "FallbackWarning"} <= set(fisheradaptune.__all__)
    assert issubclass(fisheradaptune.FallbackWarning, UserWarning)
    assert isinstance(fisheradaptune.has_compiled_ops(), bool)
    if not fisheradaptune.has_compiled_ops():
        assert not fisheradaptune.has_cuda_kernels()


def test_forced_by_the_environment_variable():
    report = _probe("1")
    _works(report)
    message = _fallback_warning(report)
    assert "because FISHERADAPTUNE_FALLBACK=1 is set" in message
    assert "unset FISHERADAPTUNE_FALLBACK" in message
    assert "has_compiled_ops()" in message
    # Every op has a real fallback kernel once every family provides one (none left missing).
    assert report["stubs"] == []


def test_every_op_is_defined_with_the_compiled_schema():
    report = _probe("0")
    if not report["compiled"]:
        pytest.skip("no loadable compiled library in this checkout to compare with")
    assert report["warnings"] == []
    fallback = _probe("1")["schemas"]
    assert fallback == report["schemas"]
    # and the Python strings are exactly those (the namespace added)
    assert report["schemas"] == {n: f"{_schemas.NAMESPACE}::{s}"
                                 for n, s in _schemas.SCHEMAS.items()}


def test_chunk_and_block_equal_the_compiled_library_s():
    report = _probe("0")
    if not report["compiled"]:
        pytest.skip("no loadable compiled library in this checkout to compare with")
    assert report["constants"] == [_library.CHUNK, _library.BLOCK]


def _copy_without_library(tmp_path, corrupt: bool) -> pathlib.Path:
    """The package copied without its compiled library (or with a file that is not one)."""
    dest = tmp_path / "fisheradaptune"
    shutil.copytree(PKG, dest, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    if corrupt:
        (dest / next(PKG.glob("_C.*so"), PKG / "_C.abi3.so").name).write_bytes(b"not a library")
    return tmp_path


def _copy_without_cuda_library(tmp_path, corrupt: bool) -> pathlib.Path:
    """The package copied with its compiled CPU library but without its CUDA one (or with a
    file that is not one in its place)."""
    dest = tmp_path / "fisheradaptune"
    shutil.copytree(PKG, dest, ignore=shutil.ignore_patterns("_C_cuda*.so", "__pycache__"))
    if corrupt:
        (dest / "_C_cuda.abi3.so").write_bytes(b"not a library")
    return tmp_path


def test_a_torch_older_than_the_target_gets_the_fallback():
    report = _probe(None, prelude="import torch; torch.__version__ = '2.10.1'")
    _works(report)
    message = _fallback_warning(report)
    assert ("torch 2.10.1 is older than 2.11, the oldest torch its compiled library supports "
            "(LibTorch stable ABI)") in message


@pytest.mark.parametrize("corrupt", [False, True], ids=["missing", "corrupt"])
def test_compiled_cpu_kernels_without_cuda_ones(tmp_path, corrupt):
    """A CPU-only build (or a CUDA library that cannot load) in a CUDA torch: the compiled CPU
    kernels run and the pure-PyTorch kernels serve CUDA tensors, with one warning when the
    library failed to load (or a GPU is visible); in a CPU torch nothing is registered for CUDA
    and nothing is said."""
    if not any(PKG.glob("_C.*so")):
        pytest.skip("no compiled library in this checkout")
    report = _probe(None, root=_copy_without_cuda_library(tmp_path, corrupt))
    assert report["compiled"] and not report["cuda"]
    assert report["fisher"] == [1.5, 1.0, 4.5]  # the compiled CPU kernel ran (NaN skipped)
    cuda_torch = torch.version.cuda is not None
    assert all(k["CPU"] for k in report["kernels"].values())
    assert all(k["CUDA"] == cuda_torch for k in report["kernels"].values()), report["kernels"]
    warned = [m for _, is_fallback, m in report["warnings"] if is_fallback]
    if cuda_torch and (corrupt or torch.cuda.is_available()):
        assert len(warned) == 1 and "pure-PyTorch fallback kernels on CUDA tensors" in warned[0]
        assert ("fisheradaptune._C_cuda could not be loaded" if corrupt else
                "built without CUDA kernels") in warned[0]
    else:
        assert warned == []


@pytest.mark.parametrize("corrupt", [False, True], ids=["missing", "corrupt"])
def test_import_works_without_a_loadable_library(tmp_path, corrupt):
    report = _probe(None, root=_copy_without_library(tmp_path, corrupt))
    _works(report)
    message = _fallback_warning(report)
    assert "the compiled library fisheradaptune._C could not be loaded (" in message
    assert ("ImportError" if corrupt else "ModuleNotFoundError") in message
    assert "pip install" in message and "wheel" in message


def test_a_bad_value_of_the_environment_variable_is_refused():
    env = {**os.environ, _loader.ENV_VAR: "yes", "PYTHONPATH": str(PKG.parent)}
    done = subprocess.run([sys.executable, "-c", "import fisheradaptune"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert ("ValueError: fisheradaptune: environment variable FISHERADAPTUNE_FALLBACK='yes': "
            "expected '1'") in done.stderr


def test_a_fallback_kernel_for_an_unknown_op_is_refused():
    with pytest.raises(ValueError, match=r"register_fallback: 'fisher_acumulate_' is not a "
                                         r"fisheradaptune op"):
        _library.register_fallback({"fisher_acumulate_": lambda *a: None})


def test_no_module_reads_the_compiled_library_but_the_loader():
    offenders = []
    for path in [p for d in ("fisheradaptune", "tests", "tools", "benchmarks")
                 for p in (REPO_ROOT / d).rglob("*.py")]:
        if path.name in ("_loader.py", "test_fallback.py"):
            continue
        text = path.read_text()
        if "fisheradaptune._C" in text or "from . import _C" in text or "from .. import _C" in text:
            offenders.append(str(path.relative_to(REPO_ROOT)))
    assert offenders == []
