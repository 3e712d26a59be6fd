"""A small Vision Transformer with timm's module names, for examples, demos and tests.

Parameter names follow timm's ``VisionTransformer`` (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.{i}.norm1``, ``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``,
``blocks.{i}.norm2``, ``blocks.{i}.mlp.fc1``, ``blocks.{i}.mlp.fc2``, ``norm``, ``head``), so
group layouts, fused-qkv splitting and the ViT hooks (``prune_merge``, ``token_merge``) treat it
like a timm model. Attention uses ``F.scaled_dot_product_attention`` (and takes timm's
``attn_mask``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyViT"]


class _PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.num_patches = (img_size // patch) ** 2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        # timm's Block has LayerScale and DropPath here; identities keep its layout (and so
        # fisheradaptune.vit.token_merge's view of it) without parameters.
        self.ls1 = self.drop_path1 = nn.Identity()
        self.ls2 = self.drop_path2 = nn.Identity()

    def forward(self, x, attn_mask=None):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class TinyViT(nn.Module):
    """ViT with a class token and a linear head (timm naming).

    Args:
        img_size, patch, in_chans: input geometry (``img_size`` divisible by ``patch``).
        dim, depth, heads, mlp_ratio: transformer width, number of blocks, heads, MLP ratio.
        num_classes: size of the head.
    """

    def __init__(self, img_size: int = 16, patch: int = 4, in_chans: int = 1, dim: int = 64,
                 depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0, num_classes: int = 10):
        super().__init__()
        if img_size % patch:
            raise ValueError(f"argument 'img_size': {img_size} is not divisible by patch {patch}")
        if dim % heads:
            raise ValueError(f"argument 'dim': {dim} is not divisible by heads {heads}")
        self.patch_embed = _PatchEmbed(img_size, patch, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.num_prefix_tokens = 1
        self.global_pool = "token"

    def forward_features(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x):
        return self.head(self.forward_features(x)[:, 0])

    def reset_head(self, num_classes: int) -> None:
        """A fresh head for a new task (same device and dtype)."""
        old = self.head
        self.head = nn.Linear(old.in_features, num_classes).to(old.weight.device, old.weight.dtype)
