"""Preemption: SIGTERM and SIGUSR1 (and Ctrl-C's SIGINT under the command line) only set a flag;
the trainer acts on it at a step boundary.

Schedulers announce the end of a job with a signal: SIGTERM on scancel, preemption or the time
limit (SIGKILL follows after a grace period), or the signal chosen with `sbatch --signal`
(the scripts in jobs/ ask for SIGUSR1). A handler that did real work could interrupt MPI
mid-call, and ranks receive the signal at different moments, so the handler just records it;
the ranks agree on it in the next step's collective (dp) or within one local step (fl,
comm.StopNotice), rank 0 checkpoints, and every rank exits with errors.Preempted.exit_code.

The command line installs the handlers before anything else, MPI_Init included, so a signal
during start-up is never fatal (`install`); the Python API only when asked (`handling`).
"""
from __future__ import annotations

import signal
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
INTERACTIVE = (signal.SIGINT,)     # Ctrl-C: the command line stops as on SIGTERM; a second one aborts

_received: str | None = None
_previous: dict = {}               # the handlers ours replaced
_for_process = False               # installed by the command line for the whole process


def requested() -> str | None:
    """Name of the first stop signal received since the handlers went in, or None."""
    return _received


def _handler(signum, frame) -> None:
    global _received
    if signum == signal.SIGINT and _received is not None:
        raise KeyboardInterrupt          # a second Ctrl-C: the user means it
    _received = _received or signal.Signals(signum).name


def _put_in(signals=SIGNALS) -> None:
    for s in signals:
        current = signal.getsignal(s)
        if current is not _handler:
            _previous[s] = current
            signal.signal(s, _handler)


def install() -> None:
    """Record SIGTERM/SIGUSR1 from now on, for the rest of the process (the command line)."""
    global _for_process
    _put_in(SIGNALS + INTERACTIVE)
    _for_process = True


def uninstall() -> None:
    global _received, _for_process
    for s, h in _previous.items():
        signal.signal(s, h)
    _previous.clear()
    _received, _for_process = None, False


@contextmanager
def handling(enabled: bool = True):
    """Handlers for the duration of a block (hpcfl.train(..., handle_signals=True)), starting
    with no signal received. The previous handlers come back afterwards, unless a stop signal
    came: then this process is on its way out, and a second one (under Slurm the ranks get
    SIGTERM from Slurm and SIGUSR1 from the job script) must not kill it before it exits with
    its code. Under the command line (install()) this changes nothing: a signal that arrived
    during start-up must stop the run at its first step."""
    global _received
    if not enabled or _for_process:
        yield
        return
    _put_in()
    _received = None
    try:
        yield
    finally:
        if _received is None:
            uninstall()
