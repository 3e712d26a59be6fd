"""fisheradaptune.vit.prune_merge against an eager EViT-style re-implementation written here
from docs/methods.md section 6, on the stand-ins of conftest.py and on real timm, torchvision and
transformers models wherever they import.

The re-implementation forms the full N x N attention of each chosen block, averages the heads,
takes the class row, keeps the ceil(rho * (N - P)) best tokens (stable sort, ties to the lower
index) and fuses the rest with w = a * size, carrying sizes to the next block and to an avg
pool. It is independent of fisheradaptune.vit.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fisheradaptune as fat
from fisheradaptune.demo.models import TinyViT


# ---------------------------------------------------------------------------------------------
# Eager EViT-style re-implementation (docs/methods.md section 6), independent of fisheradaptune.vit


def full_cls_row_timm(block, x):
    """Class row of the full head-averaged attention matrix, formed explicitly."""
    attn = block.attn
    b, n, c = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, c // attn.num_heads)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4)
    ident = nn.Identity()
    q, k = getattr(attn, "q_norm", ident)(q), getattr(attn, "k_norm", ident)(k)
    a = ((q @ k.transpose(-1, -2)) / math.sqrt(c // attn.num_heads)).softmax(-1)  # [B,H,N,N]
    return a.mean(1)[:, 0]


def full_cls_row_tv(block, x):
    xn = block.ln_1(x)
    _, w = block.self_attention(xn, xn, xn, need_weights=True, average_attn_weights=True)
    return w[:, 0]


def evit_reduce(x, a, sizes, rho, p, normalize=True):
    b, n, c = x.shape
    m = n - p
    k = math.ceil(rho * m - 1e-9)
    if k >= m:
        return x, sizes
    score = a[:, p:].double()
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    kept, merged = order[:, :k].sort(1).values, order[:, k:].sort(1).values
    cand, cs = x[:, p:], sizes[:, p:]
    xk = torch.gather(cand, 1, kept[..., None].expand(-1, -1, c))
    xm = torch.gather(cand, 1, merged[..., None].expand(-1, -1, c)).double()
    sm = torch.gather(cs, 1, merged).double()
    w = torch.gather(score, 1, merged) * sm
    fused = (w[..., None] * xm).sum(1)
    if normalize:
        fused = fused / w.sum(1, keepdim=True)
    x = torch.cat([x[:, :p], xk, fused.to(x.dtype)[:, None]], 1)
    sizes = torch.cat([sizes[:, :p], torch.gather(cs, 1, kept), sm.sum(1, keepdim=True).float()], 1)
    return x, sizes


def evit_forward_timm(model, inp, rho, layers, p, normalize=True):
    if isinstance(model, TinyViT):
        x = model.patch_embed(inp)
        x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], 1) + model.pos_embed
    else:  # conftest's TimmLikeViT
        x = model.patch_embed(inp) + model.pos_embed
        prefix = [model.cls_token.expand(x.shape[0], -1, -1)]
        if model.dist_token is not None:
            prefix.append(model.dist_token.expand(x.shape[0], -1, -1))
        if model.reg_token is not None:
            prefix.append(model.reg_token.expand(x.shape[0], -1, -1))
        x = torch.cat(prefix + [x], 1)
    sizes = torch.ones(x.shape[:2])
    for i, blk in enumerate(model.blocks):
        y = blk(x)
        if i in layers:
            y, sizes = evit_reduce(y, full_cls_row_timm(blk, x), sizes, rho, p, normalize)
        x = y
    x = model.norm(x)
    if getattr(model, "global_pool", "token") == "avg":
        s = sizes[:, model.num_prefix_tokens:, None]
        pooled = (x[:, model.num_prefix_tokens:] * s).sum(1) / s.sum(1)
        return model.head(model.fc_norm(pooled))
    return model.head(x[:, 0])


def evit_forward_tv(model, inp, rho, layers, normalize=True):
    x = model.proj(inp)
    x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], 1) + model.encoder.pos_embedding
    sizes = torch.ones(x.shape[:2])
    for i, blk in enumerate(model.encoder.layers):
        y = blk(x)
        if i in layers:
            y, sizes = evit_reduce(y, full_cls_row_tv(blk, x), sizes, rho, 1, normalize)
        x = y
    return model.heads(model.encoder.ln(x)[:, 0])


TOL = dict(rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The stand-ins


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("name,kw", [
    ("tiny", {}), ("timm", {}), ("timm", {"reg_tokens": 2, "qk_norm": True}),
    ("timm", {"global_pool": "avg", "qk_norm": True}), ("timm", {"dist_token": True}),
])
def test_matches_evit_reimplementation_timm(tiny, timm_like, name, kw, normalize):
    model, x = tiny() if name == "tiny" else timm_like(**kw)
    p = model.num_prefix_tokens
    layers, rho = (0, 2, 3), 0.6
    expected = evit_forward_timm(model, x, rho, layers, p, normalize)
    h = fat.vit.prune_merge(model, keep=rho, layers=layers, normalize=normalize)
    assert h.num_protected == p
    torch.testing.assert_close(model(x), expected, **TOL)


@pytest.mark.parametrize("normalize", [True, False])
def test_matches_evit_reimplementation_torchvision(tv_like, normalize):
    model, x = tv_like()
    layers, rho = (1, 2, 4), 0.7
    expected = evit_forward_tv(model, x, rho, layers, normalize)
    fat.vit.prune_merge(model, keep=rho, layers=layers, normalize=normalize)
    torch.testing.assert_close(model(x), expected, **TOL)


def test_cls_attention_matches_full_attention(timm_like, tv_like):
    model, x = timm_like(qk_norm=True)
    xb = model.blocks[0](torch.cat([model.cls_token.expand(3, -1, -1),
                                    model.patch_embed(x) + model.pos_embed], 1))
    row = fat.vit.cls_attention(model, model.blocks[1], xb)
    torch.testing.assert_close(row, full_cls_row_timm(model.blocks[1], xb), **TOL)
    tv, xt = tv_like()
    xt = torch.cat([tv.class_token.expand(3, -1, -1), tv.proj(xt)], 1)
    torch.testing.assert_close(fat.vit.cls_attention(tv, tv.encoder.layers[0], xt),
                               full_cls_row_tv(tv.encoder.layers[0], xt), **TOL)


# ---------------------------------------------------------------------------------------------
# Real timm, torchvision and transformers models, wherever they import


def test_real_timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    for kw in [dict(class_token=True, global_pool="token"),
               dict(class_token=True, global_pool="avg", reg_tokens=4, qk_norm=True,
                    init_values=0.1)]:
        model = timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=4, embed_dim=48, depth=5, num_heads=4, num_classes=7,
            **kw).eval()
        x = torch.randn(2, 3, 32, 32)
        before = model(x)
        h = fat.vit.prune_merge(model, keep=1.0, layers=(1, 3))
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
        h.remove()
        # EViT-style re-implementation over timm's own forward pieces.
        p = model.num_prefix_tokens
        t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        sizes = torch.ones(t.shape[:2])
        for i, blk in enumerate(model.blocks):
            y = blk(t)
            if i in (1, 3):
                y, sizes = evit_reduce(y, full_cls_row_timm(blk, t), sizes, 0.6, p)
            t = y
        t = model.norm(t)
        if model.global_pool == "avg":
            s = sizes[:, p:, None]
            pooled = (t[:, p:] * s).sum(1) / s.sum(1)
        else:
            pooled = t[:, 0]
        expected = model.head(model.fc_norm(pooled))
        h = fat.vit.prune_merge(model, keep=0.6, layers=(1, 3))
        assert h.num_protected == p
        torch.testing.assert_close(model(x), expected, **TOL)
        fat.vit.unpatch(model)
        assert torch.equal(model(x), before)


def test_real_torchvision_vit():
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = tvm.VisionTransformer(image_size=32, patch_size=4, num_layers=5, num_heads=4,
                                  hidden_dim=48, mlp_dim=96, num_classes=7).eval()
    # torchvision zero-initialises the head: every output below would be 0 and match anything.
    nn.init.normal_(model.heads.head.weight, std=0.2)
    nn.init.normal_(model.heads.head.bias, std=0.2)
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    assert before.abs().max() > 1e-2
    h = fat.vit.prune_merge(model, keep=1.0, layers=(1, 3))
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    h.remove()
    t = model._process_input(x)
    t = torch.cat([model.class_token.expand(2, -1, -1), t], 1) + model.encoder.pos_embedding
    sizes = torch.ones(t.shape[:2])
    for i, blk in enumerate(model.encoder.layers):
        y = blk(t)
        if i in (1, 3):
            y, sizes = evit_reduce(y, full_cls_row_tv(blk, t), sizes, 0.6, 1)
        t = y
    expected = model.heads(model.encoder.ln(t)[:, 0])
    assert (expected - before).abs().max() > 1e-3  # reducing changes the output
    fat.vit.prune_merge(model, keep=0.6, layers=(1, 3))
    torch.testing.assert_close(model(x), expected, **TOL)
    fat.vit.unpatch(model)
    assert torch.equal(model(x), before)


def full_cls_row_hf(block, x):
    """Class row of the head-averaged weights that transformers' eager attention returns."""
    _, w = block.attention(block.layernorm_before(x), None)
    return w.mean(1)[:, 0]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_real_transformers_vit(impl):
    transformers = pytest.importorskip("transformers")

    def build(attn):
        torch.manual_seed(0)
        # initializer_range 0.2 (not 0.02): the class attention rows then separate the tokens
        # clearly and the classifier's logits are not ~0.
        cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64,
                                     num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=128, num_labels=7, initializer_range=0.2,
                                     attn_implementation=attn)
        return transformers.ViTForImageClassification(cfg).eval()

    model, ref = build(impl), build("eager")  # the reference reads eager's attention weights
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x).logits
        assert before.abs().max() > 1e-2
        h = fat.vit.prune_merge(model, keep=1.0, layers=(0, 2))
        assert torch.equal(model(x).logits, before)
        h.remove()
        t = ref.vit.embeddings(x)
        sizes = torch.ones(t.shape[:2])
        for i, blk in enumerate(ref.vit.layers):
            y = blk(t)
            if i in (0, 2):
                y, sizes = evit_reduce(y, full_cls_row_hf(blk, t), sizes, 0.6, 1)
            t = y
        expected = ref.classifier(ref.vit.layernorm(t)[:, 0])
        assert t.shape[1] < 17 and (expected - before).abs().max() > 1e-3
        h = fat.vit.prune_merge(model, keep=0.6, layers=(0, 2))
        torch.testing.assert_close(model(x).logits, expected, **TOL)
        assert torch.equal(h.sizes, sizes)
        fat.vit.unpatch(model)
        assert torch.equal(model(x).logits, before)
