"""prune_merge on real transformers ViTs (ViTModel, ViTForImageClassification, random init from
a ViTConfig): both attention implementations that can serve it (eager, sdpa), unpatch restoring
bitwise, gradients and gradient checkpointing, state_dict / save_pretrained / torch.save,
deepcopy, and what is refused (flex_attention, masked image modeling, attention masks). Runs in
the integration stage, where transformers exists. (Against the EViT re-implementation:
test_prune_merge_evit.py.)"""
from __future__ import annotations

import copy
import io

import pytest
import torch

import fisheradaptune as fat

transformers = pytest.importorskip("transformers")

IMPLS = ["eager", "sdpa"]
N_TOKENS = 1 + (32 // 8) ** 2  # class token + 16 patches


def _hf(attn: str = "sdpa", cls=None, depth: int = 4, seed: int = 0):
    """A tiny ViT in eval mode. initializer_range 0.2 instead of transformers' 0.02: with 0.02
    the class attention is nearly uniform and the logits nearly 0, so a wrong token choice or a
    wrong merge would hardly move the output."""
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64,
                                 num_hidden_layers=depth, num_attention_heads=4,
                                 intermediate_size=128, num_labels=5, initializer_range=0.2,
                                 attn_implementation=attn)
    return (cls or transformers.ViTForImageClassification)(cfg).eval()


def _x(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _out(model, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out.pooler_output


def _grads(model, x: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = _out(model, x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                          if p.grad is not None}


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("cls", ["ViTForImageClassification", "ViTModel"])
def test_keep_one_is_identity_reducing_differs_and_unpatch_restores_bitwise(attn, cls):
    model = _hf(attn, getattr(transformers, cls))
    x = _x()
    keys = list(model.state_dict())
    with torch.no_grad():
        before = _out(model, x)
        assert before.abs().max() > 1e-2
        # transformers installs its output-capturing hooks (and marks the model) lazily, at the
        # first call that asks for hidden states: take the snapshot after one.
        model(x, output_hidden_states=True)
        dicts = {n: dict(m.__dict__) for n, m in model.named_modules()}
        hooks = {n: (len(m._forward_pre_hooks), len(m._forward_hooks))
                 for n, m in model.named_modules()}
        h = fat.vit.prune_merge(model, keep=1.0, layers=(0, 2))
        assert h.family.name == "transformers ViT" and h.num_protected == 1
        assert torch.equal(_out(model, x), before)
        h.remove()
        h = fat.vit.prune_merge(model, keep=0.5, layers=(0, 2))
        patched = model(x, output_hidden_states=True)
        sizes = h.sizes
        assert list(model.state_dict()) == keys
        fat.vit.unpatch(model)
        again = _out(model, x)
    # 17 -> 1 + 8 + 1 = 10 -> 1 + 5 + 1 = 7 tokens
    assert [t.shape[1] for t in patched.hidden_states] == [17, 10, 10, 7, 7]
    assert sizes.shape == (3, 7) and torch.equal(sizes.sum(1), torch.full((3,), 17.0))
    reduced = patched.logits if cls == "ViTForImageClassification" else patched.pooler_output
    assert (reduced - before).abs().max() > 1e-3
    assert torch.equal(again, before)
    for n, m in model.named_modules():
        assert m.__dict__.keys() == dicts[n].keys(), n
        assert (len(m._forward_pre_hooks), len(m._forward_hooks)) == hooks[n], n


def test_eager_and_sdpa_reduce_alike():
    # Scores come from the layers' q/k weights, not from the attention kernel, so the two
    # implementations keep the same tokens and differ only by kernel rounding.
    outs = []
    for attn in IMPLS:
        model = _hf(attn)
        h = fat.vit.prune_merge(model, keep=0.5, layers=(0, 2))
        h.record = True
        with torch.no_grad():
            outs.append((_out(model, _x()), h.kept_patches))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("attn", IMPLS)
def test_gradients_flow_and_detach_scores(attn):
    model = _hf(attn).train()
    x = _x()
    k_grads = {}
    for detach in (False, True):
        h = fat.vit.prune_merge(model, keep=0.5, layers=(0, 2), detach_scores=detach)
        _, grads = _grads(model, x)
        assert grads.keys() == {n for n, _ in model.named_parameters()}
        assert all(bool(g.abs().max() > 0) for g in grads.values())
        k_grads[detach] = grads["vit.layers.0.attention.k_proj.weight"]
        h.remove()
    # Without detach, the scores send gradient into block 0's k projection too.
    assert not torch.allclose(k_grads[False], k_grads[True])


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    model = _hf().train()
    fat.vit.prune_merge(model, keep=0.6, layers=(0, 2))
    x = _x()
    out, ref = _grads(model, x)
    assert fat.vit.handle_of(model).sizes.shape[1] < N_TOKENS
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    out2, got = _grads(model, x)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    assert got.keys() == ref.keys()
    # Reentrant checkpointing adds the scores' gradient into a block's input in another order,
    # so gradients agree to rounding, measured against the model's largest gradient: k_proj.bias
    # gets none in exact arithmetic (a shift of every logit leaves the softmax unchanged), so
    # all of its ~1e-6 is rounding.
    scale = max(float(g.abs().max()) for g in ref.values())
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6 * scale, msg=n)


def test_state_dict_and_save_pretrained_load_into_an_unpatched_model(tmp_path):
    model = _hf()
    x = _x()
    with torch.no_grad():
        plain = _out(model, x)
    fat.vit.prune_merge(model, keep=0.5, layers=(1,))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = _hf(seed=1)
    fresh.load_state_dict(torch.load(buf), strict=True)
    model.save_pretrained(tmp_path)
    loaded = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    assert fat.vit.handle_of(loaded) is None
    with torch.no_grad():
        assert torch.equal(_out(fresh, x), plain)
        torch.testing.assert_close(_out(loaded, x), plain, rtol=0, atol=0)


def test_torch_save_of_a_patched_model():
    model = _hf()
    h = fat.vit.prune_merge(model, keep=0.5, layers=(0, 2))
    x = _x()
    with torch.no_grad():
        want = _out(model, x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    h2 = fat.vit.handle_of(loaded)
    assert h2 is not None and h2 is not h and h2.model is loaded
    with torch.no_grad():
        torch.testing.assert_close(_out(loaded, x), want, rtol=0, atol=0)
    assert h2.sizes.shape == h.sizes.shape


def test_deepcopy_of_a_patched_model_is_independent():
    model = _hf()
    handle = fat.vit.prune_merge(model, keep=0.5, layers=(1,))
    twin = copy.deepcopy(model)
    h2 = fat.vit.handle_of(twin)
    assert h2 is not handle and h2.model is twin
    assert twin.vit.layers[1].forward.block is twin.vit.layers[1]
    x = _x()
    with torch.no_grad():
        a = _out(model, x)
        for p in twin.parameters():
            p.add_(0.01)
        b = _out(twin, x[:2])
    assert handle.sizes.shape[0] == 3 and h2.sizes.shape[0] == 2  # each its own handle
    h2.set_step(5)
    assert handle.step == 0
    with torch.no_grad():
        assert not torch.equal(_out(twin, x), a)  # the copy runs its own weights
        fat.vit.unpatch(twin)
        assert "forward" not in twin.vit.layers[1].__dict__
        assert "forward" in model.vit.layers[1].__dict__
        assert torch.equal(_out(model, x), a)
    assert b.shape[0] == 2


def test_flex_attention_and_masked_image_modeling_are_refused():
    model = _hf("flex_attention")
    with pytest.raises(ValueError, match="flex_attention"):
        fat.vit.prune_merge(model, keep=0.5, layers=(1,))
    assert fat.vit.handle_of(model) is None
    assert not any("forward" in b.__dict__ for b in model.vit.layers)
    mim = _hf(cls=transformers.ViTForMaskedImageModeling)
    # Its decoder reads every patch token back into an image: not a registered class.
    with pytest.raises(TypeError, match="ViTForMaskedImageModeling .* is not a registered ViT "
                                        "family.*transformers ViT \\(ViTModel, "
                                        "ViTForImageClassification\\)"):
        fat.vit.prune_merge(mim, keep=0.5, layers=(1,))
    assert fat.vit.handle_of(mim) is None


def test_attention_mask_is_refused_by_name():
    model = _hf()
    fat.vit.prune_merge(model, keep=0.5, layers=(0,))
    mask = torch.ones(3, N_TOKENS)
    mask[:, 3] = 0  # a real mask: without padding transformers drops it before the layers
    with pytest.raises(ValueError, match="attention mask"):
        model(_x(), attention_mask=mask)
    model.set_attn_implementation("flex_attention")  # switched after patching
    with pytest.raises(ValueError, match="attention mask"):
        model(_x())
    model.set_attn_implementation("sdpa")
    model(_x())
    fat.vit.unpatch(model)
    model(_x(), attention_mask=mask)  # unpatched, transformers takes it
