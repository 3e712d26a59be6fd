"""FisherAdapTune under DistributedDataParallel or FSDP2, with a resumable checkpoint.

    torchrun --nproc_per_node 2 examples/ddp_adaptune.py [--steps 200] [--fsdp]
    torchrun --nproc_per_node 2 examples/ddp_adaptune.py --steps 100 --save ckpt
    torchrun --nproc_per_node 2 examples/ddp_adaptune.py --steps 100 --resume ckpt

Each rank trains on its shard of every global batch. Under DDP the gradients are averaged, so
the Fisher (from ``.grad`` after backward) is the global-batch Fisher on every rank; wrap the
model with ``find_unused_parameters=True``, since a tensor frozen whole stops receiving
gradients. Under FSDP2 (``--fsdp``: ``fully_shard`` per block and at the root) each rank
tracks the Fisher of its own shards and the per-group sums and drift partial sums are
all-reduced. Either way each freeze decision is broadcast from rank 0. ``--save`` /
``--resume`` checkpoint model, optimizer and wrapper with torch.distributed.checkpoint
(``fisheradaptune.distributed.save`` / ``load``); a resumed run makes the same decisions as an
uninterrupted one. Uses gloo on CPU and NCCL when CUDA is available.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import fisheradaptune as fat
from fisheradaptune.demo.data import digits_transfer_task
from fisheradaptune.demo.models import TinyViT


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64, help="global batch")
    ap.add_argument("--check-every", type=int, default=20, help="steps between drift checks")
    ap.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP")
    ap.add_argument("--save", help="checkpoint directory to write after training")
    ap.add_argument("--resume", help="checkpoint directory to load before training")
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
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        wrapped = model
    else:
        wrapped = DDP(model, find_unused_parameters=True)
    opt = fat.FisherAdapTune(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05),
                             wrapped, check_every=args.check_every, fisher_decay=0.98,
                             policy=fat.Threshold(tau=0.1, patience=2, min_active_fraction=0.1))
    if args.resume:
        fat.distributed.load(args.resume, wrapped, opt)
    x, y = (t.to(device) for t in task.pretrain)
    per_rank = args.batch // world
    g = torch.Generator(device="cpu")
    for _ in range(args.steps):
        # The global batch depends on the step only: the same on every rank, and a resumed run
        # sees what an uninterrupted one would.
        g.manual_seed(opt.step_count)
        idx = torch.randint(0, len(y), (args.batch,), generator=g).to(device)
        mine = idx[rank * per_rank:(rank + 1) * per_rank]
        F.cross_entropy(wrapped(x[mine]), y[mine]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if args.save:
        fat.distributed.save(args.save, wrapped, opt)
    model.eval()
    with torch.no_grad():  # every rank runs the forward: FSDP2 gathers parameters collectively
        acc = (wrapped(x).argmax(-1) == y).float().mean().item()
    if rank == 0:
        print(opt.summary(max_rows=12))
        print(f"{world} ranks ({'FSDP2' if args.fsdp else 'DDP'}), step {opt.step_count}, active "
              f"fraction {opt.active_fraction:.3f}, training accuracy (clean digits, from scratch) "
              f"{acc:.3f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
