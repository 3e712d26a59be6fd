"""TR-PTS parameter selection (fisheradaptune.selection, fisheradaptune.masked): the selection
formula, select_connections and the saved file's validation (test_selection.py), mode="mask"
with MaskedOptimizer (test_masked_optimizer.py), mode="compact" with SparseLinear
(test_sparse_linear.py; on nn.TransformerEncoder, whose attention reads out_proj.weight:
test_compact_transformer.py), what is refused about a model (tied weights, peft adapters) or an
optimizer (test_model_checks.py), and the sweep of every torch.optim optimizer variant in both
modes (test_masked_compact_optimizer_sweep.py).

The fixtures are the small token model, its data and loss that most files select on.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn


class Net(nn.Module):
    """Embedding -> fc1 -> LayerNorm -> fc2 -> head over a token axis: fc1 and fc2 are the
    selectable layers, head the classifier, emb and norm never selected."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, tok):
        h = self.emb(tok)
        h = self.fc2(torch.relu(self.norm(self.fc1(h))))
        return self.head(h.mean(1))


@pytest.fixture
def make_net():
    """``make_net()``: a fresh :class:`Net` (initialised from the global RNG, as ``Net()``)."""
    return Net


@pytest.fixture
def make_data():
    """``make_data(n=3, seed=0)``: ``n`` batches of (tokens [4, 5], labels [4]) for Net."""
    def data(n=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        return [(torch.randint(0, 10, (4, 5), generator=g),
                 torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]
    return data


@pytest.fixture
def loss_fn():
    """``loss_fn(model, batch)``: cross-entropy of a Net on one batch of ``make_data``."""
    def loss(model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)
    return loss


@pytest.fixture
def selected_mask():
    """``selected_mask(sel, name, shape)``: the bool mask of the weight entries ``sel`` selects
    in layer ``name``."""
    def mask(sel, name, shape):
        m = torch.zeros(shape, dtype=torch.bool)
        m.scatter_(1, sel.index[name], True)
        return m
    return mask
