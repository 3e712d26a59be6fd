"""What selection refuses about a model, by name and before anything changes: selected weights
tied to another module (a plain-torch model and a config-built transformers Llama with
``tie_word_embeddings=True``), peft adapter layers (by name here; the real peft model is in
tests/integrations/test_peft_models.py), and an optimizer MaskedOptimizer cannot keep the
contract with."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fisheradaptune.masked import MaskedOptimizer
from fisheradaptune.selection import Selection, SparseLinear, select_connections


class Tied(nn.Module):
    """Two Linear layers that share one weight (and a head)."""

    def __init__(self, tie=True):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        if tie:
            self.b.weight = self.a.weight
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))))


def _data(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g))
            for _ in range(n)]


def _ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


TIED = r"the weight of selected module 'a' is shared with 'b' \(tied weights\).*untie"


def test_tied_linear_weights_are_refused_at_select_and_apply():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=TIED):
        select_connections(Tied(), _data(), _ce, budget=0.2)
    with pytest.raises(ValueError, match=r"'b' is shared with 'a'"):
        select_connections(Tied(), _data(), _ce, budget=0.2, modules=["b"])
    sel = select_connections(Tied(tie=False), _data(), _ce, budget=0.2)
    for mode in ("mask", "compact"):
        model = Tied()
        flags = [p.requires_grad for p in model.parameters()]
        with pytest.raises(ValueError, match=TIED):
            sel.apply(model, mode=mode)
        assert [p.requires_grad for p in model.parameters()] == flags
        assert type(model.a) is nn.Linear and model.a.weight is model.b.weight
    # one Linear registered under two names is the same sharing
    shared = Tied(tie=False)
    shared.b = shared.a
    with pytest.raises(ValueError, match=TIED):
        sel.apply(shared, mode="compact")
    with pytest.raises(ValueError, match=TIED):
        MaskedOptimizer(torch.optim.SGD(shared.parameters(), lr=0.1), sel, model=shared)


def _llama(tie):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def _lm_batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 40, (2, 8), generator=g) for _ in range(n)]


def _lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def test_tied_lm_head_is_refused_by_name_in_both_modes():
    model = _llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    msg = (r"the weight of selected module 'lm_head' is shared with 'model.embed_tokens' "
           r"\(tied weights\).*tie_word_embeddings=False")
    with pytest.raises(ValueError, match=msg):
        select_connections(model, _lm_batches(), _lm_loss, budget=0.05,
                           modules=["lm_head", "model.layers.0.mlp.up_proj"])
    # a selection made on the untied model, applied to the tied one
    sel = select_connections(_llama(tie=False), _lm_batches(), _lm_loss, budget=0.05,
                             modules=["lm_head", "model.layers.0.mlp.up_proj"])
    for mode in ("mask", "compact"):
        with pytest.raises(ValueError, match=msg):
            sel.apply(model, mode=mode)
        assert type(model.lm_head) is nn.Linear
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tied_lm_head_as_the_dense_head_stays_tied_and_modes_agree():
    # By default the tied lm_head is the head (trained densely, through the one shared
    # tensor): selection leaves it alone, and mask and compact mode train the same model.
    base = _llama(tie=True)
    sel = select_connections(base, _lm_batches(), _lm_loss, budget=0.05)
    assert sel.head == "lm_head" and "lm_head" not in sel.index
    models = {}
    for mode in ("mask", "compact"):
        model = copy.deepcopy(base)
        params = sel.apply(model, mode=mode)
        inner = torch.optim.SGD(params, lr=0.05)
        opt = MaskedOptimizer(inner, sel) if mode == "mask" else inner
        for ids in _lm_batches(3, seed=1):
            _lm_loss(model, ids).backward()
            opt.step()
            opt.zero_grad()
        models[mode] = model
    merged = sel.merge(models["compact"])
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert not any(isinstance(m, SparseLinear) for m in merged.modules())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(merged) == count(base)
    ids = _lm_batches(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, models["mask"](ids).logits,
                                   rtol=1e-4, atol=1e-5)
        assert not torch.equal(merged(ids).logits, base(ids).logits)


class _LoraLike(nn.Module):
    """A Linear with a child named like peft's LoRA layers (no peft needed)."""

    def __init__(self):
        super().__init__()
        self.base_layer = nn.Linear(8, 8)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(8, 2, bias=False)})

    def forward(self, x):
        return self.base_layer(x)


def test_peft_adapter_layers_are_refused_with_what_to_do():
    model = nn.Sequential(_LoraLike(), nn.ReLU(), nn.Linear(8, 3))
    msg = (r"argument 'model': Sequential is a peft model \(module '0.lora_A'.*"
           r"save_pretrained does not save.*before peft.get_peft_model.*merge_and_unload")
    with pytest.raises(ValueError, match=msg):
        select_connections(model, _data(), _ce, budget=0.2)
    sel = select_connections(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)),
                             _data(), _ce, budget=0.2, modules=["0"])
    sel = Selection.from_state_dict({**sel.state_dict(), "index": {"0.base_layer": sel.index["0"]},
                                     "c": {"0.base_layer": sel.c["0"]},
                                     "shapes": {"0.base_layer": [8, 8]}})
    flags = [p.requires_grad for p in model.parameters()]
    for mode in ("mask", "compact"):
        with pytest.raises(ValueError, match=msg):
            sel.apply(model, mode=mode)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_masked_optimizer_refuses_sparse_adam():
    torch.manual_seed(0)
    model = Tied(tie=False)
    sel = select_connections(model, _data(), _ce, budget=0.2)
    params = sel.apply(model)
    with pytest.raises(TypeError, match="argument 'optimizer': SparseAdam steps only sparse "
                                        "gradients.*use torch.optim.Adam or AdamW"):
        MaskedOptimizer(torch.optim.SparseAdam(params, lr=0.1), sel)
