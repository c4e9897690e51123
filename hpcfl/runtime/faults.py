"""Fault injection, for the tests only: HPCFL_TESTING=1 and HPCFL_FAULT="KIND:RANK:STEP".

KIND is raise (an exception), kill (SIGKILL to this process), nan (a NaN loss), term (SIGTERM
to this process, as a scheduler would send: a deterministic preemption) or stop (SIGSTOP: a
stalled rank) on world rank RANK when it reaches optimizer step STEP (in fl mode: the round;
step 0 is start-up). Both variables are needed: a HPCFL_FAULT left in a shell must not poison a
real job, so without HPCFL_TESTING=1 it is ignored with a warning. A malformed value is a usage
error. Unset, it costs one integer comparison per step.
"""
from __future__ import annotations

import os
import signal
import sys

import numpy as np

from ..errors import UsageError

KINDS = ("raise", "kill", "nan", "term", "stop")
_kind, _rank, _step = None, -1, -1


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


def arm(rank: int, environ=os.environ) -> None:
    """Read the environment once per run (every rank, so a malformed value fails alike)."""
    global _kind, _rank, _step
    spec = environ.get("HPCFL_FAULT")
    testing = environ.get("HPCFL_TESTING") == "1"
    parsed = parse(spec, testing)
    if spec and not testing and rank == 0:
        print(f"hpcfl: warning: HPCFL_FAULT={spec} is ignored (fault injection is for the tests: "
              "it needs HPCFL_TESTING=1 as well)", file=sys.stderr, flush=True)
    _kind, _rank, _step = parsed if parsed else (None, -1, -1)


def at_step(rank: int, step: int) -> bool:
    """Fire the fault if one is due; returns True when the caller must inject a NaN."""
    if step != _step or rank != _rank:
        return False
    print(f"hpcfl: fault injection: {_kind} on rank {rank} at step {step}", file=sys.stderr, flush=True)
    if _kind == "raise":
        raise RuntimeError(f"injected fault at step {step}")
    if _kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if _kind == "term":
        os.kill(os.getpid(), signal.SIGTERM)  # the handler (preempt.py) runs before kill returns
    if _kind == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    return _kind == "nan"


def poison_loss_once(hooks: list):
    """A pre_reduce hook that writes NaN into the loss slot of one step, then removes itself."""
    def hook(gradbuf) -> None:
        gradbuf[-1] = np.nan
        hooks.remove(hook)
    return hook
