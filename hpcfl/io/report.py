"""What rank 0 shows and writes: progress bar, one line per epoch/round, JSON Lines metrics,
and the final model (written atomically, files.py)."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import StopTraining
from ..io.files import append_record, atomic_write, open_append
from ..log import RESULT

if TYPE_CHECKING:
    from .tensorboard import TensorBoardWriter

logger = logging.getLogger(__name__)


def on_terminal(levels: int = 3) -> bool:
    """Is this process, or the launcher that started it, writing to a terminal?

    Under mpirun a rank's stderr is a pipe to the launcher, which forwards it; so we also look
    at the stderr of up to `levels` ancestors (rank -> hydra proxy -> mpiexec) on Linux.
    """
    if sys.stderr.isatty():
        return True
    pid = os.getppid()
    for _ in range(levels):
        try:
            if os.readlink(f"/proc/{pid}/fd/2").startswith(("/dev/pts/", "/dev/tty")):
                return True
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])   # the field after the name: ppid
        except (OSError, ValueError, IndexError):
            return False
        if pid <= 1:
            return False
    return False


class Reporter:
    """Only rank 0 reports; other ranks get a Reporter that does nothing.

    Nothing is written before `begin()`, which the trainer calls once the run is known to start
    (every check passed, the checkpoint restored): a refused run leaves the metrics file as it
    was. Each record is appended durably (flush and fsync) to a file that must not be a
    symbolic link, then handed to the callbacks (hpcfl.train(..., callbacks=...)).
    """

    def __init__(self, cfg, rank: int, callbacks=(), dataset=None):
        self.cfg, self.active = cfg, rank == 0
        self.dataset = dataset                 # the data's name, shape, classes, normalisation
        self.callbacks = list(callbacks) if self.active else []
        self.bar = None
        self.use_bar = self.active and not cfg.quiet and on_terminal()
        self._fd: int | None = None
        self.tensorboard: TensorBoardWriter | None = None    # opened with the metrics file, in begin()

    def begin(self, position: int | None = None, key: str = "step") -> None:
        """Open the metrics file: a fresh run truncates it; a resumed run (position = the
        checkpoint's step, or round in fl mode) keeps the records up to it and drops the ones
        it will write again."""
        if self.active and self.cfg.tensorboard and self.tensorboard is None:
            from ..io.tensorboard import TensorBoardWriter

            if position is None:               # a fresh run (--overwrite): the old events go
                for old in Path(self.cfg.tensorboard).glob("events.out.tfevents.*"):
                    old.unlink()
            self.tensorboard = TensorBoardWriter(self.cfg.tensorboard)
        if not (self.active and self.cfg.metrics) or self._fd is not None:
            return
        path = Path(self.cfg.metrics)
        path.parent.mkdir(parents=True, exist_ok=True)
        if position is not None and path.exists() and not path.is_symlink():
            lines = path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if line.strip() and json.loads(line).get(key, 0) <= position]
            atomic_write(path, lambda f: f.write("".join(kept).encode()))
        self._fd = open_append(path, truncate=position is None)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def info(self, msg: str) -> None:
        if self.active:
            logger.info(msg)

    def result(self, msg: str) -> None:
        """The run's outcome (the final accuracy): shown even with --quiet (log.RESULT)."""
        if self.active:
            logger.log(RESULT, msg)

    def warn(self, msg: str) -> None:
        if self.active:
            logger.warning(msg)

    def start_progress(self, total: int, desc: str) -> None:
        if self.use_bar:
            from tqdm import tqdm

            # on stdout, like the epoch lines, so the launcher cannot reorder the two streams
            self.bar = tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True, file=sys.stdout)

    def advance(self, n: int = 1, loss: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if loss is not None and self.bar.n % 20 == 0:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def record(self, rec: dict, line: str) -> bool:
        """One epoch/round: close the bar, print the line, append the metrics record, run the
        callbacks. Returns True (rank 0 only) when a callback raised StopTraining."""
        if not self.active:
            return False
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.info(line)
        self.begin()
        if self.cfg.metrics:
            assert self._fd is not None          # begin() opened it
            append_record(self._fd, json.dumps(rec) + "\n")
        if self.tensorboard is not None:
            self.tensorboard(dict(rec))
        for callback in self.callbacks:
            try:
                callback(dict(rec))
            except StopTraining as exc:
                self.info(f"stopped by a callback{': ' + str(exc) if str(exc) else ''}")
                return True
        return False

    def save_model(self, params, sizes, projection=None) -> None:
        """--out: model.npz (core/model.py documents the format) and config.json, atomically."""
        if not (self.active and self.cfg.out):
            return
        from ..core.model import Model

        d = self.dataset
        meta = {} if d is None else {"dataset": d.name, "image_shape": tuple(d.image_shape),
                                     "num_classes": d.num_classes, "mean": d.mean, "std": d.std}
        out = Path(self.cfg.out)
        path = Model(tuple(sizes), params, projection=projection, **meta).save(out)
        atomic_write(out / "config.json", lambda f: f.write(self.cfg.to_json(this_mode_only=True).encode()))
        self.info(f"saved model to {path}")
