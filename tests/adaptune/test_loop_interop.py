"""FisherAdapTune in ordinary training-loop patterns: gradient clipping, logging and scaling
between ``backward`` and ``step`` (frozen ranges are zeroed at the source, by a hook), and
gradient accumulation."""
from __future__ import annotations

import copy

import torch
from torch import nn

import fisheradaptune as fat

FROZEN = ["0.weight.slab0", "0.weight.slab1", "0.weight.slab2", "2.weight.slab0"]


def _setup(make_mlp, inner=None):
    model = make_mlp()
    opt = fat.FisherAdapTune(inner(model) if inner else torch.optim.SGD(model.parameters(), lr=0.1),
                             model, check_every=10 ** 6, policy=fat.Observe(), fisher_decay=0.5)
    g = torch.Generator().manual_seed(1)
    return model, opt, torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def _norms(model, opt, x, y):
    """Gradient norms of a copy of ``model`` trained without the wrapper: of all elements,
    and of the active ones only (the oracle)."""
    bare = copy.deepcopy(model)
    nn.functional.cross_entropy(bare(x), y).backward()
    full = torch.cat([p.grad.reshape(-1) for p in bare.parameters()]).norm()
    active = torch.cat([p.grad[~opt.frozen_mask(q)].reshape(-1)
                        for p, q in zip(bare.parameters(), model.parameters())]).norm()
    return float(full), float(active)


def test_clip_grad_norm_after_backward_counts_trainable_elements_only(make_mlp):
    """The defect: between backward() and step(), frozen slabs still held their gradients, so
    clip_grad_norm_ (the transformers Trainer's max_grad_norm) measured them too and scaled
    the active updates by active/full (0.54 in the report) instead of 1.0."""
    model, opt, x, y = _setup(make_mlp)
    opt.freeze(FROZEN)
    full, active = _norms(model, opt, x, y)
    assert active < 0.9 * full  # the frozen slabs carry a real part of the norm
    nn.functional.cross_entropy(model(x), y).backward()
    for p in model.parameters():
        assert (p.grad[opt.frozen_mask(p)] == 0).all()  # zero with no call from the user
    before = [p.grad.clone() for p in model.parameters()]
    max_norm = 1.01 * active  # above the active norm: clipping must leave them alone
    norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm=max_norm)
    assert abs(float(norm) - active) <= 1e-6 * active
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.grad, b)  # scaled by 1.0, not by active / full
    opt.step()


def test_grad_scaler_unscale_sees_zero_frozen_gradients(make_mlp):
    model, opt, x, y = _setup(make_mlp)
    opt.freeze(FROZEN)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    mask = opt.frozen_mask(model[0].weight)
    assert (model[0].weight.grad[mask] == 0).all() and (model[0].weight.grad[~mask] != 0).any()
    scaler.step(opt)
    scaler.update()


def test_mask_frozen_grads_still_masks_gradients_assigned_by_hand(make_mlp):
    model, opt, x, y = _setup(make_mlp)
    opt.freeze(FROZEN)
    model[0].weight.grad = torch.ones_like(model[0].weight)  # no backward: no hook ran
    opt.mask_frozen_grads()
    mask = opt.frozen_mask(model[0].weight)
    assert (model[0].weight.grad[mask] == 0).all() and (model[0].weight.grad[~mask] == 1).all()


def test_hooks_follow_the_frozen_set(make_mlp):
    model, opt, x, y = _setup(make_mlp)
    opt.freeze(FROZEN)
    opt.unfreeze(FROZEN)
    nn.functional.cross_entropy(model(x), y).backward()
    assert (model[0].weight.grad[:6] != 0).all()  # unfrozen: the hook is gone
    # A copy of model and wrapper masks its own parameters; the original's hooks stay its own.
    opt.freeze(["0.weight.slab0"])
    both = copy.deepcopy({"model": model, "opt": opt})
    m2, o2 = both["model"], both["opt"]
    o2.unfreeze(["0.weight.slab0"])
    o2.freeze(["0.weight.slab3"])
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    nn.functional.cross_entropy(m2(x), y).backward()
    assert (model[0].weight.grad[:2] == 0).all() and (model[0].weight.grad[6:] != 0).all()
    assert (m2[0].weight.grad[6:] == 0).all() and (m2[0].weight.grad[:2] != 0).all()


def test_masking_at_the_source_changes_no_active_result(make_mlp):
    """Active elements and the Fisher are bit for bit those of the step-time masking alone
    (hooks removed), over steps with clipping-free SGD with momentum and weight decay."""
    runs = []
    for hooks in (True, False):
        model, opt, x, y = _setup(make_mlp, lambda m: torch.optim.SGD(
            m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01))
        opt.freeze(FROZEN)
        if not hooks:
            for h in opt.freezer._hooks:
                h.remove()
        for _ in range(4):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        runs.append(([p.detach().clone() for p in model.parameters()],
                     [f.clone() for f in opt.estimator.snapshot() if f is not None]))
    for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]):
        assert torch.equal(a, b)


def test_gradient_accumulation_updates_the_fisher_once_from_the_summed_grad(make_mlp):
    model, opt, x, y = _setup(make_mlp)
    opt.freeze(["0.weight.slab0"])
    mask = opt.frozen_mask(model[0].weight)
    for xb, yb in ((x[:4], y[:4]), (x[4:], y[4:])):
        (nn.functional.cross_entropy(model(xb), yb, reduction="sum")).backward()
        assert (model[0].weight.grad[mask] == 0).all()  # after every micro-batch
    summed = [p.grad.detach().clone() for p in model.parameters()]
    opt.step()
    assert opt.step_count == 1
    for f, g in zip(opt.estimator.snapshot(), summed):
        torch.testing.assert_close(f, 0.5 * g.float() ** 2)  # decay 0.5: F = 0.5 * 0 + 0.5 g^2
