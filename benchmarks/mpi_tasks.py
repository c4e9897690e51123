"""Benchmarks that run inside MPI ranks (launched by run_all.py under mpirun):

    mpirun -n 2 python benchmarks/mpi_tasks.py sync --allreduce fused --epochs 3
        gradient synchronisation per step inside real dp training (a timing wrapper around
        Comm's collectives, in this process only) vs a bare Allreduce of the same buffer
    mpirun -n 2 python benchmarks/mpi_tasks.py osu
        OSU-style MPI_Allreduce latency/bandwidth over 4 B..4 MiB, and point-to-point bandwidth
    mpirun -n 1 python benchmarks/mpi_tasks.py profile
        where the time of one dp step goes (GEMMs, elementwise, gather, optimizer, comm, Python):
        timers around the parts of the real Replica.step
    mpirun -n 1 python benchmarks/mpi_tasks.py onerank
        one rank's step at dp's defaults and at fl's B=10 against the GEMMs alone, and fl's plain
        SGD with the general kernel or the momentum-free one; blocks interleaved
    mpirun -n 1 python benchmarks/mpi_tasks.py compute
        step time at local batch 1..1024 (the compute term of the scaling model)

Each prints one RESULT line (rank 0).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
from common import emit

from hpcfl import backends
from hpcfl import data as data_mod
from hpcfl.config import Config
from hpcfl.io.report import Reporter
from hpcfl.parallel.comm import Comm
from hpcfl.training import dataparallel as dp

NORM = (data_mod.MEAN, data_mod.STD)      # MNIST's pixel statistics, as its cache records them

perf = time.perf_counter


def open_data(comm):
    return data_mod.open_cache(comm.agree(lambda: str(data_mod.prepare_cache(data_mod.resolve_data_dir(None)))))


# ------------------------------------------------------------------ sync

class TimedComm(Comm):
    """Comm that records the time spent synchronising the gradient buffer in each step.

    fused: the time inside Allreduce_sum of the (n+1)-float gradient buffer;
    overlap: the time inside every Iallreduce_sum of the step plus the final Waitall.
    Benchmark-only: hpcfl's own Comm carries no timers."""

    def __init__(self, n_params: int):
        super().__init__()
        self.n_params, self.times, self.start_times, self._acc = n_params, [], [], 0.0

    def Allreduce_sum(self, buf):
        if buf.size < self.n_params:                 # not the gradient (evaluation counts)
            return super().Allreduce_sum(buf)
        t0 = perf()
        super().Allreduce_sum(buf)
        self.times.append(perf() - t0)

    def Iallreduce_sum(self, buf):
        t0 = perf()
        req = super().Iallreduce_sum(buf)
        self._acc += perf() - t0
        return req

    def Waitall(self, requests):
        t0 = perf()
        Comm.Waitall(requests)
        self.times.append(self._acc + perf() - t0)
        self.start_times.append(self._acc)
        self._acc = 0.0


def per_call_stats(comm, times: np.ndarray) -> dict:
    """Per call: min over ranks (the rank that arrives last waits for nobody: its time is the
    synchronisation itself) and mean over ranks (adds the waiting for slower ranks)."""
    alltimes = comm.mpicomm.allgather(times)
    k = min(len(t) for t in alltimes)
    m = np.array([t[:k] for t in alltimes])          # (ranks, calls)
    return {"min_over_ranks_median_us": float(np.median(m.min(axis=0)) * 1e6),
            "mean_over_ranks_median_us": float(np.median(m.mean(axis=0)) * 1e6),
            "mean_us": float(m.mean() * 1e6), "calls": k}


def task_sync(args):
    from hpcfl.core import layout as model

    n_params = model.layout(Config().hidden).n_params
    comm = TimedComm(n_params)
    be = backends.get("numba")
    backends.set_threads(1)
    data = open_data(comm)
    cfg = Config(epochs=args.epochs, backend="numba", allreduce=args.allreduce, quiet=True)
    summary = dp.train(cfg, comm, data, be, Reporter(cfg, rank=1))
    steps = summary.extra["steps"]
    per_epoch = steps // args.epochs
    train_times = np.array(comm.times[per_epoch:])    # drop the warm-up epoch
    sync = per_call_stats(comm, train_times)
    # the bare collective: the same buffer, the same number of calls, back to back
    n = dp.Replica(cfg, be, 1, norm=NORM).sync.gradbuf.size    # the flat gradient with its extra slots
    buf = np.ones(n, np.float32)
    mpi = comm.mpicomm
    from mpi4py import MPI

    for _ in range(20):
        mpi.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    bare = np.empty(len(train_times))
    for i in range(len(bare)):
        t0 = perf()
        mpi.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        bare[i] = perf() - t0
    bare_stats = per_call_stats(comm, bare)
    # the same calls with the same compute between them on every rank (a step's GEMMs at the local
    # batch, and the buffer rewritten as the backward pass does): cache and scheduling effects
    # without the load imbalance of real training
    b = math.ceil(128 / comm.size)
    x = np.ones((b, 784), np.float32)
    w1 = np.full((784, 256), 1e-3, np.float32)
    h = np.empty((b, 256), np.float32)
    g1 = buf[:784 * 256].reshape(784, 256)
    between = np.empty(len(train_times))
    for i in range(len(between)):
        np.matmul(x, w1, out=h)
        np.matmul(x.T, h, out=g1)
        t0 = perf()
        mpi.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        between[i] = perf() - t0
    between_stats = per_call_stats(comm, between)
    epochs = [h["epoch_seconds"] for h in summary.history]
    if comm.rank == 0:
        emit({"task": "sync", "ranks": comm.size, "allreduce": args.allreduce, "floats": n,
              "epoch_seconds": epochs, "sync": sync, "bare": bare_stats, "bare_with_compute": between_stats,
              "start_us": float(np.median(comm.start_times[per_epoch:]) * 1e6) if comm.start_times else None,
              "ratio": sync["min_over_ranks_median_us"] / bare_stats["min_over_ranks_median_us"]})


# ------------------------------------------------------------------ osu

def task_osu(args):
    from mpi4py import MPI

    comm = Comm.world()
    mpi = comm.mpicomm
    sizes = [4 << k for k in range(21)]               # 4 B .. 4 MiB
    rows = []
    for nbytes in sizes:
        buf = np.ones(nbytes // 4, np.float32)
        for _ in range(5):
            mpi.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        mpi.Barrier()
        t0 = perf()
        for _ in range(5):
            mpi.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        est = mpi.allreduce((perf() - t0) / 5, op=MPI.MAX)
        iters = int(min(args.max_iters, max(10, args.budget / max(est, 1e-7))))
        mpi.Barrier()
        t0 = perf()
        for _ in range(iters):
            mpi.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        lat = (perf() - t0) / iters
        lats = mpi.allgather(lat)
        rows.append({"bytes": nbytes, "iters": iters, "lat_avg_us": 1e6 * float(np.mean(lats)),
                     "lat_min_us": 1e6 * min(lats), "lat_max_us": 1e6 * max(lats)})
    # point-to-point bandwidth (osu_bw: a window of non-blocking sends, rank 0 -> rank 1)
    p2p = None
    if comm.size >= 2:
        best = 0.0
        for nbytes in (1 << 20, 4 << 20):
            buf = np.ones(nbytes, np.uint8)
            ack = np.zeros(1, np.uint8)
            window = 16
            for rep in range(4):
                mpi.Barrier()
                t0 = perf()
                if comm.rank == 0:
                    MPI.Request.Waitall([mpi.Isend(buf, 1, 7) for _ in range(window)])
                    mpi.Recv(ack, 1, 8)
                elif comm.rank == 1:
                    bufs = [np.empty(nbytes, np.uint8) for _ in range(window)]
                    MPI.Request.Waitall([mpi.Irecv(b, 0, 7) for b in bufs])
                    mpi.Send(ack, 0, 8)
                dt = perf() - t0
                if rep and comm.rank == 0:
                    best = max(best, window * nbytes / dt)
        p2p = mpi.bcast(best / 1e9)
    # a memory copy on one rank, for reference (what shared-memory transport is made of)
    src = np.ones(4 << 20, np.uint8)
    dst = np.empty_like(src)
    t0 = perf()
    for _ in range(20):
        np.copyto(dst, src)
    memcpy = (4 << 20) * 20 / (perf() - t0) / 1e9
    if comm.rank == 0:
        emit({"task": "osu", "ranks": comm.size, "rows": rows, "p2p_GBps": p2p, "memcpy_GBps": memcpy})


# ------------------------------------------------------------------ profile

PHASES = ["gather", "gemm_forward", "gemm_weight_grad", "gemm_input_grad", "elementwise",
          "allreduce", "optimizer", "python_overhead"]


class Instrumented:
    """Timers around the parts of the REAL step (dp.Replica.step with the numba backend), not a
    copy of it: inside the block, the backend's np.matmul and its fused kernels, the gather, the
    communicator's Allreduce and the optimizer are wrapped by timers that add to T. A GEMM is told
    apart by its operands: a.T @ dz (weight gradient: a transposed first operand), dz @ W.T (input
    gradient: a transposed second operand), else a @ W (forward)."""

    KERNELS = ("_bias_act", "_softmax_xent_grad", "_relu_backward_bias", "_relu_backward_bias_t")

    def __init__(self, rep, comm, T):
        self.rep, self.comm, self.T = rep, comm, T

    def _timed(self, fn, phase):
        T = self.T

        def wrapper(*args, **kwargs):
            t0 = perf()
            out = fn(*args, **kwargs)
            T[phase] += perf() - t0
            return out
        return wrapper

    def _matmul(self, a, b, out=None):
        phase = ("gemm_weight_grad" if not a.flags.c_contiguous else
                 "gemm_input_grad" if not b.flags.c_contiguous else "gemm_forward")
        t0 = perf()
        np.matmul(a, b, out=out)
        self.T[phase] += perf() - t0
        return out

    def __enter__(self):
        import types

        from hpcfl.backends import numba_backend as nb

        self.saved = {name: getattr(nb, name) for name in (*self.KERNELS, "np", "gather", "gather_labels")}
        nb.np = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
        nb.np.matmul = self._matmul
        for name in self.KERNELS:
            setattr(nb, name, self._timed(self.saved[name], "elementwise"))
        be = self.rep.backend
        self.be_saved = (be.gather, be.gather_labels)
        be.gather, be.gather_labels = self._timed(be.gather, "gather"), self._timed(be.gather_labels, "gather")
        self.comm_saved = self.comm.Allreduce_sum
        self.comm.Allreduce_sum = self._timed(self.comm.Allreduce_sum, "allreduce")
        opt = self.rep.model.opt
        self.opt_saved = opt.step
        opt.step = self._timed(opt.step, "optimizer")
        if self.rep.sync.shared_params is not None:    # shm: the sum and the update run inside sync.run
            sync, model, T = self.rep.sync, self.rep.model, self.T
            self.run_saved = sync.run

            def timed_run(*args, **kwargs):
                t0 = perf()
                local = T["local_gradient"]
                out = self.run_saved(*args, **kwargs)
                T["sync_update"] += (perf() - t0) - (T["local_gradient"] - local)
                return out

            self.local_saved = model.local_gradient
            model.local_gradient = self._timed(model.local_gradient, "local_gradient")
            sync.run = timed_run
        return self

    def __exit__(self, *exc):
        from hpcfl.backends import numba_backend as nb

        for name, value in self.saved.items():
            setattr(nb, name, value)
        self.rep.backend.gather, self.rep.backend.gather_labels = self.be_saved
        self.comm.Allreduce_sum = self.comm_saved
        del self.rep.model.opt.step                            # back to the class's method
        del self.comm.Allreduce_sum
        if self.rep.sync.shared_params is not None:
            del self.rep.sync.run
            del self.rep.model.local_gradient


def allocations_per_step(rep, comm, data, perm, B, steps=50):
    """Peak bytes allocated (tracemalloc sees NumPy's buffers too) during `steps` dp steps."""
    import tracemalloc

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    for s in range(steps):
        rep.step(comm, data.train_x, data.train_y, perm[s * B:(s + 1) * B], 0.01)
    cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"peak_extra_bytes": peak - base, "retained_bytes": cur - base}


def task_profile(args):
    comm = Comm.world()
    backends.set_threads(1)
    be = backends.get("numba")
    data = open_data(comm)
    B = 128
    rep = dp.Replica(Config(backend="numba", allreduce=args.allreduce), be, math.ceil(B / comm.size), comm=comm,
                     norm=NORM)
    perm = data_mod.epoch_permutation(data.n_train, 0, 0)
    steps = data.n_train // B
    lr = 0.01
    int(np.asarray(data.train_x[:, 0]).sum())             # map every page of the images (as after epoch 1)
    for s in range(60):                                    # warm-up: load the kernels, fill the caches
        rep.step(comm, data.train_x, data.train_y, perm[s * B:(s + 1) * B], lr)
    T = dict.fromkeys(PHASES[:-1] + ["local_gradient", "sync_update"], 0.0)
    plain, instr, n_plain, n_instr, s = 0.0, 0.0, 0, 0, 0
    for _block in range(args.blocks):                      # alternate plain and timed blocks
        for kind in ("plain", "timed"):
            comm.Barrier()
            t0 = perf()
            timers = Instrumented(rep, comm, T) if kind == "timed" else contextlib.nullcontext()
            with timers:
                for _ in range(args.block_steps):
                    idx = perm[(s % steps) * B:(s % steps + 1) * B]
                    rep.step(comm, data.train_x, data.train_y, idx, lr)
                    s += 1
            dt = perf() - t0
            if kind == "plain":
                plain, n_plain = plain + dt, n_plain + args.block_steps
            else:
                instr, n_instr = instr + dt, n_instr + args.block_steps
    us = {k: v / n_instr * 1e6 for k, v in T.items()}
    step_us = plain / n_plain * 1e6
    # gradient sync plus the optimizer update: the Allreduce and the update (fused, overlap), or
    # sync.run without the rank's own backward (shm, where the update happens inside)
    sync_update_us = us.pop("sync_update") if args.allreduce == "shm" else us["allreduce"] + us["optimizer"]
    us.pop("local_gradient")
    us["python_overhead"] = max(0.0, step_us - sum(us.values()) - (sync_update_us if args.allreduce == "shm" else 0))
    alloc = allocations_per_step(rep, comm, data, perm, B)
    allus = comm.mpicomm.gather(us)
    all_sync = comm.mpicomm.gather(sync_update_us)
    if comm.rank == 0:
        mean = {k: float(np.mean([u[k] for u in allus])) for k in PHASES}
        emit({"task": "profile", "ranks": comm.size, "local_batch": math.ceil(B / comm.size),
              "step_us": step_us, "timed_step_us": instr / n_instr * 1e6, "phases_us": mean,
              "sync_update_us": float(np.mean(all_sync)), "alloc": alloc, "steps_measured": n_plain,
              "allreduce": args.allreduce})


# ------------------------------------------------------------------ one rank: each change alone

ONE_RANK = [  # (label, hidden, batch, momentum, weight decay): dp's defaults, and fl's local steps
    ("dp: 784-256-128-10, B=128, momentum 0.9", (256, 128), 128, 0.9, 0.0),
    ("fl: 784-200-200-10 (2NN), B=10, plain SGD", (200, 200), 10, 0.0, 0.0)]


def floor_step(layout, B):
    """The step's GEMMs alone, in the forms the numba backend uses (dz @ W.T, or W @ dz.T for few
    rows and large layers), for a ratio in the same process."""
    from hpcfl.backends.numba_backend import _input_grad_transposed

    rng = np.random.default_rng(0)
    W = [rng.standard_normal((a, b), dtype=np.float32) * 0.05 for a, b in zip(layout.sizes, layout.sizes[1:])]
    G = [np.empty_like(w) for w in W]
    x = rng.standard_normal((B, layout.sizes[0]), dtype=np.float32)
    A = [np.empty((B, n), np.float32) for n in layout.sizes[1:]]
    D = [np.empty((B, n), np.float32) for n in layout.sizes[1:]]
    T = [np.empty((n, B), np.float32) for n in layout.sizes[1:]]
    transposed = [i > 0 and _input_grad_transposed(B, *w.shape) for i, w in enumerate(W)]

    def step():
        a = x
        for i, w in enumerate(W):
            np.matmul(a, w, out=A[i])
            a = A[i]
        for i in range(len(W) - 1, -1, -1):
            np.matmul(A[i - 1].T if i else x.T, D[i], out=G[i])
            if transposed[i]:
                np.matmul(W[i], D[i].T, out=T[i - 1])
            elif i:
                np.matmul(D[i], W[i].T, out=D[i - 1])
    return step


def task_onerank(args):
    """One rank's step, side by side in one process, blocks interleaved, against the GEMMs alone
    (the floor); for plain SGD also with the general SGD kernel instead of the momentum-free one,
    and where backward takes the transposed input gradient (few rows), also without it.
    (Updating each layer inside backward, while its gradient is in cache, was measured here too
    and did not pay: -3% to +3%, within noise; the parameters, gradient and momentum of the
    first layer exceed the L2 cache, so the update streams from memory either way.)"""
    from hpcfl.backends import numba_backend as nb

    comm = Comm.self_()
    backends.set_threads(1)
    be = backends.get("numba")
    data = open_data(comm)
    int(np.asarray(data.train_x[:, 0]).sum())
    general = lambda p, g, buf, lr, m, wd, scale: nb._sgd(p, g, buf, *map(np.float32, (lr, m, wd, scale)))
    rows = []
    for label, hidden, B, momentum, wd in ONE_RANK:
        cfg = Config(backend="numba", hidden=hidden, momentum=momentum, weight_decay=wd)
        variants = {"hpcfl step": False}
        if momentum == 0 and wd == 0:
            variants["hpcfl step, general SGD kernel"] = True
        reps = {name: dp.Replica(cfg, be, B, norm=NORM) for name in variants}
        if any(t is not None for t in reps["hpcfl step"].model.ws.deltas_t):
            variants["hpcfl step, dz @ W.T at every batch size"] = False
            reps["hpcfl step, dz @ W.T at every batch size"] = rep = dp.Replica(cfg, be, B, norm=NORM)
            rep.model.ws.deltas_t = [None] * len(rep.model.ws.deltas_t)
        floor = floor_step(reps["hpcfl step"].layout, B)
        perm = data_mod.epoch_permutation(data.n_train, 0, 0)
        steps = data.n_train // B
        times = {name: [] for name in [*variants, "GEMMs alone (floor)"]}
        s = 0
        for block in range(args.blocks + 1):                  # block 0: warm-up
            for name in times:
                if name.startswith("GEMMs"):
                    t0 = perf()
                    for _ in range(args.block_steps):
                        floor()
                else:
                    rep = reps[name]
                    saved = be.sgd_update
                    if variants[name]:
                        be.sgd_update = general
                    t0 = perf()
                    for k in range(args.block_steps):
                        o = ((s + k) % steps) * B
                        rep.step(comm, data.train_x, data.train_y, perm[o:o + B], 0.01)
                    be.sgd_update = saved
                dt = (perf() - t0) / args.block_steps * 1e6
                if block:
                    times[name].append(dt)
            s += args.block_steps
        for name, ts in times.items():
            rows.append({"setting": label, "variant": name, "step_us": float(np.median(ts)),
                         "per_block_us": [round(t, 1) for t in ts],
                         "vs_floor": float(np.median(np.array(ts) / np.array(times["GEMMs alone (floor)"])))})
    emit({"task": "onerank", "rows": rows})


# ------------------------------------------------------------------ compute (scaling model input)

def task_compute(args):
    comm = Comm.self_()
    backends.set_threads(1)
    be = backends.get("numba")
    data = open_data(Comm.world())
    rows = []
    batches = [1 << k for k in range(11)]                 # 1 .. 1024
    rep = dp.Replica(Config(backend="numba"), be, max(batches), norm=NORM)
    perm = data_mod.epoch_permutation(data.n_train, 0, 0)
    for b in batches:
        steps = max(20, min(400, int(args.budget / (b * 1e-5 + 2e-4))))
        times, upd = [], []
        for _rep_i in range(5):
            t0 = perf()
            for s in range(steps):
                o = (s * b) % (data.n_train - b)
                rep.step(comm, data.train_x, data.train_y, perm[o:o + b], 0.01)
            times.append((perf() - t0) / steps)
        t0 = perf()
        for _s in range(steps):
            rep.model.opt.step(rep.model.params, rep.sync.grads, 0.0, 1.0 / b)
        upd = (perf() - t0) / steps
        # the minimum of the repeats: this feeds a model of an unloaded machine, and on a shared
        # one other work only ever adds time
        rows.append({"local_batch": b, "step_us": 1e6 * float(np.min(times)),
                     "step_us_median": 1e6 * float(np.median(times)), "optimizer_us": 1e6 * upd})
    emit({"task": "compute", "rows": rows})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True)
    s = sub.add_parser("sync")
    s.add_argument("--allreduce", choices=["fused", "overlap"], default="fused")
    s.add_argument("--epochs", type=int, default=3)
    o = sub.add_parser("osu")
    o.add_argument("--budget", type=float, default=0.2, help="seconds per message size")
    o.add_argument("--max-iters", type=int, default=20000)
    pr = sub.add_parser("profile")
    pr.add_argument("--blocks", type=int, default=6)
    pr.add_argument("--block-steps", type=int, default=150)
    pr.add_argument("--allreduce", choices=["fused", "shm"], default="fused")
    o1 = sub.add_parser("onerank")
    o1.add_argument("--blocks", type=int, default=7)
    o1.add_argument("--block-steps", type=int, default=300)
    c = sub.add_parser("compute")
    c.add_argument("--budget", type=float, default=0.15, help="seconds per batch size and repeat")
    args = p.parse_args()
    {"sync": task_sync, "osu": task_osu, "profile": task_profile, "onerank": task_onerank,
     "compute": task_compute}[args.task](args)


if __name__ == "__main__":
    main()
