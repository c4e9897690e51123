"""One run at a time on an output: a lock file beside each of the run's outputs.

The checkpoint folder and the --out folder get DIR/.hpcfl.lock, the metrics file FILE's folder
gets .FILE.hpcfl.lock (two runs may write different metrics files side by side). A lock is
created with O_EXCL (atomic, never through a symbolic link) and names its holder: host, pid
and the pid's start time (a recycled pid is not mistaken for the holder), SLURM job id and
restart count, start time, command line. A second run on the same outputs is refused with that
information. A lock is taken over, with a warning, when its holder is gone: a dead pid on this
host, or a SLURM job that squeue no longer lists; the requeued run of the same SLURM job (a
higher SLURM_RESTART_COUNT) takes its own lock back. Rank 0 does all of this.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..errors import UsageError
from ..io.files import atomic_write

logger = logging.getLogger(__name__)

NAME = ".hpcfl.lock"


def lock_path(path, is_dir: bool) -> Path:
    path = Path(path)
    return path / NAME if is_dir else path.parent / f".{path.name}{NAME}"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def holder() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _start_time(pid),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "argv": sys.argv}


def _slurm_job_alive(job_id: str) -> bool | None:
    """Whether SLURM still lists the job (None: cannot tell, e.g. no squeue here)."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return False if "Invalid job id" in out.stderr else None
    return bool(out.stdout.strip())


def stale_reason(theirs: dict, mine: dict) -> str | None:
    """Why the lock `theirs` may be taken over by `mine`, or None when its holder may be alive."""
    if (theirs.get("slurm_job_id") and theirs["slurm_job_id"] == mine.get("slurm_job_id")
            and mine.get("slurm_restart", 0) > theirs.get("slurm_restart", 0)):
        return "the same SLURM job, requeued"
    if theirs.get("host") == mine["host"]:
        pid = theirs.get("pid")
        if not isinstance(pid, int) or _start_time(pid) is None:
            return f"pid {pid} is not running on {mine['host']}"
        if theirs.get("pid_start") and _start_time(pid) != theirs["pid_start"]:
            return f"pid {pid} on {mine['host']} is now another process"
        return None
    if theirs.get("slurm_job_id") and _slurm_job_alive(theirs["slurm_job_id"]) is False:
        return f"SLURM job {theirs['slurm_job_id']} has ended"
    return None


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _describe(info: dict) -> str:
    job = f", SLURM job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return (f"host {info.get('host')}, pid {info.get('pid')}{job}, started {info.get('started')}")


class RunLock:
    """The locks of one run's outputs; `release()` removes those it still holds."""

    def __init__(self):
        self.held: list[Path] = []
        self.me = holder()

    def acquire(self, what: str, path, is_dir: bool) -> None:
        lock = lock_path(path, is_dir)
        if lock in self.held:
            return
        text = json.dumps(self.me, indent=1).encode()
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                theirs = self._read(lock)
                if theirs is not None:
                    why = stale_reason(theirs, self.me)
                else:   # being written by a run starting right now, or left empty by a crash
                    why = "it is empty or unreadable" if _age(lock) > 60 else None
                    theirs = {"host": "?", "pid": "?", "started": "just now"}
                if why is None:
                    raise UsageError(f"{what} {path} is in use by another run ({_describe(theirs)}; "
                                     f"lock file {lock}): wait for it to end or use another "
                                     "folder; if that run is gone, remove the lock file") from None
                logger.warning(f"taking over the lock {lock} of a run that has ended ({why})")
                atomic_write(lock, lambda f: f.write(text))
                self.held.append(lock)
                return
            except OSError as exc:
                raise UsageError(f"{what} {path}: cannot create the lock file {lock} "
                                 f"({exc.strerror or exc})") from None
            with os.fdopen(fd, "wb") as f:
                f.write(text)
            self.held.append(lock)
            return

    @staticmethod
    def _read(lock: Path) -> dict | None:
        try:
            info = json.loads(lock.read_text())
            return info if isinstance(info, dict) else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        for lock in self.held:
            info = self._read(lock)
            if info is not None and info.get("pid") == self.me["pid"] and info.get("host") == self.me["host"]:
                try:
                    lock.unlink()
                except OSError:
                    pass
        self.held = []
