"""What the ViT hooks know of timm: the ``VisionTransformer`` layout (``blocks[i]`` = pre-norm
``Block`` with ``norm1``, ``attn`` (packed ``qkv``, optional ``q_norm`` / ``k_norm``), ``ls1``,
``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``), its prefix tokens (class,
distillation, register), its pools, and the two halves of a block that token merging runs.
The demo's TinyViT has the same layout (fisheradaptune/demo/models.py)."""
from __future__ import annotations

import inspect

from torch import nn

from ._layout import QK, Layout, Prefix, packed_qk, refusal
from ._patch import OutputCapture

_SUPPORTED_POOLS = ("token", "avg", "")
_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


class TimmLayout(Layout):
    """timm ``VisionTransformer``: class token optional, register tokens, ``global_pool``
    ``"token"``, ``"avg"`` (size-weighted) or ``""``."""

    library = "timm"
    token_merge = True

    def blocks(self, enc):
        return list(enc.blocks)

    def attention(self, block):
        return block.attn

    def prefix(self, enc):
        cls = int(getattr(enc, "cls_token", None) is not None)
        dist = int(getattr(enc, "dist_token", None) is not None)
        return Prefix(cls, dist, int(getattr(enc, "num_reg_tokens", 0) or 0))

    def check(self, enc, api):
        prefix = self.prefix(enc)
        declared = getattr(enc, "num_prefix_tokens", prefix.count)
        if declared != prefix.count:
            raise refusal(api, "model", f"{type(enc).__name__} declares num_prefix_tokens="
                          f"{declared} but has {prefix.describe()}; the protected tokens must be "
                          "exactly the model's prefix tokens")
        pool = getattr(enc, "global_pool", "token")
        if getattr(enc, "attn_pool", None) is not None or pool not in _SUPPORTED_POOLS:
            raise refusal(api, "model", f"global_pool {pool!r} is not supported (expected one "
                          f"of {_SUPPORTED_POOLS})")
        if api == "prune_merge" and not prefix.cls:
            # Scoring needs the class token's attention row; token 0 of such a model is a
            # patch or a register, which must neither score the others nor be fused away.
            raise refusal(api, "model", "it has no class token (class_token=False, a *_gap_* "
                          "or register-only model), and prune-merge scores tokens by the class "
                          "token's attention. Use a model with a class token")

    def qk(self, block):
        attn = block.attn
        wq, bq, wk, bk = packed_qk(attn.qkv.weight, attn.qkv.bias)
        heads = attn.num_heads
        return QK(block.norm1, wq, bq, wk, bk, heads,
                  float(getattr(attn, "scale", (wq.shape[0] // heads) ** -0.5)),
                  getattr(attn, "q_norm", None), getattr(attn, "k_norm", None))

    def pool_start(self, enc):
        if getattr(enc, "global_pool", "token") != "avg":
            return None
        return 0 if getattr(enc, "pool_include_prefix", False) else self.prefix(enc).count

    def head(self, enc):
        return (enc, "forward_head")

    def tail(self, enc):
        return (enc.norm,)

    def full_tokens(self, enc):
        pe = getattr(enc, "patch_embed", None)
        n = getattr(pe, "num_patches", None)
        if n is None or getattr(enc, "dynamic_img_size", False) or \
                getattr(pe, "dynamic_img_size", False):
            return None
        return int(n) + self.prefix(enc).count

    # -- token merging ------------------------------------------------------------------------

    def check_token_merge(self, blocks, api):
        for i, b in enumerate(blocks):
            missing = [a for a in _BLOCK_PARTS if not hasattr(b, a)]
            attn = getattr(b, "attn", None)
            qkv = getattr(attn, "qkv", None)
            if missing or not isinstance(qkv, nn.Linear) or \
                    "attn_mask" not in inspect.signature(attn.forward).parameters:
                raise refusal(api, "model", f"block {i} ({type(b).__name__}) is not timm's "
                              "pre-norm Block with an Attention that takes attn_mask (missing "
                              f"{missing or ['attn.qkv / attn_mask']})")
            head_dim = getattr(attn, "head_dim", qkv.in_features // attn.num_heads)
            if qkv.out_features != 3 * attn.num_heads * head_dim:
                raise refusal(api, "model", f"block {i}: attn.qkv does not pack q, k and v of "
                              f"{attn.num_heads} heads")

    def prepare(self, handle, block):
        qkv = block.attn.qkv
        handle._set(qkv, "forward", OutputCapture(qkv, qkv.__dict__.get("forward")))

    def attend(self, block, x, bias):
        attn = block.attn
        capture = attn.qkv.__dict__["forward"]
        y = attn(block.norm1(x), attn_mask=bias)
        # Read at once, within this call: no other forward can run in between on this thread.
        qkv, capture.out = capture.out, None
        b, n, _ = qkv.shape
        k = qkv.reshape(b, n, 3, attn.num_heads, -1)[:, :, 1]
        return x + block.drop_path1(block.ls1(y)), k.mean(2)

    def mlp(self, block, x):
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class TimmDistilledLayout(TimmLayout):
    """timm ``VisionTransformerDistilled`` (DeiT distilled): class and distillation tokens, and a
    head that reads both by position (whatever ``global_pool`` says)."""

    def check(self, enc, api):
        super().check(enc, api)
        if not self.prefix(enc).dist:
            raise refusal(api, "model", f"{type(enc).__name__} has no distillation token")

    def pool_start(self, enc):
        return None
