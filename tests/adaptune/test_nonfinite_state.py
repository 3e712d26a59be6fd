"""A non-finite Fisher never looks settled: a checkpoint holding one is refused before
anything changes, and a live one is not measured (so never frozen for it)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fisheradaptune as fat


def _run(opt, model, steps):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    for _ in range(steps):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def _make(make_mlp):
    model = make_mlp()
    opt = fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.01), model, check_every=2,
                             policy=fat.Threshold(tau=10.0, patience=1, min_active_fraction=0.0))
    return model, opt


@pytest.mark.parametrize("which", ["buffers", "references"])
def test_checkpoint_with_a_nan_buffer_is_refused_before_anything_changes(make_mlp, which):
    model, opt = _make(make_mlp)
    _run(opt, model, 2)
    sd = opt.state_dict()
    sd["adaptune"][which][0] = sd["adaptune"][which][0].clone()
    sd["adaptune"][which][0].view(-1)[3] = float("nan")
    model2, fresh = _make(make_mlp)
    with pytest.raises(ValueError, match="'0.weight' holds non-finite values"):
        fresh.load_state_dict(sd)
    assert fresh.step_count == 0 and not fresh.frozen.any()


def test_a_live_nan_fisher_is_not_measured(make_mlp):
    model, opt = _make(make_mlp)
    _run(opt, model, 2)  # the first check sets references
    opt.estimator.fisher[0].view(-1)[0] = float("nan")  # as a broken estimator might
    with pytest.warns(RuntimeWarning, match="'0.weight' is not finite"):
        _run(opt, model, 2)
    groups = opt.freezer.tensor_groups[0]
    assert not opt.frozen[groups].any()  # tau = 10 freezes every measured group at once
    assert (opt.tracker.checks[groups] == 0).all()
    others = [g for g in range(opt.layout.num_groups) if g not in groups and opt.drift_defined[g]]
    assert opt.frozen[others].all()
