"""The built libraries are on the LibTorch stable ABI and the Python limited API (Note [Stable
ABI], csrc/common/stable.h): they call no libtorch C++ symbol, only its stable C shim, and are
named as abi3 extensions. CI checks the built wheel the same way (tools/check_stable_abi.sh in
.ci/integration.sh); this test checks the library this checkout imports."""
from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

import fisheradaptune
from fisheradaptune import _loader

from helpers import REPO_ROOT

PKG = pathlib.Path(fisheradaptune.__file__).parent
LIBS = sorted(PKG.glob("_C*.so"))


def _compiled_libraries():
    if not fisheradaptune.has_compiled_ops() or not LIBS:
        pytest.skip("no compiled library in use")
    if shutil.which("nm") is None or shutil.which("c++filt") is None:
        pytest.skip("binutils (nm, c++filt) not installed")
    return LIBS


def test_libraries_are_abi3_extensions():
    for lib in _compiled_libraries():
        assert lib.name.endswith(".abi3.so"), f"{lib.name}: not built with py_limited_api"


def test_libraries_call_no_libtorch_cpp_symbol():
    libs = _compiled_libraries()
    done = subprocess.run(["bash", str(pathlib.Path(REPO_ROOT) / "tools" / "check_stable_abi.sh"),
                           *map(str, libs)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(": 0 libtorch C++ symbols;") == len(libs), done.stdout


def test_the_loader_and_the_build_agree_on_the_target_torch():
    text = (pathlib.Path(REPO_ROOT) / "setup.py").read_text()
    major, minor = _loader.TARGET_TORCH
    assert f"TARGET_TORCH = ({major}, {minor})" in text
    header = (pathlib.Path(REPO_ROOT) / "csrc" / "common" / "stable.h").read_text()
    assert f"(((0ULL + {major}) << 56) | ((0ULL + {minor}) << 48))" in header
