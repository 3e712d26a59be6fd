"""FisherAdapTune (fisheradaptune.adaptune) and the torch.optim contract of the wrappers
(fisheradaptune._wrapped): exact freezing, resume, AMP, policies and estimators
(test_fisher_adaptune.py, test_policies.py), the optimizer contract (test_contract.py), training
loop patterns, non-finite state and non-row-major parameters.

Fixture: ``make_mlp``, the small MLP the loop and state tests train.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture
def make_mlp():
    """``make_mlp()``: ``Linear(6, 8) -> Tanh -> Linear(8, 3)``, initialised after
    ``torch.manual_seed(0)`` (so every call builds the same model)."""
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    return make
