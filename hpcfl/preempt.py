"""Preemption: SIGTERM and SIGUSR1 only set a flag; the trainer acts on it at a step boundary.

Schedulers announce the end of a job with a signal: SIGTERM on scancel, preemption or the time
limit (SIGKILL follows after a grace period), or the signal chosen with `sbatch --signal`
(the scripts in jobs/ ask for SIGUSR1). A handler that did real work could interrupt MPI
mid-call, and ranks receive the signal at different moments, so the handler just records it;
the ranks agree on it in the next step's collective, rank 0 checkpoints, and every rank exits
with errors.Preempted.exit_code.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: str | None = None
_depth = 0  # how many watch() blocks are open


def requested() -> str | None:
    """Name of the first stop signal received inside watch(), or None."""
    return _received


def _handler(signum, frame) -> None:
    global _received
    _received = _received or signal.Signals(signum).name


@contextmanager
def watch():
    """Record SIGTERM/SIGUSR1 instead of dying. The previous handlers come back afterwards,
    unless a stop signal came: then this process is on its way out, and a second one (under
    Slurm the ranks get SIGTERM from Slurm and SIGUSR1 from the job script) must not kill it
    before it exits with its code."""
    global _received, _depth
    if _depth:  # nested (cli.train watches from start-up on, the trainer again): keep the flag
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    _received, _depth = None, 1
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        _depth = 0
        if _received is None:
            for s, h in previous.items():
                signal.signal(s, h)
