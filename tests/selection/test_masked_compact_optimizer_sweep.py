"""Sweep: every ``torch.optim`` optimizer class (enumerated from ``torch.optim``, not a hand
list), with each of its foreach / fused / capturable / maximize / amsgrad / nesterov /
decoupled_weight_decay variants that runs on the CPU, in both TR-PTS training modes:

- "optimizers x MaskedOptimizer": after every one of many steps, the unselected entries of
  every selected weight are bit-identical to their values before training, their gradients
  are zero, and the selected entries train; or a clear refusal at construction.
- "optimizers x compact": after every step the SparseLinear forward equals ``F.linear`` with
  the dense weight rebuilt from the current ``values`` (and so does its state dict), and the
  values train; or a clear refusal (SparseAdam, which steps sparse gradients only).

Needs only torch; each case is recorded with the ``sweep`` fixture.
"""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

from fisheradaptune.masked import MaskedOptimizer
from fisheradaptune.selection import SparseLinear, select_connections

#: The variant flags the sweep flips, one at a time and all together.
FLAGS = ("foreach", "fused", "capturable", "maximize", "amsgrad", "nesterov",
         "decoupled_weight_decay")
STEPS = 6

OPTIMIZERS = sorted(
    (name, cls) for name, cls in vars(torch.optim).items()
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)
    and cls is not torch.optim.Optimizer)


def _params_of(cls):
    return inspect.signature(cls.__init__).parameters


def _base_kwargs(name, cls):
    """Settings that make every update path run: weight decay where the class has it (it moves
    unselected entries, which the wrapper must restore), momentum for SGD (nesterov needs
    it), a few inner iterations for LBFGS."""
    params = _params_of(cls)
    kw = {"lr": {"LBFGS": 0.5, "Adadelta": 1.0, "Rprop": 1e-2}.get(name, 1e-2)}
    if "weight_decay" in params:
        kw["weight_decay"] = 0.1
    if name == "SGD":
        kw["momentum"] = 0.9
    if name == "LBFGS":
        kw["max_iter"] = 3
    return kw


def _flipped(cls, flag):
    """The non-default value of ``flag`` (None defaults read as False)."""
    default = _params_of(cls)[flag].default
    return not bool(default) if default in (None, True, False) else True


def _variants():
    """Per class: the defaults, each flag flipped alone, and every flag that runs on the CPU
    flipped together (fused rather than foreach where the class has both)."""
    for name, cls in OPTIMIZERS:
        flags = [f for f in FLAGS if f in _params_of(cls)]
        base = _base_kwargs(name, cls)
        yield name, cls, "default", base
        for f in flags:
            yield name, cls, f, {**base, f: _flipped(cls, f)}
        together = [f for f in flags if not (f == "foreach" and "fused" in flags)
                    and _probe(cls, {**base, f: _flipped(cls, f)}) is None]
        if len(together) > 1:
            yield name, cls, "+".join(together), {**base, **{f: _flipped(cls, f) for f in together}}


def _probe(cls, kwargs):
    """None if the plain optimizer steps a dense 2-D parameter on the CPU, else the error."""
    p = nn.Parameter(torch.ones(2, 3))
    p.grad = torch.ones(2, 3)
    try:
        opt = cls([p], **kwargs)
        opt.step((lambda: torch.ones(())) if cls is torch.optim.LBFGS else None)
    except Exception as e:   # noqa: BLE001  (any failure: the variant does not run here)
        return f"{type(e).__name__}: {e}"
    return None


CASES = [pytest.param(cls, kw, id=f"{name}-{variant}") for name, cls, variant, kw in _variants()]


def _needs_2d(cls):
    """Optimizers that refuse 1-D parameters at construction (Muon): give them the 2-D ones."""
    try:
        cls([nn.Parameter(torch.ones(3))], **({"lr": 1e-2}))
    except ValueError:
        return True
    return False


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.fc2(torch.tanh(self.fc1(x))))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g))
            for _ in range(n)]


def _loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


@pytest.fixture(scope="module")
def selected():
    torch.manual_seed(0)
    base = Net()
    return base, select_connections(base, _data(2, 0), _loss, budget=0.2, c_min=2)


def _case_name(cls, kwargs):
    extra = {k: v for k, v in kwargs.items() if k in FLAGS}
    return f"{cls.__name__}({', '.join(f'{k}={v}' for k, v in extra.items())})"


def _train(model, opt, steps, check):
    for batch in _data(steps, seed=1):
        if isinstance(opt, torch.optim.LBFGS) or isinstance(
                getattr(opt, "optimizer", None), torch.optim.LBFGS):
            def closure(batch=batch):
                opt.zero_grad()
                loss = _loss(model, batch)
                loss.backward()
                return loss
            opt.step(closure)
        else:
            _loss(model, batch).backward()
            opt.step()
        check()
        opt.zero_grad()


def _make(cls, kwargs, params):
    if _needs_2d(cls):
        params = [p for p in params if p.dim() == 2]
    return cls(params, **kwargs)


@pytest.mark.parametrize("cls,kwargs", CASES)
def test_masked_optimizer(selected, cls, kwargs, sweep):
    reason = _probe(cls, kwargs)
    if reason is not None and cls is not torch.optim.SparseAdam:
        pytest.skip(f"does not run on the CPU: {reason}")
    base, sel = selected
    model = copy.deepcopy(base)
    params = sel.apply(model, mode="mask")
    case = _case_name(cls, kwargs)
    if cls is torch.optim.SparseAdam:
        with pytest.raises(TypeError, match="SparseAdam steps only sparse gradients"):
            MaskedOptimizer(_make(cls, kwargs, params), sel)
        sweep("optimizers x MaskedOptimizer", case, "refused")
        return
    opt = MaskedOptimizer(_make(cls, kwargs, params), sel)
    weights = {n: model.get_submodule(n).weight for n in sel.index}
    keep = {n: torch.zeros(w.shape, dtype=torch.bool).scatter_(1, sel.index[n], True)
            for n, w in weights.items()}
    before = {n: w.detach().clone() for n, w in weights.items()}

    def check():
        for n, w in weights.items():
            assert torch.equal(w.detach()[~keep[n]], before[n][~keep[n]]), (case, n)
            assert not bool(w.grad[~keep[n]].any()), (case, n)

    _train(model, opt, STEPS, check)
    for n, w in weights.items():
        assert not torch.equal(w.detach()[keep[n]], before[n][keep[n]]), (case, n)
    sweep("optimizers x MaskedOptimizer", case, "verified")


@pytest.mark.parametrize("cls,kwargs", CASES)
def test_compact(selected, cls, kwargs, sweep):
    reason = _probe(cls, kwargs)
    if reason is not None and cls is not torch.optim.SparseAdam:
        pytest.skip(f"does not run on the CPU: {reason}")
    base, sel = selected
    model = copy.deepcopy(base)
    params = sel.apply(model, mode="compact")
    opt = _make(cls, kwargs, params)
    case = _case_name(cls, kwargs)
    sparse = {n: model.get_submodule(n) for n in sel.index}
    assert all(isinstance(m, SparseLinear) for m in sparse.values())
    before = {n: m.values.detach().clone() for n, m in sparse.items()}
    x = _data(1, seed=7)[0][0]
    if cls is torch.optim.SparseAdam:
        _loss(model, _data(1, seed=1)[0]).backward()
        with pytest.raises(RuntimeError, match="SparseAdam does not support dense gradients"):
            opt.step()
        assert all(torch.equal(m.values.detach(), before[n]) for n, m in sparse.items())
        sweep("optimizers x compact", case, "refused")
        return

    def check():
        for n, m in sparse.items():
            dense = m.base.scatter(1, m.index, m.values.detach())
            h = torch.randn(5, m.in_features, generator=torch.Generator().manual_seed(3))
            with torch.no_grad():
                assert torch.equal(m(h), nn.functional.linear(h, dense, m.bias)), (case, n)
            assert torch.equal(m.state_dict()["weight"], dense), (case, n)
            assert torch.equal(m.weight.detach(), dense), (case, n)

    _train(model, opt, STEPS, check)
    for n, m in sparse.items():
        assert not torch.equal(m.values.detach(), before[n]), (case, n)
    # the merged model is the trained one
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(sel.merge(model)(x), out, rtol=0, atol=0)
    sweep("optimizers x compact", case, "verified")
