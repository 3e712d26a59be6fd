"""tools/build_config.py: how setup.py picks the CUDA toolkit and the architecture list.

Driven with fake toolkits in temporary folders (a ``bin/nvcc`` file and an empty
``libcudart.so``), so it runs anywhere; nothing is compiled.
"""
from __future__ import annotations

import importlib.util
import os
import stat
import sys

import pytest

from helpers import REPO_ROOT


def _load():
    path = os.path.join(REPO_ROOT, "tools", "build_config.py")
    spec = importlib.util.spec_from_file_location("fisheradaptune_build_config_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bc = _load()


def make_toolkit(root, lib="lib64", cudart=True, nvcc=True):
    os.makedirs(os.path.join(root, "bin"), exist_ok=True)
    os.makedirs(os.path.join(root, lib), exist_ok=True)
    if nvcc:
        exe = os.path.join(root, "bin", "nvcc")
        with open(exe, "w") as f:
            f.write("#!/bin/sh\necho fake nvcc\n")
        os.chmod(exe, os.stat(exe).st_mode | stat.S_IEXEC)
    if cudart:
        open(os.path.join(root, lib, "libcudart.so.13"), "w").close()
    return str(root)


def make_wrapper(folder, target):
    """A wrapper script like /usr/local/bin/nvcc: exec's the real nvcc."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "nvcc")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\n# forwards to the toolkit\nexec "{target}" "$@"\n')
    os.chmod(path, 0o755)
    return path


def resolve(env, torch_cuda="13.0", gpus=0, nvcc=None, roots=(), globs=()):
    return bc.resolve(env, torch_cuda, gpus, which=lambda _: nvcc, system_roots=roots,
                      system_globs=globs)


def test_wrapper_nvcc_is_followed_to_its_toolkit(tmp_path):
    real = make_toolkit(tmp_path / "cuda-13.0")
    wrapper = make_wrapper(str(tmp_path / "bin"), os.path.join(real, "bin", "nvcc"))
    # torch's own guess would be the folder above the wrapper, which has no runtime.
    cfg = resolve({"FORCE_CUDA": "1"}, nvcc=wrapper)
    assert cfg.with_cuda
    assert cfg.toolkit.root == os.path.realpath(real)
    assert cfg.toolkit.lib_dir == os.path.join(os.path.realpath(real), "lib64")
    assert "nvcc on PATH" in cfg.toolkit.origin and "->" in cfg.toolkit.origin


def test_cuda_home_without_runtime_is_skipped_with_reason(tmp_path):
    bad = make_toolkit(tmp_path / "bad", cudart=False)
    good = make_toolkit(tmp_path / "good", lib="targets/x86_64-linux/lib")
    cfg = resolve({"FORCE_CUDA": "1", "CUDA_HOME": bad}, roots=(good,))
    assert cfg.toolkit.root == os.path.realpath(good)
    assert cfg.toolkit.lib_dir.endswith(os.path.join("targets", "x86_64-linux", "lib"))
    assert any("no libcudart" in s and "CUDA_HOME" in s for s in cfg.skipped)
    assert any("skipped" in line for line in bc.describe(cfg))


def test_newest_versioned_toolkit_first(tmp_path):
    for v in ("cuda-12.4", "cuda-13.0", "cuda-12.10"):
        make_toolkit(tmp_path / v)
    cfg = resolve({"FORCE_CUDA": "1"}, globs=(str(tmp_path / "cuda-*"),))
    assert os.path.basename(cfg.toolkit.root) == "cuda-13.0"


def test_force_cuda_without_toolkit_fails_clearly(tmp_path):
    with pytest.raises(bc.BuildConfigError, match="CUDA_HOME.*FORCE_CUDA=0"):
        resolve({"FORCE_CUDA": "1", "CUDA_HOME": str(tmp_path / "missing")})


def test_force_cuda_with_cpu_torch_fails_clearly():
    with pytest.raises(bc.BuildConfigError, match="CPU build"):
        resolve({"FORCE_CUDA": "1"}, torch_cuda=None)


def test_default_arch_list_without_gpu(tmp_path):
    tk = make_toolkit(tmp_path / "cuda")
    cfg = resolve({"FORCE_CUDA": "1", "CUDA_HOME": tk})
    # torch itself would fail here (no GPU to read an architecture from).
    assert cfg.arch_list == bc.DEFAULT_ARCH_LIST == "9.0+PTX"
    env = {}
    bc.apply(cfg, env)
    assert env == {"CUDA_HOME": os.path.realpath(tk), "TORCH_CUDA_ARCH_LIST": "9.0+PTX"}


@pytest.mark.parametrize("env_arch,gpus,want", [("8.0;9.0", 0, "8.0;9.0"), ("8.0", 2, "8.0"),
                                                ("", 1, None), ("native", 0, "9.0+PTX")])
def test_arch_list_choice(tmp_path, env_arch, gpus, want):
    tk = make_toolkit(tmp_path / "cuda")
    cfg = resolve({"FORCE_CUDA": "1", "CUDA_HOME": tk, "TORCH_CUDA_ARCH_LIST": env_arch},
                  gpus=gpus)
    assert cfg.arch_list == want


@pytest.mark.parametrize("env,torch_cuda,gpus,on", [
    ({"FORCE_CUDA": "0"}, "13.0", 1, False),
    ({}, None, 0, False),
    ({}, "13.0", 0, False),     # no GPU and not forced: CPU kernels only
    ({}, "13.0", 1, True),
])
def test_when_cuda_kernels_are_built(tmp_path, env, torch_cuda, gpus, on):
    tk = make_toolkit(tmp_path / "cuda")
    cfg = resolve(dict(env, CUDA_HOME=tk), torch_cuda=torch_cuda, gpus=gpus)
    assert cfg.with_cuda is on and cfg.reason
    env_out = {}
    bc.apply(cfg, env_out)
    assert bool(env_out) is on


def test_unforced_build_without_toolkit_falls_back_to_cpu(tmp_path):
    cfg = resolve({"CUDA_HOME": str(tmp_path / "none")}, gpus=1)
    assert not cfg.with_cuda and "FORCE_CUDA=1" in cfg.reason


def _wheel_with_a_missing_compiler(tmp_path, required: bool):
    """`pip wheel .` of a copy of the repository with CXX/CC pointing at no compiler."""
    import shutil
    import subprocess

    if not os.path.exists(os.path.join(REPO_ROOT, ".git")):
        pytest.skip("needs a git checkout of the repository (its tracked files are copied)")
    tree = tmp_path / "tree"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(REPO_ROOT, rel), tree / rel)
    env = {**os.environ, "CXX": "/nonexistent/c++", "CC": "/nonexistent/cc", "FORCE_CUDA": "0",
           "FISHERADAPTUNE_BUILD_REQUIRED": "1" if required else "0"}
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation",
                           "--no-deps", str(tree), "-w", str(tmp_path / "dist")], env=env,
                          capture_output=True, text=True, timeout=600)
    return done, sorted((tmp_path / "dist").glob("*.whl"))


@pytest.mark.slow
def test_the_extension_is_optional_where_it_cannot_be_compiled(tmp_path):
    import zipfile

    done, wheels = _wheel_with_a_missing_compiler(tmp_path, required=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "fisheradaptune: WARNING: could not build" in output
    assert "pure-PyTorch fallback operators" in output
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "fisheradaptune/__init__.py" in names and not [n for n in names if n.endswith(".so")]


@pytest.mark.slow
def test_a_required_build_fails_where_it_cannot_be_compiled(tmp_path):
    done, wheels = _wheel_with_a_missing_compiler(tmp_path, required=True)
    assert done.returncode != 0 and not wheels
