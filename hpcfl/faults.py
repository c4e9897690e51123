"""Fault injection, used only by the tests: HPCFL_FAULT="KIND:RANK:STEP".

KIND is raise (an exception), kill (SIGKILL to this process), nan (a NaN loss) or term (SIGTERM
to this process, as a scheduler would send: a deterministic preemption) on world rank RANK when
it reaches optimizer step STEP. Unset (always, outside the tests) it costs one
integer comparison per step.
"""
from __future__ import annotations

import os
import signal
import sys

_spec = os.environ.get("HPCFL_FAULT")
_kind, _rank, _step = (None, -1, -1)
if _spec:
    _kind, r, s = _spec.split(":")
    _rank, _step = int(r), int(s)


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
    return _kind == "nan"
