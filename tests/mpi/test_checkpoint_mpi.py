"""Checkpoints under MPI, run at 1, 2, 3 and 4 ranks (see tests/test_mpi_suite.py): rank 0
writes and reads, every rank gets the state, and a preempted run resumes bitwise."""
from __future__ import annotations

import signal

import numpy as np
import pytest

from hpcfl import backends
from hpcfl.config import Config
from hpcfl.errors import Preempted, UsageError
from hpcfl.io import checkpoint
from hpcfl.io.report import Reporter
from hpcfl.runtime import preempt, testing
from hpcfl.training import dataparallel as dp


@pytest.fixture
def shared_dir(comm, tmp_path):
    """One folder for every rank: rank 0's tmp_path."""
    return comm.bcast(str(tmp_path) if comm.rank == 0 else None)


def train(cfg, comm, mnist, hooks=testing.NO_HOOKS):
    with preempt.handling():    # as hpcfl.train(..., handle_signals=True) and the CLI do
        return dp.train(cfg, comm, mnist, backends.get(cfg.backend), Reporter(cfg, rank=1), hooks=hooks).params


@pytest.mark.mpi
def test_restore_gives_every_rank_the_saved_state(comm, shared_dir):
    cfg = Config(checkpoint_dir=shared_dir, resume=True, optimizer="adam")
    rng = np.random.default_rng(1)
    saved = {"params": rng.standard_normal(235_146).astype(np.float32),
             "opt.m": rng.standard_normal(235_146).astype(np.float32), "opt.t": np.array(41, np.int64)}
    path = checkpoint.save_on_root(comm, cfg, {"step": 41, "epoch": 0}, lambda: saved)
    assert path.name == "ckpt-000000041.npz"
    ck = checkpoint.restore(comm, cfg)
    assert ck.step == 41 and ck.meta["mode"] == "dp"
    for name, a in saved.items():
        assert ck.arrays[name].dtype == a.dtype and np.array_equal(ck.arrays[name], a)


@pytest.mark.mpi
def test_a_refused_checkpoint_is_an_error_on_every_rank(comm, shared_dir):
    cfg = Config(checkpoint_dir=shared_dir, resume=True)
    checkpoint.save_on_root(comm, cfg, {"step": 3}, lambda: {"params": np.zeros(5, np.float32)})
    with pytest.raises(UsageError, match="--hidden") as info:
        checkpoint.restore(comm, cfg.replace(hidden=(32,)))
    assert info.value.collective                      # so each rank exits cleanly, rank 0 prints


@pytest.fixture
def keep_signal_handlers():
    """A preempted run leaves its SIGTERM/SIGUSR1 handlers in place (preempt.handling): undo that."""
    saved = {s: signal.getsignal(s) for s in preempt.SIGNALS}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.mpi
@pytest.mark.usefixtures("keep_signal_handlers")
def test_preempted_mid_epoch_then_resumed_is_bitwise_the_uninterrupted_run(comm, mnist, shared_dir):
    # 40 steps per epoch, 80 in all; the last rank gets SIGTERM during step 47 (epoch 2, batch 7)
    cfg = Config(batch_size=1500, epochs=2, optimizer="adam", lr=1e-3, backend="numba", quiet=True)
    plain = train(cfg, comm, mnist)
    ckpt = cfg.replace(checkpoint_dir=shared_dir)
    with pytest.raises(Preempted, match="after step 47") as info:
        train(ckpt, comm, mnist, testing.FaultInjection("term", comm.size - 1, 47))
    assert info.value.collective and info.value.exit_code == 75
    resumed = train(ckpt.replace(resume=True), comm, mnist)
    assert np.array_equal(resumed, plain)
