"""Exceptions that end a run with a clear message instead of a traceback.

The Python API raises them; the command line turns them into one message and an exit code.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class HpcflError(Exception):
    """An expected failure (bad input, bad data...). `exit_code` is what every rank exits with.

    `collective` is True when every rank is known to raise the same error at the same point
    (argument parsing, or an error agreed through Comm.agree / Comm.agree_all): then each rank
    exits cleanly and rank 0 prints the message. Otherwise the raising rank prints it and
    aborts the job.
    """

    exit_code = 1

    def __init__(self, message: str, collective: bool = False):
        super().__init__(message)
        self.collective = collective

    def __reduce__(self):          # travels between ranks (pickle) with its flag
        return (type(self), (str(self), self.collective))


class UsageError(HpcflError):
    """Bad options or settings that cannot work together (exit 2)."""

    exit_code = 2


class DataError(HpcflError):
    """Bad or missing data. The message always names the file and the problem."""


class TrainingError(HpcflError):
    """Training cannot go on (non-finite loss, replicas diverged, a failed protocol step)."""


class Preempted(HpcflError):
    """Stopped early by SIGTERM/SIGUSR1 (scheduler preemption or time limit), after saving a
    checkpoint when there is a --checkpoint-dir. Exit code 75 is EX_TEMPFAIL from sysexits.h
    ("try again later"): the SLURM scripts in jobs/ requeue the job on it and resume."""

    exit_code = 75


class StopTraining(Exception):
    """Raised by a callback (on rank 0) to end training early; not an error: train() returns."""


def computed_alike(fn: Callable[[], T]) -> T:
    """fn() where every rank computes the same thing from the same inputs (a setting's check, a
    partition): an HpcflError it raises is raised alike on every rank, so it is marked collective
    (each rank exits cleanly; none aborts the job)."""
    try:
        return fn()
    except HpcflError as exc:
        exc.collective = True
        raise
