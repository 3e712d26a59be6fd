"""Freeze policies and the extension points of FisherAdapTune: exact policy arithmetic (each test
fails under a one-token change of the rule), groups with undefined drift, Observe, and a
user-defined Estimator and Policy that work without editing the package."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fisheradaptune as fat
from fisheradaptune.adaptune import Context, DriftTracker


def _ctx(tracker, sizes=None, step=100, active=None, defined=None):
    G = tracker.jsema.numel()
    sizes = torch.ones(G, dtype=torch.int64) if sizes is None else torch.tensor(sizes)
    return Context(step=step, tracker=tracker,
                   active=torch.ones(G, dtype=torch.bool) if active is None else active,
                   group_sizes=sizes, total_elements=int(sizes.sum()), defined=defined)


# ------------------------------------------------------------------ PaperPolicy arithmetic
def test_paper_policy_uses_the_population_std():
    tracker = DriftTracker(5)
    tracker.total_variation = torch.tensor([0.0, 0.0, 0.0, 0.84, 1.0], dtype=torch.float64)
    tracker.checks = torch.ones(5, dtype=torch.int64)
    s = tracker.total_variation
    # The test discriminates: 0.84 lies between the two possible thresholds.
    assert float(s.mean() + s.std(unbiased=False)) < 0.84 < float(s.mean() + s.std(unbiased=True))
    freeze = fat.PaperPolicy(lam=1.0, every=10).decide(_ctx(tracker))
    assert freeze.tolist() == [True, True, True, False, False]


def test_paper_policy_keeps_groups_with_undefined_drift_out_of_the_statistics():
    tracker = DriftTracker(6)
    tracker.total_variation = torch.tensor([0.0, 0.0, 0.0, 0.84, 1.0, 0.0], dtype=torch.float64)
    defined = torch.tensor([True] * 5 + [False])
    freeze = fat.PaperPolicy(lam=1.0, every=10).decide(_ctx(tracker, defined=defined))
    # Same decision as above for the defined groups; the undefined one stays active.
    assert freeze.tolist() == [True, True, True, False, False, False]


# ------------------------------------------------------------------ Threshold arithmetic
def test_corrected_jsema_value():
    tracker = DriftTracker(1, decay=0.9)
    active = torch.ones(1, dtype=torch.bool)
    tracker.record(1, torch.tensor([0.5], dtype=torch.float64), active, active)
    assert float(tracker.jsema[0]) == pytest.approx(0.05, rel=1e-12)
    assert float(tracker.corrected_jsema()[0]) == pytest.approx(0.5, rel=1e-12)
    tracker.record(2, torch.tensor([0.3], dtype=torch.float64), active, active)
    # jsema = 0.9 * 0.05 + 0.1 * 0.3 = 0.075; corrected by 1 - 0.9**2 = 0.19.
    assert float(tracker.jsema[0]) == pytest.approx(0.075, rel=1e-12)
    assert float(tracker.corrected_jsema()[0]) == pytest.approx(0.075 / 0.19, rel=1e-12)
    assert math.isnan(float(DriftTracker(1).corrected_jsema()[0]))  # never measured


def test_a_first_measurement_above_tau_does_not_freeze():
    tracker = DriftTracker(2, decay=0.9)
    active = torch.ones(2, dtype=torch.bool)
    # Raw jsema after one measurement is 0.1 * jsd: 0.05 and 0.005, both below tau = 0.1,
    # but the bias-corrected drift is 0.5 and 0.05: only the second is settled.
    tracker.record(1, torch.tensor([0.5, 0.05]), active, active)
    freeze = fat.Threshold(tau=0.1, patience=1, min_active_fraction=0.0).decide(_ctx(tracker))
    assert freeze.tolist() == [False, True]


def test_min_active_fraction_rounds_the_kept_elements_up():
    tracker = DriftTracker(10)
    active = torch.ones(10, dtype=torch.bool)
    tracker.record(1, torch.linspace(0.001, 0.01, 10), active, active)
    # 0.25 * 10 = 2.5 elements must stay: ceil -> 3 kept, so 7 freeze (floor or round -> 8).
    freeze = fat.Threshold(tau=1.0, patience=1, min_active_fraction=0.25).decide(_ctx(tracker))
    assert int(freeze.sum()) == 7
    # The most settled (lowest drift) go first.
    assert freeze.tolist() == [True] * 7 + [False] * 3


def test_threshold_never_freezes_groups_with_undefined_drift():
    tracker = DriftTracker(3)
    active = torch.ones(3, dtype=torch.bool)
    tracker.record(1, torch.zeros(3), active, active)  # measured as 0, but group 2 is undefined
    defined = torch.tensor([True, True, False])
    freeze = fat.Threshold(tau=0.1, patience=1, min_active_fraction=0.0).decide(
        _ctx(tracker, defined=defined))
    assert freeze.tolist() == [True, True, False]


# ------------------------------------------------------------------ in a training loop
class Net(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 12)
        self.head = nn.Linear(12, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _train(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 5, (32,), generator=g)
    for _ in range(steps):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def test_one_element_groups_are_not_frozen_for_zero_drift():
    torch.manual_seed(0)
    model = Net(classes=5)  # head.bias: 5 entries in 4 slabs -> three 1-element groups
    opt = fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.05), model, check_every=2,
                             policy=fat.Threshold(tau=0.05, patience=1, min_active_fraction=0.0))
    sizes = opt.layout.group_sizes
    assert int((sizes == 1).sum()) == 3
    assert torch.equal(opt.drift_defined, sizes > 1)
    _train(model, opt, 12)
    assert not opt.frozen[sizes == 1].any()
    assert (opt.tracker.checks[sizes == 1] == 0).all()  # never measured
    assert "(drift undefined)" in opt.summary(max_rows=None)
    # They freeze by hand, or with their tensor.
    opt.freeze("head.bias")
    assert opt.frozen[sizes == 1].all()


def test_histogram_mode_measures_one_element_groups():
    model = Net(classes=5)
    opt = fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.05), model,
                             drift_mode="histogram", check_every=2, policy=fat.Observe())
    assert opt.drift_defined.all()
    _train(model, opt, 4)
    assert (opt.tracker.checks > 0).all()


def test_observe_never_freezes_and_still_reports(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = fat.FisherAdapTune(torch.optim.AdamW(model.parameters(), lr=1e-2), model,
                             check_every=2, policy=fat.Observe())
    _train(model, opt, 20)
    assert not opt.frozen.any() and opt.active_fraction == 1.0
    assert all(p.requires_grad for p in model.parameters())
    assert (opt.tracker.checks[opt.drift_defined] == 9).all()  # 10 checks, the first sets refs
    assert "Observe()" in opt.summary()
    opt.plot(str(tmp_path / "drift.png"))
    assert (tmp_path / "drift.png").stat().st_size > 0


# ------------------------------------------------------------------ user-defined extensions
class AbsGradFisher(fat.Estimator):
    """A user's estimator: a running sum of |g| (not g**2), with no per-group sums of its own."""

    def __init__(self, params, layout=None, *, model=None, decay=0.9):
        self.params = list(params)
        self.acc = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.released = set()

    def update(self, grads, *, grad_scale=1.0):
        for i, g in enumerate(grads):
            if g is not None and i not in self.released:
                self.acc[i].add_(g.abs())
        return None, torch.zeros((), dtype=torch.int64)

    def snapshot(self):
        return [None if i in self.released else a for i, a in enumerate(self.acc)]

    def release(self, indices):
        self.released.update(indices)

    def restore(self, indices):
        self.released.difference_update(indices)

    def state_dict(self):
        return {"acc": [a.clone() for a in self.acc], "released": sorted(self.released)}

    def load_state_dict(self, state):
        for a, b in zip(self.acc, state["acc"]):
            a.copy_(b)
        self.released = set(state["released"])


class FreezeMostDrifting(fat.Policy):
    """A user's policy: at each check freeze the measured active group of largest last drift."""

    def decide(self, ctx):
        out = torch.zeros_like(ctx.active)
        last = torch.where(ctx.active & (ctx.tracker.checks > 0), ctx.tracker.last, -1.0)
        if float(last.max()) >= 0:
            out[int(last.argmax())] = True
        return out

    def group_scores(self, tracker):
        return tracker.last * 100

    def thresholds(self):
        return {"my level": 0.2}


def test_custom_estimator_and_policy(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.05), model, check_every=2,
                             estimator=AbsGradFisher, policy=FreezeMostDrifting())
    expected = [torch.zeros_like(p) for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 5, (32,), generator=g)
    for _ in range(2):
        nn.functional.cross_entropy(model(x), y).backward()
        for e, p in zip(expected, model.parameters()):
            e.add_(p.grad.abs())
        opt.step()
        opt.zero_grad()
    for a, e in zip(opt.estimator.snapshot(), expected):
        torch.testing.assert_close(a, e)
    _train(model, opt, 6)  # checks at 4, 6, 8 measure and freeze one group each
    assert int(opt.frozen.sum()) == 3
    assert opt.estimator_name == "AbsGradFisher"
    table = opt.summary(max_rows=None)
    top = int(torch.argmax(opt.tracker.last))
    assert f"{float(opt.tracker.last[top]) * 100:8.4f}" in table  # the policy's own score
    opt.plot(str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0
    # Its state round-trips through the wrapper's state dict.
    sd = opt.state_dict()
    fresh = fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.05), model,
                               check_every=2, estimator=AbsGradFisher, policy=FreezeMostDrifting())
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.frozen, opt.frozen)
    for a, b in zip(fresh.estimator.acc, opt.estimator.acc):
        assert torch.equal(a, b)


def test_registered_estimator_by_name():
    name = "abs_grad_test"
    if name not in fat.fisher.available_estimators():
        fat.register_estimator(name)(AbsGradFisher)
    model = Net()
    opt = fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.05), model,
                             estimator=name, policy=fat.Observe())
    assert isinstance(opt.estimator, AbsGradFisher) and opt.estimator_name == name
    with pytest.raises(ValueError, match="already registered"):
        fat.register_estimator(name)(type("Other", (AbsGradFisher,), {}))
    with pytest.raises(ValueError, match="argument 'estimator': expected one of"):
        fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.05), model, estimator="nope")
    with pytest.raises(TypeError, match="argument 'estimator'"):
        fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.05), model, estimator=3)


def test_a_policy_returning_the_wrong_thing_is_named():
    class Bad(fat.Policy):
        def decide(self, ctx):
            return [True]

    model = Net()
    opt = fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.05), model, check_every=1,
                             policy=Bad())
    with pytest.raises(TypeError, match="Bad returned"):
        _train(model, opt, 1)
