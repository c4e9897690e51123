"""Exceptions that end a run with a clear message instead of a traceback."""


class HpcflError(Exception):
    """An expected failure (bad input, bad data...). `exit_code` is what every rank exits with.

    `collective` is True when every rank is known to raise the same error at the same point
    (argument parsing, or an error broadcast by Comm.agree): then each rank exits cleanly and
    rank 0 prints the message. Otherwise the raising rank prints it and aborts the job.
    """

    exit_code = 1

    def __init__(self, message: str, collective: bool = False):
        super().__init__(message)
        self.collective = collective


class UsageError(HpcflError):
    exit_code = 2


class TrainingError(HpcflError):
    """Training cannot go on (non-finite loss, replicas diverged)."""


class Preempted(HpcflError):
    """Stopped early by SIGTERM/SIGUSR1 (scheduler preemption or time limit), after saving a
    checkpoint when there is a --checkpoint-dir. Exit code 75 is EX_TEMPFAIL from sysexits.h
    ("try again later"): the SLURM scripts in jobs/ requeue the job on it and resume."""

    exit_code = 75
