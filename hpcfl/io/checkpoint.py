"""Checkpoints: rank 0 saves atomically and loads the newest valid one; every rank gets a copy.

One checkpoint is one `.npz` (plain arrays, loaded with pickling disabled) named by its step, so
the newest sorts last:

    DIR/ckpt-000001234.npz
      params           float32 (n,)   the flat parameters
      opt.<name>       optimizer state: float32 (n,) buffers, int64 () counters (Adam's t)
      meta             uint8          JSON: format, mode, layer sizes, step, epoch, RNG recipe...
      config           uint8          JSON: the run's Config
      sha256           uint8          hex SHA-256 over every other entry (name, dtype, shape, bytes)

The trainer decides what goes into `arrays` and `meta`; this module knows files, checksums,
rotation and which settings a checkpoint must share with the run that resumes from it.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import HpcflError, TrainingError, UsageError
from ..io.files import atomic_write

logger = logging.getLogger(__name__)

FORMAT = 1
_NAME = re.compile(r"^ckpt-(\d{9})\.npz$")
_TEXT = ("meta", "config")  # JSON entries, stored as uint8 arrays


class CorruptCheckpoint(Exception):
    """Unreadable, truncated or failing its checksum (skipped, with a warning)."""


@dataclass
class Checkpoint:
    path: Path
    meta: dict
    config: dict
    arrays: dict[str, np.ndarray]
    changed: list = field(default_factory=list)    # settings that changed since (WARN rules)

    def warning(self) -> str | None:
        """The warning a resumed run prints once it goes on (after its own checks)."""
        if not self.changed:
            return None
        return (f"resuming {self.path.name} with changed settings ({', '.join(self.changed)}); "
                "the run will not match an uninterrupted one")

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def _digest(entries: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(entries):
        a = np.asarray(entries[name], order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _text(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), dtype=np.uint8)


def path_for(directory, step: int) -> Path:
    return Path(directory) / f"ckpt-{step:09d}.npz"


def list_checkpoints(directory) -> list[Path]:
    """Checkpoint files in `directory`, oldest first (by step)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _NAME.match(p.name))


# ---------------------------------------------------------------- files (rank 0 only)

def save(directory, cfg, meta: dict, arrays: dict[str, np.ndarray]) -> Path:
    """Write ckpt-<step>.npz atomically, then keep only the newest cfg.keep_checkpoints.

    Refuses non-finite parameters: a checkpoint must never replace a good one with bad weights.
    """
    if not np.isfinite(arrays["params"]).all():
        raise TrainingError(f"not saving a checkpoint at step {meta['step']}: the weights are not "
                            "finite; the previous checkpoint is kept")
    entries = {name: np.asarray(a, order="C") for name, a in arrays.items()}
    entries["meta"] = _text(json.dumps({"format": FORMAT, "mode": cfg.mode, **meta}, sort_keys=True))
    entries["config"] = _text(cfg.to_json())
    entries["sha256"] = _text(_digest(entries))
    path = path_for(directory, int(meta["step"]))
    try:
        atomic_write(path, lambda f: np.savez(f, **entries))  # type: ignore[arg-type]
    except OSError as exc:
        raise HpcflError(f"{path}: cannot write the checkpoint ({exc.strerror or exc})") from exc
    try:
        _rotate(directory, path, cfg.keep_checkpoints)
    except OSError as exc:     # the new checkpoint is durable: an old one left over is no failure
        logger.warning(f"{path} is saved, but an older checkpoint could not be removed "
                    f"({exc.strerror or exc})")
    return path


def _rotate(directory, newest: Path, keep: int) -> None:
    """Keep `newest` and the keep-1 checkpoints before it. A checkpoint of a later step goes
    only when it is corrupt (a leftover that --resume skipped): a valid later one may be a
    newer run's work, and is never deleted."""
    found = list_checkpoints(directory)
    older = [p for p in found if p.name < newest.name]   # names sort by step
    for p in older[:max(0, len(older) - (keep - 1))]:
        p.unlink()
    for p in (p for p in found if p.name > newest.name):
        try:
            load(p)
        except CorruptCheckpoint:
            p.unlink()
        except HpcflError:            # unreadable now: not ours to judge
            pass


def load(path) -> Checkpoint:
    """Read and verify one checkpoint; raises CorruptCheckpoint with the reason when its content
    is bad, and HpcflError when it cannot be read at all (EACCES, EIO, ESTALE...): resuming from
    an older checkpoint because of a passing I/O error would silently lose work."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise HpcflError(f"cannot read the checkpoint {path} ({exc.strerror or exc}); fix its "
                         "permissions or the file system, or move it away to resume from an older one") from exc
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            entries = {name: z[name] for name in z.files}
        stored = entries.pop("sha256").tobytes().decode()
        if _digest(entries) != stored:
            raise CorruptCheckpoint("checksum mismatch")
        meta, config = (json.loads(entries.pop(k).tobytes()) for k in _TEXT)
    except CorruptCheckpoint:
        raise
    except Exception as exc:  # truncated zip, bad CRC, missing entry, bad JSON: all "corrupt"
        raise CorruptCheckpoint(f"{type(exc).__name__}: {exc}") from exc
    if meta.get("format") != FORMAT or "params" not in entries:
        raise CorruptCheckpoint(f"unknown checkpoint format {meta.get('format')!r}")
    return Checkpoint(path, meta, config, entries)


def load_latest(directory, cfg, data_id: str | None = None) -> Checkpoint | None:
    """The newest checkpoint that reads back intact (older ones are fallbacks), or None.

    Skipped files are reported on stderr; this runs on rank 0 only, so each warning prints once.
    Raises UsageError when the newest valid checkpoint belongs to a different model or mode.
    """
    for path in reversed(list_checkpoints(directory)):
        try:
            ckpt = load(path)
        except CorruptCheckpoint as exc:
            logger.warning(f"skipping checkpoint {path}: corrupt or truncated ({exc})")
            continue
        check_compatible(ckpt, cfg, data_id)
        return ckpt
    return None


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def check_compatible(ckpt: Checkpoint, cfg, data_id: str | None = None) -> None:
    """What each setting may do on resume is declared next to it (config.py: MUST match, WARN,
    IGNORE, per mode). Refuses a checkpoint of other data (its fingerprint) or of a MUST
    setting; records the WARN settings that changed in ckpt.changed."""
    from ..config import FIELDS, MUST, WARN, flag

    saved, now = ckpt.config, json.loads(cfg.to_json())
    if saved.get("mode", "dp") != now["mode"]:
        raise UsageError(f"--checkpoint-dir {ckpt.path.parent}: {ckpt.path.name} was written by a run "
                         f"with --mode {saved.get('mode', 'dp')}, this run has --mode {now['mode']}; use the "
                         "same settings or another --checkpoint-dir")
    changed = []
    for name, f in FIELDS.items():
        rule = f.metadata["resume"][cfg.mode]
        if name not in saved or rule not in (MUST, WARN) or saved[name] == now[name]:
            continue
        if rule == MUST:
            raise UsageError(f"--checkpoint-dir {ckpt.path.parent}: {ckpt.path.name} was written by "
                             f"a run with {flag(name)} {_show(saved[name])}, this run has {flag(name)} "
                             f"{_show(now[name])}; use the same settings or another --checkpoint-dir")
        changed.append(f"{flag(name)} {_show(saved[name])} -> {_show(now[name])}")
    theirs = ckpt.meta.get("data")
    if data_id and theirs and theirs != data_id:
        raise UsageError(f"--checkpoint-dir {ckpt.path.parent}: {ckpt.path.name} was trained on other "
                         f"data ({cfg.dataset} here, with another content); use the same data or another "
                         "--checkpoint-dir")
    ckpt.changed = changed


def changed_for_release(ckpt: Checkpoint | None, ranks: int) -> list[str]:
    """The settings of a resumed run that differ from its checkpoint's in a way that changes
    what the training releases (the WARN settings, and the rank count: P ranks give one
    process's model only up to rounding): [] for a fresh run."""
    if ckpt is None:
        return []
    changed = list(ckpt.changed)
    saved = int(ckpt.meta.get("ranks", ranks))
    if saved != ranks:
        changed.append(f"the rank count {saved} -> {ranks}")
    return changed


# ---------------------------------------------------------------- collective entry points

def save_on_root(comm, cfg, meta: dict, arrays) -> Path:
    """Rank 0 writes arrays() (called there only); every rank returns the path, or raises the
    same error, once the file is durable."""
    return Path(comm.agree(lambda: str(save(cfg.checkpoint_dir, cfg, meta, arrays()))))


def restore(comm, cfg, data_id: str | None = None) -> Checkpoint | None:
    """The checkpoint to resume from on every rank, or None to start from scratch.

    Rank 0 reads and verifies the file; the arrays reach the other ranks by Bcast. Without
    --resume, a folder that already holds checkpoints is refused rather than mixed with new ones.
    """
    if not cfg.checkpoint_dir:
        return None
    found = None

    def find():  # rank 0 only
        nonlocal found
        if not cfg.resume:
            existing = list_checkpoints(cfg.checkpoint_dir)
            if existing:
                raise UsageError(f"--checkpoint-dir {cfg.checkpoint_dir} already holds checkpoints "
                                 f"({existing[-1].name}); pass --resume to continue from them, "
                                 "or use an empty folder")
            ledgers = sorted(Path(cfg.checkpoint_dir).glob("dp-ledger*.jsonl"))
            if ledgers:
                raise UsageError(f"--checkpoint-dir {cfg.checkpoint_dir} holds the privacy ledger of an earlier "
                                 f"run ({ledgers[0].name}: what it released of the same data); pass --resume "
                                 "to continue that run and its budget, or use an empty folder")
            return None
        found = load_latest(cfg.checkpoint_dir, cfg, data_id)
        if found is None:
            return None
        specs = [(name, a.shape, a.dtype.str) for name, a in found.arrays.items()]
        return str(found.path), found.meta, found.config, specs, found.changed

    header = comm.agree(find)
    if header is None:
        return None
    path, meta, config, specs, changed = header
    arrays = {}
    for name, shape, dtype in specs:
        if comm.rank == 0:
            assert found is not None
            buf = found.arrays[name]
        else:
            buf = np.empty(shape, dtype)
        comm.Bcast(buf)
        arrays[name] = buf
    return Checkpoint(Path(path), meta, config, arrays, changed)
