"""TR-PTS parameter selection (SPEC section 5): fisheradaptune.selection."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fisheradaptune import ops, selection
from fisheradaptune.selection import Selection, select_connections, select_from_fisher


def _spec_c(fisher, budget, c_min, skip_empty):
    """The SPEC formula, written out independently (global argsort, stable)."""
    names = list(fisher)
    flat = torch.cat([fisher[n].reshape(-1).double() for n in names])
    k = min(flat.numel(), max(1, math.floor(budget * flat.numel() + 0.5)))
    order = torch.sort(-flat, stable=True).indices[:k]
    owner = torch.cat([torch.full((fisher[n].numel(),), i) for i, n in enumerate(names)])
    w = [int((owner[order] == i).sum()) / fisher[n].numel() for i, n in enumerate(names)]
    wmin = min(x for x in w if x > 0)
    out = {}
    for n, wl in zip(names, w):
        in_f = fisher[n].shape[1]
        if wl > 0:
            out[n] = max(1, min(in_f, math.floor(c_min * wl / wmin + 0.5)))
        else:
            out[n] = 0 if skip_empty else min(c_min, in_f)
    return out


def test_formula_hand_built():
    # a: 2x4, b: 2x2, c: 4x8. Top 4 of 48 entries (budget 1/12): 3 in a, 1 in b, 0 in c.
    a = torch.tensor([[9.0, 8.0, 0.0, 0.0], [7.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 6.0], [0.0, 0.0]])
    c = torch.full((4, 8), 0.5)
    fisher = {"a": a, "b": b, "c": c}
    index, cl = select_from_fisher(fisher, budget=4 / 48, c_min=2)
    # w_a = 3/8, w_b = 1/4 -> min 1/4; C_a = round(2 * 1.5) = 3, C_b = 2 (clamped to in=2), C_c = c_min
    assert cl == {"a": 3, "b": 2, "c": 2}
    assert index["a"].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert index["b"].tolist() == [[0, 1], [0, 1]]
    assert index["c"].tolist() == [[0, 1]] * 4
    _, cl = select_from_fisher(fisher, budget=4 / 48, c_min=2, skip_empty=True)
    assert cl == {"a": 3, "b": 2, "c": 0}
    index, _ = select_from_fisher(fisher, budget=4 / 48, c_min=2, skip_empty=True)
    assert index["c"].shape == (4, 0) and index["c"].dtype == torch.int64


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [0.001, 0.02, 0.3, 1.0])
def test_random_matches_formula_and_rows(seed, budget):
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 24), (48, 16), (8, 64), (5, 3)]
    # Quantised values make ties frequent.
    fisher = {f"l{i}": torch.randint(0, 6, s, generator=g).float() * (1 + i) for i, s in enumerate(shapes)}
    for c_min in (1, 3):
        for skip_empty in (False, True):
            index, cl = select_from_fisher(fisher, budget, c_min, skip_empty)
            assert cl == _spec_c(fisher, budget, c_min, skip_empty)
            for n, f in fisher.items():
                idx = index[n]
                assert idx.dtype == torch.int64 and idx.shape == (f.shape[0], cl[n])
                if cl[n] == 0:
                    continue
                # rows sorted, distinct, and exactly the stable top-C_l (ties to the lower index)
                assert (idx.diff(dim=1) > 0).all()
                want = torch.sort(-f, dim=1, stable=True).indices[:, :cl[n]].sort(dim=1).values
                assert torch.equal(idx, want)


def test_ties_lower_index():
    f = torch.ones(3, 10)
    index, cl = select_from_fisher({"x": f}, budget=0.1, c_min=4)
    assert cl["x"] == 4
    assert index["x"].tolist() == [[0, 1, 2, 3]] * 3
    # global ties: two equal layers, k = 1 -> the first layer gets it
    index, cl = select_from_fisher({"p": torch.ones(2, 2), "q": torch.ones(2, 2)}, budget=1 / 8,
                                   c_min=1, skip_empty=True)
    assert cl == {"p": 1, "q": 0}


def test_fisher_errors():
    with pytest.raises(ValueError, match="budget"):
        select_from_fisher({"a": torch.ones(2, 2)}, budget=0.0)
    with pytest.raises(ValueError, match="budget"):
        select_from_fisher({"a": torch.ones(2, 2)}, budget=1.5)
    with pytest.raises(ValueError, match="c_min"):
        select_from_fisher({"a": torch.ones(2, 2)}, c_min=0)
    with pytest.raises(ValueError, match="fisher"):
        select_from_fisher({"a": torch.ones(2)})
    with pytest.raises(ValueError, match="fisher"):
        select_from_fisher({"a": torch.tensor([[1.0, float("nan")]])})


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, tok):
        h = self.emb(tok)
        h = self.fc2(torch.relu(self.norm(self.fc1(h))))
        return self.head(h.mean(1))


def _data(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 10, (4, 5), generator=g), torch.randint(0, 3, (4,), generator=g))
            for _ in range(n)]


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("estimator", ["per_sample", "empirical", "kfac"])
def test_select_connections(estimator):
    torch.manual_seed(0)
    model = Net()
    sel = select_connections(model, _data(), _loss, budget=0.05, c_min=2, estimator=estimator)
    assert list(sel.index) == ["fc1", "fc2"] and sel.head == "head"
    for n, m in [("fc1", model.fc1), ("fc2", model.fc2)]:
        assert sel.index[n].shape == (m.out_features, sel.c[n])
    assert all(p.requires_grad for p in model.parameters())   # left as it was
    text = sel.summary()
    assert "trainable params:" in text and "fc1" in text
    total = sum(p.numel() for p in model.parameters())
    want = sel.selected + 16 + 8 + 8 * 3 + 3
    assert sel.trainable_parameters() == want
    assert f"all params: {total:,d}" in text


def test_select_connections_errors():
    model = Net()
    with pytest.raises(ValueError, match="budget"):
        select_connections(model, _data(1), _loss, budget=-1)
    with pytest.raises(ValueError, match="c_min"):
        select_connections(model, _data(1), _loss, c_min=0)
    with pytest.raises(ValueError, match="estimator"):
        select_connections(model, _data(1), _loss, estimator="magic")
    with pytest.raises(ValueError, match="modules.*nope"):
        select_connections(model, _data(1), _loss, modules=["nope"])
    with pytest.raises(ValueError, match="modules.*LayerNorm"):
        select_connections(model, _data(1), _loss, modules=["norm"])


def test_save_load(tmp_path):
    model = Net()
    sel = select_connections(model, _data(), _loss, budget=0.1, modules=["fc2", "fc1"])
    path = tmp_path / "sel.pt"
    sel.save(path)
    back = Selection.load(path)
    assert list(back.index) == ["fc2", "fc1"]
    for n in sel.index:
        assert torch.equal(back.index[n], sel.index[n])
    assert back.c == sel.c and back.shapes == sel.shapes and back.counts == sel.counts
    assert (back.budget, back.c_min, back.estimator, back.head) == (sel.budget, sel.c_min,
                                                                   sel.estimator, sel.head)
    assert back.summary() == sel.summary()
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="selection"):
        Selection.load(tmp_path / "other.pt")


def test_apply_mask_trainability():
    model = Net()
    sel = select_connections(model, _data(), _loss, budget=0.05)
    params = sel.apply(model, mode="mask")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "head.weight",
                         "head.bias"}
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    sel.train_bias = sel.train_head = False
    sel.apply(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc1.weight", "fc2.weight"}
    with pytest.raises(ValueError, match="mode"):
        sel.apply(model, mode="dense")
    with pytest.raises(ValueError, match="model"):
        sel.apply(nn.Sequential(nn.Linear(2, 2)))


# ---------------------------------------------------------------------------------------------
# mode="mask" with MaskedOptimizer

from fisheradaptune.masked import MaskedOptimizer  # noqa: E402


def _selected_mask(sel, name, shape):
    m = torch.zeros(shape, dtype=torch.bool)
    m.scatter_(1, sel.index[name], True)
    return m


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1),
], ids=["adamw", "sgd"])
def test_masked_optimizer_keeps_unselected(make_opt):
    torch.manual_seed(0)
    model = Net()
    sel = select_connections(model, _data(), _loss, budget=0.05, c_min=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = MaskedOptimizer(make_opt(sel.apply(model, mode="mask")), sel)
    for batch in _data(5, seed=1):
        _loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    for name in ("fc1", "fc2"):
        w = dict(model.named_parameters())[name + ".weight"].detach()
        keep = _selected_mask(sel, name, w.shape)
        w0 = before[name + ".weight"]
        assert torch.equal(w[~keep], w0[~keep])   # bit-identical
        assert not torch.equal(w[keep], w0[keep])
    for name in ("fc1.bias", "head.weight"):
        assert not torch.equal(dict(model.named_parameters())[name].detach(), before[name])
    for name in ("emb.weight", "norm.weight"):
        assert torch.equal(dict(model.named_parameters())[name].detach(), before[name])


def test_masked_optimizer_grads_and_model_arg():
    torch.manual_seed(0)
    model = Net()
    sel = select_connections(model, _data(), _loss, budget=0.05)
    params = sel.apply(model)
    opt = MaskedOptimizer(torch.optim.SGD(params, lr=0.1), Selection.from_state_dict(sel.state_dict()),
                          model=model)
    _loss(model, _data(1)[0]).backward()
    opt.step()
    g = model.fc1.weight.grad
    keep = _selected_mask(sel, "fc1", g.shape)
    assert (g[~keep] == 0).all() and (g[keep] != 0).any()
    with pytest.raises(ValueError, match="apply"):
        MaskedOptimizer(torch.optim.SGD(params, lr=0.1), Selection.from_state_dict(sel.state_dict()))
    with pytest.raises(TypeError, match="selection"):
        MaskedOptimizer(torch.optim.SGD(params, lr=0.1), {})
    # state_dict round trip through the wrapper
    opt.load_state_dict(opt.state_dict())


# ---------------------------------------------------------------------------------------------
# mode="compact": SparseLinear (sampled gradient) and merge

from fisheradaptune.selection import SparseLinear, _SparseLinearFn  # noqa: E402


def test_sparse_linear_gradcheck():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(6, 4).double()
    index = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(4)])
    sp = SparseLinear.from_linear(lin, index)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)

    def f(x, v, b):
        return _SparseLinearFn.apply(x, sp.weight, v, sp.index, b)

    v = sp.values.detach().clone().requires_grad_(True)
    b = sp.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x, v, b))
    # forward equals the dense Linear before any training
    torch.testing.assert_close(sp(x), lin(x))


def _sparse_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(6, 4)
    index = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(4)])
    return SparseLinear.from_linear(lin, index), torch.randn(3, 6, generator=g)


def test_sparse_linear_forward_tracks_values_without_a_dense_copy_per_forward():
    sp, x = _sparse_case()
    opt = torch.optim.SGD(sp.parameters(), lr=0.5)
    for _ in range(3):  # after every optimizer step the output is the merged layer's
        sp(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(sp(x), nn.functional.linear(x, sp.dense_weight(), sp.bias))
    # The layer multiplies by its own buffer: the selected entries hold `values`, in place.
    assert torch.equal(sp.weight.gather(1, sp.index), sp.values.detach())
    # Several forwards before one backward (gradient accumulation) leave what the first saved
    # for backward untouched, and the gradients add up.
    ptr = sp.weight.data_ptr()
    loss = sp(x).sum() + sp(2 * x).sum()
    loss.backward()
    assert sp.weight.data_ptr() == ptr
    expected = ops.sampled_grad(torch.ones(3, 4), 3 * x, sp.index)
    torch.testing.assert_close(sp.values.grad, expected)


def test_sparse_linear_resyncs_after_loads_and_outside_writes():
    sp, x = _sparse_case(0)
    other, _ = _sparse_case(0)
    with torch.no_grad():
        other.values.add_(1.0)
    sp(x)
    sp.load_state_dict(other.state_dict())  # copies values (and weight) in place
    torch.testing.assert_close(sp(x), nn.functional.linear(x, other.dense_weight(), other.bias))
    with torch.no_grad():
        sp.weight.fill_(0.25)  # someone overwrites the dense buffer: values are put back
    want = torch.full((4, 6), 0.25).scatter(1, sp.index, sp.values.detach())
    torch.testing.assert_close(sp(x), nn.functional.linear(x, want, sp.bias))


def test_compact_matches_mask_and_merge():
    torch.manual_seed(0)
    base = Net()
    sel = select_connections(base, _data(), _loss, budget=0.05, c_min=2)
    models = {}
    for mode in ("mask", "compact"):
        model = Net()
        model.load_state_dict(base.state_dict())
        params = sel.apply(model, mode=mode)
        inner = torch.optim.SGD(params, lr=0.05)
        opt = MaskedOptimizer(inner, sel) if mode == "mask" else inner
        for batch in _data(4, seed=2):
            _loss(model, batch).backward()
            opt.step()
            opt.zero_grad()
        models[mode] = model
    compact = models["compact"]
    assert isinstance(compact.fc1, SparseLinear)
    assert {n for n, p in compact.named_parameters() if p.requires_grad} == {
        "fc1.values", "fc1.bias", "fc2.values", "fc2.bias", "head.weight", "head.bias"}
    x = _data(1, seed=5)[0][0]
    out_compact = compact(x)
    sel.merge(compact)
    assert type(compact.fc1) is nn.Linear and type(compact.fc2) is nn.Linear
    torch.testing.assert_close(compact(x), out_compact)
    for name in ("fc1", "fc2"):
        w = getattr(compact, name).weight.detach()
        keep = _selected_mask(sel, name, w.shape)
        w0 = getattr(base, name).weight.detach()
        assert torch.equal(w[~keep], w0[~keep])
        assert not torch.equal(w[keep], w0[keep])
        torch.testing.assert_close(w, getattr(models["mask"], name).weight.detach(),
                                   rtol=1e-5, atol=1e-6)
    sd = compact.state_dict()
    assert set(sd) == set(base.state_dict())
    sel.merge(models["mask"])   # mask mode: nothing to do
