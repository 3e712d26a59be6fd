"""What the ViT hooks know of transformers: the ViT-style encoders (``ViTModel``, ``DeiTModel``,
``ASTModel``: ``embeddings`` with a class token and, for DeiT and AST, a distillation token;
``layers[i]`` with ``layernorm_before``, ``attention.q_proj`` / ``k_proj``, ``layernorm_after``,
``mlp``), the attention implementations that can serve a changing token count, and heads that
read the prefix tokens by position. Token merging is not provided here yet (``token_merge =
False``): it needs :meth:`attend` / :meth:`mlp` for this layout."""
from __future__ import annotations

from ._layout import QK, Layout, Prefix, refusal

# Attention implementations whose layers get no mask when the model is called without one. The
# others (flex_attention) build a mask over the input tokens for every call, which no longer
# fits once a block has reduced them.
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


class TransformersViTLayout(Layout):
    """``enc`` is the encoder model (``ViTModel``, ``DeiTModel``, ``ASTModel``); a task model
    (``...ForImageClassification``) is served through it (the registry says which attribute
    holds it). Its heads read the prefix tokens by position (class token; class and
    distillation tokens for DeiT with teacher and AST), which are protected."""

    library = "transformers"

    def blocks(self, enc):
        return list(enc.layers)

    def attention(self, block):
        return block.attention

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


class TransformersDinov2Layout(TransformersViTLayout):
    """``Dinov2Model`` / ``Dinov2WithRegistersModel``: ``encoder.layer[i]`` with ``norm1``,
    ``attention.q_proj`` / ``k_proj``, layer scale; class token (and register tokens), the
    pooler reads the class token. (Their image-classification heads average the patch tokens
    unweighted, so they are not registered.)"""

    def blocks(self, enc):
        return list(enc.encoder.layer)

    def qk(self, block):
        attn = block.attention
        return QK(block.norm1, attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight,
                  attn.k_proj.bias, int(attn.num_attention_heads), float(attn.scaling))
