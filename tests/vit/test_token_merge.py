"""fisheradaptune.vit.token_merge (ToMe): against an eager forward written here from the method's
description (docs/methods.md section 7) on the timm- and torchvision-structured stand-ins
always, and on real timm and torchvision models where they import (the integration stage);
token counts, sizes, schedules, unpatch, deepcopy, torch.compile, autocast, gradient
checkpointing, and the refusals."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisheradaptune as fat
from fisheradaptune import reference


# ---------------------------------------------------------------------------------------------
# The eager ToMe forward, from the description: per block, attention with log(size) added to
# every key's logits, residual, bipartite merge of r tokens on the head-averaged keys (the
# float64 reference op), MLP on the merged tokens; size-weighted average pooling at the end.


def _attention(h, w, b, heads, q_norm, k_norm, sizes):
    bsz, n, c = h.shape
    q, k, v = F.linear(h, w, b).reshape(bsz, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    metric = k.mean(1)  # the projected keys, averaged over heads
    q, k = q_norm(q), k_norm(k)
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if sizes is not None:
        logits = logits + sizes.log()[:, None, None, :]
    y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(bsz, n, c)
    return y, metric


def _merge(x, metric, r, p, sizes):
    r = min(r, (x.shape[1] - p) // 2)
    if r == 0:
        return x, sizes
    x, sizes, _ = reference.bipartite_merge(x, metric, r, num_protected=p, sizes=sizes)
    return x, sizes


def eager_timm(model, images, r, p, prop=True):
    inputs = {}
    h = model.blocks[0].register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a[0]))
    with torch.no_grad():
        model(images)
    h.remove()
    x, sizes = inputs["x"], None
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        ident = nn.Identity()
        y, metric = _attention(blk.norm1(x), a.qkv.weight, a.qkv.bias, a.num_heads,
                               getattr(a, "q_norm", ident), getattr(a, "k_norm", ident),
                               sizes if prop else None)
        x = x + blk.ls1(a.proj(y))
        x, sizes = _merge(x, metric, r[i], p, sizes)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    x = model.norm(x)
    if getattr(model, "global_pool", "token") == "avg":
        start = model.num_prefix_tokens
        s = (sizes if sizes is not None else torch.ones(x.shape[:2]))[:, start:, None]
        pooled = (x[:, start:] * s).sum(1) / s.sum(1)
        return model.head(model.fc_norm(pooled)), sizes
    return model.head(x[:, 0]), sizes


def eager_torchvision(model, images, r, prop=True):
    inputs = {}
    layers = model.encoder.layers
    h = layers[0].register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a[0]))
    with torch.no_grad():
        model(images)
    h.remove()
    x, sizes = inputs["x"], None
    ident = nn.Identity()
    for i, blk in enumerate(layers):
        mha = blk.self_attention
        y, metric = _attention(blk.ln_1(x), mha.in_proj_weight, mha.in_proj_bias, mha.num_heads,
                               ident, ident, sizes if prop else None)
        x = x + mha.out_proj(y)
        x, sizes = _merge(x, metric, r[i], 1, sizes)
        x = x + blk.mlp(blk.ln_2(x))
    return model.heads(model.encoder.ln(x)[:, 0]), sizes


def _token_counts(blocks):
    """Forward pre-hooks recording the token count entering each block."""
    counts, hooks = [], []
    for blk in blocks:
        hooks.append(blk.register_forward_pre_hook(lambda m, a: counts.append(a[0].shape[1])))
    return counts, hooks


# ---------------------------------------------------------------------------------------------
# Stand-ins (always)


TIMM_VARIANTS = {
    "cls": {},
    "reg_qknorm_avg": dict(reg_tokens=2, qk_norm=True, global_pool="avg"),
    "dist": dict(dist_token=True),
}


def test_demo_tinyvit_equals_the_eager_forward(tiny):
    model, x = tiny(img_size=32)
    handle = fat.vit.token_merge(model, r=8)
    with torch.no_grad():
        out = model(x)
    expected, sizes = eager_timm(model, x, handle.r, 1)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert handle.sizes.shape == (3, 65 - 5 * 8)


@pytest.mark.parametrize("variant", list(TIMM_VARIANTS))
@pytest.mark.parametrize("prop", [True, False])
def test_timm_standin_equals_the_eager_forward(timm_like, variant, prop):
    model, x = timm_like(**TIMM_VARIANTS[variant])
    p = model.num_prefix_tokens
    handle = fat.vit.token_merge(model, r=3, proportional_attention=prop)
    counts, hooks = _token_counts(model.blocks)
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    expected, sizes = eager_timm(model, x, handle.r, p, prop)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(handle.sizes, sizes)
    n0 = 19 + p
    # r = 3 per block, until fewer than 2 * 3 mergeable tokens are left.
    want, n = [], n0
    for _ in model.blocks:
        want.append(n)
        n -= min(3, (n - p) // 2)
    assert counts == want and handle.sizes.shape == (3, n)
    assert torch.equal(handle.sizes.sum(1), torch.full((3,), float(n0)))


def test_torchvision_standin_equals_the_eager_forward(tv_like):
    model, x = tv_like()
    handle = fat.vit.token_merge(model, r=[2, 4, 0, 3, 1])
    with torch.no_grad():
        out = model(x)
    expected, sizes = eager_torchvision(model, x, handle.r)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(handle.sizes, sizes)
    assert handle.layers == (0, 1, 3, 4)
    assert handle.sizes.shape == (3, 20 - 10)


@pytest.mark.parametrize("which", ["timm", "torchvision"])
def test_r_zero_is_the_unpatched_model_and_unpatch_restores_bitwise(timm_like, tv_like, which):
    model, x = timm_like(global_pool="avg") if which == "timm" else tv_like()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
        fat.vit.token_merge(model, r=0)
        assert torch.equal(model(x), ref)
        fat.vit.unpatch(model)
        handle = fat.vit.token_merge(model, r=4)
        assert not torch.allclose(model(x), ref)  # merging changes the output
        handle.remove()
        assert torch.equal(model(x), ref)
    assert fat.vit.handle_of(model) is None
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    blocks = model.blocks if which == "timm" else model.encoder.layers
    assert all("forward" not in b.__dict__ for b in blocks)


def test_schedules_and_layers(timm_like):
    model, _ = timm_like(depth=5)
    assert fat.vit.token_merge(model, r=4).r == (4, 4, 4, 4, 4)
    fat.vit.unpatch(model)
    h = fat.vit.token_merge(model, r=4, schedule="decreasing")
    assert h.r == (8, 6, 4, 2, 0) and sum(h.r) == 20 and h.layers == (0, 1, 2, 3)
    fat.vit.unpatch(model)
    h = fat.vit.token_merge(model, r=2, layers=(1, 3))
    assert h.r == (0, 2, 0, 2, 0) and h.layers == (1, 3)
    fat.vit.unpatch(model)


def test_decreasing_schedule_total_is_exactly_r_times_depth():
    from fisheradaptune.vit._token_merge import _per_block
    # depth 13, r = 9 merged 116 tokens instead of 117 before the rounding was distributed
    assert sum(_per_block(9, 13, None, "decreasing")) == 117
    for depth in range(1, 25):
        for r in range(25):
            got = _per_block(r, depth, None, "decreasing")
            assert sum(got) == r * depth, (depth, r)
            if depth == 1:
                assert got == (r,)
                continue
            ramp = [2 * r * (1 - j / (depth - 1)) for j in range(depth)]
            assert all(abs(g - v) <= 1 for g, v in zip(got, ramp)), (depth, r, got)
            assert got[-1] == 0 and all(a >= b for a, b in zip(got, got[1:])), (depth, r, got)
    # over a subset of blocks: the same total over the chosen ones, 0 elsewhere
    got = _per_block(5, 12, (2, 3, 5, 7, 11), "decreasing")
    assert sum(got) == 25 and [got[i] for i in (0, 1, 4, 6, 8, 9, 10)] == [0] * 7


def test_layers_subset_equals_the_eager_forward(timm_like):
    model, x = timm_like()
    h = fat.vit.token_merge(model, r=4, layers=(1, 3))
    with torch.no_grad():
        out = model(x)
    assert "forward" not in model.blocks[0].__dict__  # before the first merge: untouched
    expected, _ = eager_timm(model, x, h.r, 1)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_record_maps_every_input_token_to_its_final_row(timm_like):
    model, x = timm_like()
    h = fat.vit.token_merge(model, r=3)
    h.record = True
    with torch.no_grad():
        model(x)
    rows = h.patch_rows
    assert rows.shape == (3, 20) and rows.dtype == torch.int64
    assert torch.equal(rows[:, 0], torch.zeros(3, dtype=torch.int64))  # the class token
    final = h.sizes.shape[1]
    for b in range(3):  # every final row's size is the number of input tokens mapped to it
        counts = torch.bincount(rows[b], minlength=final).float()
        assert torch.equal(counts, h.sizes[b])


def test_training_backward_and_deepcopy(timm_like):
    model, x = timm_like(global_pool="avg")
    model.train()
    h = fat.vit.token_merge(model, r=3)
    model(x).square().sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    twin = copy.deepcopy(model)
    th = fat.vit.handle_of(twin)
    assert th is not h and th.model is twin and th.r == h.r
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
        th.remove()  # the copy's patch is its own
        assert fat.vit.handle_of(model) is h
        assert not torch.equal(twin(x), model(x))


def test_torch_save_of_a_patched_model(tiny):
    model, x = tiny(img_size=32)  # an importable class (the stand-ins live in a conftest)
    fat.vit.token_merge(model, r=8)
    buf = io.BytesIO()
    torch.save(model, buf)  # the patched methods pickle
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert fat.vit.handle_of(loaded).model is loaded


def test_torch_compile_matches_eager(tiny):
    # The demo's TinyViT, not a conftest stand-in: the token-state lookups are graph breaks,
    # and dynamo's guards on the resumed frames look globals up by module name, which
    # "conftest" does not identify when several test folders have one.
    model, x = tiny(img_size=32)
    fat.vit.token_merge(model, r=8)
    with torch.no_grad():
        ref = model(x)
        compiled = torch.compile(model)
        torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-6)


def test_autocast_bfloat16(timm_like):
    model, x = timm_like()
    h = fat.vit.token_merge(model, r=3)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert h.sizes.shape[1] < 20
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


def test_gradient_checkpointed_blocks_give_the_same_gradients(timm_like):
    import torch.utils.checkpoint as cp
    model, x = timm_like(global_pool="avg")
    fat.vit.token_merge(model, r=3)
    params = list(model.parameters())

    def grads():
        model.zero_grad(set_to_none=True)
        for q in params:
            q.grad = None
        model(x).square().sum().backward()
        return [q.grad.clone() for q in params]

    ref = grads()
    blocks = list(model.blocks)
    model.blocks = nn.Sequential(*[_Checkpointed(b, cp) for b in blocks])
    try:
        got = grads()
    finally:
        model.blocks = nn.Sequential(*blocks)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


class _Checkpointed(nn.Module):
    """A block run under non-reentrant activation checkpointing (the block is held outside the
    module tree; its parameters are reached through the list above)."""

    def __init__(self, block, cp):
        super().__init__()
        self.inner = [block]
        self.cp = cp

    def forward(self, x):
        return self.cp.checkpoint(self.inner[0], x, use_reentrant=False)


def test_refusals(timm_like):
    model, _ = timm_like()
    for kw, arg, err in [(dict(r=-1), "r", ValueError), (dict(r=2.5), "r", TypeError),
                         (dict(r=[1, 2]), "r", ValueError),
                         (dict(r=[1] * 5, layers=(1,)), "r", ValueError),
                         (dict(r=2, layers=(7,)), "layers", ValueError),
                         (dict(r=2, schedule="cosine"), "schedule", ValueError),
                         (dict(num_protected=-1), "num_protected", ValueError)]:
        with pytest.raises(err, match=rf"token_merge: argument '{arg}'"):
            fat.vit.token_merge(model, **kw)
        assert fat.vit.handle_of(model) is None  # nothing patched
    fat.vit.token_merge(model, r=2)
    with pytest.raises(ValueError, match="cannot be combined"):
        fat.vit.prune_merge(model, layers=(1,))
    with pytest.raises(ValueError, match="cannot be combined"):
        fat.vit.token_merge(model)
    fat.vit.unpatch(model)
    fat.vit.prune_merge(model, layers=(1,))
    with pytest.raises(ValueError, match="already patched by fisheradaptune.vit.prune_merge"):
        fat.vit.token_merge(model)
    fat.vit.unpatch(model)
    odd, _ = timm_like()
    del odd.blocks[2].ls1  # not timm's pre-norm Block layout any more
    with pytest.raises(ValueError, match="token_merge: argument 'model': block 2"):
        fat.vit.token_merge(odd)
    assert fat.vit.handle_of(odd) is None
    with pytest.raises(TypeError, match="token_merge: argument 'model'"):
        fat.vit.token_merge(nn.Linear(2, 2))


def test_a_mask_given_to_a_patched_block_is_refused(timm_like):
    model, x = timm_like()
    fat.vit.token_merge(model, r=2)
    tokens = torch.randn(3, 20, 32)
    with pytest.raises(ValueError, match="received an attention mask"):
        model.blocks[1](tokens, attn_mask=torch.zeros(20, 20))


# ---------------------------------------------------------------------------------------------
# Real timm and torchvision models (integration stage)


def _real_timm(**kw):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kw = {"img_size": 32, "patch_size": 4, "num_classes": 7, "depth": 4, **kw}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).eval()
    # timm zero-initialises the head: outputs would be 0 whatever the tokens.
    nn.init.normal_(model.head.weight, std=0.2)
    nn.init.normal_(model.head.bias, std=0.2)
    return model


def _images(n=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kw", [{}, dict(global_pool="avg", class_token=False),
                                dict(reg_tokens=2, global_pool="avg")],
                         ids=["cls", "avg_no_class_token", "registers_avg"])
def test_real_timm_equals_the_eager_forward(kw):
    model = _real_timm(**kw)
    x = _images()
    with torch.no_grad():
        ref = model(x)
    handle = fat.vit.token_merge(model, r=8)
    counts, hooks = _token_counts(model.blocks)
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    p = model.num_prefix_tokens
    expected, sizes = eager_timm(model, x, handle.r, p)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert counts == [64 + p - 8 * i for i in range(4)]
    assert handle.sizes.shape == (2, 64 + p - 32)
    assert not torch.allclose(out, ref, atol=1e-3)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_real_timm_gradient_checkpointing_and_compile():
    model = _real_timm()
    fat.vit.token_merge(model, r=6)
    x = _images()

    def grads():
        model.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    model.set_grad_checkpointing(True)
    got = grads()
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)
    model.set_grad_checkpointing(False)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-5, atol=1e-6)


def test_real_torchvision_equals_the_eager_forward():
    tv = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = tv.VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=3,
                                 hidden_dim=48, mlp_dim=96, num_classes=7).eval()
    nn.init.normal_(model.heads.head.weight, std=0.2)  # zero-initialised by torchvision
    x = _images()
    with torch.no_grad():
        ref = model(x)
    handle = fat.vit.token_merge(model, r=8)
    with torch.no_grad():
        out = model(x)
    expected, sizes = eager_torchvision(model, x, handle.r)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(handle.sizes, sizes)
    assert not torch.allclose(out, ref, atol=1e-3)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_the_example_runs():
    import subprocess
    import sys
    from helpers import REPO_ROOT
    run = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "token_merge_vit.py"),
                          "--steps", "20"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "8 dec" in run.stdout and "[65, 49, 36, 26, 20, 17]" in run.stdout
