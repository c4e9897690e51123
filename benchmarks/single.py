"""Single-process, single-thread epoch timings of the comparisons in target 1 (one variant per run):

    python benchmarks/single.py floor       # the 8 GEMMs of every step back to back: the BLAS floor
    python benchmarks/single.py numpy-loop  # a straightforward NumPy training loop
    python benchmarks/single.py torch       # PyTorch CPU, same MLP, same batches, SGD momentum

hpcfl itself is timed through its own command line (run_all.py). Every variant trains (or
multiplies) 468 steps of batch 128 per epoch and prints one RESULT line with the seconds of each
epoch; run_all drops the first (warm-up) epoch.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
from common import BATCH, LR, MOMENTUM, N_TRAIN, SIZES, WEIGHT_DECAY, emit, flops_per_sample
from threadpoolctl import threadpool_limits

STEPS = N_TRAIN // BATCH
f32 = np.float32


def gemm_operands(sizes=SIZES, B=BATCH, seed=0):
    """Buffers laid out as hpcfl's: W/gW as views into flat buffers, activations row-major."""
    rng = np.random.default_rng(seed)
    n = sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:]))
    flat, gflat = (rng.standard_normal(n, dtype=f32) * f32(0.05)), np.zeros(n, f32)
    W, G, off = [], [], 0
    for i, o in zip(sizes[:-1], sizes[1:]):
        W.append(flat[off:off + i * o].reshape(i, o))
        G.append(gflat[off:off + i * o].reshape(i, o))
        off += i * o + o
    x = rng.standard_normal((B, sizes[0]), dtype=f32)
    acts = [rng.standard_normal((B, o), dtype=f32) for o in sizes[1:]]
    deltas = [rng.standard_normal((B, o), dtype=f32) * f32(0.01) for o in sizes[1:]]
    return x, W, G, acts, deltas


def gemm_calls(x, W, G, acts, deltas):
    """The GEMMs of one training step, exactly as the numba backend issues them:
    [(name, a, b, out)]; a transposed operand is a view (BLAS gets a trans flag, no copy)."""
    calls, a = [], x
    for i, w in enumerate(W):                                   # forward: (B, in) @ (in, out)
        calls.append((f"fwd{i + 1} x@W", a, w, acts[i]))
        a = acts[i]
    for i in range(len(W) - 1, -1, -1):                         # backward, last layer first
        a_prev = acts[i - 1] if i > 0 else x
        calls.append((f"bwd{i + 1} a.T@dz", a_prev.T, deltas[i], G[i]))
        if i > 0:
            calls.append((f"bwd{i + 1} dz@W.T", deltas[i], W[i].T, deltas[i - 1]))
    return calls


def floor(epochs: int) -> dict:
    ops = gemm_operands()
    calls = [(a, b, out) for _, a, b, out in gemm_calls(*ops)]
    mm = np.matmul
    for a, b, out in calls * 20:                                # warm-up
        mm(a, b, out=out)
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        for _ in range(STEPS):
            for a, b, out in calls:
                mm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    # each shape alone, for the kernels table (hot caches: an upper bound on the rate)
    shapes = []
    for name, a, b, out in gemm_calls(*ops):
        reps, t0 = 300, time.perf_counter()
        for _ in range(reps):
            mm(a, b, out=out)
        dt = (time.perf_counter() - t0) / reps
        m, k = a.shape
        nn = b.shape[1]
        shapes.append({"gemm": name, "m": m, "k": k, "n": nn,
                       "trans_a": not a.flags.c_contiguous, "trans_b": not b.flags.c_contiguous,
                       "seconds": dt, "gflops": 2 * m * k * nn / dt / 1e9})
    flops = flops_per_sample() * BATCH * STEPS
    return {"epoch_seconds": times, "flops_per_epoch": flops, "shapes": shapes}


def load_data():
    from hpcfl import data

    d = data.open_cache(data.prepare_cache(data.resolve_data_dir(None)))
    return d, data.epoch_permutation, data.MEAN, data.STD


def numpy_loop(epochs: int) -> dict:
    """What one writes without thinking about performance: allocate freely, plain NumPy ops."""
    d, epoch_permutation, MEAN, STD = load_data()
    X, Y = d.train_x, d.train_y
    rng = np.random.default_rng(0)
    params = []
    for i, o in zip(SIZES[:-1], SIZES[1:]):
        params += [(rng.standard_normal((i, o)) * np.sqrt(2 / i)).astype(f32), np.zeros(o, f32)]
    vel = [np.zeros_like(p) for p in params]
    rows = np.arange(BATCH)
    times = []
    for epoch in range(epochs):
        perm = epoch_permutation(N_TRAIN, 0, epoch)
        t0, loss_sum = time.perf_counter(), 0.0
        for s in range(STEPS):
            idx = perm[s * BATCH:(s + 1) * BATCH]
            x = (X[idx].astype(f32) / f32(255) - f32(MEAN)) / f32(STD)
            y = Y[idx]
            W1, b1, W2, b2, W3, b3 = params
            h1 = np.maximum(x @ W1 + b1, 0)
            h2 = np.maximum(h1 @ W2 + b2, 0)
            z = h2 @ W3 + b3
            z = z - z.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            loss_sum += float(-np.log(p[rows, y]).mean())
            dz = p
            dz[rows, y] -= 1
            dz /= BATCH
            g3, gb3 = h2.T @ dz, dz.sum(axis=0)
            dh2 = (dz @ W3.T) * (h2 > 0)
            g2, gb2 = h1.T @ dh2, dh2.sum(axis=0)
            dh1 = (dh2 @ W2.T) * (h1 > 0)
            g1, gb1 = x.T @ dh1, dh1.sum(axis=0)
            for prm, g, v in zip(params, (g1, gb1, g2, gb2, g3, gb3), vel):
                v *= f32(MOMENTUM)
                v += g + f32(WEIGHT_DECAY) * prm
                prm -= f32(LR) * v
        times.append(time.perf_counter() - t0)
        if not np.isfinite(loss_sum):
            raise SystemExit("numpy loop diverged")
    return {"epoch_seconds": times, "train_loss_last_epoch": loss_sum / STEPS}


def torch_loop(epochs: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    d, epoch_permutation, MEAN, STD = load_data()
    torch.manual_seed(0)
    model = make_torch_model(torch)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    X = torch.from_numpy((d.train_x.astype(f32) / f32(255) - f32(MEAN)) / f32(STD))   # preloaded, normalised
    Y = torch.from_numpy(d.train_y.astype(np.int64))
    times = []
    for epoch in range(epochs):
        perm = torch.from_numpy(epoch_permutation(N_TRAIN, 0, epoch))
        t0, loss_sum = time.perf_counter(), 0.0
        for s in range(STEPS):
            idx = perm[s * BATCH:(s + 1) * BATCH]
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
        times.append(time.perf_counter() - t0)
    return {"epoch_seconds": times, "train_loss_last_epoch": loss_sum / STEPS, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def make_torch_model(torch):
    layers = []
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(SIZES) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variant", choices=["floor", "numpy-loop", "torch"])
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    with threadpool_limits(1):
        fn = {"floor": floor, "numpy-loop": numpy_loop, "torch": torch_loop}[args.variant]
        emit({"variant": args.variant, **fn(args.epochs)})


if __name__ == "__main__":
    main()
