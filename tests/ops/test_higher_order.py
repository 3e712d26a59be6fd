"""Higher-order gradients through every differentiable path of the package: the ops with an
autograd formula (sampled_grad, token_prune_merge, bipartite_merge) and SparseLinear.

Each either differentiates its backward correctly (gradgradcheck in float64, and a
Hessian-vector product equal to the dense / reference computation's) or refuses a graph built
through it with a clear error. Before, a gradient penalty through SparseLinear or the token ops
had second derivatives of exactly zero, and sampled_grad's output required grad while backward
left its inputs' gradients at None. Every case is recorded in the "autograd" sweep.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

from fisheradaptune import ops, reference
from fisheradaptune.selection import SparseLinear
from fisheradaptune.selection.sparse_linear import _SparseLinearFn

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _hvp(f, inputs, wrt, v):
    """``d/d inputs[wrt] <grad f, v>``: a Hessian-vector product of the scalar ``f``."""
    g, = torch.autograd.grad(f(*inputs), inputs[wrt], create_graph=True)
    hv, = torch.autograd.grad((g * v).sum(), inputs[wrt])
    return hv


# --------------------------------------------------------------------------- sampled_grad


def _sampled_inputs(seed=0):
    g = _gen(seed)
    grad_out = torch.randn(7, 4, generator=g, dtype=F64, requires_grad=True)
    x = torch.randn(7, 6, generator=g, dtype=F64, requires_grad=True)
    index = torch.tensor([[0, 2, 2], [1, 5, 3], [4, 0, 1], [5, 5, 0]])   # repeats allowed
    return grad_out, x, index


def test_sampled_grad_is_differentiable_to_second_order(sweep):
    grad_out, x, index = _sampled_inputs()
    out = ops.sampled_grad(grad_out, x, index)
    out.square().sum().backward()
    # the gradients are those of the dense composition (they were None before)
    go2, x2 = grad_out.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    reference.sampled_grad(go2, x2, index).square().sum().backward()
    torch.testing.assert_close(grad_out.grad, go2.grad)
    torch.testing.assert_close(x.grad, x2.grad)
    f = lambda go, xx: ops.sampled_grad(go, xx, index)  # noqa: E731
    assert gradcheck(f, (grad_out, x))
    assert gradgradcheck(f, (grad_out, x))
    sweep("autograd", "ops.sampled_grad", "verified")


def test_sampled_grad_low_precision_gradients_keep_input_dtypes():
    grad_out, x, index = _sampled_inputs()
    go, xx = (t.detach().to(torch.bfloat16).requires_grad_() for t in (grad_out, x))
    ops.sampled_grad(go, xx, index).sum().backward()
    assert go.grad.dtype == torch.bfloat16 and xx.grad.dtype == torch.bfloat16


# --------------------------------------------------------------------------- SparseLinear


def _sparse(seed=0):
    g = _gen(seed)
    torch.manual_seed(seed)
    lin = nn.Linear(6, 4).double()
    index = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(4)])
    return SparseLinear.from_linear(lin, index), torch.randn(5, 6, generator=g, dtype=F64)


def test_sparse_linear_gradgradcheck(sweep):
    sp, x = _sparse()
    x = x.requires_grad_()
    v = sp.values.detach().clone().requires_grad_()
    b = sp.bias.detach().clone().requires_grad_()

    def f(x, v, b):
        return nn.functional.linear(x, sp.base.scatter(1, sp.index, v), b).pow(2)

    def g(x, v, b):
        return _SparseLinearFn.apply(x, sp.base, v, sp.index, b).pow(2)

    assert gradcheck(g, (x, v, b))
    assert gradgradcheck(g, (x, v, b))
    torch.testing.assert_close(g(x, v, b), f(x, v, b))
    sweep("autograd", "selection.SparseLinear", "verified")


def test_sparse_linear_hessian_vector_product_matches_dense():
    # The reproducer: the HVP of sum(out ** 3) was 0.0 through SparseLinear.
    sp, x = _sparse(1)
    v = torch.ones_like(sp.values)

    def sparse_loss(values):
        return sp(x).pow(3).sum()

    def dense_loss(values):
        w = sp.base.scatter(1, sp.index, values)
        return nn.functional.linear(x, w, sp.bias).pow(3).sum()

    got = _hvp(sparse_loss, (sp.values,), 0, v)
    dense_values = sp.values.detach().clone().requires_grad_()
    want = _hvp(dense_loss, (dense_values,), 0, v)
    assert want.abs().sum() > 1.0
    torch.testing.assert_close(got, want)


def test_gradient_penalty_through_sparse_linear_trains_values():
    # A gradient penalty (d loss / d x)^2 through the layer: its gradient reaches `values`
    # through the second derivative, and equals the dense layer's.
    sp, x = _sparse(2)
    x = x.requires_grad_()
    gx, = torch.autograd.grad(sp(x).pow(3).sum(), x, create_graph=True)
    gx.square().sum().backward()
    dense = nn.Linear(6, 4).double()
    with torch.no_grad():
        dense.weight.copy_(sp.dense_weight())
        dense.bias.copy_(sp.bias)
    x2 = x.detach().clone().requires_grad_()
    gx2, = torch.autograd.grad(dense(x2).pow(3).sum(), x2, create_graph=True)
    gx2.square().sum().backward()
    torch.testing.assert_close(sp.values.grad, dense.weight.grad.gather(1, sp.index))
    torch.testing.assert_close(sp.bias.grad, dense.bias.grad)


# --------------------------------------------------------------------------- token_prune_merge


def _prune_inputs(seed=0, n=7, c=3, protected=1):
    g = _gen(seed)
    x = torch.randn(2, n, c, generator=g, dtype=F64, requires_grad=True)
    # well separated scores: a numerical perturbation never changes the selection
    scores = (torch.randperm(n - protected, generator=g).double() + 1.0).expand(2, -1)
    scores = (scores + 0.1 * torch.rand(2, n - protected, generator=g, dtype=F64))
    sizes = 1.0 + torch.rand(2, n, generator=g)
    return x, scores.requires_grad_(), sizes


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_sizes", [True, False])
def test_token_prune_merge_gradgradcheck(normalize, with_sizes, sweep):
    x, scores, sizes = _prune_inputs()
    sizes = sizes if with_sizes else None

    def f(x, s):
        return ops.token_prune_merge(x, s, 3, sizes=sizes, normalize=normalize)[0]

    assert gradcheck(f, (x, scores))
    assert gradgradcheck(f, (x, scores))
    sweep("autograd", "ops.token_prune_merge", "verified")


def test_token_prune_merge_create_graph_gradients_equal_the_kernel_backward():
    x, scores, sizes = _prune_inputs(3)
    for dtype in (F64, torch.float32):
        xx = x.detach().to(dtype).requires_grad_()
        ss = scores.detach().to(dtype).requires_grad_()
        out = ops.token_prune_merge(xx, ss, 2, sizes=sizes)[0]
        w = torch.randn(out.shape, generator=_gen(1), dtype=dtype)
        plain = torch.autograd.grad(out, (xx, ss), w, retain_graph=True)
        graph = torch.autograd.grad(out, (xx, ss), w, create_graph=True)
        for a, b in zip(plain, graph):
            torch.testing.assert_close(a, b.detach())


def test_token_prune_merge_hessian_vector_product_matches_reference():
    x, scores, sizes = _prune_inputs(4)
    v = torch.randn(x.shape, generator=_gen(5), dtype=F64)
    got = _hvp(lambda t: ops.token_prune_merge(t, scores.detach(), 2, sizes=sizes)[0]
               .pow(3).sum(), (x,), 0, v)
    x2 = x.detach().clone().requires_grad_()
    want = _hvp(lambda t: reference.token_prune_merge(t, scores.detach(), 2, sizes=sizes)[0]
                .pow(3).sum(), (x2,), 0, v)
    assert want.abs().sum() > 1.0
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- bipartite_merge


def _merge_inputs(seed=0, n=9, c=3):
    g = _gen(seed)
    x = torch.randn(2, n, c, generator=g, dtype=F64, requires_grad=True)
    metric = torch.randn(2, n, 4, generator=g, dtype=F64)
    sizes = 1.0 + torch.rand(2, n, generator=g)
    return x, metric, sizes


@pytest.mark.parametrize("with_sizes", [True, False])
def test_bipartite_merge_gradgradcheck(with_sizes, sweep):
    x, metric, sizes = _merge_inputs()
    sizes = sizes if with_sizes else None

    def f(x):
        return ops.bipartite_merge(x, metric, 3, sizes=sizes)[0]

    assert gradcheck(f, (x,))
    assert gradgradcheck(f, (x,))
    sweep("autograd", "ops.bipartite_merge", "verified")


def test_bipartite_merge_create_graph_gradients_equal_the_kernel_backward():
    x, metric, sizes = _merge_inputs(2)
    sizes[0, 1] = 0.0   # a zero-size token: weight 0 unless alone in its row
    for dtype in (F64, torch.float32, torch.bfloat16):
        xx = x.detach().to(dtype).requires_grad_()
        out = ops.bipartite_merge(xx, metric, 4, sizes=sizes)[0]
        w = torch.randn(out.shape, generator=_gen(1)).to(dtype)
        plain, = torch.autograd.grad(out, xx, w, retain_graph=True)
        graph, = torch.autograd.grad(out, xx, w, create_graph=True)
        tol = {} if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(plain, graph.detach(), **tol)


def test_bipartite_merge_hessian_vector_product_matches_reference():
    x, metric, sizes = _merge_inputs(6)
    v = torch.randn(x.shape, generator=_gen(7), dtype=F64)
    got = _hvp(lambda t: ops.bipartite_merge(t, metric, 3, sizes=sizes)[0].pow(3).sum(),
               (x,), 0, v)
    x2 = x.detach().clone().requires_grad_()
    want = _hvp(lambda t: reference.bipartite_merge(t, metric, 3, sizes=sizes)[0]
                .pow(3).sum(), (x2,), 0, v)
    assert want.abs().sum() > 1.0
    torch.testing.assert_close(got, want)
