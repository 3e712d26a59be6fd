"""Tests for fisheradaptune.adapters (VeFA, LoRFA; docs/methods.md section 8)."""
import copy
import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisheradaptune  # noqa: F401  (loads the compiled ops used by the Fisher estimators)
from fisheradaptune import adapters
from fisheradaptune.adapters import LoRFALinear, VeFALinear


# ---------------------------------------------------------------------------------------------
# Small models


class MLP(nn.Module):
    def __init__(self, d_in=12, d_h=16, n_cls=4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_h)
        self.fc2 = nn.Linear(d_h, d_h)
        self.head = nn.Linear(d_h, n_cls)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class Block(nn.Module):
    """A tiny pre-norm transformer block with its own attention (token axis: [B, T, C])."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, c // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, d=16, depth=2, n_cls=3):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(depth)])
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(d, n_cls))

    def forward(self, x):
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.heads(x.mean(1))


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return MLP().to(dtype)


def randomize(model, scale=0.3):
    """Give every adapter non-trivial values (as after training)."""
    with torch.no_grad():
        for _, m in adapters.named_adapters(model):
            for p in m.adapter_parameters():
                p.add_(torch.randn_like(p) * scale)


def add(method, model, **kw):
    return adapters.add_vefa(model, **kw) if method == "vefa" else adapters.add_lorfa(model, rank=3, **kw)


METHODS = ["vefa", "lorfa"]


# ---------------------------------------------------------------------------------------------
# Formulation and identity at init


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init_exact(method):
    model = mlp()
    x = torch.randn(7, 12)
    ref = model(x)
    add(method, model)
    assert torch.equal(model(x), ref)  # s = 1 (VeFA), B = 0 (LoRFA): bit-identical


def test_vefa_forward_matches_formula():
    model = adapters.add_vefa(mlp(dtype=torch.float64))
    randomize(model)
    m = model.fc1
    x = torch.randn(5, 12, dtype=torch.float64)
    want = (m.base.weight @ (m.vefa_s[:, None] * x.T)).T + m.base.bias
    torch.testing.assert_close(m(x), want)


def test_lorfa_forward_matches_formula_with_scaling():
    model = adapters.add_lorfa(mlp(dtype=torch.float64), rank=2, alpha=5.0)
    randomize(model)
    m = model.fc2
    assert m.scaling == pytest.approx(2.5)
    x = torch.randn(5, 16, dtype=torch.float64)
    h = x.T + 2.5 * m.lorfa_B @ (m.lorfa_A @ x.T)
    torch.testing.assert_close(m(x), (m.base.weight @ h).T + m.base.bias)
    assert m.lorfa_A.shape == (2, 16) and m.lorfa_B.shape == (16, 2)
    assert torch.count_nonzero(adapters.add_lorfa(mlp(), rank=2).fc1.lorfa_B) == 0


def test_lorfa_default_alpha_is_rank():
    model = adapters.add_lorfa(mlp(), rank=4)
    assert model.fc1.alpha == 4.0 and model.fc1.scaling == 1.0


# ---------------------------------------------------------------------------------------------
# Placement and the head rule


@pytest.mark.parametrize("method", METHODS)
def test_default_placement_skips_head(method):
    model = add(method, mlp())
    cls = VeFALinear if method == "vefa" else LoRFALinear
    assert [n for n, _ in adapters.named_adapters(model)] == ["fc1", "fc2"]
    assert all(isinstance(getattr(model, n), cls) for n in ("fc1", "fc2"))
    assert type(model.head) is nn.Linear


def test_default_placement_token_model():
    model = adapters.add_vefa(TinyViT())
    names = [n for n, _ in adapters.named_adapters(model)]
    assert "heads.head" not in names and "embed" in names
    assert "blocks.1.mlp.2" in names and "blocks.0.qkv" in names and len(names) == 9


@pytest.mark.parametrize("names,expected", [
    (["fc1", "fc2", "head"], "head"),
    (["features.fc1", "fc"], "fc"),                  # torchvision ResNet
    (["blocks.fc1", "heads.head"], "heads.head"),    # torchvision ViT
    (["blocks.fc1", "head.fc"], "head.fc"),          # timm-style
    (["x.dense", "classifier.dense", "classifier.out_proj"], "classifier.out_proj"),
    (["stages.0", "classifier.2"], "classifier.2"),  # torchvision ConvNeXt
    (["model.proj", "lm_head"], "lm_head"),
    (["fc1", "fc2"], None),
    (["0", "2"], None),
])
def test_find_head_rule(names, expected):
    root = nn.Module()
    for n in names:
        parent = root
        parts = n.split(".")
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        parent.add_module(parts[-1], nn.Linear(2, 2))
    assert adapters.find_head(root) == expected


def test_explicit_modules_and_head_override():
    model = adapters.add_lorfa(mlp(), rank=2, modules=["fc2", "head"])
    assert [n for n, _ in adapters.named_adapters(model)] == ["fc2", "head"]
    assert type(model.fc1) is nn.Linear
    # head=None: the model has no head, so the default adapts every Linear.
    model = adapters.add_vefa(mlp(), head=None)
    assert [n for n, _ in adapters.named_adapters(model)] == ["fc1", "fc2", "head"]
    # head named explicitly: it is left out and stays trainable.
    model = adapters.add_vefa(mlp(), head="fc2")
    assert [n for n, _ in adapters.named_adapters(model)] == ["fc1", "head"]
    assert model.fc2.weight.requires_grad and not model.head.base.weight.requires_grad


def test_multihead_attention_out_proj_skipped():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 8)
            self.classifier = nn.Linear(8, 2)

        def forward(self, x):
            return self.classifier(self.fc(self.attn(x, x, x)[0]).mean(1))

    model = M()
    adapters.add_lorfa(model, rank=2)
    assert [n for n, _ in adapters.named_adapters(model)] == ["fc"]
    model(torch.randn(2, 3, 8)).sum().backward()
    with pytest.raises(ValueError, match="modules"):
        adapters.add_vefa(M(), modules=["attn.out_proj"])


class ScaledMLP(nn.Module):
    """l2 sees its input scaled by 100 with its weight scaled by 1/100: the function is an
    ordinary MLP, but l2's weight gradient (hence its Fisher) is 100x (10^4x) larger."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.l1, self.l2, self.l3 = nn.Linear(10, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)
        with torch.no_grad():
            self.l2.weight.div_(100.0)

    def forward(self, x):
        x = torch.tanh(self.l1(x))
        x = torch.tanh(self.l2(100.0 * x))
        return self.head(torch.tanh(self.l3(x)))


def _calib(n_batches=3, bs=16):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(bs, 10, generator=g), torch.randint(0, 3, (bs,), generator=g))
            for _ in range(n_batches)]


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("estimator", ["per_sample", "empirical", "kfac"])
def test_fisher_topk_picks_largest_fisher_layer(estimator):
    model = ScaledMLP()
    adapters.add_lorfa(model, rank=2, modules="fisher:1", batches=_calib(), loss_fn=_loss,
                       estimator=estimator)
    assert [n for n, _ in adapters.named_adapters(model)] == ["l2"]
    mass = model.__dict__["_fisheradaptune_adapters"]["fisher_mass"]
    assert set(mass) == {"l1", "l2", "l3"}  # the head is not a candidate
    assert mass["l2"] > 100 * max(mass["l1"], mass["l3"])


def test_fisher_topk_matches_estimate_ranking():
    model = ScaledMLP()
    fis = fisheradaptune.fisher.estimate(copy.deepcopy(model), _calib(), _loss,
                                         modules=["l1", "l2", "l3"])
    mass = {n: f.double().sum().item() for n, f in fis.items()}
    top2 = sorted(sorted(mass, key=mass.get, reverse=True)[:2], key=["l1", "l2", "l3"].index)
    adapters.add_vefa(model, modules="fisher:2", batches=_calib(), loss_fn=_loss)
    assert [n for n, _ in adapters.named_adapters(model)] == top2
    # Placement leaves the model's gradients and flags as they were (then add_* freezes).
    assert all(p.grad is None for p in model.parameters())


def test_fisher_placement_works_on_frozen_model():
    model = ScaledMLP()
    for p in model.parameters():
        p.requires_grad_(False)
    adapters.add_vefa(model, modules="fisher:1", batches=_calib(), loss_fn=_loss)
    assert [n for n, _ in adapters.named_adapters(model)] == ["l2"]


# ---------------------------------------------------------------------------------------------
# Trainability and gradients


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("train_head", [True, False])
def test_only_adapters_trainable(method, train_head):
    model = add(method, mlp(), train_head=train_head)
    adapter_ids = {id(p) for p in adapters.adapter_parameters(model)}
    head_ids = {id(p) for p in model.head.parameters()}
    for name, p in model.named_parameters():
        expected = id(p) in adapter_ids or (train_head and id(p) in head_ids)
        assert p.requires_grad == expected, name
    trainable, total = adapters.count_parameters(model)
    n_adapt = sum(p.numel() for p in adapters.adapter_parameters(model))
    n_head = sum(p.numel() for p in model.head.parameters()) if train_head else 0
    assert trainable == n_adapt + n_head
    assert total == sum(p.numel() for p in mlp().parameters()) + n_adapt


@pytest.mark.parametrize("method", METHODS)
def test_gradient_flows_only_into_adapters(method):
    model = add(method, mlp(), train_head=False)
    model(torch.randn(9, 12)).pow(2).sum().backward()
    adapter_ids = {id(p) for p in adapters.adapter_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) in adapter_ids:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    # The parameters that carry the initial signal get a non-zero gradient
    # (LoRFA: dL/dA = 0 while B = 0, as for LoRA).
    live = [model.fc1.vefa_s, model.fc2.vefa_s] if method == "vefa" else [model.fc1.lorfa_B, model.fc2.lorfa_B]
    assert all(p.grad.abs().sum() > 0 for p in live)


@pytest.mark.parametrize("method", METHODS)
def test_training_reduces_loss(method):
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(128, 12)
    y = (x[:, 0] + x[:, 1] > 0).long() + 2 * (x[:, 2] > 0).long()
    add(method, model)
    w0 = model.fc1.base.weight.clone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert torch.equal(model.fc1.base.weight, w0)  # the pretrained weight never moves


# ---------------------------------------------------------------------------------------------
# Merge / unmerge


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_exact(method, dtype):
    model = add(method, mlp(dtype=dtype))
    randomize(model)
    x = torch.randn(11, 12, dtype=dtype)
    before = model(x)
    merged = adapters.merge(model)
    assert merged == ["fc1", "fc2"]
    assert all(type(m) is nn.Linear for m in (model.fc1, model.fc2, model.head))
    assert list(adapters.named_adapters(model)) == []
    assert model.fc1.weight.dtype == dtype
    after = model(x)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(after, before, **tol)


def test_merged_weight_formulas_float64():
    model = adapters.add_lorfa(mlp(dtype=torch.float64), rank=3, alpha=6.0)
    adapters.add_vefa(model, modules=["head"])
    randomize(model)
    a, b, w0 = model.fc1.lorfa_A, model.fc1.lorfa_B, model.fc1.base.weight.clone()
    s, h0 = model.head.vefa_s, model.head.base.weight.clone()
    want_fc1 = w0 @ (torch.eye(12, dtype=torch.float64) + 2.0 * b @ a)
    want_head = h0 @ torch.diag(s)
    adapters.merge(model)
    torch.testing.assert_close(model.fc1.weight, want_fc1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.head.weight, want_head, rtol=1e-12, atol=1e-12)


def test_merge_token_model():
    model = adapters.add_lorfa(TinyViT(), rank=4)
    randomize(model, 0.1)
    x = torch.randn(2, 5, 8)
    before = model(x)
    adapters.merge(model)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_unmerge_round_trip(method):
    model = add(method, mlp())
    randomize(model)
    x = torch.randn(6, 12)
    before = model(x)
    fc1 = model.fc1
    values = [p.detach().clone() for p in model.fc1.parameters()]
    flags = [p.requires_grad for p in model.parameters()]
    adapters.merge(model)
    assert adapters.unmerge(model) == ["fc1", "fc2"]
    assert model.fc1 is fc1  # the very same adapter module
    assert all(torch.equal(a, b) for a, b in zip(values, model.fc1.parameters()))
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(model(x), before)
    # merge again after unmerge, and through a deepcopy
    adapters.merge(model)
    clone = copy.deepcopy(model)
    assert adapters.unmerge(clone) == ["fc1", "fc2"]
    assert torch.equal(clone(x), before)


def test_merge_without_keep_frees_the_adapter():
    model = adapters.add_vefa(mlp())
    adapters.merge(model, keep_unmerge=False)
    assert adapters.unmerge(model) == []
    assert type(model.fc1) is nn.Linear


def test_merged_model_has_no_extra_parameters_or_state():
    model = adapters.add_vefa(mlp())
    adapters.merge(model)
    assert set(model.state_dict()) == set(mlp().state_dict())
    assert adapters.count_parameters(model)[1] == sum(p.numel() for p in mlp().parameters())


# ---------------------------------------------------------------------------------------------
# Save / load


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_small_and_round_trips(method, tmp_path):
    model = add(method, mlp(seed=0))
    randomize(model)
    with torch.no_grad():
        model.head.weight.add_(1.0)  # the trained head travels with the adapters
    sd = adapters.state_dict(model)
    n_adapt = sum(p.numel() for p in adapters.adapter_parameters(model))
    n_head = sum(p.numel() for p in model.head.parameters())
    assert sum(t.numel() for t in sd["tensors"].values()) == n_adapt + n_head
    small = adapters.state_dict(model, include_head=False)
    assert sum(t.numel() for t in small["tensors"].values()) == n_adapt
    assert set(small["tensors"]) == {n for n, _ in model.named_parameters() if "vefa_" in n or "lorfa_" in n}
    assert n_adapt < 0.5 * adapters.count_parameters(model)[1]

    path = tmp_path / "adapters.pt"
    adapters.save(model, path)
    fresh = add(method, mlp(seed=0))  # same pretrained weights, different adapter init
    adapters.load(fresh, path)
    x = torch.randn(4, 12)
    assert torch.equal(fresh(x), model(x))


def test_load_with_create_restores_placement():
    model = ScaledMLP()
    adapters.add_lorfa(model, rank=2, alpha=3.0, modules="fisher:1", batches=_calib(), loss_fn=_loss)
    randomize(model)
    sd = copy.deepcopy(adapters.state_dict(model))
    fresh = ScaledMLP()  # no adapters, no calibration data
    with pytest.raises(ValueError, match="state_dict"):
        adapters.load_state_dict(fresh, sd)
    adapters.load_state_dict(fresh, sd, create=True)
    assert [n for n, _ in adapters.named_adapters(fresh)] == ["l2"]
    assert fresh.l2.alpha == 3.0
    x = torch.randn(3, 10)
    assert torch.equal(fresh(x), model(x))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {"l2.lorfa_A", "l2.lorfa_B", "head.weight", "head.bias"}


def test_load_state_dict_mismatch_errors():
    sd = adapters.state_dict(adapters.add_lorfa(mlp(), rank=3))
    with pytest.raises(ValueError, match="state_dict"):      # different rank
        adapters.load_state_dict(adapters.add_lorfa(mlp(), rank=2), sd)
    with pytest.raises(ValueError, match="state_dict"):      # different method
        adapters.load_state_dict(adapters.add_vefa(mlp()), sd)
    with pytest.raises(ValueError, match="state_dict"):      # different modules
        adapters.load_state_dict(adapters.add_lorfa(mlp(), rank=3, modules=["fc1"]), sd)
    with pytest.raises(ValueError, match="state_dict"):      # different alpha
        adapters.load_state_dict(adapters.add_lorfa(mlp(), rank=3, alpha=1.0), sd)
    with pytest.raises(ValueError, match="state_dict"):      # not an adapters dict
        adapters.load_state_dict(adapters.add_lorfa(mlp(), rank=3), mlp().state_dict())
    bad = copy.deepcopy(sd)
    bad["tensors"]["fc1.lorfa_A"] = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="state_dict"):      # wrong shape
        adapters.load_state_dict(adapters.add_lorfa(mlp(), rank=3), bad)
    merged = adapters.add_vefa(mlp())
    adapters.merge(merged)
    with pytest.raises(ValueError, match="model"):
        adapters.state_dict(merged)


# ---------------------------------------------------------------------------------------------
# Errors


def _adapted(method, modules):
    return add(method, mlp(), modules=modules)


@pytest.mark.parametrize("call,exc,arg", [
    (lambda: adapters.add_lorfa(mlp(), rank=0), ValueError, "rank"),
    (lambda: adapters.add_lorfa(mlp(), rank=-2), ValueError, "rank"),
    (lambda: adapters.add_lorfa(mlp(), rank=1.5), TypeError, "rank"),
    (lambda: adapters.add_lorfa(mlp(), rank=2, alpha=0.0), ValueError, "alpha"),
    (lambda: adapters.add_vefa(mlp(), modules=["nope"]), ValueError, "modules"),
    (lambda: adapters.add_vefa(mlp(), modules=["fc1", "fc1"]), ValueError, "modules"),
    (lambda: adapters.add_vefa(mlp(), modules=[]), ValueError, "modules"),
    (lambda: adapters.add_vefa(mlp(), modules="fc1"), ValueError, "modules"),
    (lambda: adapters.add_vefa(mlp(), modules=[""]), TypeError, "modules"),
    (lambda: adapters.add_vefa(TinyViT(), modules=["blocks.0.norm1"]), TypeError, "modules"),
    (lambda: adapters.add_vefa(TinyViT(), modules=["blocks.0.mlp"]), TypeError, "modules"),
    (lambda: adapters.add_vefa(_adapted("vefa", ["fc1"]), modules=["fc1"]), ValueError, "modules"),
    (lambda: adapters.add_lorfa(_adapted("vefa", ["fc1"]), modules=["fc1"]), ValueError, "modules"),
    (lambda: adapters.add_vefa(_adapted("lorfa", ["fc1"]), modules=["fc1"]), ValueError, "modules"),
    (lambda: adapters.add_vefa(_adapted("lorfa", ["fc1"]), modules=["fc1.base"]), ValueError, "modules"),
    (lambda: adapters.add_vefa(_adapted("vefa", None)), ValueError, "modules"),
    (lambda: adapters.add_lorfa(_adapted("vefa", None)), ValueError, "modules"),
    (lambda: adapters.add_vefa(mlp(), modules="fisher:0"), ValueError, "modules"),
    (lambda: adapters.add_vefa(mlp(), modules="fisher:-1"), ValueError, "modules"),
    (lambda: adapters.add_vefa(mlp(), modules="fisher:x"), ValueError, "modules"),
    (lambda: adapters.add_vefa(mlp(), modules="fisher:2"), ValueError, "batches"),
    (lambda: adapters.add_vefa(ScaledMLP(), modules="fisher:2", batches=_calib()), ValueError, "loss_fn"),
    (lambda: adapters.add_vefa(ScaledMLP(), modules="fisher:4", batches=_calib(), loss_fn=_loss),
     ValueError, "modules"),
    (lambda: adapters.add_vefa(mlp(), modules="fisher:1", estimator="exact"), ValueError, "estimator"),
    (lambda: adapters.add_vefa(mlp(), head="nope"), ValueError, "head"),
    (lambda: adapters.add_vefa(mlp(), train_head="yes"), TypeError, "train_head"),
    (lambda: adapters.add_vefa(nn.Linear(3, 3)), TypeError, "model"),
    (lambda: adapters.add_vefa("model"), TypeError, "model"),
    (lambda: adapters.apply(mlp(), {"rank": 2}), TypeError, "config"),
])
def test_errors_name_the_argument(call, exc, arg):
    with pytest.raises(exc, match=f"'{arg}'"):
        call()


def test_linear_subclass_with_own_forward_rejected():
    class Odd(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(Odd(3, 3), nn.Linear(3, 3))
    with pytest.raises(TypeError, match="modules"):
        adapters.add_vefa(model, modules=["0"])
    adapters.add_vefa(model)  # the default simply skips it
    assert [n for n, _ in adapters.named_adapters(model)] == ["1"]


# ---------------------------------------------------------------------------------------------
# Summary and configs


def test_summary_format(capsys):
    model = adapters.add_lorfa(mlp(), rank=2)
    trainable, total = adapters.count_parameters(model)
    line = adapters.summary(model)
    m = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: (\d+\.\d{4})", line)
    assert m, line
    assert int(m.group(1).replace(",", "")) == trainable
    assert int(m.group(2).replace(",", "")) == total
    assert float(m.group(3)) == pytest.approx(100 * trainable / total, abs=1e-4)
    adapters.print_trainable_parameters(model)
    assert capsys.readouterr().out.strip() == line
    verbose = adapters.summary(model, verbose=True).splitlines()
    assert verbose[0] == line and verbose[1].startswith("  fc1: lorfa") and "head" in verbose[-1]
    big = nn.Sequential(nn.Linear(1000, 1000), nn.Linear(1000, 2))
    assert "all params: 1,003,002 ||" in adapters.summary(big)


@pytest.mark.parametrize("cls", [adapters.VeFAConfig, adapters.LoRFAConfig])
def test_configs_have_help_and_round_trip(cls):
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f.name
    cfg = cls(modules=["fc1"], train_head=False)
    assert cls.from_dict(cfg.to_dict()) == cfg
    other = adapters.LoRFAConfig if cls is adapters.VeFAConfig else adapters.VeFAConfig
    with pytest.raises(ValueError, match="'d'"):
        other.from_dict(cfg.to_dict())


def test_apply_config_equals_add():
    torch.manual_seed(5)
    a = adapters.apply(mlp(), adapters.LoRFAConfig(rank=3, alpha=6.0, modules=["fc2"]))
    torch.manual_seed(5)
    b = adapters.add_lorfa(mlp(), rank=3, alpha=6.0, modules=["fc2"])
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert "fc2.base.weight" in sa and "fc2.lorfa_A" in sa  # predictable keys


def test_mixed_methods_on_different_modules():
    model = adapters.add_vefa(mlp(), modules=["fc1"])
    adapters.add_lorfa(model, rank=2, modules=["fc2"])
    assert isinstance(model.fc1, VeFALinear) and isinstance(model.fc2, LoRFALinear)
    # the second call keeps the first call's adapters trainable
    assert all(p.requires_grad for p in adapters.adapter_parameters(model))
    randomize(model)
    x = torch.randn(3, 12)
    before = model(x)
    adapters.merge(model)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
