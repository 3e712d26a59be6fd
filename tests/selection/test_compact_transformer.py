"""mode="compact" on a real nn.TransformerEncoder: nn.MultiheadAttention reads
``out_proj.weight`` instead of calling ``out_proj``, and the encoder layer's inference fast path
reads every Linear's ``weight``. SparseLinear's ``weight`` is the synced buffer, differentiable
into ``values``, so out_proj trains and eval (fast path) equals the slow path."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fisheradaptune.masked import MaskedOptimizer
from fisheradaptune.selection import SparseLinear, select_connections


class Encoder(nn.Module):
    """2 post-norm encoder layers, d_model 32, 4 heads (even, as the fast path requires),
    then a mean-pooled classifier head."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def _data(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 6, 32, generator=g), torch.randint(0, 3, (4,), generator=g))
            for _ in range(n)]


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _slow_path(model, x):
    """``model(x)`` under no_grad with the MHA / encoder-layer fast path switched off."""
    setter = getattr(torch.backends.mha, "set_fastpath_enabled", None)
    if setter is None:
        pytest.skip("this torch cannot switch the MHA fast path off")
    was = torch.backends.mha.get_fastpath_enabled()
    setter(False)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        setter(was)


def _fast_path(model, x, monkeypatch):
    """``model(x)`` under no_grad, checking that every encoder layer took the fast path."""
    calls = []
    real = torch._transformer_encoder_layer_fwd

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", spy)
    with torch.no_grad():
        out = model(x)
    monkeypatch.undo()
    assert len(calls) == 2, "the encoder layers did not take the fast path"
    return out


def test_compact_trains_mha_out_proj_and_eval_matches_slow_path(monkeypatch):
    torch.manual_seed(0)
    base = Encoder()
    sel = select_connections(base, _data(), _loss, budget=0.1, c_min=2)
    out_projs = [f"encoder.layers.{i}.self_attn.out_proj" for i in range(2)]
    assert set(out_projs) <= set(sel.index)   # selected by default

    models = {}
    for mode in ("mask", "compact"):
        model = copy.deepcopy(base)
        params = sel.apply(model, mode=mode)
        inner = torch.optim.SGD(params, lr=0.1)
        opt = MaskedOptimizer(inner, sel) if mode == "mask" else inner
        for step, batch in enumerate(_data(3, seed=1)):
            _loss(model, batch).backward()
            if mode == "compact" and step == 0:
                sparse = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
                assert set(sparse) == set(sel.index)
                before = {n: m.values.detach().clone() for n, m in sparse.items()}
                grads = {n: m.values.grad for n, m in sparse.items()}
                for n in out_projs:   # MHA never calls out_proj: the gradient came via .weight
                    assert grads[n] is not None and bool((grads[n] != 0).any()), n
            opt.step()
            opt.zero_grad()
            if mode == "compact" and step == 0:
                for n, m in sparse.items():   # every entry with a gradient moved
                    assert grads[n] is not None, n
                    moved = m.values.detach() != before[n]
                    assert torch.equal(moved, grads[n] != 0), n
        models[mode] = model

    compact, mask = models["compact"], models["mask"]
    # Same training as mask mode (which reads dense weights), out_proj included.
    merged = sel.merge(copy.deepcopy(compact))
    for n in sel.index:
        torch.testing.assert_close(merged.get_submodule(n).weight,
                                   mask.get_submodule(n).weight, rtol=1e-5, atol=1e-6)
    assert type(merged.encoder.layers[0].self_attn.out_proj) is type(
        base.encoder.layers[0].self_attn.out_proj)

    # Eval right after an optimizer step, no forward in between: the fast path reads each
    # SparseLinear's weight, which must hold the stepped values.
    for m in (compact, mask, merged):
        m.eval()
    x = _data(1, seed=5)[0][0]
    fast = _fast_path(compact, x, monkeypatch)
    slow = _slow_path(compact, x)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(slow, _slow_path(merged, x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(slow, _slow_path(mask, x), rtol=1e-4, atol=1e-5)
    # eval with grad mode on takes the slow path (the weights require grad) and still trains
    out = compact(x)
    torch.testing.assert_close(out, slow, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert all(compact.get_submodule(n).values.grad is not None for n in out_projs)


def test_sparse_linear_weight_read_is_differentiable_into_values():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    index = torch.tensor([[0, 4], [1, 2], [3, 4]])
    sp = SparseLinear.from_linear(lin, index)
    x = torch.randn(7, 5)
    # What nn.MultiheadAttention does with out_proj: F.linear on the weight it reads.
    nn.functional.linear(x, sp.weight, sp.bias).square().sum().backward()
    via_read = sp.values.grad.clone()
    sp.values.grad = None
    sp(x).square().sum().backward()
    torch.testing.assert_close(via_read, sp.values.grad)
    with torch.no_grad():   # without grad mode: the buffer itself, synced
        sp.values.add_(1.0)
        w = sp.weight
        assert not w.requires_grad
        torch.testing.assert_close(w, sp.dense_weight())
        assert torch.equal(w.gather(1, index), sp.values)
