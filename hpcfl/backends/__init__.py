"""Compute backends: the same functions with the same signatures on every backend (base.py
writes them down as the Backend protocol).

    base.py           the Backend protocol (and HostBackend: --allreduce shm's kernels)
    host.py           what the CPU backends share
    numpy_backend.py  the reference, plain NumPy; the others are tested against it
    numba_backend.py  CPU: Numba kernels around BLAS
    cupy_backend.py   GPU: cuBLAS and fused CUDA kernels (CuPy), imported only when used
"""
from __future__ import annotations

import importlib
from typing import cast

from .base import Backend

# --backend's choices (besides auto), in the order auto prefers them last to first
NAMES = ("numpy", "numba", "cupy")


class BackendUnavailable(RuntimeError):
    pass


def get(name: str) -> Backend:
    """Import the backend `name`; for cupy this checks for a usable GPU at run time."""
    if name not in NAMES:
        raise BackendUnavailable(f"unknown backend {name!r}; choose from {', '.join(NAMES)}")
    mod = importlib.import_module(f"hpcfl.backends.{name}_backend")
    reason = mod.unavailable_reason()
    if reason:
        raise BackendUnavailable(f"backend {name!r} is not usable here: {reason}")
    return cast(Backend, mod)


def resolve(name: str) -> str:
    """'auto' -> cupy when a GPU is usable, else numba, else numpy."""
    if name != "auto":
        return name
    for candidate in ("cupy", "numba"):
        try:
            get(candidate)
            return candidate
        except (BackendUnavailable, ImportError):
            continue
    return "numpy"


def available() -> dict[str, str]:
    """{name: 'ok' or the reason it cannot run} for `hpcfl info`."""
    out = {}
    for name in NAMES:
        try:
            get(name)
            out[name] = "ok"
        except (BackendUnavailable, ImportError) as exc:
            out[name] = str(exc)
    return out


def set_threads(n: int) -> None:
    """BLAS and Numba threads of this process. One per rank by default: 8 ranks on 2 cores must
    not oversubscribe (measured: 2 spinning BLAS threads per rank made 4 ranks on 2 cores 44-59x slower)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(n)
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    except ImportError:
        pass


def gpu_description() -> str | None:
    """The GPU this process would use, or None; never raises (cupy may be absent)."""
    try:
        mod = importlib.import_module("hpcfl.backends.cupy_backend")
        return mod.describe_gpu()
    except Exception:
        return None
