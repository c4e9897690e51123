"""GPU benchmark: training epochs of hpcfl's cupy backend against PyTorch CUDA with the same MLP,
and the measured cuBLAS SGEMM rate that turns epoch times into achieved TFLOP/s.

    python benchmarks/gpu_bench.py                    # batches 128 and 8192, 3 timed epochs each
    python benchmarks/gpu_bench.py --batches 128,1024,8192 --epochs 5 --hidden 256,128
    python benchmarks/gpu_bench.py --out benchmarks/results     # + gpu_bench.json for RESULTS.md

One process, one GPU: hpcfl's side is dp.Replica.step, exactly what one rank does in `--mode dp`
(at one rank the Allreduce is a no-op). Both sides keep the uint8 images on the device, gather and normalise
each batch there, use plain FP32 (no TF32), SGD with momentum 0.9 and weight decay 1e-4, and
read the loss back to the host every step (hpcfl's trainer does; it is the step's one sync).
The images are MNIST's when $HPCFL_DATA_DIR (or --data-dir) holds them, otherwise random bytes
of the same shape: the timing does not depend on the pixel values.

Prints a markdown table; with --out also writes DIR/gpu_bench.json, which
`python benchmarks/report.py` turns into RESULTS.md's GPU section and targets 6a/6b (batch 128 no
slower than PyTorch; at the largest batch at least 50% of the 8192^3 SGEMM rate). Exits with
status 2 and one line on stderr where no GPU is usable.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcfl.backends import cupy_backend as be
from hpcfl.core import layout as model
from hpcfl.data.catalogue import MEAN, STD
from hpcfl.data.shard import epoch_permutation

N_TRAIN = 60_000


def load_images(data_dir: str | None):
    """(images (N, 784) uint8, labels (N,) uint8, description)."""
    from hpcfl import data

    folder = data_dir or os.environ.get("HPCFL_DATA_DIR")
    if folder and not data.missing_files(Path(folder)):
        mnist = data.open_cache(data.prepare_cache(Path(folder)))
        return np.asarray(mnist.train_x), np.asarray(mnist.train_y), f"MNIST from {folder}"
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (N_TRAIN, model.N_INPUT), dtype=np.uint8),
            rng.integers(0, 10, N_TRAIN).astype(np.uint8), "random bytes shaped like MNIST")


def sgemm_tflops(n: int, m: int, k: int, repeats: int = 20) -> float:
    """Measured rate of out(n, m) = a(n, k) @ b(k, m) through the backend's own SGEMM path."""
    cp = be.xp
    rng = np.random.default_rng(0)            # host random numbers: no cuRAND needed
    a = cp.asarray(rng.standard_normal((n, k), dtype=np.float32))
    b = cp.asarray(rng.standard_normal((k, m), dtype=np.float32))
    out = cp.empty((n, m), cp.float32)
    be._blas_begin()
    for _ in range(3):
        be._gemm(a, b, out)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(repeats):
        be._gemm(a, b, out)
    stop.record()
    stop.synchronize()
    seconds = cp.cuda.get_elapsed_time(start, stop) / 1e3 / repeats
    return 2.0 * n * m * k / seconds / 1e12


def time_hpcfl(images_dev, labels_dev, layout, batch, epochs, lr=0.05):
    """Epoch times (s) of hpcfl's own dp step (dp.Replica.step at one rank, as `python -m hpcfl
    --backend cupy` runs it), and the last epoch's mean loss."""
    from hpcfl.config import Config
    from hpcfl.parallel import comm
    from hpcfl.training import dataparallel as dp

    cfg = Config(hidden=layout.sizes[1:-1], batch_size=batch, optimizer="sgd", lr=lr, momentum=0.9,
                 weight_decay=1e-4, backend="cupy")
    rep = dp.Replica(cfg, be, max_local_batch=batch, norm=(MEAN, STD))
    world = comm.Comm.self_()
    steps = N_TRAIN // batch

    def epoch(e, n_steps):
        perm = be.to_device(epoch_permutation(N_TRAIN, 0, e))     # uploaded once, as dp.train does
        total = 0.0
        for s in range(n_steps):
            total += rep.step(world, images_dev, labels_dev, perm[s * batch:(s + 1) * batch], lr)
        be.synchronize()
        return total / n_steps

    epoch(0, min(steps, 20))                       # warm-up: kernel compiles, cuBLAS heuristics
    times, loss = [], None
    for e in range(epochs):
        t0 = time.perf_counter()
        loss = epoch(e + 1, steps)
        times.append(time.perf_counter() - t0)
    return times, loss


def time_torch(images_np, labels_np, layout, batch, epochs, lr=0.05):
    """The same training in PyTorch on CUDA; None when PyTorch or its CUDA build is missing."""
    try:
        import torch
    except ImportError:
        return None, "torch not installed"
    if not torch.cuda.is_available():
        return None, f"torch {torch.__version__} has no usable CUDA"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda", be.xp.cuda.runtime.getDevice())
    torch.manual_seed(0)
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(layout.sizes[:-1], layout.sizes[1:])):
        layers.append(torch.nn.Linear(fan_in, fan_out))
        if i < layout.n_layers - 1:
            layers.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*layers).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    images = torch.from_numpy(np.ascontiguousarray(images_np)).to(dev)
    labels = torch.from_numpy(labels_np.astype(np.int64)).to(dev)
    scale, shift = 1.0 / (255.0 * STD), MEAN / STD
    steps = N_TRAIN // batch

    def epoch(e, n_steps):
        perm = torch.from_numpy(epoch_permutation(N_TRAIN, 0, e)).to(dev)
        total = 0.0
        for s in range(n_steps):
            idx = perm[s * batch:(s + 1) * batch]
            x = images[idx].float() * scale - shift
            loss = torch.nn.functional.cross_entropy(net(x), labels[idx], reduction="sum")
            opt.zero_grad(set_to_none=True)
            (loss / batch).backward()
            opt.step()
            total += loss.item()                   # one sync per step, as in hpcfl
        torch.cuda.synchronize()
        return total / (n_steps * batch)

    epoch(0, min(steps, 20))
    times, loss = [], None
    for e in range(epochs):
        t0 = time.perf_counter()
        loss = epoch(e + 1, steps)
        times.append(time.perf_counter() - t0)
    return (times, loss), f"torch {torch.__version__}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="128,8192", help="comma-separated batch sizes")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per row (the median is shown)")
    p.add_argument("--hidden", default="256,128")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--out", default=None, help="folder for gpu_bench.json (benchmarks/results)")
    args = p.parse_args(argv)

    reason = be.unavailable_reason()
    if reason:
        print(f"gpu_bench: needs a CUDA GPU: {reason}", file=sys.stderr)
        return 2
    layout = model.layout(tuple(int(h) for h in args.hidden.split(",")))
    batches = [int(b) for b in args.batches.split(",")]
    images, labels, source = load_images(args.data_dir)
    images_dev, labels_dev = be.upload_images(images), be.upload_images(labels)
    flops_per_sample = layout.flops_per_sample()

    peak = sgemm_tflops(8192, 8192, 8192)
    shape_rate = sgemm_tflops(max(batches), layout.sizes[1], layout.sizes[0])
    gpu = be.describe_gpu()
    print(f"GPU: {gpu}; CuPy {be.xp.__version__}; data: {source}")
    print(f"model {'-'.join(map(str, layout.sizes))}, {flops_per_sample / 1e6:.2f} MFLOP per sample "
          f"(forward + backward GEMMs), {N_TRAIN:,} samples per epoch")
    print(f"cuBLAS SGEMM (FP32, no TF32): {peak:.1f} TFLOP/s at 8192^3; {shape_rate:.1f} TFLOP/s at "
          f"({max(batches)} x {layout.sizes[0]}) @ ({layout.sizes[0]} x {layout.sizes[1]})\n")
    print("| implementation | batch | epoch time (s) | samples/s | achieved TFLOP/s | % of SGEMM 8192^3 | final loss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for batch in batches:
        steps = N_TRAIN // batch
        flops = flops_per_sample * steps * batch
        runs = [("hpcfl cupy", time_hpcfl(images_dev, labels_dev, layout, batch, args.epochs))]
        if not args.no_torch:
            result, what = time_torch(images, labels, layout, batch, args.epochs)
            runs.append((f"PyTorch CUDA ({what})", result))
        for name, result in runs:
            if result is None:
                print(f"| {name} | {batch} | n/a | | | | |")
                continue
            times, loss = result
            t = statistics.median(times)
            tflops = flops / t / 1e12
            rows.append({"implementation": name, "batch": batch, "epoch_seconds": t, "epoch_times": times,
                         "samples_per_second": steps * batch / t, "tflops": tflops, "final_loss": loss})
            print(f"| {name} | {batch} | {t:.4f} | {steps * batch / t:,.0f} | {tflops:.2f} | "
                  f"{100 * tflops / peak:.1f}% | {loss:.4f} |")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        record = {"command": "python " + " ".join(["benchmarks/gpu_bench.py",
                                                   *(argv if argv is not None else sys.argv[1:])]),
                  "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                  "gpu": gpu, "host": platform.node(), "cupy": be.xp.__version__, "data": source,
                  "model": list(layout.sizes), "sgemm_tflops_8192": peak, "sgemm_tflops_shape": shape_rate,
                  "epochs": args.epochs, "rows": rows}
        from hpcfl.io.files import atomic_write

        atomic_write(out / "gpu_bench.json", lambda f: f.write(json.dumps(record, indent=1).encode()))
        print(f"\nwrote {out / 'gpu_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
