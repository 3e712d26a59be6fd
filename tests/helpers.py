"""Plain helpers shared by the test areas: devices, sizes, shape strategies, layouts, tensors,
Fisher-like data and multi-process (gloo) plumbing.

Import them with ``from helpers import ...`` from any folder under tests/ (pyproject.toml puts
tests/ on ``sys.path``). They are plain functions, not fixtures, so that hypothesis strategies
and ``pytest.mark.parametrize`` can use them at collection time. Fixtures live in the
``conftest.py`` of the area that uses them (tests/conftest.py: what every area needs).
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import random
import sys
from typing import List, Optional, Sequence, Tuple

import pytest
import torch
from hypothesis import strategies as st

import fisheradaptune
from fisheradaptune.groups import GroupLayout
from fisheradaptune.ops import _library

#: The repository's root (examples/, docs/ ...).
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# Devices

HAS_CUDA = torch.cuda.is_available() and fisheradaptune.has_cuda_kernels()
CUDA_SKIP_REASON = (
    "needs a CUDA device and fisheradaptune built with CUDA kernels "
    f"(torch.cuda.is_available()={torch.cuda.is_available()}, "
    f"has_cuda_kernels()={fisheradaptune.has_cuda_kernels()})")

#: Parametrisation over devices: "cpu" always; "cuda" is skipped (with a reason) without CUDA.
devices = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda",
                 marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON)]),
]

#: Skips a test without CUDA; pair it with ``@pytest.mark.cuda`` (tests/conftest.py refuses a
#: test skipped for CUDA_SKIP_REASON without the marker, so ``-m cuda`` selects every CUDA test).
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON)


#: Which operators run: the compiled library, or the pure-PyTorch fallback
#: (FISHERADAPTUNE_FALLBACK=1, or no loadable library).
COMPILED = fisheradaptune.has_compiled_ops()
COMPILED_SKIP_REASON = ("asserts a property of the compiled kernels, which the pure-PyTorch "
                        "fallback running here does not have (the same contract otherwise)")
#: Skips a test of a compiled-only fact under the fallback, with the reason.
requires_compiled = pytest.mark.skipif(not COMPILED, reason=COMPILED_SKIP_REASON)


# ---------------------------------------------------------------------------------------------
# Sizes

# fisheradaptune.ops._library holds them (a test checks they equal the compiled library's).
#: The kernels' chunk: the unit of parallel work and of deterministic reduction.
CHUNK = _library.CHUNK
#: The fisher kernel's float -> double flush block.
BLOCK = _library.BLOCK
#: Element counts straddling the block and chunk sizes.
EDGE_NUMELS = [1, 7, BLOCK - 1, BLOCK, BLOCK + 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 1]


def shape_with_numel(n: int, rng: random.Random) -> Tuple[int, ...]:
    """A shape of ``n`` elements (1-D or 2-D, picked by ``rng``)."""
    if n == 0:
        return rng.choice([(0,), (0, 3), (3, 0)])
    divisors = [d for d in range(2, min(n, 64) + 1) if n % d == 0]
    if divisors and rng.random() < 0.5:
        d = rng.choice(divisors)
        return (d, n // d)
    return (n,)


@st.composite
def shape_lists(draw, max_len: int = 300, allow_edge_sizes: bool = True) -> List[Tuple[int, ...]]:
    """Lists of 0..max_len shapes. Long lists hold small tensors (the suite must stay fast);
    short lists may hold sizes that straddle the kernels' block and chunk sizes."""
    n = draw(st.one_of(st.integers(0, 6), st.integers(0, max_len)))
    small = st.one_of(
        st.just(()),                                                      # 0-d
        st.tuples(st.integers(0, 40)),                                    # vectors, incl. empty
        st.tuples(st.integers(0, 8), st.integers(1, 8)),                  # matrices
    )
    if n <= 4 and allow_edge_sizes:
        edge = st.sampled_from(EDGE_NUMELS).map(lambda k: (k,))
        elem = st.one_of(small, edge, st.sampled_from([(32, 1024), (3, 11, 1000)]))
    else:
        elem = small
    return draw(st.lists(elem, min_size=n, max_size=n))


# ---------------------------------------------------------------------------------------------
# Layouts

LAYOUT_KINDS = ("per_tensor", "slabs", "gaps", "spanning")


def make_layout(shapes: Sequence[Sequence[int]], kind: str, seed: int = 0) -> GroupLayout:
    """A layout over ``shapes`` of one of :data:`LAYOUT_KINDS`.

    - ``per_tensor`` / ``slabs``: the library's builders (every element in exactly one group).
    - ``gaps``: random contiguous slabs per tensor, about a quarter of them left in no group,
      plus a group with no elements at all.
    - ``spanning``: random pieces assigned to a few groups shared across tensors (the shape of a
      ``per_module`` layout, but with several pieces per tensor), also with gaps.
    """
    from fisheradaptune import groups

    named = [(f"t{i}", torch.empty(s)) for i, s in enumerate(shapes)]
    if kind == "per_tensor":
        return groups.per_tensor(named)
    if kind == "slabs":
        return groups.slabs(named, k=1 + seed % 5)
    rng = random.Random(seed)
    rows: List[Tuple[int, int, int, int]] = []
    names: List[str] = []
    pool = max(1, len(shapes) // 3)
    if kind == "spanning":
        names = [f"g{j}" for j in range(pool)]
    for t, s in enumerate(shapes):
        numel = int(torch.Size(s).numel())
        if numel == 0:
            continue
        cuts = sorted(set(rng.sample(range(1, numel), min(numel - 1, rng.randint(0, 4)))))
        bounds = [0] + cuts + [numel]
        for b, e in zip(bounds, bounds[1:]):
            if rng.random() < 0.25:
                continue  # a gap: elements in no group
            if kind == "spanning":
                g = rng.randrange(pool)
            else:
                g = len(names)
                names.append(f"t{t}.[{b}:{e}]")
            rows.append((t, b, e, g))
    names.append("empty-group")
    rng.shuffle(rows)  # segment order must not matter
    seg = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)
    return GroupLayout(tuple(n for n, _ in named), tuple(torch.Size(s) for s in shapes),
                       tuple(names), seg)


def group_index(layout: GroupLayout) -> List[torch.Tensor]:
    """Per tensor, an int64 map element -> group id (-1 where in no group)."""
    out = [torch.full((int(torch.Size(s).numel()),), -1, dtype=torch.int64) for s in layout.shapes]
    for t, b, e, g in layout.segments.tolist():
        assert bool((out[t][b:e] == -1).all()), "element in two groups"
        out[t][b:e] = g
    return out


# ---------------------------------------------------------------------------------------------
# Tensors


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_fisher(shapes, seed: int, dtype=torch.float32, device="cpu") -> List[torch.Tensor]:
    """Non-negative Fisher-like tensors with a wide dynamic range."""
    g = make_generator(seed)
    out = []
    for s in shapes:
        x = torch.rand(s, generator=g, dtype=torch.float64) * torch.exp(
            4 * torch.randn(s, generator=g, dtype=torch.float64))
        out.append(x.to(dtype).to(device))
    return out


def rand_grads(shapes, seed: int, dtype=torch.float32, device="cpu",
               none_prob: float = 0.0) -> List[Optional[torch.Tensor]]:
    g = make_generator(seed)
    rng = random.Random(seed)
    out: List[Optional[torch.Tensor]] = []
    for s in shapes:
        x = torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(device)
        out.append(None if rng.random() < none_prob else x)
    return out


def snapshot(tensors):
    """Deep copy of a (possibly nested) list of tensors / None, to compare after a call."""
    if tensors is None:
        return None
    if isinstance(tensors, torch.Tensor):
        return tensors.detach().clone()
    return [snapshot(t) for t in tensors]


def assert_unchanged(before, after) -> None:
    """Bitwise equality (NaN == NaN) of a snapshot and the live tensors."""
    if before is None or after is None:
        assert before is None and after is None
        return
    if isinstance(before, torch.Tensor):
        assert isinstance(after, torch.Tensor)
        assert before.dtype == after.dtype and before.shape == after.shape
        torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)
        return
    assert len(before) == len(after)
    for b, a in zip(before, after):
        assert_unchanged(b, a)


def assert_bitwise_equal(a, b) -> None:
    assert_unchanged(a, b)


def set_threads(n: int):
    """Context manager: torch.set_num_threads(n), restored afterwards."""
    class _Threads:
        def __enter__(self):
            self.old = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.old)
    return _Threads()


# ---------------------------------------------------------------------------------------------
# Fisher-like data


def random_snapshots(shapes, seed, dtype=torch.float32, device="cpu", zeros=0.0, negative=False):
    """Two independent Fisher-like snapshots (wide dynamic range; optionally some exact zeros
    and negative entries, which the drift ops take by magnitude)."""
    g = make_generator(seed)
    out = []
    for _ in range(2):
        side = []
        for s in shapes:
            x = torch.rand(s, generator=g, dtype=torch.float64) * torch.exp(
                3 * torch.randn(s, generator=g, dtype=torch.float64))
            if zeros:
                x = torch.where(torch.rand(s, generator=g, dtype=torch.float64) < zeros, 0.0, x)
            if negative:
                x = torch.where(torch.rand(s, generator=g, dtype=torch.float64) < 0.5, -x, x)
            side.append(x.to(dtype).to(device))
        out.append(side)
    return out


# ---------------------------------------------------------------------------------------------
# Multi-process (torch.distributed, gloo) tests


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a process group's rendezvous."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo(rank: int, world: int, port: int):
    """A ``world``-rank gloo process group on 127.0.0.1:``port`` (one thread per rank) for the
    ``with`` block. On success the ranks meet at a barrier before tearing down (a rank that
    destroys gloo while another still talks to it aborts the other); after an error the group
    is destroyed at once, so the failure surfaces instead of a hang.

    With ``world > 1`` (a process started by ``mp.spawn``) a successful block then ends the
    process with ``os._exit(0)``: objects still holding gloo work (DDP's reducer, say) would
    otherwise be destroyed during interpreter shutdown, which intermittently aborts the
    process ("terminate called without an active exception"; pytorch/pytorch#179291)."""
    import torch.distributed as dist
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            init_method=f"tcp://127.0.0.1:{port}")
    torch.set_num_threads(1)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    if world > 1:
        dist.barrier()
    dist.destroy_process_group()
    if world > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def make_token_model():
    """A small token-wise MLP for selection tests: inputs [B, T, 6], outputs [B, T, 3]."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.GELU(), torch.nn.Linear(12, 12),
                               torch.nn.GELU(), torch.nn.Linear(12, 3))


def token_calibration():
    """Two calibration batches of 8 samples for :func:`make_token_model`."""
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 5, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
            for _ in range(2)]


def token_loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x).mean(1), y)


# ---------------------------------------------------------------------------------------------
# The pure-PyTorch fallback kernels (tests/ops/test_fallback_<family>.py)

#: Skips a comparison with the compiled op when the fallback is what runs (the compiled op is
#: then the fallback itself: the comparison would be with itself).
requires_compiled_op = pytest.mark.skipif(
    not COMPILED, reason="compares the fallback kernel with the compiled op, which is not "
    "loaded here (the pure-PyTorch fallback is running)")


def raised(call) -> BaseException:
    """The exception ``call()`` raises (a test failure if it returns)."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 - returned to be compared
        return e
    raise AssertionError("expected an exception, the call returned")


def assert_same_refusal(fallback_call, compiled_call, live) -> BaseException:
    """Both calls refuse with the same exception type and message, and neither writes into
    ``live`` (the tensors of the call). Returns the fallback's exception."""
    before = snapshot(live)
    got = raised(fallback_call)
    assert_unchanged(before, live)
    want = raised(compiled_call)
    assert_unchanged(before, live)
    assert type(got) is type(want) and str(got) == str(want), (got, want)
    return got


# A small FisherAdapTune run that freezes within a few steps (the checkpoint and fisher_dtype
# tests of tests/adaptune share it).
def tiny_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def tiny_adaptune(model: torch.nn.Module, **kwargs):
    """FisherAdapTune over AdamW, checking every 2 steps, freezing eagerly by default."""
    kwargs.setdefault("policy", fisheradaptune.Threshold(tau=10.0, patience=1,
                                                         min_active_fraction=0.4))
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return fisheradaptune.FisherAdapTune(inner, model, check_every=2, **kwargs)


def tiny_train(model: torch.nn.Module, opt, steps: int) -> None:
    """``steps`` optimizer steps on one fixed batch of 16 samples, 3 classes."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    for _ in range(steps):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
