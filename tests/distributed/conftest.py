"""FisherAdapTune and TR-PTS selection under torch.distributed, 2 processes on gloo (CPU):
DistributedDataParallel and the torchrun example (test_ddp.py), FSDP2 ``fully_shard``, sharded
drift and checkpoint/resume with torch.distributed.checkpoint (test_fsdp.py). Each test spawns
its ranks; a worker opens its process group with ``helpers.gloo``.

Fixture: ``spawn``, which runs a worker on every rank with a fresh port and the test's tmp_path.
"""
from __future__ import annotations

import pytest
import torch.multiprocessing as mp

from helpers import free_port


@pytest.fixture
def spawn(tmp_path):
    """``spawn(worker, *args, nprocs=n)``: ``worker(rank, port, str(tmp_path), *args)`` on ``n``
    processes (``mp.spawn``, joined; a rank's failure fails the test), ``port`` free for their
    rendezvous. Workers must be module-level functions (they are pickled by name) and report by
    saving files under tmp_path."""
    def run(worker, *args, nprocs):
        mp.spawn(worker, args=(free_port(), str(tmp_path), *args), nprocs=nprocs, join=True)
    return run
