"""FisherAdapTune.load_state_dict checks the whole checkpoint (its own state and the wrapped
optimizer's) before it changes anything, and refuses one saved under other settings
(docs/methods.md section 4, "Checkpoints")."""
from __future__ import annotations

import copy

import pytest
import torch

import fisheradaptune as fat

from helpers import tiny_adaptune, tiny_mlp, tiny_train


def _saved(**kwargs):
    """A checkpoint at step 8: some groups frozen, tensors 1 and 3 frozen whole."""
    model = tiny_mlp()
    opt = tiny_adaptune(model, **kwargs)
    tiny_train(model, opt, 8)
    if not kwargs:
        assert opt.released and opt.freezer.partial.index and not opt.frozen.all()
    return opt.state_dict()


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):  # NaN equals NaN (the drift history holds some)
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and bool(((a == b) | (a != a) & (b != b)).all()))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


def _snapshot(model, opt):
    return (copy.deepcopy(opt.state_dict()), copy.deepcopy(opt.optimizer.state_dict()),
            [(p.requires_grad, p.detach().clone()) for p in model.parameters()])


def _set(path, value):
    def corrupt(sd):
        d = sd
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value(d[path[-1]]) if callable(value) else value
    return corrupt


CORRUPTIONS = {
    # the reproducers: a [1]-shaped frozen broadcast and froze all groups; the others loaded
    "frozen_shape_1": (_set(("adaptune", "frozen"), torch.tensor([True])), r"'frozen' must be a "
                       r"torch\.bool tensor of shape \[22\], got torch\.bool of shape \[1\]"),
    "frozen_int": (_set(("adaptune", "frozen"), lambda t: t.long()), "'frozen' must be"),
    "frozen_at_shape": (_set(("adaptune", "frozen_at"), lambda t: t[:5]), "'frozen_at' must be"),
    "frozen_at_active": (_set(("adaptune", "frozen_at"), lambda t: torch.full_like(t, 3)),
                         "'frozen_at' must be -1 for active groups"),
    "frozen_at_future": (_set(("adaptune", "frozen_at"), lambda t: torch.where(t >= 0, 99, t)),
                         r"in \[0, step=8\]"),
    "step_negative": (_set(("adaptune", "step"), -5), "'step' must be an integer >= 0, got -5"),
    "step_float": (_set(("adaptune", "step"), 8.0), "'step' must be an integer"),
    "policy_shape": (_set(("adaptune", "policy", "below"), torch.zeros(3, dtype=torch.int64)),
                     r"Threshold state 'below' must be None or an int64 tensor of shape \[22\]"),
    "policy_not_dict": (_set(("adaptune", "policy"), [1]), "state of Threshold must be a dict"),
    # raised only after step, frozen set and Fisher had changed (step 2 -> 8) before the fix
    "tracker_shape": (_set(("adaptune", "tracker", "jsema"), lambda t: t[:4]),
                      "'tracker.jsema' must be a torch.float64 tensor of shape"),
    "tracker_nan": (_set(("adaptune", "tracker", "jsema"),
                         lambda t: torch.full_like(t, float("nan"))), "non-finite"),
    "tracker_missing": (lambda sd: sd["adaptune"]["tracker"].pop("checks"), "'tracker' must have"),
    "estimator_steps": (_set(("adaptune", "estimator", "steps"), "8"),
                        "'estimator.steps' must be an integer"),
    "estimator_keys": (lambda sd: sd["adaptune"]["estimator"].pop("decay"),
                       "'estimator' has keys"),
    "estimator_released": (_set(("adaptune", "estimator", "released"), [1]),
                           r"released tensors \[1\] contradict 'frozen'"),
    "buffer_shape": (_set(("adaptune", "buffers"), lambda b: [b[0][:2]] + b[1:]),
                     r"the buffer of '0\.weight' has shape \(2, 6\), expected \(8, 6\)"),
    "buffer_count": (_set(("adaptune", "buffers"), lambda b: b[:-1]),
                     "holds 5 buffers, this wrapper tracks 6 tensors"),
    "reference_nan": (_set(("adaptune", "references"),
                           lambda r: [torch.full_like(r[0], float("nan"))] + r[1:]),
                      r"the reference of '0\.weight' holds non-finite values"),
    "nonfinite_negative": (_set(("adaptune", "nonfinite"), -1), "'nonfinite' must be"),
    "names": (_set(("adaptune", "names"), lambda n: n[::-1]), "tracking other parameters"),
    "inner_state_shape": (lambda sd: sd["optimizer"]["state"][0].__setitem__(
        "exp_avg", torch.zeros(3, 3)), r"optimizer state 'exp_avg' of parameter 0 has shape "
                                       r"\(3, 3\), the parameter \(8, 6\)"),
    "inner_state_key": (lambda sd: sd["optimizer"]["state"].__setitem__(99, {}),
                        "parameter id 99, which no param group lists"),
    "inner_state_entry": (lambda sd: sd["optimizer"]["state"].__setitem__(0, 5),
                          "state of parameter 0 must be a dict"),
    "inner_group_ids": (lambda sd: sd["optimizer"]["param_groups"][0].__setitem__(
        "params", [0, 0, 2, 3, 4, 5]), "expected distinct integers"),
    "inner_group_lengths": (lambda sd: sd["optimizer"]["param_groups"][0]["params"].pop(),
                            "parameters per group"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_corrupted_checkpoint_is_refused_and_changes_nothing(case):
    corrupt, match = CORRUPTIONS[case]
    sd = copy.deepcopy(_saved())
    corrupt(sd)
    model = tiny_mlp()
    opt = tiny_adaptune(model)
    tiny_train(model, opt, 2)  # a wrapper with state of its own, at step 2
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    after = _snapshot(model, opt)
    assert _equal(before[0], after[0]), "the wrapper's state changed"
    assert _equal(before[1], after[1]), "the wrapped optimizer's state changed"
    assert _equal(before[2], after[2]), "parameters changed"
    assert opt.step_count == 2
    tiny_train(model, opt, 1)  # and it still works


def test_the_uncorrupted_checkpoint_loads():
    sd = _saved()
    model = tiny_mlp()
    opt = tiny_adaptune(model)
    tiny_train(model, opt, 2)
    opt.load_state_dict(copy.deepcopy(sd))
    assert _equal(opt.state_dict(), sd)


@pytest.mark.parametrize("saved,now,match", [
    (dict(drift_mode="histogram"), {}, r"saved with drift_mode='histogram', this wrapper has "
                                       r"drift_mode='mass'"),
    (dict(groups="per_tensor"), {}, r"saved with group layout '[0-9a-f]{16}' \(6 groups\), this "
                                    r"wrapper has '[0-9a-f]{16}' \(22 groups\)"),
    (dict(policy=fat.PaperPolicy(every=4)), {},
     r"saved with policy fisheradaptune\.adaptune\.policies\.PaperPolicy, this wrapper has "
     r"fisheradaptune\.adaptune\.policies\.Threshold"),
    (dict(estimator="kfac"), {}, "saved with estimator KFACFisher, this wrapper uses "
                                 "EmpiricalFisher"),
    # Refused, not converted (docs/methods.md "Fisher buffers in bfloat16").
    (dict(fisher_dtype=torch.bfloat16), {},
     r"saved with fisher_dtype=torch\.bfloat16, this wrapper has fisher_dtype=torch\.float32; "
     r"build the wrapper with the fisher_dtype it was saved with"),
    ({}, dict(fisher_dtype=torch.bfloat16),
     r"saved with fisher_dtype=torch\.float32, this wrapper has fisher_dtype=torch\.bfloat16"),
])
def test_a_checkpoint_saved_under_other_settings_is_refused_naming_both(saved, now, match):
    sd = _saved(**saved)
    model = tiny_mlp()
    opt = tiny_adaptune(model, **now)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert _equal(before[0], _snapshot(model, opt)[0])


def test_a_checkpoint_of_the_earlier_format_is_refused_clearly():
    sd = _saved()
    for k in ("format", "layout", "drift_mode", "policy_type"):
        del sd["adaptune"][k]
    model = tiny_mlp()
    opt = tiny_adaptune(model)
    with pytest.raises(ValueError, match=r"saved by an earlier version of fisheradaptune \(no "
                                         r"'format' entry\).*refuses it"):
        opt.load_state_dict(sd)
