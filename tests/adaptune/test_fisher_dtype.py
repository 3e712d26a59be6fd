"""FisherAdapTune(fisher_dtype=...): the Fisher buffers and drift references in float32 or
bfloat16 (docs/methods.md "Fisher buffers in bfloat16"), the memory the wrapper reports
(``metrics()["adaptune/buffer_bytes"]``, ``summary()``), and checkpoints under either."""
from __future__ import annotations

import copy

import pytest
import torch

import fisheradaptune as fat

from helpers import tiny_adaptune, tiny_mlp, tiny_train


def _held(opt):
    return [t for t in list(opt.estimator.buffers()) + list(opt.references) if t is not None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_buffers_and_references_are_kept_in_fisher_dtype(dtype):
    model = tiny_mlp()
    opt = tiny_adaptune(model, fisher_dtype=dtype, policy=fat.Observe())
    assert opt.fisher_dtype is dtype
    assert opt.metrics()["adaptune/buffer_bytes"] == 0.0  # allocated at the first step
    tiny_train(model, opt, 4)  # two checks: references exist and were updated once
    held = _held(opt)
    n = sum(p.numel() for p in model.parameters())
    assert len(held) == 2 * len(list(model.parameters()))
    assert all(t.dtype == dtype for t in held)
    size = torch.tensor([], dtype=dtype).element_size()
    assert opt.buffer_bytes == 2 * n * size
    assert opt.metrics()["adaptune/buffer_bytes"] == float(2 * n * size)
    assert bool(torch.isfinite(opt.tracker.last).all()) and float(opt.tracker.last.max()) > 0


def test_bfloat16_halves_the_buffer_bytes_and_drift_stays_close():
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_mlp()
        opt = tiny_adaptune(model, fisher_dtype=dtype, policy=fat.Observe())
        tiny_train(model, opt, 6)
        runs[dtype] = opt
    f32, bf16 = runs[torch.float32], runs[torch.bfloat16]
    assert bf16.buffer_bytes * 2 == f32.buffer_bytes > 0
    # The same gradients (Observe never freezes), Fisher rounded to 8 bits of mantissa: the
    # drift of each group moves by far less than its size.
    measured = f32.tracker.checks > 0
    assert bool(measured.any())
    diff = (f32.tracker.last - bf16.tracker.last)[measured].abs()
    assert float(diff.max()) < 0.05 * float(f32.tracker.last[measured].max()) + 1e-3


def test_buffer_bytes_drop_when_a_tensor_is_frozen_whole():
    model = tiny_mlp()
    opt = tiny_adaptune(model, fisher_dtype=torch.bfloat16, policy=fat.Observe())
    tiny_train(model, opt, 2)
    before = opt.buffer_bytes
    opt.freeze("0.weight")
    w = model[0].weight
    assert opt.buffer_bytes == before - 2 * w.numel() * 2  # its Fisher and reference, bf16


def test_summary_reports_the_dtype_and_the_bytes():
    model = tiny_mlp()
    opt = tiny_adaptune(model, fisher_dtype=torch.bfloat16)
    tiny_train(model, opt, 2)
    line = opt.summary().splitlines()[1]
    mib = opt.buffer_bytes / 2 ** 20
    assert line == (f"buffers: Fisher and drift references in bfloat16, {mib:.2f} MiB held")


@pytest.mark.parametrize("value, match", [
    (torch.float16, r"argument 'fisher_dtype': expected torch\.float32 or torch\.bfloat16, got "
                    r"torch\.float16"),
    (torch.float64, r"argument 'fisher_dtype': expected torch\.float32 or torch\.bfloat16, got "
                    r"torch\.float64"),
    ("bfloat16", r"argument 'fisher_dtype': expected torch\.float32 or torch\.bfloat16, got "
                 r"'bfloat16'"),
])
def test_other_dtypes_are_refused(value, match):
    model = tiny_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        tiny_adaptune(model, fisher_dtype=value)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_bfloat16_with_another_estimator_is_refused():
    with pytest.raises(ValueError, match=r"argument 'fisher_dtype': torch\.bfloat16 is supported "
                                         r"with estimator=\"empirical\" only, got estimator "
                                         r"'kfac'"):
        tiny_adaptune(tiny_mlp(), estimator="kfac", fisher_dtype=torch.bfloat16)


def test_empirical_estimator_refuses_other_dtypes():
    with pytest.raises(ValueError, match=r"argument 'dtype': expected torch\.float32 or "
                                         r"torch\.bfloat16, got torch\.float16"):
        fat.fisher.EmpiricalFisher([torch.zeros(3)], dtype=torch.float16)


def test_bfloat16_checkpoint_round_trip():
    model = tiny_mlp()
    opt = tiny_adaptune(model, fisher_dtype=torch.bfloat16)
    tiny_train(model, opt, 6)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["adaptune"]["fisher_dtype"] == "bfloat16"
    model2 = tiny_mlp()
    opt2 = tiny_adaptune(model2, fisher_dtype=torch.bfloat16)
    opt2.load_state_dict(copy.deepcopy(sd))
    assert all(torch.equal(a, b) and a.dtype == torch.bfloat16
               for a, b in zip(_held(opt), _held(opt2)))
    assert opt2.buffer_bytes == opt.buffer_bytes
    tiny_train(model2, opt2, 2)  # and it trains on


def test_a_payload_saved_before_the_option_reads_as_float32():
    model = tiny_mlp()
    opt = tiny_adaptune(model)
    tiny_train(model, opt, 4)
    sd = copy.deepcopy(opt.state_dict())
    del sd["adaptune"]["fisher_dtype"]  # what a format-2 payload of an earlier version holds
    fresh = tiny_adaptune(tiny_mlp())
    fresh.load_state_dict(copy.deepcopy(sd))
    assert fresh.step_count == 4
    bf16 = tiny_adaptune(tiny_mlp(), fisher_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"saved with fisher_dtype=torch\.float32, this wrapper "
                                         r"has fisher_dtype=torch\.bfloat16"):
        bf16.load_state_dict(sd)
    assert bf16.step_count == 0


def test_a_bfloat16_buffer_in_a_float32_payload_is_refused_before_anything_changes():
    model = tiny_mlp()
    opt = tiny_adaptune(model)
    tiny_train(model, opt, 4)
    sd = copy.deepcopy(opt.state_dict())
    sd["adaptune"]["references"][0] = sd["adaptune"]["references"][0].to(torch.bfloat16)
    other = tiny_adaptune(tiny_mlp())
    tiny_train(other.model, other, 2)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"the reference of '0\.weight' is torch\.bfloat16, this "
                                         r"wrapper keeps its buffers in torch\.float32"):
        other.load_state_dict(sd)
    assert other.step_count == 2
    after = other.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(before["adaptune"]["buffers"],
                                                 after["adaptune"]["buffers"]))
