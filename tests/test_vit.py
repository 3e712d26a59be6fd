"""fisheradaptune.vit: token prune-merge hook for timm and torchvision ViTs (SPEC section 6).

The patched models are checked against an eager EViT-style re-implementation written here from
SPEC section 6: it forms the full N x N attention of each chosen block, averages the heads, takes
the class row, keeps the ceil(rho * (N - P)) best tokens (stable sort, ties to the lower index)
and fuses the rest with w = a * size, carrying sizes to the next block and to an avg pool.
timm and torchvision are not installable on the CPU test machine (timm needs torchvision, which
has no CPU wheel there), so structural stand-ins with their module names are tested always and
the real models wherever they import.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisheradaptune as fat
from conftest import devices
from fisheradaptune.demo.models import TinyViT


# ---------------------------------------------------------------------------------------------
# Stand-ins with timm's and torchvision's structure


class TimmAttention(nn.Module):
    def __init__(self, dim, heads, qk_norm):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(0.5 + torch.rand(dim))

    def forward(self, x):
        return x * self.gamma


class TimmBlock(nn.Module):
    def __init__(self, dim, heads, qk_norm):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TimmAttention(dim, heads, qk_norm)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ls2 = LayerScale(dim)

    def forward(self, x, attn_mask=None):
        x = x + self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask))
        return x + self.ls2(self.mlp(self.norm2(x)))


class TimmLikeViT(nn.Module):
    """timm VisionTransformer's structure: prefix tokens (class, register, distillation),
    qk-norm, LayerScale, global_pool token/avg with fc_norm, forward_features/forward_head."""

    def __init__(self, dim=32, depth=5, heads=4, tokens=19, reg_tokens=0, dist_token=False,
                 qk_norm=False, global_pool="token"):
        super().__init__()
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = 1 + reg_tokens + int(dist_token)
        self.global_pool = global_pool
        self.patch_embed = nn.Linear(8, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.dist_token = nn.Parameter(torch.randn(1, 1, dim) * 0.1) if dist_token else None
        self.reg_token = nn.Parameter(torch.randn(1, reg_tokens, dim) * 0.1) if reg_tokens else None
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.1)
        self.blocks = nn.Sequential(*[TimmBlock(dim, heads, qk_norm) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim) if global_pool == "token" else nn.Identity()
        self.fc_norm = nn.LayerNorm(dim) if global_pool == "avg" else nn.Identity()
        self.head = nn.Linear(dim, 5)

    def forward_features(self, x):
        x = self.patch_embed(x) + self.pos_embed
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        x = torch.cat(prefix + [x], 1)
        return self.norm(self.blocks(x))

    def forward_head(self, x, pre_logits=False):
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(1)
        else:
            x = x[:, 0]
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class TvEncoderBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, input):
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = x + input
        return x + self.mlp(self.ln_2(x))


class TvEncoder(nn.Module):
    def __init__(self, dim, depth, heads, tokens):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.randn(1, tokens, dim) * 0.1)
        self.layers = nn.Sequential(*[TvEncoderBlock(dim, heads) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)

    def forward(self, x):
        return self.ln(self.layers(x + self.pos_embedding))


class TorchvisionLikeViT(nn.Module):
    """torchvision VisionTransformer's structure: class_token, encoder.layers[i] with ln_1,
    self_attention (nn.MultiheadAttention), ln_2, mlp; heads on the class token."""

    def __init__(self, dim=32, depth=5, heads=4, tokens=20):
        super().__init__()
        self.proj = nn.Linear(8, dim)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.encoder = TvEncoder(dim, depth, heads, tokens)
        self.heads = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.proj(x)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1)
        return self.heads(self.encoder(x)[:, 0])


# ---------------------------------------------------------------------------------------------
# Eager EViT-style re-implementation (SPEC section 6), independent of fisheradaptune.vit


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
    x = model.patch_embed(inp) + model.pos_embed if isinstance(model, TimmLikeViT) else None
    if isinstance(model, TimmLikeViT):
        prefix = [model.cls_token.expand(x.shape[0], -1, -1)]
        if model.dist_token is not None:
            prefix.append(model.dist_token.expand(x.shape[0], -1, -1))
        if model.reg_token is not None:
            prefix.append(model.reg_token.expand(x.shape[0], -1, -1))
        x = torch.cat(prefix + [x], 1)
    else:  # TinyViT
        x = model.patch_embed(inp)
        x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], 1) + model.pos_embed
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


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"img_size": 24, "patch": 4, "depth": 5, **kw}
    return TinyViT(**kw).eval(), torch.randn(3, 1, kw["img_size"], kw["img_size"])


def timm_like(seed=0, **kw):
    torch.manual_seed(seed)
    return TimmLikeViT(**kw).eval(), torch.randn(3, 19, 8)


def tv_like(seed=0):
    torch.manual_seed(seed)
    return TorchvisionLikeViT().eval(), torch.randn(3, 19, 8)


TOL = dict(rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Equal to the unpatched model at keep=1, restored exactly by unpatch


MODELS = {
    "tiny": lambda: tiny(),
    "timm_reg_qknorm_avg": lambda: timm_like(reg_tokens=2, qk_norm=True, global_pool="avg"),
    "timm_dist": lambda: timm_like(dist_token=True),
    "torchvision": lambda: tv_like(),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_keep_one_equals_unpatched_and_unpatch_restores(name):
    model, x = MODELS[name]()
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dicts = {n: dict(m.__dict__) for n, m in model.named_modules()}
    h = fat.vit.prune_merge(model, keep=1.0, layers=(1, 3))
    torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)
    h.remove()
    fat.vit.prune_merge(model, keep=0.5, layers=(0, 2))
    assert not torch.allclose(model(x), before)
    fat.vit.unpatch(model)
    assert torch.equal(model(x), before)
    for n, m in model.named_modules():
        assert m.__dict__.keys() == dicts[n].keys(), n
        assert len(m._forward_pre_hooks) == 0 and len(m._forward_hooks) == 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("name,kw", [
    ("tiny", {}), ("timm", {}), ("timm", {"reg_tokens": 2, "qk_norm": True}),
    ("timm", {"global_pool": "avg", "qk_norm": True}), ("timm", {"dist_token": True}),
])
def test_matches_evit_reimplementation_timm(name, kw, normalize):
    model, x = tiny() if name == "tiny" else timm_like(**kw)
    p = model.num_prefix_tokens
    layers, rho = (0, 2, 3), 0.6
    expected = evit_forward_timm(model, x, rho, layers, p, normalize)
    h = fat.vit.prune_merge(model, keep=rho, layers=layers, normalize=normalize)
    assert h.num_protected == p
    torch.testing.assert_close(model(x), expected, **TOL)


@pytest.mark.parametrize("normalize", [True, False])
def test_matches_evit_reimplementation_torchvision(normalize):
    model, x = tv_like()
    layers, rho = (1, 2, 4), 0.7
    expected = evit_forward_tv(model, x, rho, layers, normalize)
    fat.vit.prune_merge(model, keep=rho, layers=layers, normalize=normalize)
    torch.testing.assert_close(model(x), expected, **TOL)


def test_token_counts_and_sizes():
    model, x = tiny(img_size=32)  # 64 patches + cls
    h = fat.vit.prune_merge(model, keep=0.7, layers=(1, 3))
    seen = []
    for blk in model.blocks:
        blk.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    model(x)
    # 65 -> 1 + 45 + 1 = 47 -> 1 + ceil(0.7 * 46) + 1 = 35
    assert seen == [65, 65, 47, 47, 35]
    assert h.sizes.shape == (3, 35) and not h.sizes.requires_grad
    assert torch.equal(h.sizes.sum(1), torch.full((3,), 65.0))
    assert bool((h.sizes[:, :-1] >= 1).all())


def test_schedule():
    model, x = tiny(img_size=32)
    h = fat.vit.prune_merge(model, keep=lambda step: max(0.5, 1.0 - 0.1 * step), layers=(1,))
    assert h.keep_fraction == 1.0
    n_out = []
    model.blocks[2].register_forward_pre_hook(lambda m, a: n_out.append(a[0].shape[1]))
    for step in range(7):
        h.set_step(step)
        model(x)
    assert n_out == [65] + [1 + math.ceil((1.0 - 0.1 * s) * 64 - 1e-9) + 1 for s in range(1, 5)] + [34, 34]


def test_training_backward_and_detach_scores():
    model, x = tiny()
    model.train()
    grads = {}
    for detach in (False, True):
        model.zero_grad()
        h = fat.vit.prune_merge(model, keep=0.5, layers=(1, 3), detach_scores=detach)
        model(x).logsumexp(1).sum().backward()
        assert all(p.grad is not None for p in model.parameters())
        grads[detach] = model.blocks[1].attn.qkv.weight.grad.clone()
        h.remove()
    c = model.blocks[1].attn.qkv.weight.shape[1]
    # Without detach, the scores send gradient into block 1's K rows too.
    assert not torch.allclose(grads[False][c:2 * c], grads[True][c:2 * c])


@pytest.mark.parametrize("device", devices)
def test_autocast(device):
    model, x = tiny()
    model, x = model.to(device), x.to(device)
    fat.vit.prune_merge(model, keep=0.7, layers=(1, 3))
    ref = model(x)
    dtype = torch.bfloat16
    with torch.autocast(device, dtype=dtype):
        out = model(x)
    assert out.shape == ref.shape and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


def test_low_precision_model():
    model, x = tiny()
    fat.vit.prune_merge(model, keep=0.7, layers=(1, 3))
    ref = model(x)
    out = model.to(torch.bfloat16)(x.bfloat16())
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


def test_compile_aot_eager_train_and_eval():
    model, x = tiny()
    h = fat.vit.prune_merge(model, keep=0.6, layers=(1, 3))
    eager = model(x)
    eager_sizes = h.sizes
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager, rtol=1e-6, atol=1e-6)
    assert torch.equal(h.sizes, eager_sizes)
    model.train()
    xg = x.clone().requires_grad_(True)
    compiled(xg).sum().backward()
    g_compiled = xg.grad.clone()
    xg.grad = None
    model(xg).sum().backward()
    torch.testing.assert_close(g_compiled, xg.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compile_inductor_cpu():
    model, x = tiny(depth=3, dim=32)
    fat.vit.prune_merge(model, keep=0.6, layers=(1,))
    eager = model(x)
    torch.testing.assert_close(torch.compile(model)(x), eager, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad configuration


def test_bad_configuration():
    model, x = tiny()
    with pytest.raises(ValueError, match="'layers'"):
        fat.vit.prune_merge(model, layers=(1, 9))
    with pytest.raises(ValueError, match="'keep'"):
        fat.vit.prune_merge(model, keep=1.5, layers=(1,))
    with pytest.raises(TypeError, match="'keep'"):
        fat.vit.prune_merge(model, keep="half", layers=(1,))
    with pytest.raises(ValueError, match="'num_protected'"):
        fat.vit.prune_merge(model, num_protected=-1, layers=(1,))
    with pytest.raises(TypeError, match="'model'"):
        fat.vit.prune_merge(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="not patched"):
        fat.vit.unpatch(model)
    fat.vit.prune_merge(model, layers=(1,))
    with pytest.raises(ValueError, match="already patched"):
        fat.vit.prune_merge(model, layers=(2,))
    fat.vit.unpatch(model)
    bad, _ = timm_like()
    bad.global_pool = "max"
    with pytest.raises(ValueError, match="global_pool"):
        fat.vit.prune_merge(bad, layers=(1,))


def test_cls_attention_matches_full_attention():
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
# Real timm and torchvision models, wherever they import


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
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
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
    fat.vit.prune_merge(model, keep=0.6, layers=(1, 3))
    torch.testing.assert_close(model(x), expected, **TOL)
    fat.vit.unpatch(model)
    assert torch.equal(model(x), before)
