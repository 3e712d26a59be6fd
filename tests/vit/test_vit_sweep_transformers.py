"""Sweep over transformers' vision registries (integration stage): every class of the
image-classification and image (vision encoder) auto mappings, plus the audio spectrogram
transformer and the vision towers users pair with ViT hooks (CLIP, SigLIP), under
``prune_merge`` and ``token_merge``. Each case ends as one of:

- refused at patch time, the message checked (the class is not a registered family, or its
  family does not serve that hook), with the model left untouched. Refused classes are built on
  the meta device (the refusal reads the class only, so no weights are needed);
- verified (registered families, built tiny from a config, eager and sdpa attention):
  ``keep=1`` (``r=0``) is bitwise the unpatched model, a reducing patch equals the EViT oracle
  of test_prune_merge_evit.py (the eager ToMe forward of test_token_merge_tome.py), then the
  model's own final norm and heads on the oracle's tokens, every protected prefix token (class,
  distillation, register) survives, and ``unpatch`` restores bitwise."""
from __future__ import annotations

import re

import pytest
import torch

import fisheradaptune as fat
from test_prune_merge_evit import evit_reduce
from test_token_merge_tome import blocks_of, eager_transformers, parts_of

transformers = pytest.importorskip("transformers")
from transformers.models.auto import modeling_auto  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
            image_size=32, patch_size=4, num_labels=5, initializer_range=0.2)
AST_TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                patch_size=8, frequency_stride=8, time_stride=8, max_length=32, num_mel_bins=32,
                num_labels=5, initializer_range=0.2)


def _names():
    names = set()
    for mapping in (modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
                    modeling_auto.MODEL_FOR_IMAGE_MAPPING_NAMES):
        for v in mapping.values():
            names.update(v if isinstance(v, tuple) else (v,))
    # The audio spectrogram transformer (a DeiT-like encoder), the vision towers of CLIP and
    # SigLIP, and the masked-image-modeling heads of the verified families.
    names.update({"ASTModel", "ASTForAudioClassification", "CLIPVisionModel",
                  "CLIPVisionModelWithProjection", "SiglipVisionModel", "ViTMAEModel",
                  "ViTMAEForPreTraining", "ViTForMaskedImageModeling",
                  "DeiTForMaskedImageModeling"})
    return sorted(n for n in names if hasattr(transformers, n))


NAMES = _names()
REQUIRED = {"ViTModel", "ViTForImageClassification", "DeiTModel",
            "DeiTForImageClassificationWithTeacher", "BeitModel", "Data2VecVisionModel",
            "Dinov2Model", "Dinov2WithRegistersModel", "IJepaModel", "CLIPVisionModel",
            "SiglipVisionModel", "ASTModel", "ViTMSNModel", "ViTMAEModel"}

# Verified for prune_merge: the registered transformers families. Everything else is refused.
VERIFIED = {"ViTModel", "ViTForImageClassification", "DeiTModel", "DeiTForImageClassification",
            "DeiTForImageClassificationWithTeacher", "ASTModel", "ASTForAudioClassification",
            "ViTMSNModel", "ViTMSNForImageClassification", "Dinov2Model",
            "Dinov2WithRegistersModel"}
# Verified for token_merge: those, and the CLIP vision tower (registered for token_merge only).
CLIP_TOWERS = {"CLIPVisionModel", "CLIPVisionModelWithProjection"}
VERIFIED_TOKEN_MERGE = VERIFIED | CLIP_TOWERS
# class + distillation tokens; class + 2 registers (the tiny config's); the others: class token
PROTECTED = {"DeiT": 2, "AST": 2, "Dinov2WithRegisters": 3}


def test_the_sweep_reaches_the_required_encoders():
    assert REQUIRED <= set(NAMES), sorted(REQUIRED - set(NAMES))
    assert VERIFIED <= set(NAMES)


def _config(cls, **extra):
    kw = AST_TINY if cls.__name__.startswith("AST") else TINY
    if cls.__name__.startswith("Dinov2WithRegisters"):
        kw = dict(kw, num_register_tokens=2)
    return cls.config_class(**{**kw, **extra})


# Classes whose config needs a value the defaults do not give (refused classes: the meta device
# builds them without memory whatever their size).
CONFIG_EXTRA = {
    "TimmBackbone": dict(backbone="resnet18", use_pretrained_backbone=False),
    "PerceiverForImageClassificationFourier": dict(d_model=258,
                                                   num_cross_attention_heads=1),
    "PerceiverForImageClassificationConvProcessing": dict(d_model=322,
                                                          num_cross_attention_heads=1),
}


def _build_meta(cls):
    """The class built on the meta device from a tiny config (its default config if the tiny
    one does not build); None if neither builds here."""
    extra = CONFIG_EXTRA.get(cls.__name__, {})
    for make in (lambda: _config(cls, **extra), lambda: cls.config_class(**extra)):
        try:
            with torch.device("meta"):
                return cls(make())
        except Exception:  # noqa: BLE001 - a config this class cannot take: try the next
            continue
    return None


def _untouched(model):
    return fat.vit.handle_of(model) is None and not any(
        "forward" in m.__dict__ for m in model.modules())


# ---------------------------------------------------------------------------------------------
# Verified families: the oracle


def _build(cls, impl):
    torch.manual_seed(0)
    return cls(_config(cls, attn_implementation=impl)).eval()


def _input(cls):
    g = torch.Generator().manual_seed(1)
    if cls.__name__.startswith("AST"):
        return {"input_values": torch.randn(2, 32, 32, generator=g)}
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}


def _encoder(model):
    for attr in ("vit", "deit", "audio_spectrogram_transformer", "vision_model"):
        if hasattr(model, attr):
            return getattr(model, attr)
    return model


def _outputs(out):
    """Every tensor a model returns (logits, hidden states, pooled output), in order."""
    return [v for v in out.values() if isinstance(v, torch.Tensor)]


def _oracle(model, ref, inputs, keep, layers, p):
    """The model's own outputs, its final norm fed with the EViT-reduced tokens of the eager
    twin ``ref`` (same weights): class rows from eager attention weights, reduction written out
    (test_prune_merge_evit.evit_reduce)."""
    enc = _encoder(ref)
    t = enc.embeddings(*inputs.values())
    sizes = torch.ones(t.shape[:2])
    blocks = enc.layers if hasattr(enc, "layers") else enc.encoder.layer  # ViT-like / Dinov2
    for i, blk in enumerate(blocks):
        y = blk(t)
        if i in layers:
            norm = blk.layernorm_before if hasattr(blk, "layernorm_before") else blk.norm1
            _, w = blk.attention(norm(t), None)
            y, sizes = evit_reduce(y, w.mean(1)[:, 0], sizes, keep, p)
        t = y
    final = t
    h = _encoder(model).layernorm.register_forward_pre_hook(lambda m, a: (final,))
    try:
        out = model(**inputs)
    finally:
        h.remove()
    return _outputs(out), sizes


def _verify(name, impl):
    cls = getattr(transformers, name)
    model, ref = _build(cls, impl), _build(cls, "eager")
    p = PROTECTED.get(next((k for k in PROTECTED if name.startswith(k)), ""), 1)
    inputs = _input(cls)
    with torch.no_grad():
        before = _outputs(model(**inputs))
        h = fat.vit.prune_merge(model, keep=1.0, layers=(0, 1))
        assert h.num_protected == p
        assert all(torch.equal(a, b) for a, b in zip(_outputs(model(**inputs)), before))
        fat.vit.unpatch(model)
        expected, sizes = _oracle(model, ref, inputs, 0.5, (0, 1), p)
        h = fat.vit.prune_merge(model, keep=0.5, layers=(0, 1))
        got = _outputs(model(**inputs))
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert torch.equal(h.sizes, sizes) and bool((sizes[:, :p] == 1).all())
        # the outputs change, not only the token count (the class token's row for an encoder
        # without a pooler)
        assert any(not torch.allclose(a[:, :1] if a.dim() == 3 else a,
                                      b[:, :1] if b.dim() == 3 else b, atol=1e-4)
                   for a, b in zip(got, before))
        fat.vit.unpatch(model)
        assert all(torch.equal(a, b) for a, b in zip(_outputs(model(**inputs)), before))
        assert _untouched(model)


# ---------------------------------------------------------------------------------------------
# The sweep


@pytest.mark.parametrize("name", NAMES)
def test_transformers_encoder_x_prune_merge(name, sweep):
    cls = getattr(transformers, name)
    if name in VERIFIED:
        for impl in ("eager", "sdpa"):
            _verify(name, impl)
        sweep("transformers encoders x prune_merge", name, "verified")
        return
    model = _build_meta(cls)
    if model is None:
        pytest.skip(f"{name} cannot be built from a config here")
    tail = r", family transformers CLIP vision tower, which supports only \['token_merge'\]" \
        if name in CLIP_TOWERS else r" is not a registered ViT family"
    with pytest.raises(TypeError, match=rf"vit\.prune_merge: argument 'model': {name} "
                                        rf"\({re.escape(cls.__module__)}\){tail}\. prune_merge "
                                        r"supports exactly these classes: .*transformers ViT "
                                        r"\(ViTModel, ViTForImageClassification\)"):
        fat.vit.prune_merge(model, keep=1.0, layers=(0,))
    assert _untouched(model)
    sweep("transformers encoders x prune_merge", name, "refused")


def _verify_token_merge(name, impl):
    cls = getattr(transformers, name)
    model = _build(cls, impl)
    if name in CLIP_TOWERS:  # CLIP's init ignores initializer_range: widen it, so merges show
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=0.2)
    p = PROTECTED.get(next((k for k in PROTECTED if name.startswith(k)), ""), 1)
    inputs = _input(cls)
    blocks = blocks_of(_encoder(model))
    with torch.no_grad():
        before = _outputs(model(**inputs))
        h = fat.vit.token_merge(model, r=0)
        assert h.num_protected == p and h.layers == ()
        assert all(torch.equal(a, b) for a, b in zip(_outputs(model(**inputs)), before))
        fat.vit.unpatch(model)
        # the oracle: the eager ToMe tokens after the last block, then the model's own tail
        tokens = eager_transformers(model, blocks, parts_of(blocks[0]), *inputs.values(), 4, p)
        hook = blocks[-1].register_forward_hook(lambda m, a, o: tokens)
        try:
            expected = _outputs(model(**inputs))
        finally:
            hook.remove()
        h = fat.vit.token_merge(model, r=4)
        got = _outputs(model(**inputs))
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert bool((h.sizes[:, :p] == 1).all()) and h.sizes.shape[1] == tokens.shape[1]
        assert any(not torch.allclose(a[:, :1] if a.dim() == 3 else a,
                                      b[:, :1] if b.dim() == 3 else b, atol=1e-4)
                   for a, b in zip(got, before))
        fat.vit.unpatch(model)
        assert all(torch.equal(a, b) for a, b in zip(_outputs(model(**inputs)), before))
        assert _untouched(model)


@pytest.mark.parametrize("name", NAMES)
def test_transformers_encoder_x_token_merge(name, sweep):
    cls = getattr(transformers, name)
    if name in VERIFIED_TOKEN_MERGE:
        for impl in ("eager", "sdpa"):
            _verify_token_merge(name, impl)
        sweep("transformers encoders x token_merge", name, "verified")
        return
    model = _build_meta(cls)
    if model is None:
        pytest.skip(f"{name} cannot be built from a config here")
    with pytest.raises(TypeError, match=rf"vit\.token_merge: argument 'model': {name} "
                                        rf"\({re.escape(cls.__module__)}\) is not a registered "
                                        r"ViT family\. token_merge supports exactly these "
                                        r"classes: timm .*transformers CLIP vision tower "
                                        r"\(CLIPVisionModel, CLIPVisionModelWithProjection\)"):
        fat.vit.token_merge(model, r=0)
    assert _untouched(model)
    sweep("transformers encoders x token_merge", name, "refused")


def test_deit_with_teacher_distillation_logits_keep_their_token():
    # Before: only the class token was protected, so the distillation token could be fused
    # away while the distillation head reads position 1 (distillation_logits 0.43 off).
    cls = transformers.DeiTForImageClassificationWithTeacher
    model, ref = _build(cls, "sdpa"), _build(cls, "eager")
    inputs = _input(cls)
    with torch.no_grad():
        expected, _ = _oracle(model, ref, inputs, 0.3, (0, 1, 2), 2)
        one, _ = _oracle(model, ref, inputs, 0.3, (0, 1, 2), 1)  # the old protection
        h = fat.vit.prune_merge(model, keep=0.3, layers=(0, 1, 2))
        out = model(**inputs)
    assert h.num_protected == 2
    torch.testing.assert_close(out.distillation_logits, expected[2], rtol=1e-4, atol=1e-5)
    assert (one[2] - expected[2]).abs().max() > 1e-2  # protecting one token would be wrong
    with pytest.raises(ValueError, match=r"prune_merge: argument 'num_protected': 1 would leave "
                                         r"prefix tokens unprotected: DeiTModel has 1 class \+ "
                                         r"1 distillation token"):
        fat.vit.prune_merge(_build(cls, "sdpa"), keep=0.5, layers=(0,), num_protected=1)


@pytest.mark.parametrize("name", ["IJepaModel", "BeitModel", "Dinov2ForImageClassification"])
def test_look_alikes_are_refused_at_patch_time(name):
    # IJepaModel has no class token (patch 0 was protected and scored the others); BeitModel
    # has relative position biases (a raw shape error at the first reducing forward); Dinov2's
    # classifier averages the patch tokens unweighted.
    cls = getattr(transformers, name)
    torch.manual_seed(0)
    model = cls(_config(cls)).eval()
    with pytest.raises(TypeError, match=rf"vit\.prune_merge: argument 'model': {name} .*is not "
                                        r"a registered ViT family"):
        fat.vit.prune_merge(model, keep=0.5, layers=(0,))
    assert _untouched(model)
