"""The loop both trainers share: run a trainer's units (dp: epochs, fl: rounds) until the last one,
a stop signal, StopTraining from a callback, the target accuracy or the privacy budget; save
checkpoints on their cadence; at the end write the final checkpoint and the model, or, after a
stop signal, the checkpoint a resumed run continues from, and raise Preempted.

Every decision here is the same on every rank: records are identical (computed from reduced or
broadcast values), a callback's StopTraining on rank 0 is broadcast, and a stop signal is agreed
inside the trainer's collectives (Replica.step's stop votes).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import HpcflError, Preempted

if TYPE_CHECKING:
    from ..config import Config
    from ..io.report import Reporter
    from ..parallel.comm import Comm


@dataclass
class Summary:
    """What a trainer returns: the records, the final parameters and what the Result reports."""
    history: list[dict]
    params: np.ndarray
    test_accuracy: float | None               # the last evaluated
    best_accuracy: float | None = None        # fl
    projection: np.ndarray | None = None      # DP-PCA's (dp)
    extra: dict[str, Any] = field(default_factory=dict)   # steps or rounds; dp_epsilon, dp_noise, dp_delta


class Trainer(Protocol):
    unit: str              # "epoch" or "round": what one record stands for
    stop: str | None       # what stopped the run (a signal), once every rank agreed; else None
    best: float            # the best test accuracy so far

    def start(self, reporter: Reporter) -> Iterable[int]:
        """Describe the run, resume from a checkpoint if there is one; the units left to run."""

    def run_unit(self, unit: int) -> dict | None:
        """Train one unit; its record, or None when it was abandoned for a stop signal."""

    def line(self, record: dict) -> str:
        """The unit's line on the console."""

    def is_last(self, unit: int) -> bool:
        """Whether `unit` was the run's last (no cadence checkpoint after it)."""

    def save(self) -> Path | None:
        """Checkpoint now, on rank 0 (None without --checkpoint-dir). Collective."""

    def close(self, history: list[dict]) -> None:
        """The loop is over (normally or not): settle what is in flight, check the outcome."""

    def preempted(self) -> str | None:
        """Where a stop signal left the run ("after step 12 ...", "during round 3 ..."), or None
        when it did not stop it (or the run had ended anyway)."""

    def params(self) -> np.ndarray:
        """The final parameters, on the host."""

    def model_parts(self) -> tuple[tuple[int, ...], np.ndarray | None]:
        """The model's layer sizes and DP-PCA projection (or None), for the model file."""

    def final_checkpoint(self) -> Path | None:
        """The checkpoint at the end of the run (None without --checkpoint-dir). Collective."""

    def summary(self, history: list[dict], params: np.ndarray) -> Summary:
        """The run's summary."""


def run(trainer: Trainer, cfg: Config, comm: Comm, reporter: Reporter) -> Summary:
    history: list[dict] = []
    for unit in trainer.start(reporter):
        rec = trainer.run_unit(unit)
        if rec is None:                              # a stop signal: the unit was abandoned
            break
        history.append(rec)
        if comm.bcast(reporter.record(rec, trainer.line(rec))):
            break                                    # a callback on rank 0 raised StopTraining
        if rec.get("budget_stop"):                   # the next release would pass --dp-epsilon
            break
        if cfg.target_accuracy is not None and trainer.best >= cfg.target_accuracy:
            reporter.info(f"reached the target accuracy {100 * cfg.target_accuracy:.2f}% in "
                          f"{trainer.unit} {unit}")
            break
        if trainer.stop is not None:                 # agreed in the unit's last step: it is complete
            break
        if cfg.checkpoint_every and unit % cfg.checkpoint_every == 0 and not trainer.is_last(unit):
            trainer.save()
    trainer.close(history)
    where = trainer.preempted()
    if where is not None:
        path = trainer.save()
        kept = f"saved {path}; run again with --resume to continue" if path else \
            "progress is lost (no --checkpoint-dir)"
        raise Preempted(f"stopped by {trainer.stop} {where}: {kept}", collective=True)
    params = trainer.params()
    sizes, projection = trainer.model_parts()
    finish(reporter, params, sizes, trainer.final_checkpoint, projection)
    return trainer.summary(history, params)


def finish(reporter: Reporter, params: np.ndarray, sizes: tuple[int, ...],
           save_checkpoint: Callable[[], Path | None], projection: np.ndarray | None = None) -> None:
    """The end of a run: the final checkpoint, then the --out model. A checkpoint that cannot be
    written (disk full) does not cost the model: its error is raised after the model is saved."""
    error = None
    try:
        save_checkpoint()
    except HpcflError as exc:
        error = exc
    reporter.save_model(params, sizes, projection)
    if error is not None:
        raise error


def last_accuracy(history: list[dict]) -> float | None:
    """The last evaluated test accuracy of a run's records."""
    return next((r["test_accuracy"] for r in reversed(history) if r.get("test_accuracy") is not None), None)
