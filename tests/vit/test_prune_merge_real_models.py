"""prune_merge on real timm and torchvision models (random init, heads re-initialised so that
outputs are not zero): gradient checkpointing, deepcopy and timm's ModelEmaV3, torch.save,
models without a class token, attention masks. Runs in the integration stage, where timm and
torchvision exist."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import fisheradaptune as fat

timm = pytest.importorskip("timm")


def _timm(name="vit_tiny_patch16_224", **kw):
    torch.manual_seed(0)
    kw = {"img_size": 32, "patch_size": 4, "num_classes": 7, **kw}
    model = timm.create_model(name, pretrained=False, **kw)
    # timm zero-initialises the head: outputs (and head gradients) would be 0 either way.
    nn.init.normal_(model.head.weight, std=0.2)
    nn.init.normal_(model.head.bias, std=0.2)
    return model


def _x(n=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                          if p.grad is not None}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant, monkeypatch):
    model = _timm(depth=6)
    fat.vit.prune_merge(model, keep=0.6, layers=(1, 3))
    x = _x()
    out, ref = _grads(model, x)
    assert fat.vit.handle_of(model).sizes.shape[1] < 65  # tokens were reduced
    import torch.utils.checkpoint as cp
    original = cp.checkpoint
    monkeypatch.setattr(cp, "checkpoint",
                        lambda fn, *a, **k: original(fn, *a, **{**k, "use_reentrant": use_reentrant}))
    model.set_grad_checkpointing(True)
    out2, got = _grads(model, x)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)


def test_deepcopy_of_a_patched_model_is_independent():
    model = _timm(depth=4)
    handle = fat.vit.prune_merge(model, keep=0.5, layers=(1,))
    ema = copy.deepcopy(model)  # what timm's ModelEmaV3 does
    h2 = fat.vit.handle_of(ema)
    assert h2 is not handle and h2.model is ema
    assert ema.blocks[1].forward.block is ema.blocks[1]
    x = _x()
    with torch.no_grad():
        a = model(x)
        for p in ema.parameters():
            p.add_(0.01)
        b = ema(x)
    assert not torch.equal(a, b)  # the copy runs its own weights
    assert handle.sizes.shape == h2.sizes.shape  # and its own handle
    fat.vit.unpatch(ema)
    assert "forward" not in ema.blocks[1].__dict__ and "forward" in model.blocks[1].__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(x), a, rtol=0, atol=0)


def test_torch_save_of_a_patched_model_and_its_state_dict():
    model = _timm(depth=4)
    fat.vit.prune_merge(model, keep=0.5, layers=(1, 2))
    x = _x()
    with torch.no_grad():
        want = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)
    sd = model.state_dict()
    fresh = _timm(depth=4)
    fresh.load_state_dict(sd)
    fat.vit.prune_merge(fresh, keep=0.5, layers=(1, 2))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("kw", [dict(class_token=False, global_pool="avg"),
                                dict(class_token=False, reg_tokens=4, global_pool="avg")],
                         ids=["no_class_token", "registers_only"])
def test_models_without_a_class_token_are_refused(kw):
    model = _timm(depth=2, **kw)
    with pytest.raises(ValueError, match="no class token"):
        fat.vit.prune_merge(model, keep=0.5, layers=(0,))
    assert not any("forward" in b.__dict__ for b in model.blocks)


def test_attention_mask_is_refused_by_name():
    model = _timm(depth=3)
    fat.vit.prune_merge(model, keep=0.5, layers=(0,))
    n = 1 + (32 // 4) ** 2
    mask = torch.zeros(n, n, dtype=torch.bool)
    with pytest.raises(ValueError, match="attention mask"):
        model(_x(), attn_mask=mask)
    fat.vit.unpatch(model)
    model(_x(), attn_mask=torch.zeros(n, n))  # unpatched, timm takes it


def test_torchvision_vit_patched_differs_from_unpatched_and_unpatches_bitwise():
    tv = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = tv.VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4,
                                 hidden_dim=64, mlp_dim=128, num_classes=7)
    nn.init.normal_(model.heads.head.weight, std=0.2)  # torchvision zero-initialises it
    model.eval()
    x = _x()
    with torch.no_grad():
        plain = model(x)
        assert plain.abs().max() > 1e-3
        fat.vit.prune_merge(model, keep=0.5, layers=(1,))
        patched = model(x)
        fat.vit.unpatch(model)
        again = model(x)
    assert (patched - plain).abs().max() > 1e-4  # the patch changed the computation
    torch.testing.assert_close(again, plain, rtol=0, atol=0)


def test_model_ema_v3_of_a_patched_model():
    from timm.utils import ModelEmaV3
    model = _timm(depth=4)
    handle = fat.vit.prune_merge(model, keep=lambda step: 1.0 if step < 1 else 0.5, layers=(1,))
    ema = ModelEmaV3(model, decay=0.5)  # deep-copies the patched model
    h2 = fat.vit.handle_of(ema.module)
    assert h2 is not None and h2 is not handle and h2.model is ema.module
    assert ema.module.blocks[1].forward.handle is h2
    x = _x()
    # Hook state is per copy: a step set on one handle, or a forward of another batch size,
    # leaves the other alone.
    handle.set_step(1)
    assert (handle.keep_fraction, h2.keep_fraction) == (0.5, 1.0)
    with torch.no_grad():
        ema.module(x[:2])
        assert h2.sizes is None  # keep 1: nothing reduced
        model(x)
        assert handle.sizes.shape == (3, 1 + 32 + 1) and h2.sizes is None
        h2.set_step(1)
        ema.module(x[:2])
        assert h2.sizes.shape[0] == 2 and handle.sizes.shape[0] == 3
    # update() lerps the copy's weights toward the model's; the model is untouched.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
        want = model(x)
        before = ema.module(x)
    ema.update(model, step=10)
    with torch.no_grad():
        after = ema.module(x)
        assert not torch.equal(after, before)
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    p_model, p_ema = model.blocks[0].attn.qkv.weight, ema.module.blocks[0].attn.qkv.weight
    assert p_model.data_ptr() != p_ema.data_ptr() and not torch.equal(p_model, p_ema)
    # The EMA weights (and the model's) save and load into unpatched models, key for key.
    for patched in (ema.module, model):
        buf = io.BytesIO()
        torch.save(patched.state_dict(), buf)
        buf.seek(0)
        fresh = _timm(depth=4).eval()
        fresh.load_state_dict(torch.load(buf), strict=True)
        assert fat.vit.handle_of(fresh) is None
        unpatched = copy.deepcopy(patched)
        fat.vit.unpatch(unpatched)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), unpatched(x), rtol=0, atol=0)
