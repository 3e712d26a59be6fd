"""Fisher estimators of fisheradaptune.fisher against torch.func and hand-computed factors."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import fisheradaptune as fat


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3))


def batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 4, 5, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(n)]


def loss_fn(model, batch, reduction="mean"):
    x, y = batch
    return nn.functional.cross_entropy(model(x).mean(1), y, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_sample_fisher_matches_torch_func(reduction):
    model = small_model()
    data = batches()
    got = fat.fisher.per_sample_fisher(model, data, lambda m, b: loss_fn(m, b, reduction),
                                       loss_reduction=reduction)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, x, y):
        return nn.functional.cross_entropy(functional_call(model, p, (x[None],)).mean(1), y[None])

    per = [vmap(grad(one), in_dims=(None, 0, 0))(params, x, y) for x, y in data]
    for name in ("0", "2"):
        g = torch.cat([p[f"{name}.weight"] for p in per])
        torch.testing.assert_close(got[name], (g ** 2).mean(0), rtol=1e-5, atol=1e-9)


def test_estimators_leave_grads_as_they_were():
    model = small_model()
    marker = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, m in zip(model.parameters(), marker):
        p.grad = m.clone()
    for est in ("per_sample", "empirical", "kfac"):
        fat.fisher.estimate(model, batches(), loss_fn, estimator=est)
        for p, m in zip(model.parameters(), marker):
            assert torch.equal(p.grad, m), est
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_empirical_estimate_is_the_mean_squared_batch_gradient():
    model = small_model()
    data = batches()
    got = fat.fisher.estimate(model, data, loss_fn, estimator="empirical")
    expected = torch.zeros_like(model[0].weight)
    for b in data:
        model.zero_grad()
        loss_fn(model, b).backward()
        expected += model[0].weight.grad ** 2
    torch.testing.assert_close(got["0"], expected / len(data))


def test_kfac_is_outer_product_of_output_grad_and_input_second_moments():
    model = small_model()
    data = batches(n=2)
    got = fat.fisher.estimate(model, data, loss_fn, estimator="kfac")
    # By hand: per batch, S = mean over batch and tokens of (dL/dy)^2, H = mean of x^2; with
    # decay 1 the estimate is the running mean over batches of each factor.
    s_sum, h_sum = 0, 0
    for x, y in data:
        h = x.reshape(-1, 5)
        out = model[0](x)
        out.retain_grad()
        loss = nn.functional.cross_entropy(model[2](model[1](out)).mean(1), y)
        loss.backward()
        s_sum = s_sum + out.grad.reshape(-1, 7).square().mean(0)
        h_sum = h_sum + h.square().mean(0)
    torch.testing.assert_close(got["0"], torch.outer(s_sum / 2, h_sum / 2), rtol=1e-5, atol=1e-12)


def test_kfac_estimator_uses_a_real_ema():
    model = small_model()
    weights = [model[0].weight]
    est = fat.fisher.KFACFisher(weights, model=model, decay=0.5)
    for b in batches(n=3):
        loss_fn(model, b).backward()
        est.update()
    f = est._factors[model[0]]
    assert f["t"] == 3  # the step counter advances (the public code's never does)
    assert torch.isfinite(est.snapshot()[0]).all() and est.snapshot()[0].sum() > 0


def test_bad_arguments():
    model = small_model()
    with pytest.raises(ValueError, match="estimator"):
        fat.fisher.estimate(model, batches(), loss_fn, estimator="exact")
    with pytest.raises(ValueError, match="modules"):
        fat.fisher.estimate(model, batches(), loss_fn, modules=["1"])
    with pytest.raises(ValueError, match="loss_reduction"):
        fat.fisher.per_sample_fisher(model, batches(), loss_fn, loss_reduction="none")
    with pytest.raises(ValueError, match="decay"):
        fat.fisher.EmpiricalFisher(list(model.parameters()), decay=1.5)
