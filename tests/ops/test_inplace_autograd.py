"""In-place writes of the ops are visible to autograd: version counters are bumped (so a
tensor saved for backward and then overwritten raises instead of giving wrong gradients), and
leaves that require grad are refused, as torch's own in-place ops do."""
from __future__ import annotations

import pytest
import torch

import fisheradaptune as fat
from fisheradaptune import ops
from fisheradaptune.groups import GroupLayout

SAVED_MODIFIED = "modified by an inplace operation"


def _layout(n):
    return GroupLayout(("t",), (torch.Size([n]),), ("g",), torch.tensor([[0, 0, n, 0]]))


def test_fisher_accumulate_on_a_saved_tensor_makes_backward_raise():
    a = torch.zeros(4, requires_grad=True)
    f = a.exp()  # exp saves its output for backward
    v = f._version
    ops.fisher_accumulate_([f], [torch.ones(4)], decay=0.5, scale=1.0)
    assert f._version > v
    with pytest.raises(RuntimeError, match=SAVED_MODIFIED):
        f.sum().backward()


def test_direct_torch_ops_call_bumps_too():
    a = torch.zeros(4, requires_grad=True)
    f = a.exp()
    sums = torch.empty(0)
    bad = torch.zeros((), dtype=torch.int64)
    torch.ops.fisheradaptune.fisher_accumulate_([f], [torch.ones(4)], 0.5, 1.0, None, sums, bad)
    with pytest.raises(RuntimeError, match=SAVED_MODIFIED):
        f.sum().backward()


def test_per_sample_grad_sq_bumps():
    a = torch.zeros(3, 2, requires_grad=True)
    f = a.exp()
    ops.per_sample_grad_sq_(f, torch.randn(2, 1, 2), torch.randn(2, 1, 3))
    with pytest.raises(RuntimeError, match=SAVED_MODIFIED):
        f.sum().backward()


@pytest.mark.parametrize("fn", ["js_drift", "js_mass_partial"])
def test_reference_is_bumped_only_when_updated(fn):
    cur = [torch.rand(6) + 0.1]
    layout = _layout(6)

    def call(ref, rho):
        if fn == "js_drift":
            return ops.js_drift(cur, ref, layout, update_reference=rho)
        totals = ops.js_mass_totals(cur, ref, layout)
        return ops.js_mass_partial(cur, ref, layout, totals, update_reference=rho)
    ref = [torch.rand(6) + 0.1]
    v = ref[0]._version
    call(ref, None)
    assert ref[0]._version == v
    call(ref, 0.9)
    assert ref[0]._version > v


def test_leaf_that_requires_grad_is_refused_before_writing():
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="argument 'fisher': a leaf tensor that requires grad"):
        ops.fisher_accumulate_([w], [torch.ones(3)], decay=0.5, scale=1.0)
    assert torch.equal(w.detach(), torch.zeros(3))
    with torch.no_grad():
        ops.fisher_accumulate_([w], [torch.ones(3)], decay=0.5, scale=1.0)
    assert torch.equal(w.detach(), torch.ones(3))


def test_fisher_adaptune_step_is_unaffected():
    model = torch.nn.Linear(4, 3)
    opt = fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.1), model, check_every=2)
    for _ in range(4):
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert opt.step_count == 4 and opt.nonfinite == 0
