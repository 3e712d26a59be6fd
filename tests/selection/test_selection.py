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


# --------------------------------------------------------------------------- file validation


def _saved(make_net, make_data, loss_fn):
    model = make_net()
    sel = select_connections(model, make_data(), loss_fn, budget=0.05, c_min=1)
    return model, sel, sel.state_dict()


def _corrupt(state, path, value):
    """A deep-enough copy of ``state`` with ``state[path[0]][path[1]]... = value``."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in state.items()}
    d = out
    for key in path[:-1]:
        d = d[key]
    d[path[-1]] = value
    return out


def test_load_validates_the_file_against_itself(make_net, make_data, loss_fn, tmp_path):
    # The reproducers first: each was accepted before (the 6-wide index with c=1 then
    # trained all 6 columns in mask mode).
    model, sel, state = _saved(make_net, make_data, loss_fn)
    out_f, in_f = sel.shapes["fc1"]
    wide = torch.arange(6).expand(out_f, 6).clone()
    cases = [
        (("c", "fc1"), -1, r"c\['fc1'\] must be an int in \[0, in_features=8\], got -1"),
        (("c", "fc1"), 5, r"index\['fc1'\].*1 columns per row, but its count C_l is 5"),
        (("index", "fc1"), wide, r"index\['fc1'\].*6 columns per row, but its count C_l is 1"),
        (("config", "budget"), 7.0, r"budget.*\(0, 1\].*7\.0"),
        (("config", "budget"), 0.0, r"budget.*\(0, 1\]"),
        (("config", "c_min"), 0, "c_min.*>= 1"),
        (("config", "estimator"), 3, "estimator must be a str"),
        (("config", "train_bias"), 1, "train_bias must be a bool"),
        (("config", "head"), "fc1", "head must be None or the name of a module that is not "
                                    "selected"),
        (("index", "fc1"), sel.index["fc1"] + in_f, r"index\['fc1'\].*\[0, 8\).*max"),
        (("index", "fc1"), sel.index["fc1"] - 100, r"index\['fc1'\].*\[0, 8\).*min"),
        (("index", "fc1"), sel.index["fc1"].int(), r"index\['fc1'\].*expected int64"),
        (("index", "fc1"), sel.index["fc1"][:3], r"index\['fc1'\].*out_features=16"),
        (("index", "fc1"), sel.index["fc1"].float(), r"index\['fc1'\].*int64"),
        (("index", "fc1"), [[0]] * 16, r"index\['fc1'\].*expected a Tensor"),
        (("shapes", "fc1"), [16], r"shapes\['fc1'\] must be two ints"),
        (("shapes", "fc1"), [16, -8], r"shapes\['fc1'\] must be two ints"),
        (("c", "fc3"), 1, "'c' names layers"),
        (("counts", "total"), -3, "counts must map"),
        (("counts", "weird"), 3, "counts must map"),
        (("version",), 2, "unsupported version 2"),
        (("extra",), 1, "expected the keys"),
    ]
    for path, value, match in cases:
        bad = _corrupt(state, path, value)
        with pytest.raises((ValueError, TypeError), match=match):
            Selection.from_state_dict(bad)
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises((ValueError, TypeError), match=match):
            Selection.load(tmp_path / "bad.pt")
    two = sel.index["fc1"].clone()
    two[4, 0] = two[4, 1] if two.shape[1] > 1 else two[4, 0]
    dup = _corrupt(_corrupt(state, ("index", "fc1"), torch.cat([two, two[:, :1]], 1)),
                   ("c", "fc1"), two.shape[1] + 1)
    with pytest.raises(ValueError, match=r"index\['fc1'\].*row 0 repeats a column"):
        Selection.from_state_dict(dup)
    cfg = dict(state["config"])
    cfg.pop("head")
    with pytest.raises(ValueError, match="'config' must have the keys"):
        Selection.from_state_dict({**state, "config": cfg})
    Selection.from_state_dict(state)   # the untouched file loads


def test_apply_checks_the_selection_and_the_model_before_changing_anything(
        make_net, make_data, loss_fn):
    model, sel, state = _saved(make_net, make_data, loss_fn)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    mutated = Selection.from_state_dict(state)
    mutated.c["fc1"] = 6   # edited after loading: contradicts its index
    other = make_net()
    other.fc2 = nn.Linear(16, 9)
    renamed = make_net()
    renamed.fc1, renamed.fc9 = nn.Identity(), renamed.fc1
    for bad_sel, bad_model, match in [
            (mutated, model, r"selection.*index\['fc1'\].*C_l is 6"),
            (sel, other, r"'fc2' has weight shape \[9, 16\], the selection \[8, 16\]"),
            (sel, renamed, r"'fc1' is not an nn.Linear of the model \(a Identity\)")]:
        for mode in ("mask", "compact"):
            with pytest.raises(ValueError, match=match):
                bad_sel.apply(bad_model, mode=mode)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert isinstance(model.fc1, nn.Linear)


def test_mask_mode_trains_only_the_loaded_columns(make_net, make_data, loss_fn, selected_mask,
                                                  tmp_path):
    from fisheradaptune.masked import MaskedOptimizer
    model, sel, _ = _saved(make_net, make_data, loss_fn)
    sel.save(tmp_path / "sel.pt")
    back = Selection.load(tmp_path / "sel.pt")
    before = model.fc1.weight.detach().clone()
    opt = MaskedOptimizer(torch.optim.SGD(back.apply(model), lr=0.1), back)
    loss_fn(model, make_data(1)[0]).backward()
    opt.step()
    moved = model.fc1.weight.detach() != before
    assert not (moved & ~selected_mask(back, "fc1", before.shape)).any()
    assert int(moved.sum(1).max()) <= back.c["fc1"]
