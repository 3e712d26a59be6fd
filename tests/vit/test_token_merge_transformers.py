"""token_merge on transformers models (random init from tiny configs): r = 0 is bitwise the
unpatched model and unpatch restores bitwise (eager and sdpa), task models are served through
their encoder, the distillation token keeps its row for DeiT's distillation head, gradients and
gradient checkpointing, deepcopy and state_dict, and what is refused (flex_attention, attention
masks, prune_merge on the CLIP vision tower). Equality with an eager ToMe forward:
test_token_merge_tome.py. Runs where transformers imports."""
from __future__ import annotations

import copy

import pytest
import torch

import fisheradaptune as fat
from test_token_merge_tome import blocks_of, build

transformers = pytest.importorskip("transformers")

IMPLS = ["eager", "sdpa"]


def _out(model, x, **kw):
    out = model(x, **kw)
    for field in ("logits", "image_embeds", "pooler_output"):
        if getattr(out, field, None) is not None:
            return out, getattr(out, field)
    raise AssertionError(type(out))


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", ["ViTForImageClassification",
                                  "DeiTForImageClassificationWithTeacher",
                                  "Dinov2WithRegistersModel", "CLIPVisionModelWithProjection"])
def test_r_zero_is_bitwise_and_unpatch_restores_bitwise(name, attn):
    model, enc, x = build(name, attn)
    with torch.no_grad():
        _, before = _out(model, x)
        model(x, output_hidden_states=True)  # transformers installs its capture hooks lazily
        attrs = {n: set(m.__dict__) for n, m in model.named_modules()}
        keys = list(model.state_dict())
        h = fat.vit.token_merge(model, r=0)
        assert h.layers == () and torch.equal(_out(model, x)[1], before)
        h.remove()
        h = fat.vit.token_merge(model, r=[0, 3, 0])  # blocks after the first merge are patched
        out, merged = _out(model, x, output_hidden_states=True)
        assert list(model.state_dict()) == keys
        fat.vit.unpatch(model)
        _, again = _out(model, x)
    n0 = out.hidden_states[0].shape[1]
    assert [t.shape[1] for t in out.hidden_states] == [n0, n0, n0 - 3, n0 - 3]
    assert not torch.allclose(merged, before, atol=1e-4)
    assert torch.equal(again, before)
    assert {n: set(m.__dict__) for n, m in model.named_modules()} == attrs  # nothing left
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_task_model_and_encoder_agree():
    model, enc, x = build("ViTForImageClassification", "sdpa")
    h = fat.vit.token_merge(model, r=5)
    assert h.encoder is enc and h.family.name == "transformers ViT"
    with torch.no_grad():
        logits = model(x).logits
    h.remove()
    h = fat.vit.token_merge(enc, r=5)
    with torch.no_grad():
        tokens = enc(x).last_hidden_state
    torch.testing.assert_close(model.classifier(tokens[:, 0]), logits, rtol=1e-5, atol=1e-6)


def test_deit_distillation_token_keeps_its_row():
    model, enc, x = build("DeiTForImageClassificationWithTeacher", "sdpa")
    h = fat.vit.token_merge(model, r=6)
    assert h.num_protected == 2
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    assert bool((h.sizes[:, :2] == 1).all())
    # the distillation head reads row 1, which is still the distillation token: its
    # post-norm tokens give the model's own distillation logits
    last = enc.layernorm(out.hidden_states[-1])
    torch.testing.assert_close(model.distillation_classifier(last[:, 1]),
                               out.distillation_logits)
    with pytest.raises(ValueError, match=r"token_merge: argument 'num_protected': 1 would leave "
                                         r"prefix tokens unprotected: DeiTModel has 1 class \+ "
                                         r"1 distillation token"):
        fat.vit.token_merge(build("DeiTForImageClassificationWithTeacher", "sdpa")[0], r=4,
                            num_protected=1)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("name", ["ViTForImageClassification", "CLIPVisionModel"])
def test_gradients_and_gradient_checkpointing(name, reentrant):
    model, enc, x = build(name, "sdpa")
    h = fat.vit.token_merge(model, r=4)
    model.train()  # dropout is 0 in the tiny configs: train mode is deterministic here
    calls = []
    attn = h.layout.attention(blocks_of(enc)[1])
    attn.register_forward_hook(lambda m, a, o: calls.append(1))

    def grads():
        calls.clear()
        model.zero_grad(set_to_none=True)
        _out(model, x)[1].square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    assert len(calls) == 1
    assert any(n.endswith("k_proj.weight") for n in ref)  # keys get gradients (attention)
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    got = grads()
    assert len(calls) == 2  # the merging block was recomputed in the backward
    assert h.sizes.shape[1] == x.shape[-1] // 4 * x.shape[-1] // 4 + 1 - 4 * 3
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)


def test_deepcopy_carries_its_own_patch():
    model, enc, x = build("Dinov2Model", "sdpa")
    h = fat.vit.token_merge(model, r=4)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        a, b = _out(model, x)[1], _out(twin, x)[1]
    assert torch.equal(a, b)
    assert fat.vit.handle_of(twin) is not h and fat.vit.handle_of(twin) is not None
    h.remove()
    with torch.no_grad():
        assert not torch.equal(_out(model, x)[1], _out(twin, x)[1])


def test_refusals():
    model, enc, x = build("ViTModel", "sdpa")
    model.set_attn_implementation("flex_attention")
    with pytest.raises(ValueError, match=r"token_merge: argument 'model': attention "
                                         r"implementation 'flex_attention' is not supported"):
        fat.vit.token_merge(model, r=4)
    assert fat.vit.handle_of(model) is None
    model, enc, x = build("CLIPVisionModel", "sdpa")
    with pytest.raises(TypeError, match=r"prune_merge: argument 'model': CLIPVisionModel .*family "
                                        r"transformers CLIP vision tower, which supports only "
                                        r"\['token_merge'\]"):
        fat.vit.prune_merge(model, keep=0.5)
    model, enc, x = build("ViTModel", "eager")
    fat.vit.token_merge(model, r=4)
    mask = torch.ones(2, 1, x.shape[-1] // 4 * x.shape[-1] // 4 + 1, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"token_merge: a patched block received an attention "
                                         r"mask"):
        blocks_of(enc)[0](torch.randn(2, mask.shape[-1], 64), mask)
