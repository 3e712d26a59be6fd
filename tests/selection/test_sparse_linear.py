"""mode="compact": SparseLinear (the sampled weight gradient, ops.sampled_grad) and merging
back into nn.Linear, equal to mode="mask" with MaskedOptimizer."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from fisheradaptune import ops
from fisheradaptune.masked import MaskedOptimizer
from fisheradaptune.selection import SparseLinear, select_connections
from fisheradaptune.selection.sparse_linear import _SparseLinearFn


def test_sparse_linear_gradcheck():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(6, 4).double()
    index = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(4)])
    sp = SparseLinear.from_linear(lin, index)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)

    def f(x, v, b):
        return _SparseLinearFn.apply(x, sp.base, v, sp.index, b)

    v = sp.values.detach().clone().requires_grad_(True)
    b = sp.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x, v, b))
    assert torch.autograd.gradgradcheck(f, (x, v, b))
    # forward equals the dense Linear before any training
    torch.testing.assert_close(sp(x), lin(x))


def _sparse_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(6, 4)
    index = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(4)])
    return SparseLinear.from_linear(lin, index), torch.randn(3, 6, generator=g)


def _fused_case(fused):
    """The issue's reproducer: SparseLinear.from_linear(nn.Linear(6, 4), idx) trained by AdamW
    on a mean-squared error; returns the five losses and the layer."""
    torch.manual_seed(0)
    sp = SparseLinear.from_linear(nn.Linear(6, 4), torch.tensor([[0, 2], [1, 3], [4, 5], [0, 5]]))
    x, y = torch.randn(8, 6), torch.randn(8, 4)
    opt = torch.optim.AdamW([sp.values], lr=0.1, fused=fused)
    losses = []
    for _ in range(5):
        loss = nn.functional.mse_loss(sp(x), y)
        losses.append(round(loss.item(), 4))
        loss.backward()
        opt.step()
        opt.zero_grad()
        # right after the step, before any forward: the state dict and a plain Linear loaded
        # from it give the layer's own output
        plain = nn.Linear(6, 4)
        plain.load_state_dict(sp.state_dict())
        torch.testing.assert_close(plain(x), sp(x), rtol=0, atol=0)
    return losses, sp, x


def test_fused_optimizer_steps_reach_the_forward_and_the_state_dict():
    # Before: the dense weight was synced through the version counter, which fused AdamW does
    # not bump: the loss stayed at 1.4466 for five steps (1.0691 with fused=False) and a state
    # dict taken after step() held the previous values.
    fused, sp, x = _fused_case(True)
    unfused, _, _ = _fused_case(False)
    assert fused[0] == 1.4466 and fused[-1] == 1.0691
    assert fused == unfused
    torch.testing.assert_close(sp(x), nn.functional.linear(x, sp.dense_weight(), sp.bias))


def test_forward_follows_every_write_of_values():
    sp, x = _sparse_case()
    for write in (lambda v: v.data.add_(0.5),                      # .data: no version bump
                  lambda v: setattr(v, "data", v.data * 2),          # a new storage
                  lambda v: torch.no_grad()(v.copy_)(v + 1)):        # in place, bumped
        write(sp.values)
        want = sp.base.scatter(1, sp.index, sp.values.detach())
        torch.testing.assert_close(sp(x), nn.functional.linear(x, want, sp.bias))
        torch.testing.assert_close(sp.weight, want)
        torch.testing.assert_close(sp.state_dict()["weight"], want)
    # Several forwards before one backward (gradient accumulation): the gradients add up.
    loss = sp(x).sum() + sp(2 * x).sum()
    loss.backward()
    expected = ops.sampled_grad(torch.ones(3, 4), 3 * x, sp.index)
    torch.testing.assert_close(sp.values.grad, expected)


def test_state_dict_is_a_linear_state_dict():
    sp, x = _sparse_case(0)
    assert set(sp.state_dict()) == {"weight", "bias"}
    other, _ = _sparse_case(0)
    with torch.no_grad():
        other.values.add_(1.0)
    sp.load_state_dict(other.state_dict())   # values come from the loaded weight at index
    assert torch.equal(sp.values.detach(), other.values.detach())
    torch.testing.assert_close(sp(x), nn.functional.linear(x, other.dense_weight(), other.bias))
    # a plain Linear's checkpoint loads too (base and values both from it), and back
    lin = nn.Linear(6, 4)
    sp.load_state_dict(lin.state_dict())
    torch.testing.assert_close(sp(x), lin(x))
    assert torch.equal(sp.values.detach(), lin.weight.detach().gather(1, sp.index))
    lin2 = nn.Linear(6, 4)
    sp.load_state_dict(lin2.state_dict(), assign=True)
    torch.testing.assert_close(sp(x), lin2(x))
    assert isinstance(sp.values, nn.Parameter) and sp.values.requires_grad
    # a checkpoint of the earlier format (weight, values, index, bias): values win at index
    old = {"weight": torch.zeros(4, 6), "values": torch.ones(4, 3), "index": sp.index.clone(),
           "bias": torch.zeros(4)}
    sp.load_state_dict(old)
    assert torch.equal(sp.weight.detach(), torch.zeros(4, 6).scatter(1, sp.index, 1.0))
    before = sp.state_dict()
    with pytest.raises(RuntimeError, match="index differs"):
        sp.load_state_dict({**old, "index": sp.index.flip(1)})
    with pytest.raises(RuntimeError, match=r"size mismatch for weight.*\[4, 5\]"):
        sp.load_state_dict({"weight": torch.zeros(4, 5), "bias": torch.zeros(4)})
    with pytest.raises(RuntimeError, match="Missing key.*\"weight\""):
        sp.load_state_dict({"bias": torch.zeros(4)})
    for k, v in sp.state_dict().items():
        assert torch.equal(v, before[k]), k
    # deepcopy and torch.save keep one source of truth
    cp = copy.deepcopy(sp)
    buf = io.BytesIO()
    torch.save(sp, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (cp, loaded):
        with torch.no_grad():
            m.values.mul_(3)
        torch.testing.assert_close(m(x), nn.functional.linear(x, m.dense_weight(), m.bias))
    assert not torch.equal(cp.values, sp.values)


def test_compact_matches_mask_and_merge(make_net, make_data, loss_fn, selected_mask):
    torch.manual_seed(0)
    base = make_net()
    sel = select_connections(base, make_data(), loss_fn, budget=0.05, c_min=2)
    models = {}
    for mode in ("mask", "compact"):
        model = make_net()
        model.load_state_dict(base.state_dict())
        params = sel.apply(model, mode=mode)
        inner = torch.optim.SGD(params, lr=0.05)
        opt = MaskedOptimizer(inner, sel) if mode == "mask" else inner
        for batch in make_data(4, seed=2):
            loss_fn(model, batch).backward()
            opt.step()
            opt.zero_grad()
        models[mode] = model
    compact = models["compact"]
    assert isinstance(compact.fc1, SparseLinear)
    assert {n for n, p in compact.named_parameters() if p.requires_grad} == {
        "fc1.values", "fc1.bias", "fc2.values", "fc2.bias", "head.weight", "head.bias"}
    x = make_data(1, seed=5)[0][0]
    out_compact = compact(x)
    sel.merge(compact)
    assert type(compact.fc1) is nn.Linear and type(compact.fc2) is nn.Linear
    torch.testing.assert_close(compact(x), out_compact)
    for name in ("fc1", "fc2"):
        w = getattr(compact, name).weight.detach()
        keep = selected_mask(sel, name, w.shape)
        w0 = getattr(base, name).weight.detach()
        assert torch.equal(w[~keep], w0[~keep])
        assert not torch.equal(w[keep], w0[keep])
        torch.testing.assert_close(w, getattr(models["mask"], name).weight.detach(),
                                   rtol=1e-5, atol=1e-6)
    sd = compact.state_dict()
    assert set(sd) == set(base.state_dict())
    sel.merge(models["mask"])   # mask mode: nothing to do


def test_sparse_linear_validates_its_arguments():
    w, b = torch.randn(4, 6), torch.randn(4)
    good = torch.tensor([[0, 1], [2, 3], [4, 5], [0, 5]])
    SparseLinear(w, good, b)
    SparseLinear(w, torch.empty(4, 0, dtype=torch.int64))   # C = 0: nothing trains
    SparseLinear(w, torch.arange(6).expand(4, 6).to(torch.int32))  # C = in_features, int32
    cases = [
        ((torch.randn(4, 6, 1), good, b), ValueError, "weight.*2-D"),
        ((torch.ones(4, 6, dtype=torch.int64), good, b), TypeError, "weight.*floating"),
        (([[1.0]], good, b), TypeError, "weight.*Tensor"),
        ((w, good[:3], b), ValueError, r"index.*out_features=4.*\[3, 2\]"),   # wrong row count
        ((w, good.reshape(-1), b), ValueError, "index.*shape"),
        ((w, torch.zeros(4, 7, dtype=torch.int64), b), ValueError, "index.*in_features=6"),
        ((w, good.float(), b), TypeError, "index.*integer"),
        ((w, good.bool(), b), TypeError, "index.*integer"),
        ((w, good.tolist(), b), TypeError, "index.*Tensor"),
        ((w, good - 1, b), ValueError, r"index.*\[0, 6\).*min -1"),
        ((w, good + 1, b), ValueError, r"index.*\[0, 6\).*max 6"),
        ((w, torch.tensor([[0, 1], [2, 3], [5, 5], [0, 5]]), b), ValueError,
         "index.*row 2.*repeats"),
        ((w, good, torch.randn(3)), ValueError, r"bias.*\[4\].*\[3\]"),
        ((w, good, torch.randn(4, 1)), ValueError, "bias.*shape"),
        ((w, good, torch.ones(4, dtype=torch.int64)), TypeError, "bias.*floating"),
    ]
    for args, err, match in cases:
        with pytest.raises(err, match=match):
            SparseLinear(*args)
    lin = nn.Linear(6, 4)
    with pytest.raises(ValueError, match="index.*repeats"):
        SparseLinear.from_linear(lin, torch.tensor([[1, 1]] * 4))
    with pytest.raises(ValueError, match="index.*out_features"):
        SparseLinear.from_linear(lin, torch.tensor([[1, 2]] * 5))
    with pytest.raises(TypeError, match="linear"):
        SparseLinear.from_linear(nn.Conv1d(6, 4, 1), good)
