"""Fault injection, used only by the tests: HPCFL_FAULT="KIND:RANK:STEP".

KIND is raise (an exception), kill (SIGKILL to this process) or nan (a NaN loss) on world rank
RANK when it reaches optimizer step STEP. Unset (always, outside the tests) it costs one
integer comparison per step.
"""
from __future__ import annotations

import os
import signal

_spec = os.environ.get("HPCFL_FAULT")
_kind, _rank, _step = (None, -1, -1)
if _spec:
    _kind, r, s = _spec.split(":")
    _rank, _step = int(r), int(s)


def at_step(rank: int, step: int) -> bool:
    """Fire the fault if one is due; returns True when the caller must inject a NaN."""
    if step != _step or rank != _rank:
        return False
    if _kind == "raise":
        raise RuntimeError(f"injected fault at step {step}")
    if _kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    return _kind == "nan"
