"""Sweep over timm's registry (integration stage): every architecture family of
``timm.list_models()`` that is a ViT or a close relative, built tiny through the model's own
kwargs (no weights), under ``prune_merge`` and ``token_merge``. Each case ends as one of:

- refused at patch time, the message checked (the class is not a registered family, or a
  registered class in a configuration the hooks cannot serve), with the model left untouched;
- verified: ``keep=1`` / ``r=0`` is bitwise the unpatched model, a reducing patch equals an
  eager forward written here from docs/methods.md sections 6-7 (the EViT and ToMe oracles of
  test_prune_merge_evit.py and test_token_merge.py, with timm's own pieces around them), and
  ``unpatch`` restores bitwise.

The expected outcome of each case is written in the table, so that a family silently moving
from verified to refused (or the reverse) fails here. ``test_every_vit_module_is_swept`` keeps
the table in step with timm's registry."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import fisheradaptune as fat
from test_prune_merge_evit import evit_reduce
from test_token_merge import _merge

timm = pytest.importorskip("timm")

V = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5)
SMALL = dict(num_classes=5)
NO_CLS = "it has no class token"
POOL = r"global_pool 'map' is not supported"
PARALLEL = "block 0 of VisionTransformer is a .*ParallelThingsBlock"
RES_POST = "block 0 of VisionTransformer is a .*ResPostBlock"

# family -> (model name, kwargs, {hook: "verified" or a refusal pattern}); a hook not listed is
# expected to be refused because the class is not a registered family.
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", V, {"prune_merge": "verified", "token_merge": "verified"}),
    "vit_gap (no class token)": ("vit_medium_patch16_gap_240", V,
                                 {"prune_merge": NO_CLS, "token_merge": "verified"}),
    "vit_registers_gap": ("vit_medium_patch16_reg4_gap_256", V,
                          {"prune_merge": NO_CLS, "token_merge": "verified"}),
    "vit_registers_cls_avg": ("vit_base_patch16_reg4_gap_256",
                              dict(V, class_token=True, qk_norm=True),
                              {"prune_merge": "verified", "token_merge": "verified"}),
    "deit": ("deit_tiny_patch16_224", V, {"prune_merge": "verified", "token_merge": "verified"}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", V,
                       {"prune_merge": "verified", "token_merge": "verified"}),
    "deit3 (layer scale, no_embed_class)": ("deit3_small_patch16_224", V,
                                            {"prune_merge": "verified", "token_merge": "verified"}),
    "dinov2": ("vit_small_patch14_dinov2", V,
               {"prune_merge": "verified", "token_merge": "verified"}),
    "dinov2_registers": ("vit_small_patch14_reg4_dinov2", V,
                         {"prune_merge": "verified", "token_merge": "verified"}),
    "clip (norm_pre)": ("vit_base_patch16_clip_224", V,
                        {"prune_merge": "verified", "token_merge": "verified"}),
    "siglip (map pool)": ("vit_base_patch16_siglip_224", V,
                          {"prune_merge": POOL, "token_merge": POOL}),
    "siglip_gap": ("vit_base_patch16_siglip_gap_224", V,
                   {"prune_merge": NO_CLS, "token_merge": "verified"}),
    "aimv2 (rmsnorm, swiglu, avg)": ("aimv2_large_patch14_224", V,
                                    {"prune_merge": NO_CLS, "token_merge": "verified"}),
    "flexivit": ("flexivit_small", V, {"prune_merge": "verified", "token_merge": "verified"}),
    "vit_parallel_blocks": ("vit_small_patch16_18x2_224", V,
                            {"prune_merge": PARALLEL, "token_merge": PARALLEL}),
    "vit_respost_blocks": ("vit_base_patch16_rpn_224", V,
                           {"prune_merge": RES_POST, "token_merge": RES_POST}),
    "vit_hybrid (resnet stem)": ("vit_tiny_r_s16_p8_224",
                                 dict(img_size=128, embed_dim=32, depth=3, num_heads=2,
                                      num_classes=5),
                                 {"prune_merge": "verified", "token_merge": "verified"}),
    "vit_relpos": ("vit_relpos_small_patch16_224", V, {}),
    "samvit": ("samvit_base_patch16", dict(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                           num_heads=2, num_classes=5, global_attn_indexes=(1,),
                                           window_size=2, neck_chans=16), {}),
    "eva02 (rotary)": ("eva02_tiny_patch14_224", V, {}),
    "eva (clip)": ("eva_giant_patch14_224", V, {}),
    "vit_rope (eva)": ("vit_small_patch16_rope_224", V, {}),
    "beit": ("beit_base_patch16_224", V, {}),
    "beitv2": ("beitv2_base_patch16_224", V, {}),
    "cait": ("cait_xxs24_224", dict(V, depth_token_only=1), {}),
    "xcit": ("xcit_nano_12_p8_224", dict(img_size=32, embed_dim=32, depth=2, num_heads=2,
                                         num_classes=5), {}),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=4, window_size=4,
                                                  embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                                                  num_classes=5), {}),
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=32, patch_size=4, window_size=4,
                                               embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                                               num_classes=5), {}),
    "swinv2_cr": ("swinv2_cr_tiny_224", dict(img_size=(32, 32), window_size=4, embed_dim=16,
                                             depths=(1, 1), num_heads=(1, 2), num_classes=5), {}),
    "pit": ("pit_ti_224", dict(img_size=32, patch_size=4, stride=2, base_dims=[16, 16],
                               depth=[1, 1], heads=[1, 2], num_classes=5), {}),
    "pit_distilled": ("pit_ti_distilled_224", dict(img_size=32, patch_size=4, stride=2,
                                                   base_dims=[16, 16], depth=[1, 1],
                                                   heads=[1, 2], num_classes=5), {}),
    "levit": ("levit_128s", dict(img_size=32, num_classes=5), {}),
    "mvitv2": ("mvitv2_tiny", dict(img_size=32, num_classes=5), {}),
    "twins": ("twins_svt_small", dict(img_size=32, num_classes=5, embed_dims=(16, 32),
                                      depths=(1, 1), num_heads=(1, 2), mlp_ratios=(2, 2),
                                      sr_ratios=(2, 1), wss=(2, 2)), {}),
    "crossvit": ("crossvit_tiny_240", dict(img_size=[32, 32], img_scale=(1.0, 1.0),
                                           patch_size=[8, 16], embed_dim=[16, 32],
                                           depth=[[1, 1, 0]], num_heads=[2, 2],
                                           mlp_ratio=[2, 2, 1], num_classes=5), {}),
    "tnt": ("tnt_s_patch16_224", dict(img_size=32, num_classes=5), {}),
    "volo": ("volo_d1_224", dict(img_size=32, num_classes=5), {}),
    "convit": ("convit_tiny", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                   local_up_to_layer=1, num_classes=5), {}),
    "hiera": ("hiera_tiny_224", dict(img_size=64, embed_dim=16, num_heads=1, stages=(1, 1, 1, 1),
                                     num_classes=5), {}),
    "hieradet_sam2": ("hieradet_small", SMALL, {}),
    "naflexvit": ("naflexvit_base_patch16_gap", dict(img_size=32, patch_size=8, embed_dim=32,
                                                     depth=2, num_heads=2, num_classes=5), {}),
    "vitamin": ("vitamin_small_224", dict(img_size=64, num_classes=5),
                {"prune_merge": NO_CLS, "token_merge": "verified"}),
    "deepseek_vit": ("deepseek_vit_412m", dict(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                               num_heads=2, num_classes=5), {}),
    "efficientformer": ("efficientformer_l1", SMALL, {}),
    "efficientformer_v2": ("efficientformerv2_s0", SMALL, {}),
    "coat": ("coat_lite_tiny", dict(img_size=32, num_classes=5), {}),
    "nest": ("nest_tiny", dict(img_size=32, num_classes=5), {}),
    "pvt_v2": ("pvt_v2_b0", SMALL, {}),
    "davit": ("davit_tiny", dict(num_classes=5, depths=(1, 1, 1, 1), embed_dims=(8, 16, 32, 64),
                                 num_heads=(1, 1, 2, 2)), {}),
    "gcvit": ("gcvit_xxtiny", dict(img_size=64, num_classes=5), {}),
    "maxvit": ("maxvit_nano_rw_256", dict(img_size=64, num_classes=5), {}),
    "tiny_vit": ("tiny_vit_5m_224", SMALL, {}),
    "visformer": ("visformer_tiny", dict(img_size=32, num_classes=5), {}),
    "efficientvit_msra": ("efficientvit_m0", dict(img_size=32, num_classes=5), {}),
    "efficientvit_mit": ("efficientvit_b0", SMALL, {}),
    "fastvit": ("fastvit_t8", SMALL, {}),
    "nextvit": ("nextvit_small", SMALL, {}),
}

# timm modules holding ViTs or close relatives: each must have a family above.
VIT_MODULES = {
    "vision_transformer", "deit", "vision_transformer_hybrid", "vision_transformer_relpos",
    "vision_transformer_sam", "eva", "beit", "cait", "xcit", "swin_transformer",
    "swin_transformer_v2", "swin_transformer_v2_cr", "pit", "levit", "mvitv2", "twins",
    "crossvit", "tnt", "volo", "convit", "hiera", "hieradet_sam2", "naflexvit", "vitamin",
    "deepseek_vit", "efficientformer", "efficientformer_v2", "coat", "nest", "pvt_v2", "davit",
    "gcvit", "maxxvit", "tiny_vit", "visformer", "efficientvit_msra", "efficientvit_mit",
    "fastvit", "nextvit",
}

HOOKS = ("prune_merge", "token_merge")


def _module_of(name: str) -> str:
    from timm.models import _registry
    return _registry._model_to_module[name]


def test_every_vit_module_is_swept():
    available = {_module_of(n) for n in timm.list_models()}
    swept = {_module_of(name) for name, _, _ in FAMILIES.values()}
    assert VIT_MODULES <= available, sorted(VIT_MODULES - available)
    assert VIT_MODULES <= swept, sorted(VIT_MODULES - swept)
    assert len(FAMILIES) >= 25


def _build(name, kw):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kw).eval()
    for m in model.modules():  # layer scale starts near 0 (1e-5): blocks would be identities
        if isinstance(getattr(m, "gamma", None), nn.Parameter):
            nn.init.uniform_(m.gamma, 0.5, 1.5)
    for attr in ("head", "head_dist"):  # timm zero-initialises heads: outputs would be 0
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            nn.init.normal_(head.weight, std=0.2)
            nn.init.normal_(head.bias, std=0.2)
    return model


def _images(model, kw):
    size = kw.get("img_size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _untouched(model):
    return fat.vit.handle_of(model) is None and not any(
        "forward" in m.__dict__ for m in model.modules())


# ---------------------------------------------------------------------------------------------
# The oracle: timm's own embedding and head, EViT / ToMe written out in between


def _tokens_in(model, x):
    got = {}
    h = model.blocks[0].register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    return got["x"]


def _head(model, t, sizes):
    t = model.norm(t)
    if type(model).__name__ == "VisionTransformerDistilled":
        return (model.head(t[:, 0]) + model.head_dist(t[:, 1])) / 2
    pool = model.global_pool
    if pool == "avg":
        start = 0 if model.pool_include_prefix else model.num_prefix_tokens
        s = (sizes if sizes is not None else torch.ones(t.shape[:2]))[:, start:, None]
        t = (t[:, start:] * s).sum(1) / s.sum(1)
    elif pool == "token":
        t = t[:, 0]
    return model.head(model.fc_norm(t))


def _cls_row(blk, t):
    """Class row of the full head-averaged attention of a timm block, formed explicitly."""
    a = blk.attn
    b, n, _ = t.shape
    q, k, _ = a.qkv(blk.norm1(t)).reshape(b, n, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = a.q_norm(q), a.k_norm(k)
    return ((q @ k.transpose(-1, -2)) * a.scale).softmax(-1).mean(1)[:, 0]


def prune_oracle(model, x, keep, layers):
    t, p = _tokens_in(model, x), model.num_prefix_tokens
    sizes = torch.ones(t.shape[:2])
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):
            y = blk(t)
            if i in layers:
                y, sizes = evit_reduce(y, _cls_row(blk, t), sizes, keep, p)
            t = y
        return _head(model, t, sizes), t.shape[1]


def tome_oracle(model, x, r):
    t, p, sizes = _tokens_in(model, x), model.num_prefix_tokens, None
    with torch.no_grad():
        for blk in model.blocks:
            a = blk.attn
            h = blk.norm1(t)
            bsz, n, _ = h.shape
            q, k, v = a.qkv(h).reshape(bsz, n, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
            metric = k.mean(1)  # the projected keys, averaged over heads
            q, k = a.q_norm(q), a.k_norm(k)
            logits = q @ k.transpose(-1, -2) * a.scale
            if sizes is not None:
                logits = logits + sizes.log()[:, None, None, :]
            y = a.norm((logits.softmax(-1) @ v).transpose(1, 2).reshape(bsz, n, -1))
            if getattr(a, "gate", None) is not None:
                y = y * a.gate(h).sigmoid()
            t = t + blk.ls1(a.proj(y))
            t, sizes = _merge(t, metric, r, p, sizes)
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
        return _head(model, t, sizes), t.shape[1]


# ---------------------------------------------------------------------------------------------
# The sweep


def _refusal_pattern(model, hook, expected):
    if expected is None:
        cls = type(model)
        return (TypeError, rf"vit\.{hook}: argument 'model': {re.escape(cls.__qualname__)} "
                rf"\({re.escape(cls.__module__)}\) is not a registered ViT family\. {hook} "
                r"supports exactly these classes: timm VisionTransformer")
    if expected.startswith("block "):
        return (ValueError, rf"vit\.{hook}: argument 'model': {expected}")
    return (ValueError, rf"vit\.{hook}: argument 'model': .*{expected}")


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_timm_family(family, hook, sweep):
    name, kw, expect = FAMILIES[family]
    model = _build(name, kw)
    x = _images(model, kw)
    expected = expect.get(hook)
    patch = getattr(fat.vit, hook)
    if expected != "verified":
        err, pattern = _refusal_pattern(model, hook, expected)
        with pytest.raises(err, match=pattern):
            patch(model, keep=1.0, layers=(0,)) if hook == "prune_merge" else patch(model, r=0)
        assert _untouched(model)  # refused before anything changed
        sweep(f"timm families x {hook}", family, "refused")
        return
    with torch.no_grad():
        before = model(x)
        if hook == "prune_merge":
            patch(model, keep=1.0, layers=(0, 1))
        else:
            patch(model, r=0)
        assert torch.equal(model(x), before)  # keep=1 / r=0: bitwise the unpatched model
        fat.vit.unpatch(model)
        if hook == "prune_merge":
            expected_out, final = prune_oracle(model, x, 0.6, (0, 1))
            handle = patch(model, keep=0.6, layers=(0, 1))
        else:
            expected_out, final = tome_oracle(model, x, 4)
            handle = patch(model, r=4)
        out = model(x)
        torch.testing.assert_close(out, expected_out, rtol=1e-4, atol=1e-5)
        assert handle.sizes.shape[1] == final < _tokens_in(model, x).shape[1]
        assert not torch.allclose(out, before, atol=1e-4)  # the reduction changed something
        fat.vit.unpatch(model)
        assert torch.equal(model(x), before) and _untouched(model)
    sweep(f"timm families x {hook}", family, "verified")
