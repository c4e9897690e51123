"""CPU backend: matrix products through BLAS (np.matmul with out=), elementwise work fused in Numba.

Nothing is allocated inside a step: activations and deltas live in a Workspace sized for the
largest batch, and each step works on row-prefix views of it (contiguous, so BLAS takes them
as they are). Kernels are compiled once and cached on disk (cache=True).
"""
from __future__ import annotations

import math

import numpy as np

from ..data import MEAN, STD
from .host import synchronize, to_device, to_host  # noqa: F401  (backend API)

xp = np

try:
    import numba
    from numba import njit
except ImportError as exc:  # numba is a dependency, but keep the reason for `hpcfl info`
    numba = None
    _IMPORT_ERROR = str(exc)

    def njit(*args, **kwargs):
        return lambda f: f
else:
    _IMPORT_ERROR = None


def unavailable_reason() -> str | None:
    return _IMPORT_ERROR and f"numba cannot be imported ({_IMPORT_ERROR})"


class Workspace:
    def __init__(self, layout, max_batch: int):
        self.max_batch = max_batch
        outs = layout.sizes[1:]
        self.acts = [np.empty((max_batch, n), np.float32) for n in outs]    # a1..aL (aL = logits)
        self.deltas = [np.empty((max_batch, n), np.float32) for n in outs]  # dL/dz per layer


_SCALE = np.float32(1.0 / (255.0 * STD))
_SHIFT = np.float32(MEAN / STD)


@njit(cache=True, nogil=True)
def _gather(src, idx, scale, shift, out):
    for r in range(idx.shape[0]):
        row = src[idx[r]]
        for c in range(row.shape[0]):
            out[r, c] = row[c] * scale - shift


@njit(cache=True, nogil=True)
def _bias_act(z, b, relu):
    """z += b, then ReLU in place when relu."""
    for r in range(z.shape[0]):
        for c in range(z.shape[1]):
            v = z[r, c] + b[c]
            z[r, c] = max(v, np.float32(0.0)) if relu else v


@njit(cache=True, nogil=True)
def _softmax_xent_grad(logits, y, dz, gb):
    """dz = softmax(logits) - onehot(y); gb = column sums of dz; returns the summed loss."""
    gb[:] = 0.0
    loss = 0.0
    for r in range(logits.shape[0]):
        m = logits[r, 0]
        for c in range(1, logits.shape[1]):
            m = max(m, logits[r, c])
        s = 0.0
        for c in range(logits.shape[1]):
            e = math.exp(logits[r, c] - m)
            dz[r, c] = e
            s += e
        inv = 1.0 / s
        for c in range(logits.shape[1]):
            dz[r, c] *= inv
        loss += math.log(s) + m - logits[r, y[r]]
        dz[r, y[r]] -= 1.0
        for c in range(logits.shape[1]):
            gb[c] += dz[r, c]
    return loss


@njit(cache=True, nogil=True)
def _relu_backward_bias(dz, a, gb):
    """dz *= (a > 0) in place; gb = column sums of the masked dz."""
    gb[:] = 0.0
    for r in range(dz.shape[0]):
        for c in range(dz.shape[1]):
            if a[r, c] <= 0.0:
                dz[r, c] = 0.0
            gb[c] += dz[r, c]


@njit(cache=True, nogil=True)
def _eval_counts(logits, y):
    correct = 0
    loss = 0.0
    for r in range(logits.shape[0]):
        m = logits[r, 0]
        arg = 0
        for c in range(1, logits.shape[1]):
            if logits[r, c] > m:
                m = logits[r, c]
                arg = c
        s = 0.0
        for c in range(logits.shape[1]):
            s += math.exp(logits[r, c] - m)
        loss += math.log(s) + m - logits[r, y[r]]
        correct += arg == y[r]
    return correct, loss


@njit(cache=True, nogil=True)
def _sgd(p, g, buf, lr, momentum, weight_decay, scale):
    for i in range(p.shape[0]):
        d = scale * g[i] + weight_decay * p[i]
        b = momentum * buf[i] + d
        buf[i] = b
        p[i] -= lr * b


@njit(cache=True, nogil=True)
def _adam(p, g, m, v, lr, beta1, beta2, eps, weight_decay, scale, c1, c2):
    for i in range(p.shape[0]):
        d = scale * g[i] + weight_decay * p[i]
        mi = beta1 * m[i] + (1 - beta1) * d
        vi = beta2 * v[i] + (1 - beta2) * d * d
        m[i] = mi
        v[i] = vi
        p[i] -= lr * (mi / c1) / (math.sqrt(vi / c2) + eps)


@njit(cache=True, nogil=True)
def _gather_labels(labels, idx, out):
    for r in range(idx.shape[0]):
        out[r] = labels[idx[r]]


def gather(src_u8, idx, out) -> None:
    _gather(src_u8, idx, _SCALE, _SHIFT, out)


def gather_labels(labels, idx, out) -> None:
    _gather_labels(labels, idx, out)


def _forward(params, x, ws):
    n, last = x.shape[0], len(params) - 1
    a = x
    for i, (w, b) in enumerate(params):
        z = ws.acts[i][:n]
        np.matmul(a, w, out=z)               # (B, fan_in) @ (fan_in, fan_out)
        _bias_act(z, b, i < last)
        a = z
    return a


def forward_backward(params, x, y, grads, ws, on_layer_ready=None) -> float:
    """on_layer_ready(i), if given, is called as soon as layer i's (W, b) gradients are final,
    last layer first, so that the caller can start reducing them while backward goes on."""
    n = x.shape[0]
    logits = _forward(params, x, ws)
    last = len(params) - 1
    dz = ws.deltas[last][:n]
    loss = _softmax_xent_grad(logits, y, dz, grads[last][1])
    for i in range(last, -1, -1):
        a_prev = ws.acts[i - 1][:n] if i > 0 else x
        np.matmul(a_prev.T, dz, out=grads[i][0])     # (fan_in, B) @ (B, fan_out)
        if on_layer_ready is not None:
            on_layer_ready(i)                        # gb[i] was written before gW[i]
        if i > 0:
            da = ws.deltas[i - 1][:n]
            np.matmul(dz, params[i][0].T, out=da)      # (B, fan_out) @ (fan_out, fan_in)
            _relu_backward_bias(da, a_prev, grads[i - 1][1])
            dz = da
    return float(loss)


def evaluate(params, x, y, ws) -> tuple[int, float]:
    correct, loss = _eval_counts(_forward(params, x, ws), y)
    return int(correct), float(loss)


def sgd_update(p, g, buf, lr, momentum, weight_decay, scale) -> None:
    _sgd(p, g, buf, np.float32(lr), np.float32(momentum), np.float32(weight_decay), np.float32(scale))


def adam_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, scale, t) -> None:
    f = np.float32
    _adam(p, g, m, v, f(lr), f(beta1), f(beta2), f(eps), f(weight_decay), f(scale),
          f(1 - beta1**t), f(1 - beta2**t))
