"""FisherAdapTune in ordinary training-loop patterns: gradient clipping and accumulation."""
from __future__ import annotations

import torch
from torch import nn

import fisheradaptune as fat


def _setup(make_mlp):
    model = make_mlp()
    opt = fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.1), model,
                             check_every=10 ** 6, policy=fat.Observe(), fisher_decay=0.5)
    g = torch.Generator().manual_seed(1)
    return model, opt, torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def test_clip_grad_norm_after_mask_frozen_grads_counts_trainable_elements_only(make_mlp):
    model, opt, x, y = _setup(make_mlp)
    opt.freeze(["0.weight.slab0", "0.weight.slab1"])
    nn.functional.cross_entropy(model(x), y).backward()
    mask = opt.frozen_mask(model[0].weight)
    assert model[0].weight.grad[mask].abs().sum() > 0  # still there before step()
    opt.mask_frozen_grads()
    assert (model[0].weight.grad[mask] == 0).all()
    active = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)
    torch.testing.assert_close(norm, active.norm())
    opt.step()


def test_gradient_accumulation_updates_the_fisher_once_from_the_summed_grad(make_mlp):
    model, opt, x, y = _setup(make_mlp)
    for xb, yb in ((x[:4], y[:4]), (x[4:], y[4:])):
        (nn.functional.cross_entropy(model(xb), yb, reduction="sum")).backward()
    summed = [p.grad.detach().clone() for p in model.parameters()]
    opt.step()
    assert opt.step_count == 1
    for f, g in zip(opt.estimator.snapshot(), summed):
        torch.testing.assert_close(f, 0.5 * g.float() ** 2)  # decay 0.5: F = 0.5 * 0 + 0.5 g^2
