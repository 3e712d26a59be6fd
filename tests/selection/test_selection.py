"""TR-PTS parameter selection (SPEC section 5): fisheradaptune.selection's formula
(select_from_fisher), select_connections, Selection save/load and apply(mode="mask")."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

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


@pytest.mark.parametrize("estimator", ["per_sample", "empirical", "kfac"])
def test_select_connections(make_net, make_data, loss_fn, estimator):
    torch.manual_seed(0)
    model = make_net()
    sel = select_connections(model, make_data(), loss_fn, budget=0.05, c_min=2, estimator=estimator)
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


def test_select_connections_errors(make_net, make_data, loss_fn):
    model = make_net()
    with pytest.raises(ValueError, match="budget"):
        select_connections(model, make_data(1), loss_fn, budget=-1)
    with pytest.raises(ValueError, match="c_min"):
        select_connections(model, make_data(1), loss_fn, c_min=0)
    with pytest.raises(ValueError, match="estimator"):
        select_connections(model, make_data(1), loss_fn, estimator="magic")
    with pytest.raises(ValueError, match="modules.*nope"):
        select_connections(model, make_data(1), loss_fn, modules=["nope"])
    with pytest.raises(ValueError, match="modules.*LayerNorm"):
        select_connections(model, make_data(1), loss_fn, modules=["norm"])


def test_save_load(make_net, make_data, loss_fn, tmp_path):
    model = make_net()
    sel = select_connections(model, make_data(), loss_fn, budget=0.1, modules=["fc2", "fc1"])
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


def test_apply_mask_trainability(make_net, make_data, loss_fn):
    model = make_net()
    sel = select_connections(model, make_data(), loss_fn, budget=0.05)
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
