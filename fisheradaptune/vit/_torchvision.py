"""What the ViT hooks know of torchvision: ``VisionTransformer`` (``encoder.layers[i]`` =
``EncoderBlock`` with ``ln_1``, a batch-first ``nn.MultiheadAttention`` with a packed
``in_proj_weight``, ``dropout``, ``ln_2``, ``mlp``), one class token read by the head."""
from __future__ import annotations

import torch.nn.functional as F

from ._layout import QK, Layout, Prefix, packed_qk, refusal

_BLOCK_PARTS = ("ln_1", "self_attention", "dropout", "ln_2", "mlp")


class TorchvisionLayout(Layout):
    library = "torchvision"
    token_merge = True

    def blocks(self, enc):
        return list(enc.encoder.layers)

    def attention(self, block):
        return block.self_attention

    def prefix(self, enc):
        return Prefix(cls=1)

    def check(self, enc, api):
        for i, b in enumerate(self.blocks(enc)):
            mha = b.self_attention
            if not getattr(mha, "batch_first", False) or \
                    getattr(mha, "in_proj_weight", None) is None:
                raise refusal(api, "model", f"block {i}: expected torchvision's batch-first "
                              "nn.MultiheadAttention with a packed in_proj_weight")

    def qk(self, block):
        mha = block.self_attention
        wq, bq, wk, bk = packed_qk(mha.in_proj_weight, mha.in_proj_bias)
        return QK(block.ln_1, wq, bq, wk, bk, mha.num_heads,
                  (wq.shape[0] // mha.num_heads) ** -0.5)

    def full_tokens(self, enc):
        return int(enc.seq_length) if hasattr(enc, "seq_length") else None

    # -- token merging ------------------------------------------------------------------------

    def check_token_merge(self, blocks, api):
        for i, b in enumerate(blocks):
            if any(not hasattr(b, a) for a in _BLOCK_PARTS):
                raise refusal(api, "model", f"block {i} is not torchvision's EncoderBlock")

    def attend(self, block, x, bias):
        # nn.MultiheadAttention's own call would need the bias as a materialised
        # [B * heads, N, N] mask: recompute it from its packed projections with SDPA instead.
        mha = block.self_attention
        h = block.ln_1(x)
        b, n, c = h.shape
        qkv = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).reshape(b, n, 3, mha.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if bias is not None:
            bias = bias.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=mha.dropout if mha.training else 0.0)
        y = mha.out_proj(y.transpose(1, 2).reshape(b, n, c))
        return x + block.dropout(y), k.mean(1)

    def mlp(self, block, x):
        return x + block.mlp(block.ln_2(x))
