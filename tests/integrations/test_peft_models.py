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


PEFT_REFUSAL = (r"argument 'model': PeftModel\w* is a peft model; TR-PTS selection trains.*"
                r"save_pretrained does not save.*before peft.get_peft_model\(...\), or after "
                r"model.merge_and_unload\(\)")


def test_selection_refuses_a_peft_model_and_changes_nothing():
    # Before: select_connections picked the base layers, apply set the LoRA adapters to
    # requires_grad=False and trained base weights that save_pretrained does not save
    # (reloaded logits 1.07-1.56 off). Now both refuse, saying what to do instead.
    model = _lora_bert()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=PEFT_REFUSAL):
        fat.selection.select_connections(model, [_batch(0), _batch(1)], _loss, budget=0.05,
                                         estimator="empirical")
    # a selection made on the plain (merged) model, applied to the peft one
    plain = _lora_bert().merge_and_unload()
    sel = fat.selection.select_connections(plain, [_batch(0), _batch(1)], _loss, budget=0.05,
                                           estimator="empirical")
    assert not any("lora_" in n or "base_layer" in n for n in sel.index)
    for mode in ("mask", "compact"):
        with pytest.raises(ValueError, match=PEFT_REFUSAL):
            sel.apply(model, mode=mode)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    # what the message suggests works: train the merged model, nothing lost on reload
    params = sel.apply(plain, mode="compact")
    opt = torch.optim.AdamW(params, lr=1e-2)
    for s in range(2):
        _loss(plain, _batch(s)).backward()
        opt.step()
        opt.zero_grad()
    sel.merge(plain)
    again = _lora_bert().merge_and_unload()
    again.load_state_dict(plain.state_dict())
    again.eval(), plain.eval()
    ids = _batch(7)[0]
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, plain(input_ids=ids).logits)
