"""Per-forward state of the ViT hooks (docs/methods.md sections 6-7): the token sizes travel with
the token tensor they describe, so separate forwards, gradient-checkpointing recomputations
(reentrant and not) and head calls interleave without colliding. Every interleaving is checked
with exact equality against the same computation run alone. Also: attention masks and
``is_causal`` are refused by name in both hooks. Stand-ins always; real timm where it imports."""
from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint as cp
from torch import nn

import fisheradaptune as fat

HOOKS = {
    "token_merge": lambda m: fat.vit.token_merge(m, r=3),
    "prune_merge": lambda m: fat.vit.prune_merge(m, keep=0.5, layers=(0, 1, 3)),
}


def _pair(seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 19, 8, generator=g), torch.randn(3, 19, 8, generator=g)


def _grads(model, loss_fn, params=None):
    params = dict(model.named_parameters()) if params is None else params
    for p in params.values():
        p.grad = None
    loss_fn().backward()
    return {n: p.grad.clone() for n, p in params.items() if p.grad is not None}


@pytest.mark.parametrize("hook", list(HOOKS))
def test_two_forwards_then_the_first_head_pools_its_own_sizes(timm_like, hook):
    model, _ = timm_like(global_pool="avg")
    x1, x2 = _pair()
    h = HOOKS[hook](model)
    with torch.no_grad():
        ref1 = model(x1)
        s1 = h.sizes
        ref2 = model(x2)
        assert not torch.equal(s1, h.sizes)  # the two inputs do pool differently
        f1 = model.forward_features(x1)
        f2 = model.forward_features(x2)
        assert torch.equal(model.forward_head(f1), ref1)  # before: off by up to 3.3
        assert torch.equal(model.forward_head(f2), ref2)
        assert torch.equal(model.forward_head(f1.detach()), ref1)  # an alias keeps its sizes


@pytest.mark.parametrize("hook", list(HOOKS))
def test_a_copy_of_reduced_tokens_is_refused_not_pooled_unweighted(timm_like, hook):
    model, x = timm_like(global_pool="avg")
    HOOKS[hook](model)
    with torch.no_grad():
        f = model.forward_features(x)
        with pytest.raises(RuntimeError, match=rf"vit.{hook}: TimmLikeViT.forward_head received "
                                               r"tokens of shape .* no forward of this patched"):
            model.forward_head(f.clone())
        tokens = model.blocks[:2](torch.randn(3, 20, 32))  # reduced by blocks 0 and 1
        with pytest.raises(RuntimeError, match=rf"vit.{hook}: block 2 received \d+ tokens that "
                                               r"no forward"):
            model.blocks[2](tokens.clone())


def test_an_unreduced_copy_pools_as_the_unpatched_model(timm_like):
    model, x = timm_like(global_pool="avg")
    with torch.no_grad():
        ref = model(x)
        fat.vit.prune_merge(model, keep=1.0, layers=(1, 2))
        f = model.forward_features(x)
        assert torch.equal(model.forward_head(f.clone()), ref)


class _Checkpointed(nn.Module):
    """A block run under activation checkpointing (the block is held outside the module tree;
    its parameters are reached through the list above)."""

    def __init__(self, block, reentrant):
        super().__init__()
        self.inner, self.reentrant = [block], reentrant

    def forward(self, x):
        return cp.checkpoint(self.inner[0], x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("hook", list(HOOKS))
def test_two_checkpointed_forwards_in_one_loss(timm_like, hook, reentrant):
    model, _ = timm_like(global_pool="avg")
    x1, x2 = _pair()
    HOOKS[hook](model)
    out1, out2 = model(x1), model(x2)
    params = dict(model.named_parameters())
    ref = _grads(model, lambda: (model(x1) + model(x2)).square().sum(), params)
    blocks = list(model.blocks)
    model.blocks = nn.Sequential(*[_Checkpointed(b, reentrant) for b in blocks])
    try:
        # the recomputation of x1's blocks runs after x2's forward: it must see x1's sizes
        got = _grads(model, lambda: (model(x1) + model(x2)).square().sum(), params)
        assert torch.equal(model(x1), out1) and torch.equal(model(x2), out2)
    finally:
        model.blocks = nn.Sequential(*blocks)
    assert got.keys() == ref.keys()
    for n in ref:
        if reentrant and hook == "prune_merge":
            # reentrant recomputation adds the scores' gradient into a block's input in another
            # order: equal to rounding (every other case is bitwise)
            torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-7, msg=n)
        else:
            assert torch.equal(got[n], ref[n]), n


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("hook", list(HOOKS))
def test_checkpoint_sequential_with_multi_block_segments(timm_like, hook, reentrant):
    model, _ = timm_like(depth=6)
    HOOKS[hook](model)
    tokens = torch.randn(3, 20, 32, generator=torch.Generator().manual_seed(3))
    t1 = tokens.clone().requires_grad_(True)
    ref = model.blocks(t1)
    ref.square().sum().backward()
    t2 = tokens.clone().requires_grad_(True)
    out = cp.checkpoint_sequential(model.blocks, 2, t2, use_reentrant=reentrant)  # 3 blocks each
    assert torch.equal(out, ref)
    out.square().sum().backward()
    assert torch.equal(t2.grad, t1.grad)


@pytest.mark.parametrize("hook", list(HOOKS))
def test_the_state_dies_with_its_tensors(timm_like, hook):
    model, x = timm_like(global_pool="avg")
    h = HOOKS[hook](model)
    with torch.no_grad():
        for _ in range(200):
            model(x)
    assert len(h._states) <= 2 * len(model.blocks) + 2  # only what a live tensor holds
    assert len(h._states._map) <= 2 * 64  # expired entries are swept as new ones come in


@pytest.mark.parametrize("hook", list(HOOKS))
def test_masks_and_is_causal_are_refused_by_name(timm_like, hook):
    model, _ = timm_like()
    HOOKS[hook](model)
    tokens = torch.randn(3, 20, 32)
    with pytest.raises(ValueError, match=rf"vit.{hook}: a patched block received an attention "
                                         "mask"):
        model.blocks[1](tokens, attn_mask=torch.zeros(20, 20))
    with pytest.raises(ValueError, match=rf"vit.{hook}: a patched block received "
                                         "is_causal=True"):
        model.blocks[1](tokens, is_causal=True)


# ---------------------------------------------------------------------------------------------
# Real timm (integration stage)


def _real(**kw):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=4, num_classes=7, depth=4, **kw).eval()
    nn.init.normal_(model.head.weight, std=0.2)
    nn.init.normal_(model.head.bias, std=0.2)
    return model


REAL_HOOKS = {
    "token_merge": lambda m: fat.vit.token_merge(m, r=8),
    "prune_merge": lambda m: fat.vit.prune_merge(m, keep=0.5, layers=(0, 1, 2)),
}


@pytest.mark.parametrize("hook", list(REAL_HOOKS))
def test_real_timm_avg_pool_interleaved_head(hook):
    model = _real(global_pool="avg")
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    REAL_HOOKS[hook](model)
    with torch.no_grad():
        ref1, ref2 = model(x1), model(x2)
        f1 = model.forward_features(x1)
        f2 = model.forward_features(x2)
        assert torch.equal(model.forward_head(f1), ref1)
        assert torch.equal(model.forward_head(f2), ref2)
        with pytest.raises(RuntimeError, match="forward_head received"):
            model.forward_head(f1.clone())


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("hook", list(REAL_HOOKS))
def test_real_timm_grad_checkpointing_two_forwards(hook, reentrant, monkeypatch):
    model = _real(global_pool="avg")
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    REAL_HOOKS[hook](model)
    ref = _grads(model, lambda: (model(x1) + model(x2)).square().sum())
    original = cp.checkpoint
    monkeypatch.setattr(cp, "checkpoint",
                        lambda fn, *a, **k: original(fn, *a, **{**k, "use_reentrant": reentrant}))
    model.set_grad_checkpointing(True)
    got = _grads(model, lambda: (model(x1) + model(x2)).square().sum())  # before: failed
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("hook", list(REAL_HOOKS))
def test_real_timm_is_causal_is_refused(hook):
    model = _real()
    x = torch.randn(2, 3, 32, 32)
    model(x, is_causal=True)  # unpatched, timm takes it
    REAL_HOOKS[hook](model)
    with pytest.raises(ValueError, match=rf"vit.{hook}: a patched block received is_causal=True"):
        model(x, is_causal=True)
