"""A run's messages: one logger, `hpcfl`, whose records rank 0 shows. Every module logs to its own
`logging.getLogger(__name__)`, a child of `hpcfl`, so a program can raise or lower one part.

    info, debug      the start banner, one line per epoch/round, what a run did -> stdout
    RESULT (25)      the run's outcome (the final accuracy): shown even with --quiet -> stdout
    warning, error   "hpcfl: warning: ..." -> stderr

`configure` installs rank 0's handlers for a run (the command line does it for every command):
--log-level sets the least severe level shown, --quiet keeps only RESULT and above (the Python
API, with quiet=True, not even RESULT: it returns the result), --log-file adds a file with time
stamps and the rank. A program that has put its own handlers on the `hpcfl` logger keeps them
(the logger's level set to the run's) and gets no others. Without any configuration (a library
call such as hpcfl.load_dataset), Python's last-resort handler still prints warnings to stderr.

The last words of a failing rank (comm.py, api.guarded, watchdog.py) are not logged: they are
written straight to stderr by whichever rank fails, just before it aborts the job.
"""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("hpcfl")
RESULT = 25
logging.addLevelName(RESULT, "RESULT")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


class _Console(logging.Formatter):
    def format(self, record):
        if record.levelno >= logging.WARNING:
            return f"hpcfl: {record.levelname.lower()}: {record.getMessage()}"
        return record.getMessage()


class _BelowWarning(logging.Filter):
    def filter(self, record):
        return record.levelno < logging.WARNING


class RankFilter(logging.Filter):
    """Rank 0 shows what its level lets through; the other ranks only errors (the same warning
    from 8 ranks is noise, an error on rank 5 alone is news)."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record):
        return self.rank == 0 or record.levelno >= logging.ERROR


def _ours(handler: logging.Handler) -> bool:
    return getattr(handler, "_hpcfl", False)


class _Current(logging.StreamHandler):
    """Writes to sys.stdout or sys.stderr as it is at each record, so that a test's or a
    notebook's redirection is honoured."""

    def __init__(self, which: str):
        self.which = which
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self.which)

    @stream.setter
    def stream(self, value):
        pass


def _stream(which: str, level: int, *filters: logging.Filter) -> logging.Handler:
    handler = _Current(which)
    handler.setLevel(level)
    handler.setFormatter(_Console())
    for f in filters:
        handler.addFilter(f)
    return handler


def configure(rank: int, level: str = "info", *, quiet: bool = False, show_result: bool = True,
              log_file: str | None = None) -> None:
    """Rank 0's handlers for what follows (other ranks show errors only); replaces the ones an
    earlier call installed."""
    reset()
    least = LEVELS[level]
    shown = max(least, RESULT if show_result else logging.WARNING) if quiet else least
    # handlers the program put on this logger itself (not ones also on the root logger, which a
    # capture such as pytest's attaches to every non-propagating logger) win, at the run's level
    root = logging.getLogger().handlers
    if any(not _ours(h) and h not in root for h in logger.handlers):
        logger.setLevel(shown)
        return
    ranks = RankFilter(rank)
    handlers = [_stream("stdout", shown, _BelowWarning(), ranks),
                _stream("stderr", max(shown, logging.WARNING), ranks)]
    if log_file and rank == 0:
        try:
            file = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            from .errors import UsageError

            raise UsageError(f"--log-file {log_file}: cannot write it ({exc.strerror or exc})") from None
        file.setLevel(least)
        file.setFormatter(logging.Formatter(f"%(asctime)s rank {rank} %(levelname)s %(message)s"))
        handlers.append(file)
    for h in handlers:
        h._hpcfl = True      # type: ignore[attr-defined]
        logger.addHandler(h)
    logger.setLevel(min(h.level for h in handlers) if rank == 0 else logging.ERROR)
    logger.propagate = False


def reset() -> None:
    """Remove the handlers configure installed (the end of an API run)."""
    for h in list(logger.handlers):
        if _ours(h):
            logger.removeHandler(h)
            h.close()
    logger.setLevel(logging.NOTSET)
    logger.propagate = True

