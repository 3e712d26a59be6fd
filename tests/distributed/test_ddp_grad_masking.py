"""Under DistributedDataParallel the frozen ranges' gradients are zeroed at the source too: the
post-accumulate-grad hook runs before DDP's reducer reads the gradient, so after backward()
(with DDP's all-reduce done) frozen elements of ``.grad`` are zero and active ones are the
averaged gradient, with no call from the user (docs/methods.md section 4)."""
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import gloo
import fisheradaptune as fat

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def _worker(rank, port, out_dir, bucket_view):
    with gloo(rank, WORLD, port):
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True,
                                                  gradient_as_bucket_view=bucket_view)
        opt = fat.FisherAdapTune(torch.optim.SGD(model.parameters(), lr=0.1), ddp,
                                 check_every=10 ** 6, policy=fat.Observe())
        opt.freeze(["module.0.weight.slab1", "2.weight.slab0"])
        x, y = _data()
        half = slice(rank * 4, rank * 4 + 4)
        nn.functional.cross_entropy(ddp(x[half]), y[half]).backward()
        torch.save({"grads": [p.grad.clone() for p in model.parameters()],
                    "masks": [opt.frozen_mask(p) for p in model.parameters()]},
                   os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("bucket_view", [False, True])
def test_frozen_gradients_are_zero_after_ddp_backward(spawn, tmp_path, bucket_view):
    spawn(_worker, bucket_view, nprocs=WORLD)
    model = _model()
    x, y = _data()
    # DDP averages the two half-batch mean losses' gradients.
    loss = sum(nn.functional.cross_entropy(model(x[h]), y[h])
               for h in (slice(0, 4), slice(4, 8))) / 2
    loss.backward()
    for rank in range(WORLD):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert any(m.any() for m in out["masks"])
        for g, m, p in zip(out["grads"], out["masks"], model.parameters()):
            assert (g[m] == 0).all()
            torch.testing.assert_close(g[~m], p.grad[~m])
