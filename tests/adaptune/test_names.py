"""The names a user types for freeze/unfreeze: tied aliases and the names of a compiled or
DDP-wrapped model map to the tracked tensor; an unknown name gets a hint."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fisheradaptune as fat


class Enc(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.enc(x)))


def test_a_wrapper_built_from_a_compiled_model_takes_the_names_the_user_wrote():
    """The defect: after torch.compile(model), names carry an '_orig_mod.' prefix and
    freeze("enc.weight") failed with no hint."""
    torch.manual_seed(0)
    model = torch.compile(Enc(), backend="eager")
    opt = fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.1), model,
                             check_every=10 ** 6, policy=fat.Observe())
    assert opt.names[0] == "_orig_mod.enc.weight"
    opt.freeze("enc.weight.slab1")
    assert opt.frozen.tolist() == [g == "_orig_mod.enc.weight.slab1" for g in opt.layout.names]
    opt.freeze("head.weight")  # a whole tensor, by the uncompiled name
    assert not model.head.weight.requires_grad
    opt.unfreeze(["_orig_mod.head.weight", "enc.weight.slab1"])  # either spelling
    assert not opt.frozen.any()
    opt.freeze("enc.weight.slab0")
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    w = model.enc.weight.detach().clone()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert torch.equal(model.enc.weight[:2], w[:2]) and not torch.equal(model.enc.weight[2:], w[2:])


def test_a_wrapper_built_from_the_plain_model_takes_the_compiled_names():
    torch.manual_seed(0)
    plain = Enc()
    opt = fat.FisherAdapTune(torch.optim.SGD(plain.parameters(), lr=0.1), plain,
                             check_every=10 ** 6, policy=fat.Observe())
    # A name copied from the compiled model's named_parameters() is not known here: say which.
    with pytest.raises(ValueError, match=r"'_orig_mod\.enc\.weight' is neither a group nor a "
                                         r"parameter name; did you mean \['enc\.weight'"):
        opt.freeze("_orig_mod.enc.weight")


def test_tied_weights_answer_to_every_name():
    """The defect: a tied weight is tracked under its first name, and freeze("lm_head.weight")
    said it was unknown."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    opt = fat.FisherAdapTune(torch.optim.AdamW(model.parameters(), lr=1e-2), model,
                             check_every=10 ** 6, policy=fat.Observe())
    assert "lm_head.weight" not in opt.names and "model.embed_tokens.weight" in opt.names
    opt.freeze("lm_head.weight.slab2")
    assert opt.frozen[opt.layout.names.index("model.embed_tokens.weight.slab2")]
    assert int(opt.frozen.sum()) == 1
    opt.freeze("lm_head.weight")
    assert not model.model.embed_tokens.weight.requires_grad
    ids = torch.randint(0, 64, (2, 8))
    w = model.lm_head.weight.detach().clone()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert torch.equal(model.lm_head.weight, w)
    with pytest.raises(ValueError, match=r"'lm_head\.weigth' is neither a group nor a parameter "
                                         r"name; did you mean \['lm_head\.weight'"):
        opt.freeze("lm_head.weigth")


def test_names_must_be_strings():
    model = Enc()
    opt = fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(TypeError, match="argument 'names': expected names"):
        opt.freeze([model.enc.weight])
