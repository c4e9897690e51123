"""The tests' seams into a run, in one place. Production code holds a Hooks object and calls its
three methods at fixed points; outside the tests that object is NO_HOOKS, whose methods do
nothing (one integer comparison per step).

- at_step(rank, step, pre_reduce): each optimizer step (dp), each round (fl), and start-up
  (step 0), with the replica's pre_reduce hooks (where a NaN loss is injected). FaultInjection
  (HPCFL_TESTING=1 and HPCFL_FAULT="KIND:RANK:STEP") fires a fault there: KIND is raise (an
  exception), kill (SIGKILL to this process), nan (a NaN loss), term (SIGTERM, as a
  scheduler would send: a deterministic preemption), stop (SIGSTOP: a stalled rank) or mark
  (only the announcement: a test waits for it, then acts from outside), on world rank RANK at
  step STEP. Both variables are needed: a HPCFL_FAULT left in a shell must not
  poison a real job, so without HPCFL_TESTING=1 it is ignored with a warning. A malformed value
  is a usage error.
- uploads(server_round, {client: masked vector}): what the secure-aggregation server receives
  (rank 0), for the tests that check it looks uniform.
- relay(server_round, {receiver: routed ciphertexts}) -> the same: what the server relays, which
  a test may tamper with.

A test in the process of the run installs its own Hooks with `installed(hooks)`.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from ..errors import UsageError

KINDS = ("raise", "kill", "nan", "term", "stop", "mark")


class Hooks:
    """The seams, doing nothing."""

    def at_step(self, rank: int, step: int, pre_reduce: list) -> None:
        """Called at each step (fl: round; 0: start-up) before it, with the replica's pre_reduce
        hooks (a fault may add one that poisons the step's loss)."""

    def uploads(self, server_round: int, uploads: Mapping[int, np.ndarray]) -> None:
        """Rank 0, secure aggregation: the masked vectors the server received."""

    def relay(self, server_round: int, routed: dict[int, bytes]) -> dict[int, bytes]:
        """Rank 0, secure aggregation: what the server relays to each client."""
        return routed


NO_HOOKS = Hooks()
_installed: Hooks | None = None


@contextlib.contextmanager
def installed(hooks: Hooks) -> Iterator[Hooks]:
    """Runs started inside the block (hpcfl.train in this process) use `hooks`."""
    global _installed
    before, _installed = _installed, hooks
    try:
        yield hooks
    finally:
        _installed = before


def current() -> Hooks:
    """The hooks a test installed, else NO_HOOKS (what a trainer started without hooks uses)."""
    return _installed if _installed is not None else NO_HOOKS


class FaultInjection(Hooks):
    def __init__(self, kind: str, rank: int, step: int):
        self.kind, self.rank, self.step = kind, rank, step

    def at_step(self, rank: int, step: int, pre_reduce: list) -> None:
        """Fire the fault if one is due."""
        if step != self.step or rank != self.rank:
            return
        print(f"hpcfl: fault injection: {self.kind} on rank {rank} at step {step}", file=sys.stderr, flush=True)
        if self.kind == "raise":
            raise RuntimeError(f"injected fault at step {step}")
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "term":
            os.kill(os.getpid(), signal.SIGTERM)  # the handler (preempt.py) runs before kill returns
        if self.kind == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        if self.kind == "nan":
            pre_reduce.append(poison_loss_once(pre_reduce))


def parse(spec: str | None, testing: bool) -> tuple[str, int, int] | None:
    """(kind, rank, step) from HPCFL_FAULT, or None; raises UsageError when malformed."""
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] not in KINDS or not all(p.strip().isdigit() for p in parts[1:]):
        raise UsageError(f"HPCFL_FAULT={spec!r}: expected KIND:RANK:STEP with KIND one of "
                         f"{', '.join(KINDS)} and RANK, STEP integers >= 0")
    if not testing:
        return None
    return parts[0], int(parts[1]), int(parts[2])


def hooks_for(rank: int, environ: Mapping[str, str] = os.environ) -> Hooks:
    """This run's hooks: a test's installed ones, else the fault of HPCFL_FAULT (read once per
    run, on every rank, so that a malformed value fails alike), else NO_HOOKS."""
    if _installed is not None:
        return _installed
    spec = environ.get("HPCFL_FAULT")
    testing = environ.get("HPCFL_TESTING") == "1"
    parsed = parse(spec, testing)
    if spec and not testing and rank == 0:
        print(f"hpcfl: warning: HPCFL_FAULT={spec} is ignored (fault injection is for the tests: "
              "it needs HPCFL_TESTING=1 as well)", file=sys.stderr, flush=True)
    return FaultInjection(*parsed) if parsed else NO_HOOKS


def poison_loss_once(hooks: list) -> Callable[[Any], None]:
    """A pre_reduce hook that writes NaN into the loss slot of one step, then removes itself."""
    def hook(gradbuf: Any) -> None:
        gradbuf[-1] = np.nan
        hooks.remove(hook)
    return hook
