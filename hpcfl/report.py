"""What rank 0 shows and writes: progress bar, one line per epoch/round, JSON Lines metrics,
and the final model (written atomically, files.py)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from .files import atomic_write


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
    """Only rank 0 reports; other ranks get a Reporter that does nothing."""

    def __init__(self, cfg, rank: int):
        self.cfg, self.active = cfg, rank == 0
        self.bar = None
        self.use_bar = self.active and not cfg.quiet and on_terminal()
        if self.active and cfg.metrics:
            Path(cfg.metrics).parent.mkdir(parents=True, exist_ok=True)
            if not cfg.resume:  # a fresh file per run; one line is appended per epoch
                open(cfg.metrics, "w").close()

    def resume_metrics(self, position: int, key: str = "step") -> None:
        """--resume: keep the records up to the checkpoint's position (a step, or a round in fl
        mode), drop the ones the resumed run will write again."""
        if not (self.active and self.cfg.metrics):
            return
        path = Path(self.cfg.metrics)
        lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        kept = [line for line in lines if line.strip() and json.loads(line).get(key, 0) <= position]
        atomic_write(path, lambda f: f.write("".join(kept).encode()))

    def info(self, msg: str) -> None:
        if self.active and not self.cfg.quiet:
            print(msg, flush=True)

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

    def record(self, rec: dict, line: str) -> None:
        """One epoch/round: close the bar, print the line, append the metrics record."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.info(line)
        if self.cfg.metrics:
            with open(self.cfg.metrics, "a") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()

    def save_model(self, params: np.ndarray, sizes) -> None:
        if not (self.active and self.cfg.out):
            return
        out = Path(self.cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "model.npz", lambda f: np.savez(f, params=params, sizes=np.array(sizes)))
        atomic_write(out / "config.json", lambda f: f.write(self.cfg.to_json().encode()))
        self.info(f"saved model to {out / 'model.npz'}")
