"""The custom ops (fisheradaptune.ops, torch.ops.fisheradaptune), one file per op, each against
its pure-PyTorch twin in fisheradaptune.reference: results, determinism across calls and thread
counts, opcheck, and bad input refused with the argument named and nothing modified.

CPU and CUDA run the same tests through ``helpers.devices``; the CUDA cases carry the ``cuda``
marker (``pytest -m cuda tests/ops`` on a GPU machine).
"""
from __future__ import annotations

import pytest
import torch

from fisheradaptune.groups import GroupLayout
from helpers import make_generator


@pytest.fixture
def zero_total_case():
    """``make(device="cpu") -> (current, reference, layout)``: snapshots and a layout whose
    groups 0, 1, 3 have a zero total on one or both sides, group 2 has mass on both, and group
    4 has no elements (the zero-mass cases of js_drift and js_mass_*)."""
    def make(device="cpu"):
        g = make_generator(2)
        cur = [torch.rand(12, generator=g), torch.rand(8, generator=g)]
        ref = [torch.rand(12, generator=g), torch.rand(8, generator=g)]
        cur[0][0:4] = 0        # group 0: current sums to 0
        ref[0][4:8] = 0        # group 1: reference sums to 0
        cur[1][:] = 0
        ref[1][:] = 0          # group 3: both 0
        layout = GroupLayout(("a", "b"), ((12,), (8,)), ("g0", "g1", "g2", "g3", "empty"),
                             torch.tensor([[0, 0, 4, 0], [0, 4, 8, 1], [0, 8, 12, 2],
                                           [1, 0, 8, 3]]))
        return [c.to(device) for c in cur], [r.to(device) for r in ref], layout
    return make
