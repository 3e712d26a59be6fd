"""Ops without a derivative never hand back a silent zero gradient (Note [No derivative] in
fisheradaptune/ops/_library.py): distances refuse an input that requires grad, statistics treat
their inputs as data."""
from __future__ import annotations

import pytest
import torch

import fisheradaptune as fat
from fisheradaptune.ops import _library
from fisheradaptune.groups import per_tensor


def _ops():
    return sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("fisheradaptune::"))


@pytest.mark.parametrize("name", _ops())
def test_every_op_has_an_autograd_kernel(name):
    # Without one, PyTorch's fallback leaves the inputs' .grad at None (a warning only).
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fisheradaptune::{name}", "Autograd")


def _pair(requires_grad=True):
    torch.manual_seed(0)
    c = torch.rand(10, dtype=torch.float64, requires_grad=requires_grad)
    r = torch.rand(10, dtype=torch.float64)
    return c, r, per_tensor([("a", c)])


def test_js_drift_refuses_an_input_that_requires_grad(sweep):
    c, r, lay = _pair()
    with pytest.raises(RuntimeError, match=r"js_drift: argument 'current' requires grad, but "
                                           r"js_drift is not differentiable"):
        fat.ops.js_drift([c], [r], lay)
    # The silent case: before, the result required grad and backward left c.grad None.
    with torch.no_grad():
        expected = fat.ops.js_drift([c], [r], lay)
    got = fat.ops.js_drift([c.detach()], [r], lay)
    assert not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert expected.item() > 0
    sweep("autograd", "ops.js_drift", "refused")


def test_js_drift_refuses_before_updating_the_reference():
    c, r, lay = _pair()
    before = r.clone()
    with pytest.raises(RuntimeError, match="argument 'current' requires grad"):
        fat.ops.js_drift([c], [r], lay, update_reference=0.5)
    assert torch.equal(r, before)


def test_js_mass_ops_refuse_an_input_that_requires_grad(sweep):
    c, r, lay = _pair()
    with pytest.raises(RuntimeError, match="js_mass_totals: argument 'current' requires grad"):
        fat.ops.js_mass_totals([c], [r], lay)
    totals = fat.ops.js_mass_totals([c.detach()], [r], lay)
    with pytest.raises(RuntimeError, match="js_mass_partial: argument 'current' requires grad"):
        fat.ops.js_mass_partial([c], [r], lay, totals)
    sweep("autograd", "ops.js_mass_totals", "refused")
    sweep("autograd", "ops.js_mass_partial", "refused")


def test_backward_helpers_refuse_direct_calls_that_require_grad():
    x = torch.randn(1, 6, 4, dtype=torch.float64)
    metric = torch.randn(1, 6, 4, dtype=torch.float64)
    _, _, dest = fat.ops.bipartite_merge(x, metric, 1)
    grad = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="bipartite_merge_backward: argument 'grad_out' "
                                           "requires grad"):
        torch.ops.fisheradaptune.bipartite_merge_backward(grad, None, dest)


def test_statistics_treat_gradients_that_require_grad_as_data():
    # loss.backward(create_graph=True) leaves .grad requiring grad; the Fisher is a statistic.
    c, _, lay = _pair()
    g = torch.rand(10, requires_grad=True)
    fisher = torch.zeros(10)
    sums, skipped = fat.ops.fisher_accumulate_([fisher], [g], decay=0.5, scale=2.0, layout=lay)
    assert not fisher.requires_grad and not sums.requires_grad
    torch.testing.assert_close(fisher, 2.0 * g.detach() ** 2)
    assert skipped.item() == 0


def test_fisher_adaptune_after_create_graph_backward():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.1), model,
                             groups="per_tensor", check_every=1)
    x = torch.randn(8, 4)
    grads = torch.autograd.grad(model(x).pow(2).sum(), list(model.parameters()),
                                create_graph=True)
    penalty = sum(g.pow(2).sum() for g in grads)
    # A gradient-penalty loop: the .grad the wrapper reads requires grad.
    loss = model(x).pow(2).mean() + penalty
    for p, g in zip(model.parameters(), torch.autograd.grad(loss, list(model.parameters()),
                                                            create_graph=True)):
        p.grad = g
    assert model.weight.grad.requires_grad
    before = model.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.weight.detach(), before)

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v)
    state = list(tensors(opt.state_dict()))
    assert state and not any(t.requires_grad for t in state)


def test_the_lists_cover_the_ops_without_a_derivative():
    differentiable = {"bipartite_merge", "token_prune_merge", "sampled_grad"}
    assert set(_library.STATISTICS) | set(_library.NOT_DIFFERENTIABLE) | differentiable \
        == set(_ops())


def test_a_kernel_is_registered_once():
    # import fisheradaptune registered every Python kernel; a second one for the same op and
    # dispatch key is refused rather than silently replacing the first.
    with pytest.raises(RuntimeError, match="js_drift already has a kernel for Autograd"):
        _library.impl("js_drift", "Autograd")(lambda *args: None)
