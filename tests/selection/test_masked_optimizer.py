"""mode="mask" with MaskedOptimizer: unselected weights stay bit-identical under any optimizer,
gradients are masked, and the wrapper checks what it is given."""
from __future__ import annotations

import pytest
import torch

from fisheradaptune.masked import MaskedOptimizer
from fisheradaptune.selection import Selection, select_connections


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1),
], ids=["adamw", "sgd"])
def test_masked_optimizer_keeps_unselected(make_net, make_data, loss_fn, selected_mask, make_opt):
    torch.manual_seed(0)
    model = make_net()
    sel = select_connections(model, make_data(), loss_fn, budget=0.05, c_min=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = MaskedOptimizer(make_opt(sel.apply(model, mode="mask")), sel)
    for batch in make_data(5, seed=1):
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad()
    for name in ("fc1", "fc2"):
        w = dict(model.named_parameters())[name + ".weight"].detach()
        keep = selected_mask(sel, name, w.shape)
        w0 = before[name + ".weight"]
        assert torch.equal(w[~keep], w0[~keep])   # bit-identical
        assert not torch.equal(w[keep], w0[keep])
    for name in ("fc1.bias", "head.weight"):
        assert not torch.equal(dict(model.named_parameters())[name].detach(), before[name])
    for name in ("emb.weight", "norm.weight"):
        assert torch.equal(dict(model.named_parameters())[name].detach(), before[name])


def test_masked_optimizer_grads_and_model_arg(make_net, make_data, loss_fn, selected_mask):
    torch.manual_seed(0)
    model = make_net()
    sel = select_connections(model, make_data(), loss_fn, budget=0.05)
    params = sel.apply(model)
    opt = MaskedOptimizer(torch.optim.SGD(params, lr=0.1), Selection.from_state_dict(sel.state_dict()),
                          model=model)
    loss_fn(model, make_data(1)[0]).backward()
    opt.step()
    g = model.fc1.weight.grad
    keep = selected_mask(sel, "fc1", g.shape)
    assert (g[~keep] == 0).all() and (g[keep] != 0).any()
    with pytest.raises(ValueError, match="apply"):
        MaskedOptimizer(torch.optim.SGD(params, lr=0.1), Selection.from_state_dict(sel.state_dict()))
    with pytest.raises(TypeError, match="selection"):
        MaskedOptimizer(torch.optim.SGD(params, lr=0.1), {})
    # state_dict round trip through the wrapper
    opt.load_state_dict(opt.state_dict())
