"""Synchronous data-parallel training: one in-place Allreduce of the flat gradient per step.

Every epoch draws one seeded global permutation; each global batch is cut into contiguous
per-rank slices by shard_range. So the sequence of global batches does not depend on the rank
count, and P ranks follow the trajectory of one process on the same global batch (up to
floating-point summation order).
"""
from __future__ import annotations

import math
import time

import numpy as np

from ..io import checkpoint
from ..runtime import faults
from ..core import optim
from ..runtime import preempt
from ..privacy import accountant as privacy
from ..runtime import watchdog
from ..data.shard import epoch_permutation, shard_range
from ..errors import HpcflError, Preempted, TrainingError, UsageError
from ..core.replica import Replica

NOISE_BLOCK = 1 << 16        # coordinates per noise generator: the unit each rank draws


class GaussianNoise:
    """DP-SGD's noise as a pre_reduce hook: N(0, (z C)^2) added exactly once to every coordinate
    of the summed gradient. The flat buffer is cut into blocks of 65,536 coordinates; each rank
    adds the blocks shard_range gives it, each the CSPRNG stream (step, block) under the run's
    DP-SGD key (noise.py: AES-256-CTR keyed from the 256-bit secret seed), so the noise is the
    same for any number of ranks (P ranks give one process's model), its cost is split across
    them, and a resumed run draws it again bitwise."""

    def __init__(self, plan, n: int, rank: int, size: int, backend):
        from ..privacy import noise

        blocks = math.ceil(n / NOISE_BLOCK)
        lo, hi = shard_range(blocks, rank, size)
        self.ranges = [(b, b * NOISE_BLOCK, min(n, (b + 1) * NOISE_BLOCK)) for b in range(lo, hi)]
        self.plan, self.std, self.backend = plan, np.float32(plan.z * plan.clip), backend
        self.buf = np.empty(NOISE_BLOCK, np.float32)
        self.step = 0
        self.gaussian, self._keyed = noise.Gaussian(), (None, None)

    def _key(self) -> bytes:
        from ..privacy import noise

        seed = self.plan.noise_seed                 # read now: a resumed run takes the checkpoint's
        if self._keyed[0] != seed:
            self._keyed = (seed, noise.derive_key(seed, "dpsgd"))
        return self._keyed[1]

    def __call__(self, gradbuf) -> None:
        key = self._key()
        for b, a, e in self.ranges:
            noise = self.gaussian.standard_normal(key, self.step * NOISE_BLOCK + b, self.buf[:e - a])
            noise *= self.std
            gradbuf[a:e] += self.backend.to_device(noise)


def gradient_reducer(cfg, comm, world=None, group: int = 0):
    """What sums a step's gradients over `comm`: an NCCL communicator with --allreduce nccl
    (collective over `world` to create), else None, meaning comm's MPI Allreduce."""
    if cfg.allreduce != "nccl" or comm.size == 1:
        return None
    from ..parallel.comm import NcclComm

    return NcclComm(comm, world=world, group=group)


def diverged_hint(cfg) -> str:
    """Which option to change when the dp loss becomes NaN/Inf."""
    extra = f" or --momentum (now {cfg.momentum})" if cfg.optimizer == "sgd" and cfg.momentum > 0.95 else ""
    return f"try a smaller --lr (now {cfg.lr} with --optimizer {cfg.optimizer}){extra}"


def _save(cfg, comm, rep, data, step: int, steps_per_epoch: int, loss_sum: float = 0.0, dp=None):
    """Checkpoint on rank 0 (every rank waits until it is durable); None without --checkpoint-dir."""
    if not cfg.checkpoint_dir:
        return None
    epoch, in_epoch = divmod(step, steps_per_epoch)
    meta = {"step": step, "epoch": epoch, "step_in_epoch": in_epoch, "ranks": comm.size,
            "sizes": list(rep.layout.sizes), "epoch_loss_sum": loss_sum, "data": data.fingerprint,
            # All randomness is a pure function of the seed: the init, and epoch e's batch order
            # data.epoch_permutation(n_train, seed, e). The position above says where to go on.
            "rng": {"seed": cfg.seed, "epoch_permutation": "numpy default_rng([seed, epoch])"}}
    if dp is not None:          # DP-SGD: the secret seed of batches and noise, the budget spent
        meta["dp"] = dp.state()
    arrays = rep.checkpoint_arrays(comm)       # collective: gathers a sharded optimizer state
    return checkpoint.save_on_root(comm, cfg, meta, lambda: arrays)


def _resume(cfg, comm, rep, reporter, data, total_steps: int, dp=None) -> tuple[int, float]:
    """Load the checkpoint to resume from, if any; returns (step, loss sum so far in its epoch).
    Opens the metrics file (reporter.begin) once the run is known to go on."""
    ckpt = checkpoint.restore(comm, cfg, data.fingerprint or None)
    if ckpt is not None and ckpt.step > total_steps:
        raise UsageError(f"--checkpoint-dir {cfg.checkpoint_dir}: {ckpt.path.name} is at step "
                         f"{ckpt.step}, past this run's last step {total_steps} (--max-steps / "
                         "--epochs): raise them to go on, or use another folder", collective=True)
    reporter.begin(ckpt.step if ckpt else (0 if cfg.resume else None))
    if ckpt is not None and ckpt.warning():
        reporter.warn(ckpt.warning())
    if ckpt is None:
        if cfg.resume:
            reporter.info(f"no checkpoint in {cfg.checkpoint_dir} yet: starting from scratch")
        return 0, 0.0
    rep.load_state(ckpt.arrays)
    if dp is not None and "dp" in ckpt.meta:
        dp.load_state(ckpt.meta["dp"])
    reporter.info(f"resuming from {ckpt.path} at step {ckpt.step} (epoch {ckpt.meta['epoch'] + 1}, "
                  f"saved by {ckpt.meta['ranks']} rank{'s' if ckpt.meta['ranks'] != 1 else ''})")
    return ckpt.step, ckpt.meta["epoch_loss_sum"]


def train(cfg, comm, data, backend, reporter, layout=None, dp=None) -> dict:
    """Run dp training; returns a summary (final accuracy, history, parameters).

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
    # DP-SGD's Poisson batches vary: the buffers hold a batch that is exceeded with probability
    # below 1e-12 per step (privacy.poisson_capacity's Chernoff bound); a larger one goes in chunks
    capacity = privacy.poisson_capacity(data.n_train, dp.q, 1e-12) if dp is not None else B
    norm = PROJECTED_NORM if dp is not None and dp.pca else (data.mean, data.std)
    rep = Replica(cfg, backend, max_local_batch=math.ceil(capacity / comm.size),
                  reducer=gradient_reducer(cfg, comm), layout=layout, norm=norm, comm=comm)
    if dp is not None:
        rep.model.clip = dp.clip
        rep.noise = GaussianNoise(dp, rep.layout.n_params, comm.rank, comm.size, backend)
        rep.pre_reduce.append(rep.noise)
    try:
        return _run(cfg, comm, data, backend, reporter, rep, steps_per_epoch, total_steps, dp)
    finally:
        rep.free()


def _run(cfg, comm, data, backend, reporter, rep, steps_per_epoch, total_steps, dp=None) -> dict:
    """train()'s loop over epochs and steps, with the replica built."""
    B = cfg.batch_size
    flops = rep.layout.flops_per_sample()
    reporter.info(f"dp: {comm.size} rank{'s' if comm.size > 1 else ''}, global batch {B} ({steps_per_epoch} "
                  f"steps/epoch), backend {cfg.backend}, allreduce {cfg.allreduce}, "
                  f"model {'-'.join(map(str, rep.layout.sizes))} ({rep.layout.n_params:,} params)")
    if dp is not None:
        reporter.info(f"DP-SGD: Poisson batches of {B} expected (q = {dp.q:.3g}), per-sample clip "
                      f"{dp.clip:g}, noise z = {dp.z:.4g}, delta {dp.delta:g}")
    step, loss_sum = _resume(cfg, comm, rep, reporter, data, total_steps, dp)
    projection = None
    if dp is not None and dp.pca:   # after _resume: the projection is a function of the run's seed
        data, projection = _project(comm, backend, data, dp)
        reporter.info(f"DP-PCA: {dp.pca} directions, noise multiplier {dp.pca_noise:.4g} (its epsilon is "
                      f"part of eps)")
    if step >= total_steps > 0:
        reporter.info(f"the checkpoint is at the last step ({total_steps}): nothing left to train")
    history, stop, finished_early = [], None, False
    while step < total_steps and stop is None and not finished_early:
        epoch, first = divmod(step, steps_per_epoch)   # first > 0: resumed mid-epoch
        watchdog.progress(f"dp epoch {epoch + 1}")
        # on a GPU the epoch's batch order is uploaded once, not each step's indices
        perm = backend.to_device(epoch_permutation(data.n_train, cfg.seed, epoch))
        last = min(steps_per_epoch, first + total_steps - step)
        reporter.start_progress(last - first, f"epoch {epoch + 1}")
        t0 = time.perf_counter()
        samples = 0
        for s in range(first, last):
            lr = optim.learning_rate(cfg.lr, cfg.schedule, step, total_steps)
            if faults.at_step(comm.rank, step + 1):     # tests only: a NaN loss on this rank
                rep.pre_reduce.append(faults.poison_loss_once(rep.pre_reduce))
            if dp is None:
                batch, denominator = perm[s * B:(s + 1) * B], None
            else:   # a Poisson batch from the secret seed; the mean over the expected size B
                batch = backend.to_device(privacy.poisson_sample(data.n_train, dp.q, dp.noise_seed, step))
                denominator, rep.noise.step = float(B), step
                dp.accountant.compose(dp.q, dp.z)
            samples += len(batch)
            loss = rep.step(comm, data.train_x, data.train_y, batch, lr,
                            stop=preempt.requested() is not None, denominator=denominator)
            if not math.isfinite(loss):        # the loss is reduced, so every rank sees it
                raise TrainingError(f"loss became {loss} at step {step + 1} (epoch {epoch + 1}); "
                                    f"{diverged_hint(cfg)}", collective=True)
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
        watchdog.progress(f"dp evaluation after epoch {epoch + 1}")
        rep.check_replicas(comm)
        acc, test_loss = rep.evaluate(comm, data.test_x, data.test_y)
        rec = {"mode": "dp", "epoch": epoch + 1, "step": step, "ranks": comm.size,
               "train_loss": loss_sum / last, "test_loss": test_loss, "test_accuracy": acc,
               "epoch_seconds": seconds, "samples_per_second": samples / seconds,
               "gflops_per_rank": flops * samples / seconds / comm.size / 1e9}
        if dp is not None:
            clipped = comm.allreduce(rep.model.clipped)
            rep.model.clipped = 0
            rec.update(dp_epsilon=dp.accountant.epsilon(), dp_noise=dp.z, dp_delta=dp.delta,
                       dp_clipped_fraction=clipped / max(samples, 1))
        history.append(rec)
        asked = reporter.record(rec, f"epoch {epoch + 1:3d}  loss {rec['train_loss']:.4f}  "
                                     f"test acc {100 * acc:6.2f}%  {seconds:6.2f} s  "
                                     f"{rec['samples_per_second']:9.0f} samples/s  "
                                     f"{rec['gflops_per_rank']:5.1f} GFLOP/s/rank"
                                     + (f"  eps {rec['dp_epsilon']:.3g}" if dp is not None else ""))
        finished_early = comm.bcast(asked)     # a callback on rank 0 said StopTraining
        loss_sum = 0.0
        if cfg.target_accuracy is not None and acc >= cfg.target_accuracy:
            reporter.info(f"reached the target accuracy {100 * cfg.target_accuracy:.2f}% in epoch {epoch + 1}")
            finished_early = True
        if cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0 and step < total_steps \
                and not finished_early:
            _save(cfg, comm, rep, data, step, steps_per_epoch, dp=dp)
    if stop is not None and step < total_steps:
        path = _save(cfg, comm, rep, data, step, steps_per_epoch, loss_sum, dp)
        epoch, in_epoch = divmod(step, steps_per_epoch)
        kept = (f"saved {path}; run again with --resume to continue" if path else
                "progress is lost (no --checkpoint-dir)")
        raise Preempted(f"stopped by {stop} after step {step} (epoch {epoch + 1}, batch {in_epoch} "
                        f"of {steps_per_epoch}): {kept}", collective=True)
    params = rep.host_params()
    finish(reporter, params, rep.layout.sizes, lambda: _save(cfg, comm, rep, data, step, steps_per_epoch, dp=dp),
           projection)
    out = {"history": history, "test_accuracy": history[-1]["test_accuracy"] if history else None,
           "params": params, "steps": step, "projection": projection}
    if dp is not None:
        out.update(dp_epsilon=dp.accountant.epsilon(), dp_noise=dp.z, dp_delta=dp.delta)
    return out


# The kernels read a row as (x / 255 - mean) / std; rows already standardised and projected by
# DP-PCA go through unchanged with mean 0 and std 1/255.
PROJECTED_NORM = (0.0, 1.0 / 255.0)


def _project(comm, backend, data, dp):
    """DP-PCA (privacy.dp_pca) on rank 0 from the raw training images, keyed by the run's noise
    seed; every rank gets the (D, K) projection and trains on the standardised images times it."""
    import dataclasses

    from ..privacy import noise
    from ..core.model import input_rows

    def pca():
        key = noise.derive_key(dp.noise_seed, "dp-pca")
        return privacy.dp_pca(backend.to_host(data.train_x), dp.pca, dp.pca_noise, key)

    projection = comm.bcast(pca() if comm.rank == 0 else None)

    def rows(x):
        x = backend.to_host(x)
        out = np.empty((len(x), projection.shape[1]), np.float32)
        for a in range(0, len(x), 10_000):     # as the saved model will compute them
            out[a:a + 10_000] = input_rows(x[a:a + 10_000], data.mean, data.std, projection)
        return backend.upload_images(out) if hasattr(backend, "upload_images") else out

    return dataclasses.replace(data, train_x=rows(data.train_x), test_x=rows(data.test_x)), projection


def finish(reporter, params, sizes, save_checkpoint, projection=None) -> None:
    """The end of a run: the final checkpoint, then the --out model. A checkpoint that cannot be
    written (disk full) does not cost the model: its error is raised after the model is saved."""
    error = None
    try:
        save_checkpoint()
    except HpcflError as exc:
        error = exc
    reporter.save_model(params, sizes, projection)
    if error is not None:
        raise error
