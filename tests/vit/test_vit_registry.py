"""The family registry of fisheradaptune.vit (docs/methods.md sections 6-7): a model is patched
only when its class, its blocks' classes and its attention classes are registered and its
layout's checks pass; every other model is refused at patch time, naming its class and the
supported families, with nothing changed."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fisheradaptune as fat

APIS = ("prune_merge", "token_merge")


def _patch(api, model, **kw):
    if api == "prune_merge":
        return fat.vit.prune_merge(model, keep=0.5, layers=(0,), **kw)
    return fat.vit.token_merge(model, r=2, **kw)


def _untouched(model):
    return fat.vit.handle_of(model) is None and not any(
        "forward" in m.__dict__ for m in model.modules())


def test_the_registry_lists_each_family_once():
    fams = fat.vit.families()
    names = [f.name for f in fams]
    assert len(names) == len(set(names))
    for expected in ("timm VisionTransformer", "timm VisionTransformerDistilled (DeiT distilled)",
                     "torchvision VisionTransformer", "transformers ViT", "transformers DeiT",
                     "transformers AST", "fisheradaptune demo TinyViT"):
        assert expected in names
    tv = next(f for f in fams if f.name == "transformers ViT")
    assert tv.methods == frozenset({"prune_merge", "token_merge"})
    assert tv.layout == "transformers-vit"
    clip = next(f for f in fams if f.name == "transformers CLIP vision tower")
    assert clip.methods == frozenset({"token_merge"}) and clip.layout == "transformers-clip-vision"


@pytest.mark.parametrize("api", APIS)
def test_a_subclass_is_not_its_base_class(api, timm_like):
    class Custom(type(timm_like()[0])):  # may override forward: not what was verified
        pass

    torch.manual_seed(0)
    model = Custom().eval()
    with pytest.raises(TypeError, match=rf"vit\.{api}: argument 'model': .*Custom \(.*\) is not "
                                        rf"a registered ViT family\. {api} supports exactly "
                                        r"these classes: timm VisionTransformer "
                                        r"\(VisionTransformer\); .*fisheradaptune demo TinyViT"):
        _patch(api, model)
    assert _untouched(model)


@pytest.mark.parametrize("api", APIS)
def test_a_foreign_block_or_attention_is_refused(api, timm_like):
    model, _ = timm_like()

    class OtherBlock(type(model.blocks[0])):
        pass

    model.blocks[2] = OtherBlock(32, 4, False)
    with pytest.raises(ValueError, match=rf"vit\.{api}: argument 'model': block 2 of TimmLikeViT "
                                         r"is a .*OtherBlock; family test stand-in \(timm "
                                         r"layout\) has blocks"):
        _patch(api, model)
    assert _untouched(model)

    model, _ = timm_like()

    class OtherAttention(type(model.blocks[0].attn)):
        pass

    model.blocks[1].attn = OtherAttention(32, 4, False)
    with pytest.raises(ValueError, match=rf"vit\.{api}: argument 'model': block 1 of TimmLikeViT "
                                         r"has attention .*OtherAttention"):
        _patch(api, model)
    assert _untouched(model)


@pytest.mark.parametrize("api", APIS)
def test_prefix_tokens_must_be_counted_exactly(api, timm_like):
    model, _ = timm_like(reg_tokens=2)
    model.num_prefix_tokens = 1  # says 1, has class + 2 registers
    with pytest.raises(ValueError, match=rf"vit\.{api}: argument 'model': TimmLikeViT declares "
                                         r"num_prefix_tokens=1 but has 1 class \+ 2 register "
                                         r"token\(s\)"):
        _patch(api, model)
    assert _untouched(model)


@pytest.mark.parametrize("api", APIS)
def test_fewer_protected_tokens_than_the_prefix_is_refused(api, timm_like):
    model, _ = timm_like(dist_token=True)
    with pytest.raises(ValueError, match=rf"vit\.{api}: argument 'num_protected': 1 would leave "
                                         r"prefix tokens unprotected: TimmLikeViT has 1 class "
                                         r"\+ 1 distillation token\(s\)"):
        _patch(api, model, num_protected=1)
    assert _untouched(model)
    assert _patch(api, model, num_protected=3).num_protected == 3  # more is allowed


def test_register_family_validates_what_it_is_given(timm_like, monkeypatch):
    from fisheradaptune.vit import _registry, _transformers

    class NoHalves(_transformers.TransformersViTLayout):  # every real layout has them now
        token_merge = False

    monkeypatch.setitem(_registry.LAYOUTS, "no-halves", NoHalves())
    model, _ = timm_like()
    with pytest.raises(TypeError, match="register_family: argument 'family'"):
        fat.vit.register_family(type(model))
    with pytest.raises(ValueError, match="layout 'keras' is not one of"):
        fat.vit.Family("x", "keras", {nn.Linear: None}, (), (), frozenset({"prune_merge"}), "")
    with pytest.raises(ValueError, match="methods must be a non-empty subset"):
        fat.vit.Family("x", "timm", {nn.Linear: None}, (), (), frozenset({"merge"}), "")
    with pytest.raises(ValueError, match="has no token-merge block halves"):
        fat.vit.Family("x", "no-halves", {nn.Linear: None}, (), (), frozenset({"token_merge"}),
                       "")
    clash = fat.vit.Family("again", "timm", {type(model): None}, (type(model.blocks[0]),),
                           (type(model.blocks[0].attn),), frozenset({"prune_merge"}), "")
    with pytest.raises(ValueError, match=r"register_family: argument 'family': model class\(es\) "
                                         r"\[.*TimmLikeViT'\] already registered"):
        fat.vit.register_family(clash)
