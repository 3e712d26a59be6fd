"""FisherAdapTune under DistributedDataParallel: 2 processes on gloo (CPU) equal one process
with the same global batch, and every rank makes the same freeze decisions."""
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import (REPO_ROOT, free_port, gloo, make_token_model, set_threads,
                     token_calibration, token_loss)
import fisheradaptune as fat

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

STEPS, WORLD, GLOBAL_BATCH = 12, 2, 16


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))


def make_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)


def make_opt(model, wrapped, estimator="empirical", shard_state=True):
    return fat.FisherAdapTune(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05),
                              wrapped, check_every=3, estimator=estimator, shard_state=shard_state,
                              policy=fat.Threshold(tau=0.3, patience=1, min_active_fraction=0.2))


def train(forward, opt, x, y):
    for _ in range(STEPS):
        nn.functional.cross_entropy(forward(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def fisher_elements(opt):
    return sum(f.numel() for f in opt.estimator.buffers() if f is not None)


def _worker(rank, port, out_dir, estimator, shard_state):
    with gloo(rank, WORLD, port):
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = make_opt(model, ddp, estimator, shard_state)
        x, y = make_data()
        shard = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
        train(ddp, opt, x[shard], y[shard])
        torch.save({"params": [p.detach().clone() for p in model.parameters()],
                    "requires_grad": [p.requires_grad for p in model.parameters()],
                    "frozen": opt.frozen.clone(), "frozen_at": opt.frozen_at.clone(),
                    "fisher_elements": fisher_elements(opt)},
                   os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("estimator,shard_state", [("empirical", True), ("empirical", False),
                                                   ("kfac", True)])
def test_ddp_matches_single_process_and_ranks_agree(spawn, tmp_path, estimator, shard_state):
    # empirical: DDP's averaged gradient is the global batch's (each rank keeping the Fisher of
    # half the rows with shard_state); kfac: the factor statistics are all-reduced and delta
    # rescaled. All equal one process with the global batch.
    spawn(_worker, estimator, shard_state, nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    model = make_model()
    opt = make_opt(model, model, estimator)
    x, y = make_data()
    with set_threads(1):  # as each rank runs
        train(model, opt, x, y)

    assert opt.frozen.any() and not opt.frozen.all(), "the run should freeze some groups"
    assert not all(p.requires_grad for p in model.parameters()), \
        "some tensor should be frozen whole, the case DDP's reducer has to tolerate"
    for r in ranks:
        # Identical decisions on every rank, and the same as one process with the whole batch.
        assert torch.equal(r["frozen"], ranks[0]["frozen"])
        assert torch.equal(r["frozen_at"], ranks[0]["frozen_at"])
        assert torch.equal(r["frozen"], opt.frozen)
        assert r["requires_grad"] == [p.requires_grad for p in model.parameters()]
        for a, b in zip(r["params"], model.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-5)
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)  # DDP keeps replicas bitwise identical
    held = [r["fisher_elements"] for r in ranks]
    if estimator == "empirical" and shard_state:  # the ranks split the Fisher between them
        assert sum(held) == fisher_elements(opt) and max(held) < fisher_elements(opt)
    else:
        assert held == [fisher_elements(opt)] * WORLD


def test_ddp_without_find_unused_parameters_is_refused(tmp_path):
    port = free_port()
    with gloo(0, 1, port):
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        with pytest.raises(ValueError, match="find_unused_parameters=True"):
            make_opt(model, ddp)


def _selection_worker(rank, port, out_dir):
    with gloo(rank, WORLD, port):
        model = make_token_model()
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        half = [(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]) for x, y in token_calibration()]
        sel = fat.selection.select_connections(ddp, half, token_loss, budget=0.1, c_min=1)
        torch.save({n.removeprefix("module."): i for n, i in sel.index.items()},
                   os.path.join(out_dir, f"sel{rank}.pt"))


def test_select_connections_under_ddp_equals_one_process_over_all_shards(spawn, tmp_path):
    spawn(_selection_worker, nprocs=WORLD)
    got = [torch.load(tmp_path / f"sel{r}.pt") for r in range(WORLD)]
    single = fat.selection.select_connections(make_token_model(), token_calibration(), token_loss,
                                              budget=0.1, c_min=1)
    assert set(got[0]) == set(single.index)
    for n, idx in single.index.items():
        assert torch.equal(got[0][n], got[1][n]), n      # every rank selects the same
        assert torch.equal(got[0][n], idx), n            # as one process over all shards


# ---------------------------------------------------------------------------------------------
# The torchrun example


def _example(tmp_path, *args):
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(REPO_ROOT / "examples" / "ddp_adaptune.py"),
           *args]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if "ranks (" in ln]
    assert len(lines) == 1, out.stdout[-3000:]
    return lines[0]


@pytest.mark.parametrize("mode", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_torchrun_example_resumes_exactly(tmp_path, mode):
    common = ["--check-every", "2", *mode]
    straight = _example(tmp_path, "--steps", "12", *common)
    _example(tmp_path, "--steps", "6", "--save", str(tmp_path / "ckpt"), *common)
    resumed = _example(tmp_path, "--steps", "6", "--resume", str(tmp_path / "ckpt"), *common)
    assert "step 12," in straight and "active fraction 1.000" not in straight, straight
    assert resumed == straight


# ---------------------------------------------------------------------------------------------
# Per-rank state dicts of a DDP wrapper with a sharded Fisher


def _state_dict_worker(rank, port, out_dir):
    with gloo(rank, WORLD, port):
        x, y = make_data()
        half = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
        states = {}
        for shard_state in (True, False):
            model = make_model()
            ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
            opt = make_opt(model, ddp, shard_state=shard_state)
            train(ddp, opt, x[half], y[half])
            states[shard_state] = opt.state_dict()
        torch.save(states[True], os.path.join(out_dir, f"sd{rank}.pt"))
        dist.barrier()
        other = torch.load(os.path.join(out_dir, f"sd{1 - rank}.pt"))

        def fresh():
            model = make_model()
            ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
            return make_opt(model, ddp, shard_state=True)
        outcome = {}
        target = fresh()  # untrained: loading `other` would change its frozen set and step
        before = target.state_dict()
        try:
            target.load_state_dict(other)
            outcome["other"] = "loaded"
        except ValueError as e:
            outcome["other"] = str(e)
        after = target.state_dict()
        outcome["unchanged"] = (
            torch.equal(before["adaptune"]["frozen"], after["adaptune"]["frozen"])
            and after["adaptune"]["step"] == before["adaptune"]["step"]
            and all((a is None and b is None) or torch.equal(a, b) for a, b in
                    zip(before["adaptune"]["buffers"],
                        after["adaptune"]["buffers"])))
        mine = fresh()
        mine.load_state_dict(states[True])
        full = fresh()
        full.load_state_dict(states[False])  # a replicated wrapper's state: sliced to this rank
        outcome["own_equal"] = all(
            (a is None and b is None) or torch.equal(a, b)
            for a, b in zip(mine.estimator.buffers(), full.estimator.buffers()))
        outcome["own_elements"] = fisher_elements(mine)
        torch.save(outcome, os.path.join(out_dir, f"outcome{rank}.pt"))


def test_sharded_ddp_state_dict_loads_only_on_its_own_rank(spawn, tmp_path):
    spawn(_state_dict_worker, nprocs=WORLD)
    for r in range(WORLD):
        got = torch.load(tmp_path / f"outcome{r}.pt")
        assert "argument 'state_dict'" in got["other"] and \
            f"shards of rank {1 - r} of 2" in got["other"], got["other"]
        assert got["unchanged"], "a refused load must leave the wrapper as it was"
        assert got["own_equal"], "a full state dict must load as this rank's slice of it"
        assert got["own_elements"] > 0
