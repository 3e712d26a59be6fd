"""TR-PTS parameter selection (docs/methods.md section 5): fisheradaptune.selection's formula
(select_from_fisher), select_connections, Selection save/load and apply(mode="mask")."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from torch import nn

from fisheradaptune.selection import Selection, select_connections, select_from_fisher


def _spec_c(fisher, budget, c_min, skip_empty):
    """The documented formula, written out independently (global argsort, stable)."""
    names = list(fisher)
    flat = torch.cat([fisher[n].reshape(-1).double() for n in names])
    k = min(flat.numel(), max(1, math.floor(budget * flat.numel() + 0.5)))
    order = torch.sort(-flat, stable=True).indices[:k]
    owner = torch.cat([torch.full((fisher[n].numel(),), i) for i, n in enumerate(names)])
    out = {}
    for i, n in enumerate(names):
        out_f, in_f = fisher[n].shape
        kl = int((owner[order] == i).sum())
        if kl > 0:
            out[n] = min(in_f, max(c_min, math.floor(kl / out_f + 0.5)))
        else:
            out[n] = 0 if skip_empty else min(c_min, in_f)
    return out


def test_formula_hand_built():
    # a: 2x4, b: 2x2, c: 4x8. Top 4 of 48 entries (budget 1/12): 3 in a, 1 in b, 0 in c.
    a = torch.tensor([[9.0, 8.0, 0.0, 0.0], [7.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 6.0], [0.0, 0.0]])
    c = torch.full((4, 8), 0.5)
    fisher = {"a": a, "b": b, "c": c}
    index, cl = select_from_fisher(fisher, budget=4 / 48, c_min=1)
    # C_a = round(3 / 2) = 2, C_b = round(1 / 2) = 1 (half up), C_c = c_min (no top entry)
    assert cl == {"a": 2, "b": 1, "c": 1}
    assert index["a"].tolist() == [[0, 1], [0, 1]]
    assert index["b"].tolist() == [[1], [0]]
    assert index["c"].tolist() == [[0]] * 4
    # c_min lifts every layer; clamped to in_features = 2 in b
    _, cl = select_from_fisher(fisher, budget=4 / 48, c_min=3)
    assert cl == {"a": 3, "b": 2, "c": 3}
    _, cl = select_from_fisher(fisher, budget=4 / 48, c_min=2, skip_empty=True)
    assert cl == {"a": 2, "b": 2, "c": 0}
    index, _ = select_from_fisher(fisher, budget=4 / 48, c_min=2, skip_empty=True)
    assert index["c"].shape == (4, 0) and index["c"].dtype == torch.int64
    # Half the entries: k = 24 = 4 (a, b) + 20 of c's ties (row-major), C_c = round(20 / 4) = 5
    _, cl = select_from_fisher(fisher, budget=0.5, c_min=1)
    assert cl == {"a": 2, "b": 1, "c": 5}
    index, cl = select_from_fisher(fisher, budget=1.0, c_min=1)
    assert cl == {"a": 4, "b": 2, "c": 8}


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


# --------------------------------------------------------------------------- budget monotone


def _selected(index, fisher):
    """``{name: bool mask}`` of the entries ``index`` selects."""
    return {n: torch.zeros(f.shape, dtype=torch.bool).scatter_(1, index[n], True)
            for n, f in fisher.items()}


def test_budget_one_selects_everything():
    g = torch.Generator().manual_seed(0)
    fisher = {"a": torch.rand(4, 8, generator=g), "b": torch.zeros(6, 3),
              "c": torch.rand(2, 16, generator=g) * 1e3}
    for c_min in (1, 5):
        for skip_empty in (False, True):
            index, cl = select_from_fisher(fisher, 1.0, c_min, skip_empty)
            assert cl == {n: f.shape[1] for n, f in fisher.items()}
            assert all(m.all() for m in _selected(index, fisher).values())


def test_small_budget_does_not_saturate_a_layer():
    # One top entry in a big layer and the rest of the top set in a small one: the ratio rule
    # C_l = c_min * w_l / min w gave the small layer all 64 columns (512 entries for a top set
    # of 92). The selection now follows the top set: 91 entries over 8 rows -> 11 per row.
    big = torch.zeros(64, 64)
    big[3, 5] = 100.0
    small = torch.ones(8, 64) + torch.arange(64.0) / 64
    fisher = {"big": big, "small": small}
    index, cl = select_from_fisher(fisher, budget=0.02)   # k = round(0.02 * 4608) = 92
    assert cl == {"big": 1, "small": 11}
    assert index["big"][3].tolist() == [5]
    assert index["small"][0].tolist() == list(range(53, 64))
    prev = {"big": 0, "small": 0}
    for budget in torch.linspace(0.001, 1.0, 60).tolist():
        _, cl = select_from_fisher(fisher, budget)
        assert all(cl[n] >= prev[n] for n in cl), (budget, cl, prev)
        prev = cl
    assert prev == {"big": 64, "small": 64}


@st.composite
def _fisher_dicts(draw):
    """1-4 layers of different shapes (an empty one allowed); each all zeros, a few levels
    (many ties, zeros among them), one constant, or spread-out values."""
    fisher = {}
    for i in range(draw(st.integers(1, 4))):
        out_f, in_f = draw(st.integers(0, 6)), draw(st.integers(1, 9))
        n = out_f * in_f
        kind = draw(st.sampled_from(["zeros", "levels", "const", "spread"]))
        if kind == "zeros":
            vals = [0.0] * n
        elif kind == "const":
            vals = [draw(st.sampled_from([0.5, 1.0, 3.0]))] * n
        elif kind == "levels":
            vals = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]), min_size=n, max_size=n))
        else:
            vals = draw(st.lists(st.floats(0.0, 1e3, allow_nan=False, width=32),
                                 min_size=n, max_size=n))
        fisher[f"l{i}"] = torch.tensor(vals, dtype=torch.float32).reshape(out_f, in_f)
    assume(sum(f.numel() for f in fisher.values()) > 0)
    return fisher


_budgets = st.one_of(st.floats(1e-4, 1.0, allow_nan=False), st.sampled_from([1e-4, 0.5, 1.0]))


@settings(max_examples=150)
@given(fisher=_fisher_dicts(), b1=_budgets, b2=_budgets, c_min=st.integers(1, 4),
       skip_empty=st.booleans())
def test_budget_is_monotone_and_nested(fisher, b1, b2, c_min, skip_empty):
    # Nestedness holds in general (see the module doc): the global top-k sets follow one
    # order, so each k_l and hence C_l grows with the budget, and each row's top C_l is a
    # prefix of one per-row order. So both properties are checked, not only the counts.
    b1, b2 = sorted((b1, b2))
    assume(b1 < b2)
    idx1, c1 = select_from_fisher(fisher, b1, c_min, skip_empty)
    idx2, c2 = select_from_fisher(fisher, b2, c_min, skip_empty)
    assert all(c1[n] <= c2[n] for n in fisher), (c1, c2)
    m1, m2 = _selected(idx1, fisher), _selected(idx2, fisher)
    assert all(not (m1[n] & ~m2[n]).any() for n in fisher)
    assert sum(int(m.sum()) for m in m1.values()) <= sum(int(m.sum()) for m in m2.values())
    if b2 == 1.0:
        assert all(m.all() for m in m2.values())
    # the selected count is k up to each layer's rounding to whole rows and the c_min floor
    total = sum(f.numel() for f in fisher.values())
    k = min(total, max(1, math.floor(b2 * total + 0.5)))
    slack = sum(f.shape[0] for f in fisher.values()) / 2
    assert sum(int(m.sum()) for m in m2.values()) >= k - slack
