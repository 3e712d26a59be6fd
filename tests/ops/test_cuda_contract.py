"""One contract on both backends: the edge cases where the CUDA kernels once differed from the CPU
ones, and the claims of CPU-identical rounding (Note [CPU-identical Fisher update] in
csrc/fisher/fisher_accumulate_cuda.cu, the reference EMA in csrc/drift/drift_mass_cuda.cu). CPU
parts run everywhere; the CUDA parts skip without a GPU and run on the GPU machine
(``pytest -m cuda``)."""
from __future__ import annotations

import importlib.util
import os
import re
import sys

import pytest
import torch

from helpers import (REPO_ROOT, assert_bitwise_equal, assert_unchanged, devices, make_generator,
                     make_layout, requires_cuda, snapshot)
from fisheradaptune import groups, ops, reference

_ops = torch.ops.fisheradaptune


# ---------------------------------------------------------------------------------------------
# sampled_grad: the index range is checked on every backend, before anything runs


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("t", [0, 5])
def test_sampled_grad_out_of_range_index_raises(device, t):
    grad_out = torch.randn(t, 3, device=device)
    x = torch.randn(t, 6, device=device)
    for bad in ([[0, 6], [1, 2], [3, 4]], [[0, 1], [-1, 2], [3, 4]]):
        index = torch.tensor(bad, device=device)
        with pytest.raises(ValueError, match=r"argument 'index'.*\[0, 6\)"):
            ops.sampled_grad(grad_out, x, index)


@pytest.mark.parametrize("device", devices)
def test_sampled_grad_empty_shapes(device):
    # in == 0 admits only C == 0; T == 0 with a valid index gives zeros.
    with pytest.raises(ValueError, match=r"argument 'index'.*in = 0"):
        ops.sampled_grad(torch.randn(4, 2, device=device), torch.randn(4, 0, device=device),
                         torch.zeros(2, 1, dtype=torch.int64, device=device))
    empty = ops.sampled_grad(torch.randn(4, 2, device=device), torch.randn(4, 0, device=device),
                             torch.zeros(2, 0, dtype=torch.int64, device=device))
    assert empty.shape == (2, 0)
    z = ops.sampled_grad(torch.randn(0, 2, device=device), torch.randn(0, 5, device=device),
                         torch.tensor([[0, 4], [2, 2]], device=device))
    assert z.shape == (2, 2) and z.device.type == device and bool((z == 0).all())


@pytest.mark.parametrize("device", devices)
def test_sampled_grad_cached_check_sees_in_place_writes(device):
    # Note [Checked indices]: the typed wrapper remembers a checked index with its version, so
    # an in-place write (or one through a view sharing the counter) forces a new check.
    grad_out, x = torch.randn(7, 3, device=device), torch.randn(7, 6, device=device)
    index = torch.tensor([[0, 5], [1, 2], [3, 4]], device=device)
    want = reference.sampled_grad(grad_out, x, index)
    for _ in range(3):
        torch.testing.assert_close(ops.sampled_grad(grad_out, x, index), want)
    index[1, 0] = 6
    with pytest.raises(ValueError, match="'index'"):
        ops.sampled_grad(grad_out, x, index)
    index.view(-1)[2] = 0          # a view: same version counter
    ops.sampled_grad(grad_out, x, index)
    index.view(-1)[3] = -1
    with pytest.raises(ValueError, match="'index'"):
        ops.sampled_grad(grad_out, x, index)
    # The same index checked against a narrower x is refused: the record keeps the `in` it was
    # checked against, not a verdict.
    index.view(-1)[3] = 5
    ops.sampled_grad(grad_out, x, index)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        ops.sampled_grad(grad_out, x[:, :5], index)


# ---------------------------------------------------------------------------------------------
# token_prune_merge: neither direction is limited by the grid (N > 65535)


@pytest.mark.parametrize("device", devices)
def test_token_prune_merge_many_tokens(device):
    g = make_generator(0)
    n, c, keep = 70_000, 8, 10
    x = torch.randn(1, n, c, generator=g).to(device).requires_grad_()
    scores = torch.randn(1, n - 1, generator=g).to(device).requires_grad_()
    out, kept, sizes = ops.token_prune_merge(x, scores, keep)
    assert out.shape == (1, 1 + keep + 1, c)
    go = torch.randn(out.shape, generator=g).to(device)
    gx, gs = torch.autograd.grad(out, (x, scores), go)
    xr, sr = x.detach().cpu().double().requires_grad_(), scores.detach().cpu().double().requires_grad_()
    out_r, kept_r, _ = reference.token_prune_merge(xr, sr, keep)
    gx_r, gs_r = torch.autograd.grad(out_r, (xr, sr), go.cpu().double())
    assert torch.equal(kept.cpu(), kept_r)
    # float32 sums over ~70000 fused tokens
    torch.testing.assert_close(out.cpu().double(), out_r.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx.cpu().double(), gx_r, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gs.cpu().double(), gs_r, rtol=1e-4, atol=1e-6)


def test_token_prune_merge_score_dtypes_validated():
    # Only x's dtype or float32 are admitted for the scores (the CUDA kernels exist for those).
    x = torch.randn(2, 5, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="'scores'"):
        ops.token_prune_merge(x, torch.randn(2, 4, dtype=torch.float16), 2)
    with pytest.raises(ValueError, match="'scores'"):
        ops.token_prune_merge(x.float(), torch.randn(2, 4, dtype=torch.float64), 2)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("x_dtype,s_dtype", [
    (torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float64, torch.float32),
    (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16), (torch.float16, torch.float32)])
def test_token_prune_merge_every_admitted_dtype_pair_runs_on_cuda(x_dtype, s_dtype):
    g = make_generator(1)
    x = torch.randn(3, 17, 5, generator=g).to("cuda", x_dtype).requires_grad_()
    s = torch.randn(3, 16, generator=g).to("cuda", s_dtype).requires_grad_()
    out, kept, _ = ops.token_prune_merge(x, s, 6)
    out.sum().backward()
    cpu_out, cpu_kept, _ = ops.token_prune_merge(x.detach().cpu(), s.detach().cpu(), 6)
    assert torch.equal(kept.cpu(), cpu_kept)
    torch.testing.assert_close(out.detach().cpu(), cpu_out, rtol=2e-2, atol=2e-2)
    assert x.grad.dtype == x_dtype and s.grad.dtype == s_dtype


# ---------------------------------------------------------------------------------------------
# per_sample_grad_sq_: full fp32 whatever the float32 matmul precision


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("precision", ["high", "medium"])
def test_per_sample_ignores_reduced_matmul_precision(device, precision):
    g = make_generator(2)
    x = torch.randn(6, 9, 64, generator=g).to(device)
    go = torch.randn(6, 9, 48, generator=g).to(device)
    want = torch.zeros(48, 64, device=device)
    ops.per_sample_grad_sq_(want, x, go)
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        got = torch.zeros(48, 64, device=device)
        ops.per_sample_grad_sq_(got, x, go)
        # the caller's setting is restored
        assert torch.get_float32_matmul_precision() == precision
    finally:
        torch.set_float32_matmul_precision(saved)
    assert_bitwise_equal(got, want)
    exact = torch.einsum("nto,nti->noi", go.double(), x.double()).pow(2).sum(0)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# js_drift histogram: the bin range is never empty


@pytest.mark.parametrize("device", devices)
def test_histogram_range_below_an_ulp(device):
    # Values near 10 (log10 ~ 1, ulp 2.2e-16): lo + 1e-17 rounds back to lo. The range then is
    # [lo, nextafter(lo)] (Note [Histogram range]); no NaN bin, the same answer as the reference.
    cur = torch.full((1000,), 10.0, device=device)
    ref = torch.full((1000,), 10.0, device=device)
    ref[:5] = 1000.0                      # beyond the upper quantile: dropped
    cur2 = cur.clone()
    cur2[:3] = 0.5                        # below the lower quantile: dropped
    layout = groups.per_tensor([("w", cur)])
    for a, b in ((cur, ref), (cur2, ref), (cur, cur)):
        got = ops.js_drift([a], [b], layout, drift_mode="histogram", min_log_range=1e-17)
        want = reference.js_drift([a.cpu()], [b.cpu()], layout, drift_mode="histogram",
                                  min_log_range=1e-17)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# CUDA-graph capture: refused before anything runs (Note [No CUDA-graph capture])


@pytest.mark.cuda
@requires_cuda
def test_cuda_graph_capture_refused_cleanly():
    shapes = [(300,), (17, 5)]
    fisher = [torch.rand(s, device="cuda") for s in shapes]
    grads = [torch.randn(s, device="cuda") for s in shapes]
    layout = make_layout(shapes, "slabs")
    ops.fisher_accumulate_(fisher, grads, decay=0.9, scale=0.1, layout=layout)  # warm-up
    before = snapshot([fisher])
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with pytest.raises(RuntimeError, match="CUDA graph"):
            with torch.cuda.graph(graph, stream=stream):
                ops.fisher_accumulate_(fisher, grads, decay=0.9, scale=0.1, layout=layout)
    torch.cuda.synchronize()
    assert_unchanged(before, [fisher])
    # the device is usable afterwards
    ops.fisher_accumulate_(fisher, grads, decay=0.9, scale=0.1, layout=layout)
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Bitwise CPU == CUDA where the sources claim it


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fisher_update_bitwise_cpu_cuda(grad_dtype, state_dtype):
    # bfloat16 state (Note [bfloat16 state], csrc/common/state.h): the same float update
    # rounded to nearest even on both backends.
    g = make_generator(3)
    shapes = [(4097,), (33, 65), (1,), (0,)]
    fisher = [(torch.rand(s, generator=g) * 3).to(state_dtype) for s in shapes]
    grads = [(torch.randn(s, generator=g) * 7).to(grad_dtype) for s in shapes]
    grads[0][:5] = float("nan")
    grads[1][0, :3] = float("inf")
    if grad_dtype == torch.float32:
        grads[1][1, :4] = 3e38            # the square overflows: skipped and counted
        if state_dtype == torch.bfloat16:
            # 0.93 * max + g * g / 3 = 3.3994e38: finite in float32, Inf once rounded to
            # bfloat16 (past max + ulp / 2 = 3.3961e38): skipped and counted on both backends.
            fisher[0][-4:] = torch.finfo(torch.bfloat16).max
            grads[0][-4:] = 8.61e18
    layout = make_layout(shapes, "slabs")
    f_cpu = [f.clone() for f in fisher]
    f_gpu = [f.cuda() for f in fisher]
    _, n_cpu = ops.fisher_accumulate_(f_cpu, grads, decay=0.93, scale=1 / 3, layout=layout)
    _, n_gpu = ops.fisher_accumulate_(f_gpu, [t.cuda() for t in grads], decay=0.93, scale=1 / 3,
                                      layout=layout)
    for a, b in zip(f_cpu, f_gpu):
        assert_bitwise_equal(a, b.cpu())
    assert int(n_cpu) == int(n_gpu) > 0


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["mass", "histogram"])
def test_reference_update_bitwise_cpu_cuda(mode, dtype):
    g = make_generator(4)
    shapes = [(5000,), (31, 7)]
    cur = [torch.rand(s, generator=g).to(dtype) for s in shapes]
    ref = [torch.rand(s, generator=g).to(dtype) for s in shapes]
    layout = make_layout(shapes, "slabs")
    r_cpu = [r.clone() for r in ref]
    r_gpu = [r.cuda() for r in ref]
    d_cpu = ops.js_drift(cur, r_cpu, layout, drift_mode=mode, update_reference=0.37)
    d_gpu = ops.js_drift([c.cuda() for c in cur], r_gpu, layout, drift_mode=mode,
                         update_reference=0.37)
    for a, b in zip(r_cpu, r_gpu):
        assert_bitwise_equal(a, b.cpu())
    # distances agree to rounding (not bitwise: the device's log differs in the last ulp)
    torch.testing.assert_close(d_gpu.cpu(), d_cpu, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Launch resources (Note [Launch resources], csrc/common/multi_tensor.cuh), in the sources: every
# kernel's block size is its __launch_bounds__, and tools/cuda_resources.py, which reads the
# compiled kernels' registers and shared memory, knows every launch's dynamic shared memory.

def _resources_tool():
    path = os.path.join(REPO_ROOT, "tools", "cuda_resources.py")
    spec = importlib.util.spec_from_file_location("fisheradaptune_cuda_resources_contract", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _cuda_sources():
    """{path relative to csrc/: text} of every CUDA source and header."""
    root = REPO_ROOT / "csrc"
    return {str(p.relative_to(root)): p.read_text()
            for p in sorted(root.rglob("*")) if p.suffix in (".cu", ".cuh")}


def _kernels(text):
    """{kernel name: __launch_bounds__ argument or None} of the __global__ kernels in text."""
    out = {}
    for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\(([^)]*)\)\s+)?(\w+)\s*\(",
                         text):
        out[m.group(2)] = m.group(1).strip() if m.group(1) else None
    return out


def _split_top_level(args):
    parts, depth, cur = [], 0, ""
    for ch in args:
        if ch in "(<[":
            depth += 1
        elif ch in ")>]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def _launches(text):
    """(kernel name, block-size expression, dynamic shared memory expression or None) of every
    `kernel<...><<<grid, block[, smem[, stream]]>>>` launch in text."""
    out = []
    for m in re.finditer(r"<<<(.*?)>>>", text, re.S):
        i = m.start() - 1
        if text[i] == ">":  # skip the template arguments, balanced
            depth = 0
            while True:
                depth += {">": 1, "<": -1}.get(text[i], 0)
                if depth == 0:
                    break
                i -= 1
            i -= 1
        name = re.search(r"(\w+)\s*$", text[:i + 1]).group(1)
        args = _split_top_level(m.group(1))
        out.append((name, args[1], args[2] if len(args) > 2 else None))
    return out


def test_every_kernel_is_launched_with_its_launch_bounds():
    sources = _cuda_sources()
    kernels = {}  # name -> (file, bound); a name may be defined in several files
    for path, text in sources.items():
        for name, bound in _kernels(text).items():
            assert bound is not None, f"{path}: kernel {name} has no __launch_bounds__"
            # A named constant, shared with the launch: a literal could drift from it.
            assert re.fullmatch(r"[A-Za-z_][\w:]*", bound), f"{path}: {name}: {bound}"
            kernels.setdefault(name, []).append((path, bound))
    # Every __global__ outside comments was parsed (none hides from the checks below).
    declared = sum(len(re.findall(r"^[^/\n]*__global__", t, re.M)) for t in sources.values())
    assert sum(map(len, kernels.values())) == declared >= 15, kernels
    launched = set()
    for path, text in sources.items():
        local = _kernels(text)
        for name, block, _ in _launches(text):
            # The definition in the same file, else the one shared header that defines it.
            defs = [(p, b) for p, b in kernels[name] if p == path or name not in local]
            assert len(defs) == 1, (path, name, defs)
            assert block == defs[0][1], (
                f"{path}: {name} is launched with {block} threads but declares "
                f"__launch_bounds__({defs[0][1]})")
            launched.add((defs[0][0], name))
    defined = {(p, n) for n, ds in kernels.items() for p, _ in ds}
    assert launched == defined, f"kernels never launched: {sorted(defined - launched)}"


def test_dynamic_shared_memory_is_known_to_the_resource_check():
    tool = _resources_tool()
    sources = _cuda_sources()
    users = set()
    for path, text in sources.items():
        lines = text.splitlines()
        defs = list(tool._definitions(lines))
        for i, line in enumerate(lines):
            if "extern __shared__" in line:
                users.add((os.path.basename(path), [n for j, n in defs if j < i][-1]))
    assert {n for _, n in users} == set(tool.DYNAMIC_SMEM_NAMES)
    assert {f for f, _ in users} == {f for f, _ in tool.DYNAMIC_SMEM}
    header = sources[os.path.join("common", "multi_tensor.cuh")]
    m = re.search(r"constexpr int64_t kMaxDynamicSmem = (\d+) \* 1024;", header)
    assert m and int(m.group(1)) * 1024 == tool.MAX_DYNAMIC_SMEM
    # Each launch with dynamic shared memory bounds it by a constant defined from kMaxDynamicSmem.
    for path, text in sources.items():
        for name, _, smem in _launches(text):
            if smem not in (None, "0"):
                assert "kMaxDynamicSmem" in text, (path, name)
