"""Durable file writes. A crash never leaves a half-written file under its final name: data is
written to a temporary file beside it, fsynced, renamed into place, and the rename is made
durable by an fsync of the folder."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Make renames inside `path` durable, not just the files' contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write) -> None:
    """write(fileobj) into a temporary file next to `path`, fsync, then rename over `path`.
    If write raises, the temporary file is removed and `path` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600; give what open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def check_writable_dir(path: str | Path) -> None:
    """Create `path` if needed and prove we can write there (raises OSError otherwise)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
        pass


def open_append(path: str | Path, truncate: bool = False) -> int:
    """A file descriptor for appending records to `path`, which must not be a symbolic link (a
    planted link must not redirect a job's output onto another file); created if missing."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    if truncate:
        flags |= os.O_TRUNC
    return os.open(path, flags, 0o666)


def append_record(fd: int, line: str) -> None:
    """Append one line and make it durable before going on (one metrics record per epoch or
    round: the fsync costs nothing next to them)."""
    data = line.encode()
    while data:
        data = data[os.write(fd, data):]
    os.fsync(fd)
