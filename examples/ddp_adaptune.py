"""FisherAdapTune under DistributedDataParallel.

    torchrun --nproc_per_node 2 examples/ddp_adaptune.py [--steps 200]

Each rank trains on its shard of every global batch; DDP averages the gradients, so the
Fisher (computed from ``.grad`` after backward) is the global-batch Fisher on every rank, and
each freeze decision is broadcast from rank 0. Wrap the model with
``find_unused_parameters=True``: a tensor frozen whole stops receiving gradients. Uses gloo on
CPU and NCCL when CUDA is available.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import fisheradaptune as fat
from fisheradaptune.data import digits_transfer_task
from fisheradaptune.models import TinyViT


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64, help="global batch")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same initial model on every rank
    task = digits_transfer_task(labels_per_class=20, seed=0)
    model = TinyViT().to(device)
    ddp = DDP(model, find_unused_parameters=True)
    opt = fat.FisherAdapTune(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05), ddp,
                             check_every=20, fisher_decay=0.98,
                             policy=fat.Threshold(tau=0.1, patience=2, min_active_fraction=0.1))
    x, y = (t.to(device) for t in task.pretrain)
    g = torch.Generator(device="cpu").manual_seed(1)  # the same global batches on every rank
    per_rank = args.batch // world
    for step in range(args.steps):
        idx = torch.randint(0, len(y), (args.batch,), generator=g).to(device)
        mine = idx[rank * per_rank:(rank + 1) * per_rank]
        F.cross_entropy(ddp(x[mine]), y[mine]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if rank == 0:
        print(opt.summary(max_rows=12))
        model.eval()
        with torch.no_grad():
            acc = (model(x).argmax(-1) == y).float().mean().item()
            print(f"{world} ranks, active fraction {opt.active_fraction:.3f}, training accuracy "
                  f"(clean digits, from scratch) {acc:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
