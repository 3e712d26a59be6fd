"""fisheradaptune.vit: the token prune-merge hook (prune_merge, unpatch, cls_attention) and TR-PTS
sparse insertion (sparse_layers).

timm and torchvision are not installable on the CPU test machine (timm needs torchvision, which
has no CPU wheel there), so the stand-ins here, with those libraries' module names and
structure, are tested always and the real models wherever they import (test_prune_merge_evit.py,
test_prune_merge_real_models.py in the integration stage).

Fixtures: ``tiny``, ``timm_like``, ``tv_like`` build ``(model in eval mode, input)`` from a seed;
``standin`` is each supported structure in turn.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisheradaptune as fat
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
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


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
        self.drop_path1 = nn.Identity()
        self.drop_path2 = nn.Identity()

    def forward(self, x, attn_mask=None):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


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
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, input):
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x) + input
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


# The hooks patch registered classes only (fisheradaptune.vit.families()): the stand-ins copy
# timm's and torchvision's layouts, so they are registered with those layouts.
_STANDIN_FAMILIES = [
    fat.vit.Family("test stand-in (timm layout)", "timm", {TimmLikeViT: None}, (TimmBlock,),
                   (TimmAttention,), frozenset({"prune_merge", "token_merge"}),
                   "class + distillation + register tokens"),
    fat.vit.Family("test stand-in (torchvision layout)", "torchvision", {TorchvisionLikeViT: None},
                   (TvEncoderBlock,), (nn.MultiheadAttention,),
                   frozenset({"prune_merge", "token_merge"}), "class token"),
]
for _f in _STANDIN_FAMILIES:
    if _f.name not in {g.name for g in fat.vit.families()}:
        fat.vit.register_family(_f)


# ---------------------------------------------------------------------------------------------
# Builders


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"img_size": 24, "patch": 4, "depth": 5, **kw}
    return TinyViT(**kw).eval(), torch.randn(3, 1, kw["img_size"], kw["img_size"])


def _timm_like(seed=0, **kw):
    torch.manual_seed(seed)
    return TimmLikeViT(**kw).eval(), torch.randn(3, 19, 8)


def _tv_like(seed=0):
    torch.manual_seed(seed)
    return TorchvisionLikeViT().eval(), torch.randn(3, 19, 8)


@pytest.fixture
def tiny():
    """``tiny(seed=0, **kw)``: the demo's TinyViT (24 x 24 images, patch 4, depth 5) and a batch
    of 3 images."""
    return _tiny


@pytest.fixture
def timm_like():
    """``timm_like(seed=0, **kw)``: a :class:`TimmLikeViT` and a batch of 3 token sequences."""
    return _timm_like


@pytest.fixture
def tv_like():
    """``tv_like(seed=0)``: a :class:`TorchvisionLikeViT` and a batch of 3 token sequences."""
    return _tv_like


STANDINS = {
    "tiny": lambda: _tiny(),
    "timm_reg_qknorm_avg": lambda: _timm_like(reg_tokens=2, qk_norm=True, global_pool="avg"),
    "timm_dist": lambda: _timm_like(dist_token=True),
    "torchvision": lambda: _tv_like(),
}


@pytest.fixture(params=list(STANDINS))
def standin(request):
    """``(model, input)`` for each structure the hook supports: the demo's TinyViT, timm's with
    register tokens, qk-norm and avg pooling, timm's with a distillation token, torchvision's."""
    return STANDINS[request.param]()
