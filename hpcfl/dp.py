"""Synchronous data-parallel training: one in-place Allreduce of the flat gradient per step.

Every epoch draws one seeded global permutation; each global batch is cut into contiguous
per-rank slices by shard_range. So the sequence of global batches does not depend on the rank
count, and P ranks follow the trajectory of one process on the same global batch (up to
floating-point summation order).
"""
from __future__ import annotations

import math
import time
import zlib

import numpy as np

from . import faults, model, optim
from .data import epoch_permutation, shard_range
from .errors import TrainingError

EVAL_BATCH = 1000


class Replica:
    """One copy of the model with its gradient buffer, optimizer and workspaces.

    The gradient buffer has one extra slot at the end that carries the batch loss, so the
    loss rides along in the same single Allreduce as the gradients.
    """

    def __init__(self, cfg, backend, max_local_batch: int):
        self.cfg, self.backend = cfg, backend
        self.layout = model.layout(cfg.hidden)
        n = self.layout.n_params
        self.params = backend.to_device(model.init_params(self.layout, cfg.seed))
        self.gradbuf = backend.xp.zeros(n + 1, dtype=np.float32)
        self.grads = self.gradbuf[:n]
        self.pviews, self.gviews = self.layout.views(self.params), self.layout.views(self.grads)
        self.opt = optim.make(cfg.optimizer, backend, n, cfg.momentum, cfg.weight_decay)
        self.ws = backend.Workspace(self.layout, max_local_batch)
        self.xbuf = backend.xp.empty((max_local_batch, model.N_INPUT), np.float32)
        self.ybuf = backend.xp.empty(max_local_batch, np.int32)
        self.eval_ws = backend.Workspace(self.layout, EVAL_BATCH)
        self.eval_x = backend.xp.empty((EVAL_BATCH, model.N_INPUT), np.float32)
        self.eval_y = backend.xp.empty(EVAL_BATCH, np.int32)
        self.proximal = None                   # (mu, anchor weights) in fl mode with --mu > 0
        self._prox_tmp = None

    def load_params(self, flat_host: np.ndarray) -> None:
        self.params[...] = self.backend.to_device(flat_host)

    def reset_optimizer(self) -> None:
        self.opt = optim.make(self.cfg.optimizer, self.backend, self.layout.n_params,
                              self.cfg.momentum, self.cfg.weight_decay)

    def _add_proximal(self, batch: int) -> None:
        mu, anchor = self.proximal
        if self._prox_tmp is None:
            self._prox_tmp = self.backend.xp.empty_like(self.params)
        tmp = self._prox_tmp
        self.backend.xp.subtract(self.params, anchor, out=tmp)
        tmp *= np.float32(mu * batch)          # the optimizer scales the gradient sum by 1/batch
        self.grads += tmp

    def local_gradient(self, images, labels, idx) -> None:
        """Summed loss and gradients of rows `idx` into gradbuf (the slot -1 is the loss)."""
        n, be = len(idx), self.backend
        if n == 0:                              # a rank with no rows in a tiny last batch (fl)
            self.gradbuf[...] = 0
            return
        be.gather(images, idx, self.xbuf)
        be.gather_labels(labels, idx, self.ybuf)
        self.gradbuf[-1] = be.forward_backward(self.pviews, self.xbuf[:n], self.ybuf[:n], self.gviews, self.ws)

    def step(self, comm, images, labels, global_idx, lr: float, fault: bool = False) -> float:
        """One synchronous step on this rank's slice of the global batch; returns the mean loss."""
        lo, hi = shard_range(len(global_idx), comm.rank, comm.size)
        self.local_gradient(images, labels, global_idx[lo:hi])
        if fault:
            self.gradbuf[-1] = np.nan
        comm.Allreduce_sum(self.gradbuf)       # sum of gradients and losses over the global batch
        if self.proximal is not None:          # FedProx: + mu (w - w_global), on the mean gradient
            self._add_proximal(len(global_idx))
        self.opt.step(self.params, self.grads, lr, 1.0 / len(global_idx))
        return float(self.gradbuf[-1]) / len(global_idx)

    def evaluate(self, comm, images, labels) -> tuple[float, float]:
        """(accuracy, mean loss) on the whole set; each rank scores its slice, counts are summed."""
        lo, hi = shard_range(len(labels), comm.rank, comm.size)
        counts = np.zeros(2, np.float64)
        for start in range(lo, hi, EVAL_BATCH):
            idx = np.arange(start, min(start + EVAL_BATCH, hi))
            self.backend.gather(images, idx, self.eval_x)
            self.backend.gather_labels(labels, idx, self.eval_y)
            correct, loss = self.backend.evaluate(self.pviews, self.eval_x[: len(idx)],
                                                  self.eval_y[: len(idx)], self.eval_ws)
            counts += (correct, loss)
        comm.Allreduce_sum(counts)
        return counts[0] / len(labels), counts[1] / len(labels)

    def host_params(self) -> np.ndarray:
        return self.backend.to_host(self.params)

    def check_replicas(self, comm) -> None:
        """Replicas must stay bitwise identical; compare a cheap checksum across ranks."""
        sums = comm.allgather(zlib.adler32(self.host_params().tobytes()))
        if len(set(sums)) > 1:
            raise TrainingError(f"model replicas diverged (checksums by rank: {sums})", collective=True)


def train(cfg, comm, data, backend, reporter) -> dict:
    """Run dp training; returns a summary (final accuracy, history)."""
    B = cfg.batch_size
    steps_per_epoch = data.n_train // B    # the last partial batch is dropped: fixed-size steps
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    rep = Replica(cfg, backend, max_local_batch=math.ceil(B / comm.size))
    flops = rep.layout.flops_per_sample()
    reporter.info(f"dp: {comm.size} ranks, global batch {B}, {steps_per_epoch} steps/epoch, "
                  f"backend {cfg.backend}, model {'-'.join(map(str, rep.layout.sizes))} "
                  f"({rep.layout.n_params:,} parameters)")
    history, step, epoch = [], 0, 0
    while step < total_steps:
        perm = epoch_permutation(data.n_train, cfg.seed, epoch)
        n_steps = min(steps_per_epoch, total_steps - step)
        reporter.start_progress(n_steps, f"epoch {epoch + 1}")
        loss_sum, t0 = 0.0, time.perf_counter()
        for s in range(n_steps):
            lr = optim.learning_rate(cfg.lr, cfg.schedule, step, total_steps)
            fault = faults.at_step(comm.rank, step + 1)
            loss = rep.step(comm, data.train_x, data.train_y, perm[s * B:(s + 1) * B], lr, fault)
            if not math.isfinite(loss):        # the loss is reduced, so every rank sees it
                raise TrainingError(f"loss became {loss} at step {step + 1} (epoch {epoch + 1}); "
                                    "try a smaller --lr", collective=True)
            loss_sum += loss
            step += 1
            reporter.advance(1, loss)
        backend.synchronize()
        seconds = time.perf_counter() - t0
        rep.check_replicas(comm)
        acc, test_loss = rep.evaluate(comm, data.test_x, data.test_y)
        rec = {"mode": "dp", "epoch": epoch + 1, "step": step, "ranks": comm.size,
               "train_loss": loss_sum / n_steps, "test_loss": test_loss, "test_accuracy": acc,
               "epoch_seconds": seconds, "samples_per_second": n_steps * B / seconds,
               "gflops_per_rank": flops * n_steps * B / seconds / comm.size / 1e9}
        history.append(rec)
        reporter.record(rec, f"epoch {epoch + 1:3d}  loss {rec['train_loss']:.4f}  "
                             f"test acc {100 * acc:6.2f}%  {seconds:6.2f} s  "
                             f"{rec['samples_per_second']:9.0f} samples/s  "
                             f"{rec['gflops_per_rank']:5.1f} GFLOP/s/rank")
        epoch += 1
        if cfg.target_accuracy is not None and acc >= cfg.target_accuracy:
            reporter.info(f"reached the target accuracy {100 * cfg.target_accuracy:.2f}% in epoch {epoch}")
            break
    params = rep.host_params()
    reporter.save_model(params, rep.layout.sizes)
    return {"history": history, "test_accuracy": history[-1]["test_accuracy"] if history else None,
            "params": params, "steps": step}
