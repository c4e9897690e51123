"""Synchronous data-parallel training: one in-place Allreduce of the flat gradient per step.

Every epoch draws one seeded global permutation; each global batch is cut into contiguous
per-rank slices by shard_range. So the sequence of global batches does not depend on the rank
count, and P ranks follow the trajectory of one process on the same global batch (up to
floating-point summation order). With DP-SGD the batches are Poisson samples drawn from the
secret seed, each per-sample gradient is clipped in the kernel, and GaussianNoise is added once
to the summed gradient (dpsgd.py).

With --checkpoint-dir, rank 0 checkpoints every --checkpoint-every epochs, at the end, and when
a stop signal arrives (preempt.py); then every rank raises Preempted. --resume goes on from the
saved step, skipping the batches of its epoch already done, so the final weights are bitwise
those of an uninterrupted run on as many ranks.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core import optim
from ..core.replica import Replica
from ..data.shard import epoch_permutation
from ..errors import TrainingError, UsageError
from ..io import checkpoint
from ..parallel.sync import gradient_reducer
from ..privacy import sampling
from ..runtime import preempt, testing, watchdog
from ..runtime.testing import Hooks
from . import dpsgd, loop

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..config import Config
    from ..core.layout import Layout
    from ..data.cache import Dataset
    from ..io.report import Reporter
    from ..parallel.comm import Comm
    from ..privacy.plan import DpPlan


def diverged_hint(cfg: Config) -> str:
    """Which option to change when the dp loss becomes NaN/Inf."""
    extra = f" or --momentum (now {cfg.momentum})" if cfg.optimizer == "sgd" and cfg.momentum > 0.95 else ""
    return f"try a smaller --lr (now {cfg.lr} with --optimizer {cfg.optimizer}){extra}"


class DataParallel:
    """The dp trainer (loop.Trainer): one unit is an epoch."""
    unit = "epoch"

    def __init__(self, cfg: Config, comm: Comm, data: Dataset, backend: Backend, layout: Layout | None,
                 plan: DpPlan | None, hooks: Hooks):
        B = cfg.batch_size
        self.steps_per_epoch = spe = data.n_train // B   # the last partial batch is dropped: fixed-size steps
        if spe == 0:
            raise UsageError(f"--batch-size {B} is larger than the training set ({data.n_train} samples)",
                             collective=True)
        self.total_steps = cfg.epochs * spe
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.cfg, self.comm, self.data, self.backend, self.plan, self.hooks = cfg, comm, data, backend, plan, hooks
        # DP-SGD's Poisson batches vary: the buffers hold a batch that is exceeded with probability
        # below 1e-12 per step (sampling.poisson_capacity's Chernoff bound); a larger one goes in chunks
        capacity = sampling.poisson_capacity(data.n_train, plan.q, 1e-12) if plan is not None else B
        norm = dpsgd.PROJECTED_NORM if plan is not None and plan.pca else (data.mean, data.std)
        self.rep = Replica(cfg, backend, max_local_batch=math.ceil(capacity / comm.size),
                           reducer=gradient_reducer(cfg, comm), layout=layout, norm=norm, comm=comm)
        self.noise: dpsgd.GaussianNoise | None = None
        if plan is not None:
            self.rep.model.clip = plan.clip
            self.noise = dpsgd.GaussianNoise(plan, self.rep.layout.n_params, comm.rank, comm.size, backend)
            self.rep.pre_reduce.append(self.noise)
        self.step, self.loss_sum = 0, 0.0     # the position, and the loss summed in its epoch so far
        self.stop: str | None = None
        self.budget_stop: str | None = None   # DP-SGD: the next step would pass --dp-epsilon
        self.best = 0.0
        self.projection: np.ndarray | None = None
        self.reporter: Reporter | None = None

    # ---- loop.Trainer
    def start(self, reporter: Reporter) -> Iterable[int]:
        cfg, comm, rep, plan = self.cfg, self.comm, self.rep, self.plan
        self.reporter = reporter
        reporter.info(f"dp: {comm.size} rank{'s' if comm.size > 1 else ''}, global batch {cfg.batch_size} "
                      f"({self.steps_per_epoch} steps/epoch), backend {cfg.backend}, allreduce {cfg.allreduce}, "
                      f"model {'-'.join(map(str, rep.layout.sizes))} ({rep.layout.n_params:,} params)")
        if plan is not None:
            reporter.info(f"DP-SGD: Poisson batches of {cfg.batch_size} expected (q = {plan.q:.3g}), "
                          f"per-sample clip {plan.clip:g}, noise z = {plan.z:.4g}, delta {plan.delta:g}")
        self.step, self.loss_sum = self._resume(reporter)
        if plan is not None and plan.pca:   # after _resume: the projection is a function of the run's seed
            self.data, self.projection = dpsgd.project(comm, self.backend, self.data, plan)
            reporter.info(f"DP-PCA: {plan.pca} directions, noise multiplier {plan.pca_noise:.4g} (its "
                          "epsilon is part of eps)")
        if self.step >= self.total_steps > 0:
            reporter.info(f"the checkpoint is at the last step ({self.total_steps}): nothing left to train")
            return range(0)
        spe = self.steps_per_epoch
        return range(self.step // spe + 1, (self.total_steps - 1) // spe + 2)

    def run_unit(self, unit: int) -> dict | None:
        """Epoch `unit` (from 1), from where the run stands (mid-epoch after a resume)."""
        spe, backend, reporter = self.steps_per_epoch, self.backend, self.reporter
        assert reporter is not None
        epoch, first = divmod(self.step, spe)          # first > 0: resumed mid-epoch
        watchdog.progress(f"dp epoch {epoch + 1}")
        # on a GPU the epoch's batch order is uploaded once, not each step's indices
        perm = backend.to_device(epoch_permutation(self.data.n_train, self.cfg.seed, epoch))
        last = min(spe, first + self.total_steps - self.step)
        reporter.start_progress(last - first, f"epoch {epoch + 1}")
        t0 = time.perf_counter()
        samples = self._private_steps(epoch, perm, first, last) if self.plan is not None else \
            self._steps(epoch, perm, first, last)
        done = self.step - epoch * spe
        if done < last and self.budget_stop is None:
            return None                                # stopped mid-epoch: the resumed run ends it
        backend.synchronize()
        seconds = time.perf_counter() - t0
        rec = self._record(epoch, max(done - first, 1), samples, seconds)
        if self.budget_stop is not None:
            rec["budget_stop"] = self.budget_stop
            reporter.warn(f"training stops after step {self.step}: {self.budget_stop}")
        self.loss_sum = 0.0
        return rec

    def _private_steps(self, epoch: int, perm: Any, first: int, last: int) -> int:
        """DP-SGD's steps first..last-1: written to the ledger before they are taken (one line
        for the lot, settled if fewer are taken), each checked against --dp-epsilon first."""
        plan, writer, start = self.plan, self.comm.rank == 0, self.step
        assert plan is not None
        plan.reserve(start, last - first, writer)
        samples = self._steps(epoch, perm, first, last)
        if self.step - start < last - first:
            plan.settle(start, self.step - start, writer)
        return samples

    def _steps(self, epoch: int, perm: Any, first: int, last: int) -> int:
        """Steps first..last-1 of the epoch; the samples they saw. Stops early on a stop signal."""
        cfg, comm, rep, plan, backend = self.cfg, self.comm, self.rep, self.plan, self.backend
        B, samples = cfg.batch_size, 0
        for s in range(first, last):
            lr = optim.learning_rate(cfg.lr, cfg.schedule, self.step, self.total_steps)
            self.hooks.at_step(comm.rank, self.step + 1, rep.pre_reduce)
            if plan is None:
                batch, denominator = perm[s * B:(s + 1) * B], None
            else:   # a Poisson batch from the secret seed; the mean over the expected size B
                assert self.noise is not None
                self.budget_stop = plan.over_budget(plan.z)    # the hard cap: a step past it is not taken
                if self.budget_stop is not None:
                    break
                batch = backend.to_device(sampling.poisson_sample(self.data.n_train, plan.q, plan.noise_seed,
                                                                  self.step, plan.attempt))
                denominator, self.noise.step = float(B), self.step
                plan.compose_round(plan.z, self.step)
            samples += len(batch)
            loss = rep.step(comm, self.data.train_x, self.data.train_y, batch, lr,
                            stop=preempt.requested() is not None, denominator=denominator)
            if not math.isfinite(loss):        # the loss is reduced, so every rank sees it
                raise TrainingError(f"loss became {loss} at step {self.step + 1} (epoch {epoch + 1}); "
                                    f"{diverged_hint(cfg)}", collective=True)
            self.loss_sum += loss
            self.step += 1
            assert self.reporter is not None
            self.reporter.advance(1, loss)
            if rep.stop_agreed:                # the same on every rank
                self.stop = preempt.requested() or "SIGTERM/SIGUSR1 on another rank"
                break
        return samples

    def _record(self, epoch: int, steps: int, samples: int, seconds: float) -> dict:
        """The epoch's record: the replicas checked, the test set scored, the rates. Under DP-SGD
        it carries no training loss, no sample count or rate and no clipping count: the Poisson
        batches are secret, and only the noised model is released."""
        comm, rep, plan = self.comm, self.rep, self.plan
        watchdog.progress(f"dp evaluation after epoch {epoch + 1}")
        rep.check_replicas(comm)
        acc, test_loss = rep.evaluate(comm, self.data.test_x, self.data.test_y)
        self.best = max(self.best, acc)
        rec = {"mode": "dp", "epoch": epoch + 1, "step": self.step, "ranks": comm.size,
               "test_loss": test_loss, "test_accuracy": acc, "epoch_seconds": seconds}
        if plan is None:
            flops = rep.layout.flops_per_sample()
            rec.update(train_loss=self.loss_sum / steps, samples_per_second=samples / seconds,
                       gflops_per_rank=flops * samples / seconds / comm.size / 1e9)
        else:
            rep.model.clipped = 0
            rec.update(dp_epsilon=plan.accountant.epsilon(), dp_noise=plan.z, dp_delta=plan.delta)
        return rec

    def line(self, rec: dict) -> str:
        if self.plan is not None:                  # DP-SGD: no loss, no rates (they tell the batches)
            return (f"epoch {rec['epoch']:3d}  test acc {100 * rec['test_accuracy']:6.2f}%  "
                    f"{rec['epoch_seconds']:6.2f} s  eps {rec['dp_epsilon']:.3g}")
        return (f"epoch {rec['epoch']:3d}  loss {rec['train_loss']:.4f}  test acc {100 * rec['test_accuracy']:6.2f}%  "
                f"{rec['epoch_seconds']:6.2f} s  {rec['samples_per_second']:9.0f} samples/s  "
                f"{rec['gflops_per_rank']:5.1f} GFLOP/s/rank")

    def is_last(self, unit: int) -> bool:
        return self.step >= self.total_steps

    def save(self) -> Path | None:
        return self._save(self.loss_sum)

    def close(self, history: list[dict]) -> None:
        pass

    def preempted(self) -> str | None:
        if self.stop is None or self.step >= self.total_steps:
            return None
        epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
        return f"after step {self.step} (epoch {epoch + 1}, batch {in_epoch} of {self.steps_per_epoch})"

    def params(self) -> np.ndarray:
        return self.rep.host_params()

    def model_parts(self) -> tuple[tuple[int, ...], np.ndarray | None]:
        return tuple(self.rep.layout.sizes), self.projection

    def final_checkpoint(self) -> Path | None:
        return self._save(0.0)

    def summary(self, history: list[dict], params: np.ndarray) -> loop.Summary:
        extra = {"steps": self.step, **(self.plan.summary() if self.plan is not None else {})}
        return loop.Summary(history, params, loop.last_accuracy(history),
                            projection=self.projection, extra=extra)

    # ---- checkpoints
    def _save(self, loss_sum: float) -> Path | None:
        """Checkpoint on rank 0 (every rank waits until it is durable); None without --checkpoint-dir."""
        cfg, comm, rep = self.cfg, self.comm, self.rep
        if not cfg.checkpoint_dir:
            return None
        epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
        meta = {"step": self.step, "epoch": epoch, "step_in_epoch": in_epoch, "ranks": comm.size,
                "sizes": list(rep.layout.sizes), "epoch_loss_sum": loss_sum, "data": self.data.fingerprint,
                # All randomness is a pure function of the seed: the init, and epoch e's batch order
                # data.epoch_permutation(n_train, seed, e). The position above says where to go on.
                "rng": {"seed": cfg.seed, "epoch_permutation": "numpy default_rng([seed, epoch])"}}
        if self.plan is not None:      # DP-SGD: the secret seed of batches and noise, the budget spent
            meta["dp"] = self.plan.state()
        arrays = rep.checkpoint_arrays(comm)       # collective: gathers a sharded optimizer state
        return checkpoint.save_on_root(comm, cfg, meta, lambda: arrays)

    def _resume(self, reporter: Reporter) -> tuple[int, float]:
        """Load the checkpoint to resume from, if any; returns (step, loss sum so far in its
        epoch). Opens the metrics file (reporter.begin) once the run is known to go on."""
        cfg, comm = self.cfg, self.comm
        ckpt = checkpoint.restore(comm, cfg, self.data.fingerprint or None)
        if ckpt is not None and ckpt.step > self.total_steps:
            raise UsageError(f"--checkpoint-dir {cfg.checkpoint_dir}: {ckpt.path.name} is at step "
                             f"{ckpt.step}, past this run's last step {self.total_steps} (--max-steps / "
                             "--epochs): raise them to go on, or use another folder", collective=True)
        if self.plan is not None:
            if ckpt is not None and "dp" in ckpt.meta:
                self.plan.load_state(ckpt.meta["dp"])     # the secret seed, the noise in use
            said = self.plan.start_attempt(comm, cfg.checkpoint_dir, checkpoint.changed_for_release(ckpt, comm.size),
                                           self.total_steps - (ckpt.step if ckpt else 0))
            if said:
                reporter.warn(f"resuming under --dp-epsilon: {said}")
        reporter.begin(ckpt.step if ckpt else (0 if cfg.resume else None))
        warning = ckpt.warning() if ckpt is not None else None
        if warning:
            reporter.warn(warning)
        if ckpt is None:
            if cfg.resume:
                reporter.info(f"no checkpoint in {cfg.checkpoint_dir} yet: starting from scratch")
            return 0, 0.0
        self.rep.load_state(ckpt.arrays)
        ranks = ckpt.meta["ranks"]
        reporter.info(f"resuming from {ckpt.path} at step {ckpt.step} (epoch {ckpt.meta['epoch'] + 1}, "
                      f"saved by {ranks} rank{'s' if ranks != 1 else ''})")
        return ckpt.step, ckpt.meta["epoch_loss_sum"]


def train(cfg: Config, comm: Comm, data: Dataset, backend: Backend, reporter: Reporter,
          layout: Layout | None = None, plan: DpPlan | None = None, hooks: Hooks | None = None) -> loop.Summary:
    """Run dp training on every rank of comm (loop.run); returns the summary."""
    trainer = DataParallel(cfg, comm, data, backend, layout, plan, hooks or testing.current())
    try:
        return loop.run(trainer, cfg, comm, reporter)
    finally:
        trainer.rep.free()
