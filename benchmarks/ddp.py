"""PyTorch DistributedDataParallel (gloo, loopback only) with P ranks x 1 thread at global batch 128:

    python benchmarks/ddp.py --ranks 2 --epochs 3

The same MLP, optimizer and global batches as hpcfl (each rank takes its contiguous slice of
every global batch); processes started with torch.multiprocessing.spawn, rendezvous on
127.0.0.1. Prints one RESULT line with rank 0's seconds per epoch (after a barrier per epoch).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
from common import BATCH, LR, MOMENTUM, N_TRAIN, WEIGHT_DECAY, emit
from single import load_data, make_torch_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, size: int, port: int, epochs: int, queue) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    d, epoch_permutation, MEAN, STD = load_data()
    torch.manual_seed(0)
    model = DDP(make_torch_model(torch))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    X = torch.from_numpy((d.train_x.astype(np.float32) / np.float32(255) - np.float32(MEAN)) / np.float32(STD))
    Y = torch.from_numpy(d.train_y.astype(np.int64))
    base, extra = divmod(BATCH, size)
    lo = rank * base + min(rank, extra)
    hi = lo + base + (rank < extra)
    steps, times = N_TRAIN // BATCH, []
    for epoch in range(epochs):
        perm = torch.from_numpy(epoch_permutation(N_TRAIN, 0, epoch))
        dist.barrier()
        t0 = time.perf_counter()
        for s in range(steps):
            idx = perm[s * BATCH + lo:s * BATCH + hi]
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()                       # DDP averages the gradients (one bucket)
            opt.step()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        queue.put({"epoch_seconds": times, "torch": torch.__version__, "backend": "gloo"})
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(worker, args=(args.ranks, free_port(), args.epochs, queue), nprocs=args.ranks, join=True)
    emit({"variant": "torch-ddp", "ranks": args.ranks, **queue.get()})


if __name__ == "__main__":
    main()
