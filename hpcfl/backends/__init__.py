"""Compute backends: the same functions with the same signatures on every backend.

A backend is a module providing
    xp                                    the array module (numpy or cupy)
    Workspace(layout, max_batch)          preallocated activations, reused every step
    gather(src_u8, idx, out, mean, std)   rows `idx` of the uint8 images -> (x/255 - mean)/std float32
    gather_labels(labels, idx, out)       labels[idx] -> out (int32)
    forward_backward(params, x, y, grads, ws, on_layer_ready=None) -> loss_sum
                                          grads = SUM over the batch; on_layer_ready(i) is
                                          called once layer i's grads are final (last first)
    forward_backward_clipped(params, x, y, grads, ws, clip) -> (loss_sum, n_clipped)
                                          grads = SUM over the batch of per-sample gradients each
                                          clipped to L2 norm clip (DP-SGD), without materialising them
    evaluate(params, x, y, ws) -> (correct, loss_sum)
    sgd_update(p, g, buf, lr, momentum, weight_decay, scale)
    adam_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, scale, t)
    to_device(a), to_host(a), synchronize()
`params`/`grads` are lists of (W, b) views into flat buffers (model.Layout.views).
The numpy backend is the reference; the others are tested against it.
"""
from __future__ import annotations

import importlib
from types import ModuleType

NAMES = ("numpy", "numba", "cupy")


class BackendUnavailable(RuntimeError):
    pass


def get(name: str) -> ModuleType:
    """Import the backend `name`; for cupy this checks for a usable GPU at run time."""
    if name not in NAMES:
        raise BackendUnavailable(f"unknown backend {name!r}; choose from {', '.join(NAMES)}")
    mod = importlib.import_module(f"hpcfl.backends.{name}_backend")
    reason = mod.unavailable_reason()
    if reason:
        raise BackendUnavailable(f"backend {name!r} is not usable here: {reason}")
    return mod


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

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass


def gpu_description() -> str | None:
    """The GPU this process would use, or None; never raises (cupy may be absent)."""
    try:
        mod = importlib.import_module("hpcfl.backends.cupy_backend")
        return mod.describe_gpu()
    except Exception:
        return None
