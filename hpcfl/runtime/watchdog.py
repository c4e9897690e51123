"""The stall watchdog (--stall-timeout): a rank that sees no progress of its own for that long
says what it was waiting for and aborts the whole job.

Without it, a peer that is SIGSTOPped, swapping to death or stuck on a dead file system leaves
every other rank spinning in a collective forever (MPI has no timeouts). Progress is marked
where it happens: comm.py around every blocking call (`waiting` before, `done` after), the
trainers after every step and round (`progress`). Each mark is two stores and one clock read,
so marking costs nothing next to a step. A daemon thread looks at the clock a few times per
timeout and calls the abort function it was given (comm.Abort: MPI_Abort takes every rank
down; mpi4py releases the GIL inside MPI calls, so the thread runs while the main thread
waits in one).
"""
from __future__ import annotations

import sys
import threading
import time

_last = time.monotonic()      # when this rank last made progress
_op = None                    # the blocking call it is in, if any
_context = "start-up"         # what the trainer is doing (step / round)


def waiting(op: str) -> None:
    global _op
    _op = op


def done() -> None:
    global _last, _op
    _last, _op = time.monotonic(), None


def progress(context: str | None = None) -> None:
    global _last, _context
    _last = time.monotonic()
    if context is not None:
        _context = context


def stalled_for() -> float:
    return time.monotonic() - _last


class Watchdog:
    """Start with `with Watchdog(timeout, rank, host, abort):`; timeout 0 disables it."""

    def __init__(self, timeout: float, rank: int, host: str, abort):
        self.timeout, self.rank, self.host, self.abort = timeout, rank, host, abort
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        if self.timeout > 0:
            progress("start-up")
            self._thread = threading.Thread(target=self._watch, name="hpcfl-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        period = min(max(self.timeout / 10, 0.05), 5.0)
        # Every healthy rank stalls at once when one peer stops; a rank-dependent grace lets rank 0
        # (or the lowest live rank) speak alone: its MPI_Abort ends the others within a second.
        limit = self.timeout + 2.0 * min(self.rank, 5)
        while not self._stop.wait(period):
            idle = stalled_for()
            if idle > limit:
                where = f"waiting in {_op}" if _op else "not in any MPI call"
                print(f"hpcfl: error: rank {self.rank} ({self.host}) made no progress for "
                      f"{idle:.0f} s ({where}, during {_context}): another rank is stalled, stopped or "
                      f"dead, or this one is; aborting the job (--stall-timeout {self.timeout:g})",
                      file=sys.stderr, flush=True)
                self.abort(1)
                return
