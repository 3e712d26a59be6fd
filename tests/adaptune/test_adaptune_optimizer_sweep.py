"""Every torch.optim optimizer class (enumerated, not listed), with each of its variants that
runs on the CPU, under FisherAdapTune with slab and whole-tensor freezes: either frozen
elements stay bit-identical over many steps and the active ones equal the bare optimizer fed
the same gradients, or the wrapper refuses the class at construction, by name
(fisheradaptune.adaptune.support; docs/methods.md section 4)."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import fisheradaptune as fat
from fisheradaptune.adaptune.support import REFUSED, VERIFIED

SWEEP = "optimizers x FisherAdapTune"
FLAGS = ("foreach", "fused", "capturable", "maximize", "amsgrad", "nesterov",
         "decoupled_weight_decay")
CLASSES = sorted((c for c in vars(torch.optim).values() if isinstance(c, type)
                  and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer),
                 key=lambda c: c.__name__)
# Hyperparameters that exercise each class's state (momentum, weight decay, averaging); a
# class not named here runs with its defaults.
HYPER = {
    "SGD": dict(lr=0.05, momentum=0.9, weight_decay=0.01),
    "Adam": dict(lr=1e-2, weight_decay=0.01), "AdamW": dict(lr=1e-2, weight_decay=0.1),
    "Adamax": dict(lr=1e-2, weight_decay=0.01), "NAdam": dict(lr=1e-2, weight_decay=0.01),
    "RAdam": dict(lr=1e-2, weight_decay=0.01), "Adagrad": dict(lr=0.05, weight_decay=0.01),
    "RMSprop": dict(lr=1e-2, momentum=0.5, weight_decay=0.01, centered=True),
    "Rprop": dict(lr=1e-2), "Adadelta": dict(lr=1.0, weight_decay=0.01),
    "ASGD": dict(lr=1e-2, t0=2.0, weight_decay=0.01), "LBFGS": dict(lr=0.5),
}
SLABS = ["0.weight.slab1", "2.weight.slab0", "2.weight.slab3", "2.bias.slab2"]
WHOLE = ["4.weight", "0.bias"]
STEPS, FREEZE_SLABS, FREEZE_WHOLE = 14, 3, 6


def _variants(cls):
    params = inspect.signature(cls).parameters
    return [None] + [f for f in FLAGS if f in params]


CASES = [(cls, v) for cls in CLASSES for v in _variants(cls)]


def _case_id(case):
    cls, flag = case
    return cls.__name__ if flag is None else f"{cls.__name__}({flag}=True)"


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def _build(cls, flag, params):
    kwargs = dict(HYPER.get(cls.__name__, {}))
    if flag is not None:
        kwargs[flag] = True
    if flag == "nesterov" and "dampening" in inspect.signature(cls).parameters:
        kwargs["dampening"] = 0.0
    return cls(params, **kwargs)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _runnable(cls, flag):
    """Build and step the bare optimizer once; None if it runs here, else why not."""
    model = _model()
    x, y = _data()
    try:
        opt = _build(cls, flag, model.parameters())
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step(lambda: nn.functional.cross_entropy(model(x), y))
    except (RuntimeError, ValueError, TypeError, NotImplementedError, AssertionError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return None


def _bits(t):
    return t.detach().view(torch.int32)  # bitwise: -0.0 differs from 0.0


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_optimizer_under_fisher_adaptune(case, sweep):
    cls, flag = case
    name = _case_id(case)
    model = _model()
    if cls not in VERIFIED:
        try:
            inner = _build(cls, flag, model.parameters())
        except ValueError:  # e.g. Muon takes matrices only
            inner = _build(cls, flag, [p for p in model.parameters() if p.dim() == 2])
        why = REFUSED.get(cls.__name__, "is not a verified optimizer")
        with pytest.raises(ValueError, match=rf"argument 'optimizer': torch\.optim\.{cls.__name__}"
                                             rf" is not .*Supported: torch\.optim\.SGD, "):
            fat.FisherAdapTune(inner, model)
        assert why  # refused for a documented reason, or as unverified
        sweep(SWEEP, name, "refused")
        return
    why = _runnable(cls, flag)
    if why is not None:
        pytest.skip(f"{name} does not run on the CPU here ({why})")
    twin = copy.deepcopy(model)
    opt = fat.FisherAdapTune(_build(cls, flag, model.parameters()), model, check_every=10 ** 6,
                             policy=fat.Observe())
    bare = _build(cls, flag, twin.parameters())
    x, y = _data()
    held = {}  # name -> (mask, bits at the freeze)
    for step in range(STEPS):
        if step == FREEZE_SLABS:
            opt.freeze(SLABS)
        if step == FREEZE_WHOLE:
            opt.freeze(WHOLE)
        for n, p in model.named_parameters():
            if n not in held or opt.frozen_mask(p).sum() > held[n][0].sum():
                held[n] = (opt.frozen_mask(p).clone(), _bits(p).clone())
        nn.functional.cross_entropy(model(x), y).backward()
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()  # the same (masked) gradients
        opt.step()
        bare.step()
        opt.zero_grad()
        bare.zero_grad()
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            mask, bits = held[n]
            assert torch.equal(_bits(p)[mask], bits[mask]), (name, n, step)
            assert torch.equal(_bits(p)[~mask], _bits(q)[~mask]), (name, n, step)
    assert not model[4].weight.requires_grad and opt.frozen_mask(model[0].weight).any()
    moved = [not torch.equal(p, q) for p, q in zip(model.parameters(), _model().parameters())]
    assert moved[2] and moved[3]  # the active elements trained
    sweep(SWEEP, name, "verified")


def test_the_sweep_covers_every_class():
    names = {c.__name__ for c in CLASSES}
    assert {c.__name__ for c in VERIFIED} <= names
    assert len(names) >= 14
    # Every refusal has a reason; a class neither verified nor refused by name (a new
    # torch.optim class) is refused as unverified until it is verified here.
    assert all(REFUSED[n] for n in REFUSED)


class _MySGD(torch.optim.SGD):
    pass


def test_an_unverified_optimizer_needs_the_opt_in_and_a_refused_one_never_passes():
    model = _model()
    with pytest.raises(ValueError, match=r"argument 'optimizer': .*_MySGD is not a verified "
                                         r"optimizer\. Supported: torch\.optim\.SGD, .*pass "
                                         r"allow_unverified_optimizer=True"):
        fat.FisherAdapTune(_MySGD(model.parameters(), lr=0.1), model)
    opt = fat.FisherAdapTune(_MySGD(model.parameters(), lr=0.1), model,
                             allow_unverified_optimizer=True)
    assert isinstance(opt.optimizer, _MySGD)

    class MyLBFGS(torch.optim.LBFGS):
        pass
    with pytest.raises(ValueError, match=r"MyLBFGS is not supported by FisherAdapTune: it "
                                         r"steps every parameter"):
        fat.FisherAdapTune(MyLBFGS(model.parameters()), model, allow_unverified_optimizer=True)


def test_differentiable_optimizers_are_refused():
    model = _model()
    with pytest.raises(ValueError, match=r"param_groups\[0\] has differentiable=True"):
        fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.1, differentiable=True),
                           model)
