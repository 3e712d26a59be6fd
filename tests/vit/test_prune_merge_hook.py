"""fisheradaptune.vit.prune_merge / unpatch: the hook itself. Equal to the unpatched model at
keep=1 and restored exactly by unpatch, token counts and sizes, keep schedules, training,
autocast and low precision, torch.compile, and bad configuration refused. (Against an EViT
re-implementation: test_prune_merge_evit.py.)"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fisheradaptune as fat
from helpers import devices


# ---------------------------------------------------------------------------------------------
# Equal to the unpatched model at keep=1, restored exactly by unpatch


def test_keep_one_equals_unpatched_and_unpatch_restores(standin):
    model, x = standin
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


def test_token_counts_and_sizes(tiny):
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


def test_schedule(tiny):
    model, x = tiny(img_size=32)
    h = fat.vit.prune_merge(model, keep=lambda step: max(0.5, 1.0 - 0.1 * step), layers=(1,))
    assert h.keep_fraction == 1.0
    n_out = []
    model.blocks[2].register_forward_pre_hook(lambda m, a: n_out.append(a[0].shape[1]))
    for step in range(7):
        h.set_step(step)
        model(x)
    assert n_out == [65] + [1 + math.ceil((1.0 - 0.1 * s) * 64 - 1e-9) + 1 for s in range(1, 5)] + [34, 34]


def test_training_backward_and_detach_scores(tiny):
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
def test_autocast(tiny, device):
    model, x = tiny()
    model, x = model.to(device), x.to(device)
    fat.vit.prune_merge(model, keep=0.7, layers=(1, 3))
    ref = model(x)
    dtype = torch.bfloat16
    with torch.autocast(device, dtype=dtype):
        out = model(x)
    assert out.shape == ref.shape and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


def test_low_precision_model(tiny):
    model, x = tiny()
    fat.vit.prune_merge(model, keep=0.7, layers=(1, 3))
    ref = model(x)
    out = model.to(torch.bfloat16)(x.bfloat16())
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


def test_compile_aot_eager_train_and_eval(tiny):
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
def test_compile_inductor_cpu(tiny):
    model, x = tiny(depth=3, dim=32)
    fat.vit.prune_merge(model, keep=0.6, layers=(1,))
    eager = model(x)
    torch.testing.assert_close(torch.compile(model)(x), eager, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad configuration


def test_bad_configuration(tiny, timm_like):
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
