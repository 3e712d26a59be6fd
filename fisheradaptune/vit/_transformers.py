"""What the ViT hooks know of transformers: the ViT-style encoders (``ViTModel``, ``DeiTModel``,
``ASTModel``, ``ViTMSNModel``: ``embeddings`` with a class token and, for DeiT and AST, a
distillation token; ``layers[i]`` with ``layernorm_before``, ``attention.q_proj`` / ``k_proj``,
``dropout``, ``layernorm_after``, ``mlp``), DINOv2 (``encoder.layer[i]`` with ``norm1``, layer
scale, ``norm2``), the CLIP vision tower (``encoder.layers[i]`` with ``layer_norm1``,
``self_attn``, ``layer_norm2``), the attention implementations that can serve a changing token
count, heads that read the prefix tokens by position, and the two block halves token merging
runs (:meth:`attend`: the library's own attention module, so its eager or sdpa kernel, with the
``log(size)`` bias passed as its ``attention_mask``, the keys read from ``k_proj``'s output;
:meth:`mlp`)."""
from __future__ import annotations

import inspect

import torch
from torch import nn

from ._layout import QK, Layout, Prefix, refusal
from ._patch import OutputCapture

# Attention implementations whose layers get no mask when the model is called without one. The
# others (flex_attention) build a mask over the input tokens for every call, which no longer
# fits once a block has reduced them.
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


class TransformersViTLayout(Layout):
    """``enc`` is the encoder model (``ViTModel``, ``DeiTModel``, ``ASTModel``, ``ViTMSNModel``);
    a task model (``...ForImageClassification``) is served through it (the registry says which
    attribute holds it). Its heads read the prefix tokens by position (class token; class and
    distillation tokens for DeiT with teacher and AST), which are protected."""

    library = "transformers"
    token_merge = True
    # The block's parts the token-merge halves call: (pre-attention norm, attention, post-MLP
    # norm, MLP) and the residual branches' own modules.
    _norm1, _attn, _norm2 = "layernorm_before", "attention", "layernorm_after"
    _branch = ("dropout",)

    def blocks(self, enc):
        return list(enc.layers)

    def attention(self, block):
        return getattr(block, self._attn)

    def prefix(self, enc):
        emb = enc.embeddings
        return Prefix(int(getattr(emb, "cls_token", None) is not None),
                      int(getattr(emb, "distillation_token", None) is not None),
                      int(getattr(getattr(emb, "register_tokens", None), "shape", (0, 0))[1]))

    def check(self, enc, api):
        impl = getattr(getattr(enc, "config", None), "_attn_implementation", None)
        if impl not in ATTENTION_IMPLEMENTATIONS:
            raise refusal(api, "model", f"attention implementation {impl!r} is not supported: "
                          "it passes each layer a mask over the input tokens, which no longer "
                          "fits once tokens are reduced (expected one of "
                          f"{ATTENTION_IMPLEMENTATIONS}; see model.set_attn_implementation)")
        if api == "prune_merge" and not self.prefix(enc).cls:
            raise refusal(api, "model", f"{type(enc).__name__} has no class token, and "
                          "prune-merge scores tokens by the class token's attention")

    def qk(self, block):
        attn = block.attention
        return QK(block.layernorm_before, attn.q_proj.weight, attn.q_proj.bias,
                  attn.k_proj.weight, attn.k_proj.bias, int(attn.num_attention_heads),
                  float(attn.scaling))

    # -- token merging ------------------------------------------------------------------------

    def check_token_merge(self, blocks, api):
        parts = (self._norm1, self._attn, self._norm2, "mlp") + self._branch
        for i, b in enumerate(blocks):
            missing = [a for a in parts if not hasattr(b, a)]
            attn = getattr(b, self._attn, None)
            k_proj = getattr(attn, "k_proj", None)
            head_dim = getattr(attn, "head_dim", None)
            if missing or not isinstance(k_proj, nn.Linear) or not isinstance(head_dim, int) or \
                    head_dim <= 0 or k_proj.out_features % head_dim or \
                    "attention_mask" not in inspect.signature(attn.forward).parameters:
                raise refusal(api, "model", f"block {i} ({type(b).__name__}) lacks what token "
                              "merging calls (missing "
                              f"{missing or ['attention k_proj / head_dim / attention_mask']})")

    def prepare(self, handle, block):
        k_proj = self.attention(block).k_proj
        handle._set(k_proj, "forward", OutputCapture(k_proj, k_proj.__dict__.get("forward")))

    def attend(self, block, x, bias):
        attn = self.attention(block)
        capture = attn.k_proj.__dict__["forward"]
        # The library's attention (its eager or sdpa kernel): a float attention_mask is added to
        # the logits by both, broadcast over heads and queries.
        y, _ = attn(getattr(block, self._norm1)(x), attention_mask=bias)
        keys, capture.out = capture.out, None
        b, n, _ = keys.shape
        return x + self._attention_branch(block, y), keys.reshape(b, n, -1, attn.head_dim).mean(2)

    def mlp(self, block, x):
        return x + self._mlp_branch(block, block.mlp(getattr(block, self._norm2)(x)))

    def checkpoint(self, block):
        # transformers' GradientCheckpointingLayer checkpoints its forward under these
        # conditions, with the function gradient_checkpointing_enable set on the layer
        if getattr(block, "gradient_checkpointing", False) and block.training and \
                torch.is_grad_enabled():
            return block._gradient_checkpointing_func
        return None

    def _attention_branch(self, block, y):
        return block.dropout(y)

    def _mlp_branch(self, block, y):
        return block.dropout(y)


class TransformersDinov2Layout(TransformersViTLayout):
    """``Dinov2Model`` / ``Dinov2WithRegistersModel``: ``encoder.layer[i]`` with ``norm1``,
    ``attention.q_proj`` / ``k_proj``, layer scale; class token (and register tokens), the
    pooler reads the class token. (Their image-classification heads average the patch tokens
    unweighted, so they are not registered.)"""

    _norm1, _norm2 = "norm1", "norm2"
    _branch = ("layer_scale1", "layer_scale2", "drop_path")

    def blocks(self, enc):
        return list(enc.encoder.layer)

    def qk(self, block):
        attn = block.attention
        return QK(block.norm1, attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight,
                  attn.k_proj.bias, int(attn.num_attention_heads), float(attn.scaling))

    def _attention_branch(self, block, y):
        return block.drop_path(block.layer_scale1(y))

    def _mlp_branch(self, block, y):
        return block.drop_path(block.layer_scale2(y))


class TransformersCLIPVisionLayout(TransformersViTLayout):
    """``CLIPVisionModel`` (and ``CLIPVisionModelWithProjection`` through its
    ``vision_model``): ``encoder.layers[i]`` with ``layer_norm1``, ``self_attn``
    (``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj``), ``layer_norm2``, ``mlp``, no dropout
    on the residual branches; one class token (``embeddings.class_embedding``), which the pooler
    reads (``post_layernorm`` of token 0). Served for token merging only."""

    _norm1, _attn, _norm2 = "layer_norm1", "self_attn", "layer_norm2"
    _branch = ()

    def blocks(self, enc):
        return list(enc.encoder.layers)

    def prefix(self, enc):
        return Prefix(int(getattr(enc.embeddings, "class_embedding", None) is not None), 0, 0)

    def qk(self, block):
        attn = block.self_attn
        return QK(block.layer_norm1, attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight,
                  attn.k_proj.bias, int(attn.num_heads), float(attn.scale))

    def _attention_branch(self, block, y):
        return y

    def _mlp_branch(self, block, y):
        return y
