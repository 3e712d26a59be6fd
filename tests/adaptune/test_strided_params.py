"""Freezing parameters whose strides are not row-major (channels_last convolutions): frozen
elements never move, active ones do, and nothing changes state before a failure."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fisheradaptune as fat


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1),
], ids=["adamw", "sgd"])
def test_channels_last_weight_freezes_exactly(make_opt):
    torch.manual_seed(0)
    model = ConvNet().to(memory_format=torch.channels_last)
    assert not model.conv.weight.is_contiguous()
    opt = fat.FisherAdapTune(make_opt(model.parameters()), model, check_every=10 ** 6,
                             policy=fat.Observe())
    x = torch.randn(6, 3, 8, 8).to(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (6,))

    def step():
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    for _ in range(3):
        step()  # optimizer state exists (momentum / Adam moments, channels_last too)
    opt.freeze(["conv.weight.slab0", "conv.weight.slab2"])
    mask = opt.frozen_mask(model.conv.weight)
    assert mask.any() and not mask.all()
    state = [v for v in opt.optimizer.state[model.conv.weight].values()
             if isinstance(v, torch.Tensor) and v.shape == mask.shape]
    assert state and all((v[mask] == 0).all() and (v[~mask] != 0).any() for v in state)
    before = model.conv.weight.detach().clone()
    for _ in range(4):
        step()
    after = model.conv.weight.detach()
    assert torch.equal(after[mask], before[mask])
    assert not torch.equal(after[~mask], before[~mask])


def test_layout_names_for_the_conv():
    model = ConvNet()
    opt = fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.1), model)
    assert "conv.weight.slab0" in opt.layout.names
