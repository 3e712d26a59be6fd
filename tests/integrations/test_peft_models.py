"""FisherAdapTune and TR-PTS selection on a peft LoRA model (integration stage)."""
from __future__ import annotations

import pytest
import torch

import fisheradaptune as fat

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _lora_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=16, num_labels=3)
    base = transformers.BertForSequenceClassification(cfg)
    lora = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["query", "value"],
                           modules_to_save=["classifier"], init_lora_weights="gaussian")
    return peft.get_peft_model(base, lora)


def _batch(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (n, 8), generator=g), torch.randint(0, 3, (n,), generator=g)


def _loss(model, batch):
    ids, labels = batch
    return model(input_ids=ids, labels=labels).loss


def test_fisher_adaptune_tracks_and_freezes_lora_parameters_exactly():
    model = _lora_bert()
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and len(trainable) < len(list(model.parameters()))
    opt = fat.FisherAdapTune(torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1), model,
                             check_every=2, policy=fat.Observe())
    assert set(opt.names) == set(names)  # only the LoRA (and saved head) tensors are tracked
    for s in range(4):
        _loss(model, _batch(s)).backward()
        opt.step()
        opt.zero_grad()
    lora_a = [n for n in names if "lora_A" in n]
    opt.freeze(lora_a[0])
    frozen = dict(model.named_parameters())[lora_a[0]]
    before = frozen.detach().clone()
    moving = dict(model.named_parameters())[lora_a[1]].detach().clone()
    for s in range(3):
        _loss(model, _batch(10 + s)).backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(frozen.detach(), before) and not frozen.requires_grad
    assert not torch.equal(dict(model.named_parameters())[lora_a[1]].detach(), moving)
    assert (opt.tracker.checks[opt.drift_defined] > 0).any()


def test_select_connections_on_a_peft_model_selects_base_layers_not_adapters():
    model = _lora_bert()
    sel = fat.selection.select_connections(model, [_batch(0), _batch(1)], _loss, budget=0.05,
                                           estimator="empirical")
    names = list(sel.index)
    assert any(n.endswith("query.base_layer") for n in names)
    assert any(n.endswith("attention.self.key") for n in names)  # not wrapped by LoRA
    assert not any("lora_" in n for n in names)
    mods = dict(model.named_modules())
    for n, idx in sel.index.items():
        w = mods[n].weight
        assert idx.shape[0] == w.shape[0] and idx.dtype == torch.int64
        assert int(idx.max()) < w.shape[1]
