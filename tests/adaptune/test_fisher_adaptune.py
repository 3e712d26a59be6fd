"""FisherAdapTune wrapper: exact freezing, real savings, resume, AMP, policies, bad config."""
import io
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import fisheradaptune as fat


class Tiny(nn.Module):
    """Linear layers with a token axis, a fused qkv-named layer, a norm and an unused param."""

    def __init__(self, d=12, classes=5):
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(d, 3 * d)
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # x [B, T, d]
        q, k, v = self.attn.qkv(x).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), -1) @ v
        h = self.norm(x + a)
        h = h + self.fc2(torch.nn.functional.gelu(self.fc1(h)))
        return self.head(h.mean(1))


def data(seed=0, n=32, t=6, d=12, classes=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, d, generator=g), torch.randint(0, classes, (n,), generator=g)


OPTIMIZERS = {
    "adamw_wd": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=0.05),
    "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True,
                                              weight_decay=0.01),
    "sgd_foreach": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01,
                                             foreach=True),
    "sgd_fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, weight_decay=0.01),
}


def train(model, opt, steps, x, y, after_step=None):
    for s in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step:
            after_step(s)


@settings(max_examples=12, deadline=None)
@given(opt_name=st.sampled_from(sorted(OPTIMIZERS)), freeze_step=st.integers(0, 6),
       picks=st.lists(st.integers(0, 10_000), min_size=1, max_size=8), seed=st.integers(0, 3))
def test_frozen_elements_never_change(opt_name, freeze_step, picks, seed):
    torch.manual_seed(seed)
    model = Tiny()
    opt = fat.FisherAdapTune(OPTIMIZERS[opt_name](model.parameters()), model, check_every=3,
                             policy=fat.Threshold(tau=0.3, patience=1, min_active_fraction=0.2))
    names = opt.layout.names
    chosen = sorted({names[p % len(names)] for p in picks})
    x, y = data(seed)
    frozen_values = {}

    def after(s):
        if s == freeze_step:
            opt.freeze(chosen)
        # Whatever is frozen now (manually or by the policy) must keep its value from here on.
        for n, p in model.named_parameters():
            mask = opt.frozen_mask(p)
            if n in frozen_values:
                old_mask, old = frozen_values[n]
                assert torch.equal(p.detach()[old_mask].view(torch.int32),
                                   old[old_mask].view(torch.int32)), (opt_name, n, s)
                assert bool((mask | ~old_mask).all()), "a group thawed without unfreeze"
            frozen_values[n] = (mask.clone(), p.detach().clone())

    train(model, opt, 14, x, y, after)
    assert opt.frozen.sum() >= 1


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_whole_tensor_freeze_releases_grad_state_and_fisher(opt_name):
    torch.manual_seed(0)
    model = Tiny()
    opt = fat.FisherAdapTune(OPTIMIZERS[opt_name](model.parameters()), model, check_every=1000)
    x, y = data()
    train(model, opt, 3, x, y)

    def state_bytes():
        return sum(v.numel() * v.element_size() for s in opt.optimizer.state.values()
                   for v in s.values() if isinstance(v, torch.Tensor))

    before = state_bytes()
    opt.freeze(["fc1.weight", "fc1.bias", "attn.qkv.weight"])
    assert not model.fc1.weight.requires_grad and model.fc1.weight.grad is None
    assert model.fc1.weight not in opt.optimizer.state
    i = opt.names.index("fc1.weight")
    assert opt.estimator.fisher[i] is None and opt.references[i] is None
    if before:
        assert state_bytes() < before
    w = model.fc1.weight.detach().clone()
    train(model, opt, 3, x, y)
    assert model.fc1.weight.grad is None  # backward skipped the weight gradient
    assert torch.equal(model.fc1.weight.detach(), w)


def test_partial_freeze_zeroes_optimizer_state_of_frozen_slabs():
    torch.manual_seed(0)
    model = Tiny()
    opt = fat.FisherAdapTune(torch.optim.AdamW(model.parameters(), lr=1e-2), model, check_every=1000)
    x, y = data()
    train(model, opt, 3, x, y)
    opt.freeze(["fc1.weight.slab1"])
    mask = opt.frozen_mask(model.fc1.weight)
    assert 0 < int(mask.sum()) < mask.numel()
    st_ = opt.optimizer.state[model.fc1.weight]
    train(model, opt, 2, x, y)
    for k in ("exp_avg", "exp_avg_sq"):
        assert bool((st_[k][mask] == 0).all())
        assert bool((st_[k][~mask] != 0).any())


def test_partial_freeze_masks_a_non_contiguous_gradient_in_place():
    torch.manual_seed(0)
    model = Tiny()
    opt = fat.FisherAdapTune(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
                             model, check_every=1000)
    x, y = data()
    train(model, opt, 2, x, y)
    opt.freeze(["fc1.weight.slab1"])
    mask = opt.frozen_mask(model.fc1.weight)
    before = model.fc1.weight.detach().clone()
    nn.functional.cross_entropy(model(x), y).backward()
    # A column-major gradient (a transposed layout), as a user's hook or kernel may leave it.
    grad = model.fc1.weight.grad = model.fc1.weight.grad.t().contiguous().t()
    assert not grad.is_contiguous()
    opt.step()
    assert model.fc1.weight.grad is grad  # masked in place, not replaced
    assert bool((grad[mask] == 0).all()) and bool((grad[~mask] != 0).any())
    assert torch.equal(model.fc1.weight.detach()[mask], before[mask])
    assert not torch.equal(model.fc1.weight.detach()[~mask], before[~mask])


def run_steps(seed, n_first, n_second, checkpoint):
    torch.manual_seed(seed)
    model = Tiny()
    x, y = data(seed)
    make = lambda m: fat.FisherAdapTune(
        torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.05), m, check_every=4,
        policy=fat.Threshold(tau=0.25, patience=2, min_active_fraction=0.1))
    opt = make(model)
    train(model, opt, n_first, x, y)
    if checkpoint:
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        buf.seek(0)
        ck = torch.load(buf, weights_only=False)
        torch.manual_seed(seed + 100)
        model = Tiny()
        model.load_state_dict(ck["model"])
        opt = make(model)
        opt.load_state_dict(ck["opt"])
    train(model, opt, n_second, x, y)
    return model, opt


def test_resume_is_bitwise_identical():
    m1, o1 = run_steps(0, 10, 10, checkpoint=False)
    m2, o2 = run_steps(0, 10, 10, checkpoint=True)
    assert o1.frozen.sum() > 0, "the run should freeze something for the test to mean anything"
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(a, b), n
        assert a.requires_grad == b.requires_grad, n
    assert torch.equal(o1.frozen, o2.frozen)
    assert torch.equal(o1.tracker.jsema, o2.tracker.jsema)
    assert torch.equal(o1.tracker.total_variation, o2.tracker.total_variation)
    for f1, f2 in zip(o1.estimator.fisher, o2.estimator.fisher):
        assert (f1 is None) == (f2 is None)
        if f1 is not None:
            assert torch.equal(f1, f2)
    for r1, r2 in zip(o1.references, o2.references):
        assert (r1 is None) == (r2 is None)
        if r1 is not None:
            assert torch.equal(r1, r2)


def test_grad_scaler_skipped_step_accumulates_no_fisher():
    torch.manual_seed(0)
    model = Tiny()
    opt = fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.1), model, check_every=1000)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x, y = data()
    for _ in range(2):
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    fisher = [f.clone() for f in opt.estimator.fisher]
    steps = opt.step_count
    params = [p.detach().clone() for p in model.parameters()]
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    model.fc1.weight.grad[0, 0] = float("inf")  # overflow: the scaler must skip this step
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    assert opt.step_count == steps
    for a, b in zip(fisher, opt.estimator.fisher):
        assert torch.equal(a, b)
    for a, b in zip(params, model.parameters()):
        assert torch.equal(a, b)


def test_nonfinite_gradient_is_skipped_and_counted():
    torch.manual_seed(0)
    model = Tiny()
    opt = fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.0), model, check_every=1000)
    x, y = data()
    nn.functional.cross_entropy(model(x), y).backward()
    model.fc2.weight.grad[1, 2] = float("nan")
    opt.step()
    assert opt.nonfinite == 1
    assert all(bool(torch.isfinite(f).all()) for f in opt.estimator.fisher)


def test_lr_scheduler_on_wrapper_and_param_groups_shared():
    model = Tiny()
    inner = torch.optim.SGD(model.parameters(), lr=1.0)
    opt = fat.FisherAdapTune(inner, model)
    assert opt.param_groups is inner.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = data()
    train(model, opt, 1, x, y)
    sched.step()
    assert inner.param_groups[0]["lr"] == 0.5


def test_paper_policy_freezes_zero_fisher_groups_at_step_zero_before_any_update():
    torch.manual_seed(0)
    model = Tiny()
    model.unused = nn.Parameter(torch.ones(8))  # gets a zero gradient below
    opt = fat.FisherAdapTune(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5),
                             model, groups="per_tensor", check_every=1000,
                             policy=fat.PaperPolicy(every=3000))
    x, y = data()
    loss = nn.functional.cross_entropy(model(x), y) + 0.0 * model.unused.sum()
    loss.backward()
    opt.step()
    assert opt.frozen[opt.layout.names.index("unused")]
    assert torch.equal(model.unused.detach(), torch.ones(8))  # weight decay never touched it
    assert not model.unused.requires_grad


def test_paper_policy_mean_plus_lambda_std_and_argmax_fallback():
    tracker = fat.adaptune.DriftTracker(5)
    tracker.total_variation = torch.tensor([0.1, 0.2, 0.3, 0.4, 5.0], dtype=torch.float64)
    ctx = fat.adaptune.Context(step=10, tracker=tracker, active=torch.ones(5, dtype=torch.bool),
                               group_sizes=torch.ones(5, dtype=torch.int64), total_elements=5)
    p = fat.PaperPolicy(lam=1.0, every=10)
    s = tracker.total_variation
    thr = s.mean() + s.std(unbiased=False)
    assert torch.equal(p.decide(ctx), s < thr)
    # No group reaches mean + 100 std: the argmax stays.
    p = fat.PaperPolicy(lam=100.0, every=10)
    assert torch.equal(p.decide(ctx), torch.tensor([True, True, True, True, False]))
    # Between decision steps nothing happens.
    ctx.step = 15
    assert not p.decide(ctx).any()


def test_threshold_patience_and_min_active_fraction():
    tracker = fat.adaptune.DriftTracker(4)
    sizes = torch.tensor([10, 10, 10, 70])
    pol = fat.Threshold(tau=0.1, patience=2, min_active_fraction=0.75)
    active = torch.ones(4, dtype=torch.bool)
    for step in (1, 2):
        tracker.record(step, torch.tensor([0.01, 0.02, 0.5, 0.03]), torch.ones(4, dtype=torch.bool), active)
        out = pol.decide(fat.adaptune.Context(step, tracker, active, sizes, 100))
        if step == 1:
            assert not out.any()  # patience 2: one settled check is not enough
    # Groups 0, 1, 3 settled twice; freezing all would leave 10% active. The floor is 75%:
    # only the two most settled small groups fit (25 elements of budget).
    assert torch.equal(out, torch.tensor([True, True, False, False]))


def test_threshold_ignores_first_visit():
    torch.manual_seed(0)
    model = Tiny()
    opt = fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.01), model, check_every=2,
                             policy=fat.Threshold(tau=10.0, patience=1, min_active_fraction=0.0))
    x, y = data()
    train(model, opt, 2, x, y)  # the first check only sets references
    assert not opt.frozen.any()
    train(model, opt, 2, x, y)  # the second measures: every defined drift < 10 freezes
    assert opt.drift_defined.any() and not opt.drift_defined.all()
    assert opt.frozen[opt.drift_defined].all()
    assert not opt.frozen[~opt.drift_defined].any()  # 1-element groups: drift undefined


@pytest.mark.parametrize("estimator", ["empirical", "kfac"])
@pytest.mark.parametrize("drift", ["mass", "histogram"])
def test_estimators_and_drift_modes_run_and_freeze(estimator, drift):
    torch.manual_seed(0)
    model = Tiny()
    opt = fat.FisherAdapTune(torch.optim.AdamW(model.parameters(), lr=1e-2), model,
                             estimator=estimator, drift_mode=drift, check_every=3,
                             policy=fat.Threshold(tau=0.5, patience=1, min_active_fraction=0.3))
    x, y = data()
    train(model, opt, 12, x, y)
    assert opt.frozen.any()
    assert 0.3 <= opt.active_fraction < 1.0
    assert len(opt.tracker.history) == 4
    assert "active" in opt.summary() and "frozen@" in opt.summary()
    m = opt.metrics()
    assert m["adaptune/active_fraction"] == pytest.approx(opt.active_fraction)


def test_unfreeze_restores_training():
    torch.manual_seed(0)
    model = Tiny()
    opt = fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.1), model, check_every=1000)
    x, y = data()
    opt.freeze("fc1.weight")
    assert not model.fc1.weight.requires_grad
    opt.unfreeze("fc1.weight")
    assert model.fc1.weight.requires_grad and not opt.frozen.any()
    w = model.fc1.weight.detach().clone()
    train(model, opt, 2, x, y)
    assert not torch.equal(w, model.fc1.weight.detach())


def test_plot_writes_file(tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    model = Tiny()
    opt = fat.FisherAdapTune(torch.optim.AdamW(model.parameters(), lr=1e-2), model, check_every=2,
                             policy=fat.Threshold(tau=0.5, patience=1))
    x, y = data()
    train(model, opt, 8, x, y)
    path = tmp_path / "drift.png"
    opt.plot(str(path))
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("kwargs,match", [
    (dict(policy=None, check_every=0), "check_every"),
    (dict(drift_mode="kl"), "drift_mode"),
    (dict(estimator="fisher"), "estimator"),
    (dict(groups="rows"), "groups"),
    (dict(fisher_decay=1.5), "fisher_decay"),
    (dict(score_decay=1.0), "score_decay"),
])
def test_bad_configuration(kwargs, match):
    model = Tiny()
    with pytest.raises(ValueError, match=match):
        fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.1), model, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(tau=0.0), "tau"), (dict(tau=-1.0), "tau"), (dict(patience=0), "patience"),
    (dict(min_active_fraction=1.5), "min_active_fraction"),
    (dict(min_active_fraction=-0.1), "min_active_fraction"), (dict(warmup=-1), "warmup"),
])
def test_bad_threshold(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fat.Threshold(**kwargs)


def test_bad_paper_policy_and_foreign_params():
    with pytest.raises(ValueError, match="every"):
        fat.PaperPolicy(every=0)
    with pytest.raises(ValueError, match="score"):
        fat.PaperPolicy(score="max")
    model, other = Tiny(), nn.Linear(3, 3)
    with pytest.raises(ValueError, match="model"):
        fat.FisherAdapTune(torch.optim.SGD(list(model.parameters()) + list(other.parameters()),
                                           lr=0.1), model)
    opt = fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(ValueError, match="names"):
        opt.freeze("no.such.group")
    with pytest.raises(ValueError, match="param"):
        opt.frozen_mask(other.weight)


@pytest.mark.parametrize("method", ["vefa", "lorfa"])
def test_adapter_parameters_freeze_progressively(method):
    torch.manual_seed(0)
    model = Tiny()
    if method == "vefa":
        fat.adapters.add_vefa(model)
    else:
        fat.adapters.add_lorfa(model, rank=2)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = fat.FisherAdapTune(torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1), model,
                             check_every=3,
                             policy=fat.Threshold(tau=0.6, patience=1, min_active_fraction=0.2))
    assert all(n.split(".")[-1].startswith(("vefa", "lorfa")) or n.startswith("head")
               for n in opt.names)
    x, y = data()
    train(model, opt, 9, x, y)
    assert opt.frozen.any() and opt.active_fraction >= 0.2
    before = {n: (opt.frozen_mask(p).clone(), p.detach().clone())
              for n, p in zip(opt.names, opt.params)}
    train(model, opt, 3, x, y)
    for n, p in zip(opt.names, opt.params):
        mask, old = before[n]
        assert torch.equal(p.detach()[mask], old[mask]), n


def test_distributed_save_load_without_a_process_group_resumes_exactly(tmp_path):
    """fisheradaptune.distributed.save/load (torch.distributed.checkpoint) also serve one
    process: a run saved at step 10 and resumed equals the uninterrupted run bit for bit."""
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 18), torch.nn.GELU(), torch.nn.Linear(18, 3))
        opt = fat.FisherAdapTune(torch.optim.AdamW(model.parameters(), lr=1e-2), model,
                                 check_every=2, policy=fat.Threshold(tau=0.15, patience=2,
                                                                     min_active_fraction=0.1))
        return model, opt

    def train(model, opt, steps):
        for _ in range(steps):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()

    model, opt = make()
    train(model, opt, 20)
    straight = ([p.detach().clone() for p in model.parameters()], opt.frozen.clone())
    model, opt = make()
    train(model, opt, 10)
    assert opt.frozen.any()
    fat.distributed.save(str(tmp_path / "ckpt"), model, opt)
    model, opt = make()
    fat.distributed.load(str(tmp_path / "ckpt"), model, opt)
    train(model, opt, 10)
    assert torch.equal(opt.frozen, straight[1])
    for a, b in zip(straight[0], model.parameters()):
        assert torch.equal(a, b)
