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

from . import checkpoint, faults, model, optim, preempt
from .data import epoch_permutation, shard_range
from .errors import Preempted, TrainingError, UsageError

EVAL_BATCH = 1000


def gradient_reducer(cfg, comm):
    """What sums a step's gradients over `comm`: an NCCL communicator with --allreduce nccl
    (collective to create), else None, meaning comm's MPI Allreduce."""
    if cfg.allreduce != "nccl" or comm.size == 1:
        return None
    from .comm import NcclComm

    return NcclComm(comm)


class Replica:
    """One copy of the model with its gradient buffer, optimizer and workspaces.

    The gradient buffer has two extra slots at the end, [grads | stop votes | loss]: the batch
    loss and the ranks' votes to stop (preemption) ride along in the same single Allreduce as
    the gradients, so agreeing on a stop signal costs no extra collective.
    """

    def __init__(self, cfg, backend, max_local_batch: int, reducer=None):
        self.cfg, self.backend = cfg, backend
        self.reducer = reducer                 # sums the step's gradbuf instead of comm (NCCL)
        self.layout = model.layout(cfg.hidden)
        n = self.layout.n_params
        self.params = backend.to_device(model.init_params(self.layout, cfg.seed))
        self.gradbuf = backend.xp.zeros(n + 2, dtype=np.float32)
        self.grads = self.gradbuf[:n]
        self.stop_agreed = False               # set by step(): some rank voted to stop
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
        # --allreduce overlap: one gradient slice per layer (W then b, contiguous in the flat
        # buffer), each reduced by its own Iallreduce as soon as backward has produced it
        self.overlap = cfg.allreduce == "overlap"
        bounds = np.cumsum([0] + [i * o + o for i, o in zip(self.layout.sizes[:-1], self.layout.sizes[1:])])
        self.layer_grads = [self.gradbuf[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        self._reqs, self._req_comm = [], None
        self._on_layer_ready = self._start_layer_reduce   # bound once: no allocation per step

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

    def local_gradient(self, images, labels, idx, on_layer_ready=None) -> None:
        """Summed loss and gradients of rows `idx` into gradbuf (the slot -1 is the loss)."""
        n, be = len(idx), self.backend
        if n == 0:                              # a rank with no rows in a tiny last batch (fl)
            self.gradbuf[...] = 0
            return
        be.gather(images, idx, self.xbuf)
        be.gather_labels(labels, idx, self.ybuf)
        if on_layer_ready is None:
            loss = be.forward_backward(self.pviews, self.xbuf[:n], self.ybuf[:n], self.gviews, self.ws)
        else:
            loss = be.forward_backward(self.pviews, self.xbuf[:n], self.ybuf[:n], self.gviews, self.ws,
                                       on_layer_ready=on_layer_ready)
        self.gradbuf[-1] = loss

    def _start_layer_reduce(self, i: int) -> None:
        self._reqs.append(self._req_comm.Iallreduce_sum(self.layer_grads[i]))

    def _fill_tail(self, fault: bool, stop: bool) -> None:
        """After backward: this rank's stop vote, and the injected NaN loss of a fault test."""
        self.gradbuf[-2] = 1.0 if stop else 0.0
        if fault:
            self.gradbuf[-1] = np.nan

    def _overlapped_gradient(self, comm, images, labels, idx, fault: bool, stop: bool) -> None:
        """--allreduce overlap: Iallreduce each layer's gradients as soon as backward has made
        them (last layer first), then the loss slot; wait for all before the update. Every
        rank starts the same reductions in the same order, also a rank with no rows."""
        self._reqs.clear()
        self._req_comm = comm
        self.local_gradient(images, labels, idx, self._on_layer_ready)
        for i in range(len(self.layer_grads) - 1 - len(self._reqs), -1, -1):
            self._start_layer_reduce(i)        # only when backward did not run (no rows here)
        self._fill_tail(fault, stop)
        self._reqs.append(comm.Iallreduce_sum(self.gradbuf[-2:]))   # stop votes and loss
        comm.Waitall(self._reqs)

    def step(self, comm, images, labels, global_idx, lr: float, fault: bool = False,
             stop: bool = False) -> float:
        """One synchronous step on this rank's slice of the global batch; returns the mean loss.

        `stop` is this rank's vote to stop after this step; afterwards self.stop_agreed is the
        same on every rank: True when any rank voted.
        """
        lo, hi = shard_range(len(global_idx), comm.rank, comm.size)
        if self.overlap and comm.size > 1:
            self._overlapped_gradient(comm, images, labels, global_idx[lo:hi], fault, stop)
        else:
            self.local_gradient(images, labels, global_idx[lo:hi])
            self._fill_tail(fault, stop)
            # sum of gradients, stop votes and losses over the global batch
            (comm if self.reducer is None else self.reducer).Allreduce_sum(self.gradbuf)
        if self.proximal is not None:          # FedProx: + mu (w - w_global), on the mean gradient
            self._add_proximal(len(global_idx))
        self.opt.step(self.params, self.grads, lr, 1.0 / len(global_idx))
        votes, loss = (float(v) for v in self.backend.to_host(self.gradbuf[-2:]))  # one small copy
        self.stop_agreed = votes > 0
        return loss / len(global_idx)

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

    def state(self) -> dict[str, np.ndarray]:
        """Host copies of what a checkpoint holds: the parameters and the optimizer state."""
        out = {"params": self.host_params()}
        for name, value in self.opt.state().items():
            out[f"opt.{name}"] = np.array(value, np.int64) if isinstance(value, int) else self.backend.to_host(value)
        return out

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.load_params(arrays["params"])
        self.opt.load_state({k[4:]: v for k, v in arrays.items() if k.startswith("opt.")})

    def check_replicas(self, comm) -> None:
        """Replicas must stay bitwise identical; compare a cheap checksum across ranks."""
        sums = comm.allgather(zlib.adler32(self.host_params().tobytes()))
        if len(set(sums)) > 1:
            raise TrainingError(f"model replicas diverged (checksums by rank: {sums})", collective=True)


def _save(cfg, comm, rep, step: int, steps_per_epoch: int, loss_sum: float = 0.0):
    """Checkpoint on rank 0 (every rank waits until it is durable); None without --checkpoint-dir."""
    if not cfg.checkpoint_dir:
        return None
    epoch, in_epoch = divmod(step, steps_per_epoch)
    meta = {"step": step, "epoch": epoch, "step_in_epoch": in_epoch, "ranks": comm.size,
            "sizes": list(rep.layout.sizes), "epoch_loss_sum": loss_sum,
            # All randomness is a pure function of the seed: the init, and epoch e's batch order
            # data.epoch_permutation(n_train, seed, e). The position above says where to go on.
            "rng": {"seed": cfg.seed, "epoch_permutation": "numpy default_rng([seed, epoch])"}}
    return checkpoint.save_on_root(comm, cfg, meta, rep.state)


def _resume(cfg, comm, rep, reporter) -> tuple[int, float]:
    """Load the checkpoint to resume from, if any; returns (step, loss sum so far in its epoch)."""
    ckpt = checkpoint.restore(comm, cfg)
    if cfg.resume:
        reporter.resume_metrics(ckpt.step if ckpt else 0)
    if ckpt is None:
        if cfg.resume:
            reporter.info(f"no checkpoint in {cfg.checkpoint_dir} yet: starting from scratch")
        return 0, 0.0
    rep.load_state(ckpt.arrays)
    reporter.info(f"resuming from {ckpt.path} at step {ckpt.step} (epoch {ckpt.meta['epoch'] + 1}, "
                  f"saved by {ckpt.meta['ranks']} ranks)")
    return ckpt.step, ckpt.meta["epoch_loss_sum"]


def train(cfg, comm, data, backend, reporter) -> dict:
    """Run dp training; returns a summary (final accuracy, history).

    With --checkpoint-dir, rank 0 checkpoints every --checkpoint-every epochs, at the end, and
    when a stop signal arrives (preempt.py); then every rank raises Preempted. --resume goes on
    from the saved step, skipping the batches of its epoch already done, so the final weights
    are bitwise those of an uninterrupted run on as many ranks.
    """
    B = cfg.batch_size
    steps_per_epoch = data.n_train // B    # the last partial batch is dropped: fixed-size steps
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {B} is larger than the training set ({data.n_train} samples)",
                         collective=True)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    reducer = gradient_reducer(cfg, comm)
    try:
        rep = Replica(cfg, backend, max_local_batch=math.ceil(B / comm.size), reducer=reducer)
        return _run(cfg, comm, data, backend, reporter, rep, steps_per_epoch, total_steps)
    finally:
        if reducer is not None:
            reducer.Free()


def _run(cfg, comm, data, backend, reporter, rep, steps_per_epoch, total_steps) -> dict:
    """train()'s loop over epochs and steps, with the replica built."""
    B = cfg.batch_size
    flops = rep.layout.flops_per_sample()
    reporter.info(f"dp: {comm.size} ranks, global batch {B}, {steps_per_epoch} steps/epoch, "
                  f"backend {cfg.backend}, allreduce {cfg.allreduce}, model {'-'.join(map(str, rep.layout.sizes))} "
                  f"({rep.layout.n_params:,} parameters)")
    step, loss_sum = _resume(cfg, comm, rep, reporter)
    if step >= total_steps > 0:
        reporter.info(f"the checkpoint is at the last step ({total_steps}): nothing left to train")
    history, stop = [], None
    with preempt.watch():
        while step < total_steps and stop is None:
            epoch, first = divmod(step, steps_per_epoch)   # first > 0: resumed mid-epoch
            # on a GPU the epoch's batch order is uploaded once, not each step's indices
            perm = backend.to_device(epoch_permutation(data.n_train, cfg.seed, epoch))
            last = min(steps_per_epoch, first + total_steps - step)
            reporter.start_progress(last - first, f"epoch {epoch + 1}")
            t0 = time.perf_counter()
            for s in range(first, last):
                lr = optim.learning_rate(cfg.lr, cfg.schedule, step, total_steps)
                fault = faults.at_step(comm.rank, step + 1)
                loss = rep.step(comm, data.train_x, data.train_y, perm[s * B:(s + 1) * B], lr, fault,
                                stop=preempt.requested() is not None)
                if not math.isfinite(loss):        # the loss is reduced, so every rank sees it
                    raise TrainingError(f"loss became {loss} at step {step + 1} (epoch {epoch + 1}); "
                                        "try a smaller --lr", collective=True)
                loss_sum += loss
                step += 1
                reporter.advance(1, loss)
                if rep.stop_agreed:                # the same on every rank
                    stop = preempt.requested() or "SIGTERM/SIGUSR1 on another rank"
                    break
            if step < epoch * steps_per_epoch + last:
                break                              # stopped mid-epoch: the resumed run ends it
            backend.synchronize()
            seconds = time.perf_counter() - t0
            n_steps = last - first                 # steps done by this run, for the throughput
            rep.check_replicas(comm)
            acc, test_loss = rep.evaluate(comm, data.test_x, data.test_y)
            rec = {"mode": "dp", "epoch": epoch + 1, "step": step, "ranks": comm.size,
                   "train_loss": loss_sum / last, "test_loss": test_loss, "test_accuracy": acc,
                   "epoch_seconds": seconds, "samples_per_second": n_steps * B / seconds,
                   "gflops_per_rank": flops * n_steps * B / seconds / comm.size / 1e9}
            history.append(rec)
            reporter.record(rec, f"epoch {epoch + 1:3d}  loss {rec['train_loss']:.4f}  "
                                 f"test acc {100 * acc:6.2f}%  {seconds:6.2f} s  "
                                 f"{rec['samples_per_second']:9.0f} samples/s  "
                                 f"{rec['gflops_per_rank']:5.1f} GFLOP/s/rank")
            loss_sum = 0.0
            if cfg.target_accuracy is not None and acc >= cfg.target_accuracy:
                reporter.info(f"reached the target accuracy {100 * cfg.target_accuracy:.2f}% in epoch {epoch + 1}")
                break
            if cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0 and step < total_steps:
                _save(cfg, comm, rep, step, steps_per_epoch)
        if stop is not None and step < total_steps:
            path = _save(cfg, comm, rep, step, steps_per_epoch, loss_sum)
            epoch, in_epoch = divmod(step, steps_per_epoch)
            kept = (f"saved {path}; run again with --resume to continue" if path else
                    "progress is lost (no --checkpoint-dir)")
            raise Preempted(f"stopped by {stop} after step {step} (epoch {epoch + 1}, batch {in_epoch} "
                            f"of {steps_per_epoch}): {kept}", collective=True)
        _save(cfg, comm, rep, step, steps_per_epoch)
    params = rep.host_params()
    reporter.save_model(params, rep.layout.sizes)
    return {"history": history, "test_accuracy": history[-1]["test_accuracy"] if history else None,
            "params": params, "steps": step}
