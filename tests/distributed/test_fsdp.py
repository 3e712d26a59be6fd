"""FisherAdapTune under FSDP2 (``fully_shard``) and checkpoint/resume with
torch.distributed.checkpoint, with 2 processes on gloo (CPU).

- the sharded drift equals the unsharded drift (mass: all-reduced partial sums; histogram:
  gathered), for layouts whose groups straddle shard boundaries and span tensors;
- training under FSDP2 equals one process with the same global batch, and every rank freezes
  the same groups; shards split unevenly (3 rows over 2 ranks) and slabs cross the boundary;
- a run saved with ``fisheradaptune.distributed.save`` and resumed with ``load`` into a fresh
  model and wrapper continues exactly as the uninterrupted run, under DDP and FSDP2.
"""
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import (free_port, gloo, make_token_model, set_threads, token_calibration,
                     token_loss)
import fisheradaptune as fat
from fisheradaptune import distributed as fdist

fsdp = pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available()
                                or not hasattr(fsdp, "fully_shard"),
                                reason="needs torch.distributed with gloo and FSDP2")

WORLD, GLOBAL_BATCH = 2, 16


def make_model(classes=3):
    # 18 rows split in 4 slabs of 5, 5, 4, 4 rows: the slab [5, 10) straddles the shard
    # boundary at row 9; a 3-class head's rows split 2 + 1, a 1-output head's 1 + 0 (an empty
    # shard on rank 1).
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 18), nn.GELU(), nn.Linear(18, 18), nn.GELU(),
                         nn.Linear(18, classes))


def loss_of(out, y):
    if out.shape[-1] == 1:  # regression onto the label
        return nn.functional.mse_loss(out.squeeze(-1), y.float())
    return nn.functional.cross_entropy(out, y)


def shard(model):
    for m in model:
        if isinstance(m, nn.Linear):
            fsdp.fully_shard(m)
    fsdp.fully_shard(model)
    return model


def make_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)


TAU = {"mass": 0.3, "histogram": 0.7}  # histogram distances run higher on this tiny model


def make_opt(model, wrapped, drift="mass"):
    return fat.FisherAdapTune(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05),
                              wrapped, check_every=3, drift_mode=drift,
                              policy=fat.Threshold(tau=TAU[drift], patience=1,
                                                   min_active_fraction=0.2))


def train(forward, opt, x, y, steps):
    for _ in range(steps):
        loss_of(forward(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def full_params(model):
    out = []
    for p in model.parameters():
        out.append((p.full_tensor() if fdist.is_dtensor(p) else p).detach().clone())
    return out


def record(model, opt):
    return {"params": full_params(model), "frozen": opt.frozen.clone(),
            "frozen_at": opt.frozen_at.clone(), "jsema": opt.tracker.jsema.clone(),
            "requires_grad": [p.requires_grad for p in model.parameters()]}


# ---------------------------------------------------------------------------------------------
# The sharded drift equals the unsharded drift


def layouts(named):
    """Slabs (groups straddle the shard boundary), one group per tensor, and groups that span
    tensors as per_module's do (the histogram path then gathers linked tensors together)."""
    n = [c.numel() for _, c in named]
    spanning = fat.GroupLayout(
        tuple(k for k, _ in named), tuple(c.shape for _, c in named),
        ("t0+t1", "t2a", "t2b+t3", "t4"),
        torch.tensor([[0, 0, n[0], 0], [1, 0, n[1], 0], [2, 0, 13, 1], [2, 13, n[2], 2],
                      [3, 0, n[3], 2], [4, 0, n[4], 3]]))
    return (("slabs", fat.groups.slabs(named, k=4)), ("per_tensor", fat.groups.per_tensor(named)),
            ("spanning", spanning))


def _drift_worker(rank, port, out_dir):
    with gloo(rank, WORLD, port):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        mesh = init_device_mesh("cpu", (WORLD,))
        g = torch.Generator().manual_seed(3)
        shapes = [(18, 5), (3,), (7, 4), (1, 9), (5,)]
        full_c = [torch.rand(s, generator=g) * torch.exp(2 * torch.randn(s, generator=g))
                  for s in shapes]
        full_r = [torch.rand(s, generator=g) for s in shapes]
        full_r[4].zero_()  # a zero-sum group scores 0
        named = [(f"t{i}", c) for i, c in enumerate(full_c)]
        results = {}
        for kind, layout in layouts(named):
            for mode in ("mass", "histogram"):
                params = [distribute_tensor(c, mesh, [Shard(0)]) for c in full_c]
                sharding = fdist.sharding_of(params)
                local = fdist.local_layout(layout, sharding)
                cur = [p.to_local().clone() for p in params]
                ref = [distribute_tensor(r, mesh, [Shard(0)]).to_local().clone() for r in full_r]
                d = fdist.js_drift(cur, ref, local, sharding, drift_mode=mode, update_reference=0.9,
                                   global_layout=layout, tensors=list(range(len(shapes))))
                refs_full = [sharding.to_global(i, r).full_tensor() for i, r in enumerate(ref)]
                results[(kind, mode)] = (d, refs_full)
        torch.save(results, os.path.join(out_dir, f"drift{rank}.pt"))


def test_sharded_drift_equals_unsharded_drift(spawn, tmp_path):
    spawn(_drift_worker, nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"drift{r}.pt") for r in range(WORLD)]
    g = torch.Generator().manual_seed(3)
    shapes = [(18, 5), (3,), (7, 4), (1, 9), (5,)]
    full_c = [torch.rand(s, generator=g) * torch.exp(2 * torch.randn(s, generator=g)) for s in shapes]
    full_r = [torch.rand(s, generator=g) for s in shapes]
    full_r[4].zero_()
    named = [(f"t{i}", c) for i, c in enumerate(full_c)]
    for kind, layout in layouts(named):
        for mode in ("mass", "histogram"):
            ref = [r.clone() for r in full_r]
            want = fat.ops.js_drift(full_c, ref, layout, drift_mode=mode, update_reference=0.9)
            assert want.abs().sum() > 0
            for r in ranks:
                got, refs = r[(kind, mode)]
                assert torch.equal(got, ranks[0][(kind, mode)][0]), "ranks must agree exactly"
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
                for a, b in zip(refs, ref):
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            assert float(want[-1]) == 0.0 and float(ranks[0][(kind, mode)][0][-1]) == 0.0


def test_unsupported_sharding_is_refused_with_the_parameter_named():
    port = free_port()
    with gloo(0, 1, port):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
        mesh = init_device_mesh("cpu", (1,))
        a = nn.Parameter(distribute_tensor(torch.zeros(4, 3), mesh, [Shard(0)]))
        b = nn.Parameter(torch.zeros(3))
        with pytest.raises(ValueError, match="argument 'optimizer': parameter 'param_groups.0.1' "
                                             "is a plain tensor"):
            fat.FisherAdapTune(torch.optim.SGD([a, b], lr=0.1))
        c = nn.Parameter(distribute_tensor(torch.zeros(4, 3), mesh, [Shard(1)]))
        with pytest.raises(ValueError, match="is placed Shard\\(dim=1\\)"):
            fat.FisherAdapTune(torch.optim.SGD([c], lr=0.1))
        d = nn.Parameter(distribute_tensor(torch.zeros(4, 3), mesh, [Replicate()]))
        with pytest.raises(ValueError, match="is placed Replicate\\(\\)"):
            fat.FisherAdapTune(torch.optim.SGD([d], lr=0.1))
        model = shard(make_model())
        with pytest.raises(ValueError, match="argument 'estimator'"):
            fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.1), model,
                               estimator="kfac")


# ---------------------------------------------------------------------------------------------
# Training under FSDP2 equals one process


STEPS = 12


def _fsdp_worker(rank, port, out_dir, drift, classes):
    with gloo(rank, WORLD, port):
        model = shard(make_model(classes))
        opt = make_opt(model, model, drift)
        x, y = make_data()
        half = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
        train(model, opt, x[half], y[half], STEPS)
        torch.save(record(model, opt), os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("drift,classes", [("mass", 3), ("histogram", 3), ("mass", 1)])
def test_fsdp2_matches_single_process_and_ranks_agree(spawn, tmp_path, drift, classes):
    spawn(_fsdp_worker, drift, classes, nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    model = make_model(classes)
    opt = make_opt(model, model, drift)
    x, y = make_data()
    with set_threads(1):  # as each rank runs
        train(model, opt, x, y, STEPS)
    single = record(model, opt)

    assert single["frozen"].any() and not single["frozen"].all(), "the run should freeze some groups"
    assert not all(single["requires_grad"]), "some tensor should be frozen whole"
    partial = [i for i, p in enumerate(model.parameters())
               if p.requires_grad and opt.frozen_mask(p).any()]
    assert partial, "some tensor should be frozen in part (slabs across the shard boundary)"
    for r in ranks:
        assert torch.equal(r["frozen"], single["frozen"])
        assert torch.equal(r["frozen_at"], single["frozen_at"])
        assert r["requires_grad"] == single["requires_grad"]
        torch.testing.assert_close(r["jsema"], single["jsema"], rtol=1e-4, atol=1e-6)
        for a, b in zip(r["params"], single["params"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Checkpoint and resume (torch.distributed.checkpoint)


RESUME_AT = 10  # between the freezes at steps 6 and 14, 18 of this configuration


def make_resume_opt(model, wrapped, shard_state=False, fisher_dtype=torch.float32):
    return fat.FisherAdapTune(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05),
                              wrapped, check_every=2, shard_state=shard_state,
                              policy=fat.Threshold(tau=0.15, patience=2, min_active_fraction=0.1),
                              fisher_dtype=fisher_dtype)


def _wrap(kind, model):
    if kind.startswith("fsdp"):
        return shard(model), None
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    return model, ddp


def _resume_worker(rank, port, out_dir, kind):
    with gloo(rank, WORLD, port):
        x, y = make_data()
        half = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
        x, y = x[half], y[half]
        ckpt = os.path.join(out_dir, "ckpt")
        # fsdp_bf16: bfloat16 Fisher shards and references through DCP and the sharded drift.
        dtype = torch.bfloat16 if kind.endswith("bf16") else torch.float32

        # Uninterrupted: 2 * RESUME_AT steps.
        model, ddp = _wrap(kind, make_model())
        opt = make_resume_opt(model, ddp or model, kind == "ddp_sharded", dtype)
        train(ddp or model, opt, x, y, 2 * RESUME_AT)
        straight = record(model, opt)

        # RESUME_AT steps, saved ...
        model, ddp = _wrap(kind, make_model())
        opt = make_resume_opt(model, ddp or model, kind == "ddp_sharded", dtype)
        train(ddp or model, opt, x, y, RESUME_AT)
        saved_frozen = opt.frozen.clone()
        fdist.save(ckpt, ddp or model, opt)

        # ... loaded into a fresh model and wrapper, and RESUME_AT more.
        model, ddp = _wrap(kind, make_model())
        opt = make_resume_opt(model, ddp or model, kind == "ddp_sharded", dtype)
        fdist.load(ckpt, ddp or model, opt)
        loaded_frozen = opt.frozen.clone()
        train(ddp or model, opt, x, y, RESUME_AT)
        resumed = record(model, opt)
        torch.save({"straight": straight, "resumed": resumed, "saved_frozen": saved_frozen,
                    "loaded_frozen": loaded_frozen}, os.path.join(out_dir, f"resume{rank}.pt"))


@pytest.mark.parametrize("kind", ["ddp", "ddp_sharded", "fsdp", "fsdp_bf16"])
def test_checkpoint_resume_gives_the_same_decisions_and_weights(spawn, tmp_path, kind):
    spawn(_resume_worker, kind, nprocs=WORLD)
    for r in range(WORLD):
        got = torch.load(tmp_path / f"resume{r}.pt")
        a, b = got["straight"], got["resumed"]
        assert got["saved_frozen"].any(), "the checkpoint should hold frozen groups"
        assert torch.equal(got["loaded_frozen"], got["saved_frozen"])
        assert (a["frozen"] & ~got["saved_frozen"]).any(), "groups should freeze after resuming"
        assert torch.equal(a["frozen"], b["frozen"])
        assert torch.equal(a["frozen_at"], b["frozen_at"])
        assert a["requires_grad"] == b["requires_grad"]
        assert torch.equal(a["jsema"], b["jsema"])
        for p, q in zip(a["params"], b["params"]):
            assert torch.equal(p, q)  # resuming is exact


# ---------------------------------------------------------------------------------------------
# TR-PTS selection of an FSDP2 model


def _selection_worker(rank, port, out_dir, estimator):
    with gloo(rank, WORLD, port):
        model = shard(make_token_model())
        half = [(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]) for x, y in token_calibration()]
        sel = fat.selection.select_connections(model, half, token_loss, budget=0.1, c_min=1,
                                               estimator=estimator)
        torch.save(dict(sel.index), os.path.join(out_dir, f"sel{rank}.pt"))


@pytest.mark.parametrize("estimator", ["per_sample", "empirical"])
def test_select_connections_under_fsdp2_equals_one_process_over_all_shards(spawn, tmp_path, estimator):
    spawn(_selection_worker, estimator, nprocs=WORLD)
    got = [torch.load(tmp_path / f"sel{r}.pt") for r in range(WORLD)]
    single = fat.selection.select_connections(make_token_model(), token_calibration(), token_loss,
                                              budget=0.1, c_min=1, estimator=estimator)
    assert set(got[0]) == set(single.index)
    for n, idx in single.index.items():
        assert torch.equal(got[0][n], got[1][n]), n      # every rank selects the same
        assert torch.equal(got[0][n], idx), n            # as one process over all shards


# ---------------------------------------------------------------------------------------------
# Frozen means frozen on shards, under FSDP2 mixed precision


def _frozen_worker(rank, port, out_dir):
    with gloo(rank, WORLD, port):
        model = make_model()
        policy = fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for m in model:
            if isinstance(m, nn.Linear):
                fsdp.fully_shard(m, mp_policy=policy)
        fsdp.fully_shard(model, mp_policy=policy)
        opt = make_opt(model, model)
        x, y = make_data()
        half = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
        train(model, opt, x[half], y[half], STEPS)
        params = list(model.parameters())
        masks = [opt.frozen_mask(p) for p in params]
        before = [p.to_local().detach().clone() for p in params]
        train(model, opt, x[half], y[half], STEPS)
        moved_frozen = sum(int((p.to_local().detach() != b)[m].sum())
                           for p, b, m in zip(params, before, masks))
        moved_active = sum(int((p.to_local().detach() != b)[~m].sum())
                           for p, b, m in zip(params, before, masks))
        torch.save({"frozen": opt.frozen.clone(), "moved_frozen": moved_frozen,
                    "moved_active": moved_active, "frozen_elements": sum(int(m.sum()) for m in masks),
                    "fisher_dtypes": {str(f.dtype) for f in opt.estimator.buffers() if f is not None}},
                   os.path.join(out_dir, f"frozen{rank}.pt"))


def test_frozen_shards_never_move_under_fsdp2_mixed_precision(spawn, tmp_path):
    spawn(_frozen_worker, nprocs=WORLD)
    got = [torch.load(tmp_path / f"frozen{r}.pt") for r in range(WORLD)]
    assert torch.equal(got[0]["frozen"], got[1]["frozen"])
    for g in got:
        assert g["frozen_elements"] > 0 and g["moved_active"] > 0
        assert g["moved_frozen"] == 0
        assert g["fisher_dtypes"] == {"torch.float32"}


# ---------------------------------------------------------------------------------------------
# Manual freeze and unfreeze of sharded parameters


def freeze_thaw_run(model, opt, x, y):
    opt.freeze(["0.weight", "2.bias"])          # whole tensors: released on every rank
    train(model, opt, x, y, 3)
    opt.unfreeze(["0.weight"])                  # tracked again from a zero Fisher
    train(model, opt, x, y, 3)


def _freeze_worker(rank, port, out_dir):
    with gloo(rank, WORLD, port):
        model = shard(make_model())
        opt = fat.FisherAdapTune(torch.optim.AdamW(model.parameters(), lr=1e-2), model,
                                 check_every=100)
        x, y = make_data()
        half = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
        freeze_thaw_run(model, opt, x[half], y[half])
        torch.save(record(model, opt), os.path.join(out_dir, f"thaw{rank}.pt"))


def test_freeze_and_unfreeze_under_fsdp2_match_one_process(spawn, tmp_path):
    spawn(_freeze_worker, nprocs=WORLD)
    model = make_model()
    opt = fat.FisherAdapTune(torch.optim.AdamW(model.parameters(), lr=1e-2), model,
                             check_every=100)
    x, y = make_data()
    with set_threads(1):  # as each rank runs
        freeze_thaw_run(model, opt, x, y)
    single = record(model, opt)
    assert single["requires_grad"] == [True, True, True, False, True, True]  # 2.bias frozen
    for r in range(WORLD):
        got = torch.load(tmp_path / f"thaw{r}.pt")
        assert torch.equal(got["frozen"], single["frozen"])
        assert got["requires_grad"] == single["requires_grad"]
        for a, b in zip(got["params"], single["params"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
