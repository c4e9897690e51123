"""CPU backend: matrix products through BLAS (np.matmul with out=), elementwise work fused in Numba.

Nothing is allocated inside a step: activations and deltas live in a Workspace sized for the
largest batch, and each step works on row-prefix views of it (contiguous, so BLAS takes them
as they are). Kernels are compiled once and cached on disk (cache=True).
"""
from __future__ import annotations

import math
import sys

import numpy as np

from .host import normalisation, synchronize, to_device, to_host, upload_images  # noqa: F401  (backend API)

xp = np


def _import_numba_arraymath_without_scipy_blas() -> None:
    """Import numba.np.arraymath (Numba imports it when the first kernel loads) while scipy.linalg
    cannot be imported. At import it checks whether SciPy's BLAS is there, for np.dot inside
    kernels, and importing scipy.linalg for that takes 80 ms per rank (measured with python -X
    importtime; SciPy comes with dp-accounting). hpcfl's kernels never call np.dot (the GEMMs go
    through np.matmul outside them), so nothing is lost; scipy.linalg imports normally afterwards.
    A kernel that calls np.dot would need this gone (Numba would then say it has no BLAS)."""
    if "scipy.linalg" in sys.modules or "numba.np.arraymath" in sys.modules:
        return
    sys.modules["scipy.linalg"] = None  # type: ignore[assignment]   # `import scipy.linalg...` raises ImportError
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        del sys.modules["scipy.linalg"]


_IMPORT_ERROR: str | None = None
try:
    import numba
    from numba import njit

    _import_numba_arraymath_without_scipy_blas()
except ImportError as exc:  # numba is a dependency, but keep the reason for `hpcfl info`
    numba = None  # type: ignore[assignment]
    _IMPORT_ERROR = str(exc)

    def njit(*args, **kwargs):  # type: ignore[no-redef]
        return lambda f: f


def unavailable_reason() -> str | None:
    return _IMPORT_ERROR and f"numba cannot be imported ({_IMPORT_ERROR})"


# Backward's input gradient da = dz @ W.T hands OpenBLAS a transposed second operand, which it
# runs slowly for few rows: at 10 rows and a 200 x 200 layer it took 30 us against 18 us for the
# same product as W @ dz.T (the transpose of da), with the same bits. Measured with the ReLU
# pass included (it then reads da transposed), the transposed form won by 7-30% at up to 64 rows
# for layers of 128 x 256 and more, and lost on smaller layers and at 96 rows and more.
TRANSPOSED_MAX_ROWS = 64
TRANSPOSED_MIN_WEIGHTS = 128 * 128


def _input_grad_transposed(rows: int, fan_in: int, fan_out: int) -> bool:
    return rows <= TRANSPOSED_MAX_ROWS and fan_in * fan_out >= TRANSPOSED_MIN_WEIGHTS


class Workspace:
    def __init__(self, layout, max_batch: int):
        self.max_batch = max_batch
        outs = layout.sizes[1:]
        self.acts = [np.empty((max_batch, n), np.float32) for n in outs]    # a1..aL (aL = logits)
        self.deltas = [np.empty((max_batch, n), np.float32) for n in outs]  # dL/dz per layer
        # the input gradient of layer i > 0, transposed (fan_in, rows), where backward takes the
        # faster W @ dz.T form (_input_grad_transposed); flat, so that each batch size's view is
        # contiguous
        rows = min(max_batch, TRANSPOSED_MAX_ROWS)
        self.deltas_t = [np.empty(fi * rows, np.float32) if _input_grad_transposed(rows, fi, fo) else None
                         for fi, fo in zip(layout.sizes[1:-1], layout.sizes[2:])]
        self.n_layers = len(outs)
        self._clip: tuple | None = None

    def clip_buffers(self):
        """(asq, sq, factor) for forward_backward_clipped, allocated on its first call only:
        asq[l] = ||input row of layer l||^2, sq = squared per-sample gradient norms (float64,
        (L, B) and (B,)), factor = the per-sample clip factors (float32, (B,))."""
        if self._clip is None:
            self._clip = (np.empty((self.n_layers, self.max_batch), np.float64),
                          np.empty(self.max_batch, np.float64), np.empty(self.max_batch, np.float32))
        return self._clip


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
def _relu_backward_bias_t(da_t, a, dz, gb):
    """_relu_backward_bias of da_t's transpose, written into dz: dz = da_t.T, zero where a <= 0
    (the same test, so a NaN activation keeps its gradient alike); gb = column sums of dz."""
    gb[:] = 0.0
    for r in range(dz.shape[0]):
        for c in range(dz.shape[1]):
            v = da_t[c, r]
            if a[r, c] <= 0.0:
                v = np.float32(0.0)
            dz[r, c] = v
            gb[c] += v


# ---- per-sample gradient clipping (DP-SGD): the squared norm of sample r's gradient of a
# layer is (||a_r||^2 + 1) ||delta_r||^2 (a = the layer's input), summed over layers in sq[r].

@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _sumsq_row(row):
    """sum(row**2) in float32, returned as float64. Reassociation lets LLVM vectorise the sum
    (3.4x faster than the strict left-to-right loop, measured on x's 784-wide rows); the order
    is then fixed by the compiled code, so it is the same run after run on this machine."""
    s = np.float32(0.0)
    for c in range(row.shape[0]):
        s += row[c] * row[c]
    return float(s)


@njit(cache=True, nogil=True)
def _row_sumsq(a, out):
    """out[r] = ||a[r]||^2."""
    for r in range(a.shape[0]):
        out[r] = _sumsq_row(a[r])


@njit(cache=True, nogil=True)
def _bias_relu_sumsq(z, b, out):
    """z = max(z + b, 0) in place; out[r] = ||z[r]||^2 (the next layer's input norms)."""
    for r in range(z.shape[0]):
        row = z[r]
        for c in range(row.shape[0]):
            row[c] = max(row[c] + b[c], np.float32(0.0))
        out[r] = _sumsq_row(row)


@njit(cache=True, nogil=True)
def _softmax_xent_delta_sumsq(logits, y, dz, asq, sq):
    """dz = softmax(logits) - onehot(y) (no bias sum: it waits for the clipping);
    sq[r] = (asq[r] + 1) ||dz[r]||^2, the last layer's part; returns the summed loss."""
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
        sq[r] = (asq[r] + 1.0) * _sumsq_row(dz[r])
    return loss


@njit(cache=True, nogil=True)
def _relu_backward_sumsq(dz, a, asq, sq):
    """dz *= (a > 0) in place; sq[r] += (asq[r] + 1) ||dz[r]||^2 (asq: this layer's input norms)."""
    for r in range(dz.shape[0]):
        row, arow = dz[r], a[r]
        for c in range(row.shape[0]):
            if arow[c] <= 0.0:
                row[c] = 0.0
        sq[r] += (asq[r] + 1.0) * _sumsq_row(row)


@njit(cache=True, nogil=True)
def _relu_backward_clip_bias(dz, a, asq, sq, clip, factor, gb):
    """The first layer's delta, where each sample's norm becomes complete: dz *= (a > 0);
    sq[r] += (asq[r] + 1) ||dz[r]||^2; factor[r] = min(1, clip / sqrt(sq[r])) (1 when sq[r] is
    0); dz[r] *= factor[r] while the row is in cache; gb = column sums of the clipped dz.
    Returns the number clipped."""
    gb[:] = 0.0
    n_clipped = 0
    for r in range(dz.shape[0]):
        row, arow = dz[r], a[r]
        for c in range(row.shape[0]):
            if arow[c] <= 0.0:
                row[c] = 0.0
        total = sq[r] + (asq[r] + 1.0) * _sumsq_row(row)
        sq[r] = total
        norm = math.sqrt(total)
        f32 = np.float32(1.0)
        if norm > clip:                       # a zero norm is never clipped
            n_clipped += 1
            f32 = np.float32(clip / norm)
        factor[r] = f32
        for c in range(row.shape[0]):
            v = row[c] * f32
            row[c] = v
            gb[c] += v
    return n_clipped


@njit(cache=True, nogil=True)
def _clip_factors(sq, clip, factor):
    """factor[r] = min(1, clip / sqrt(sq[r])); returns the number clipped (one-layer models)."""
    n_clipped = 0
    for r in range(sq.shape[0]):
        norm = math.sqrt(sq[r])
        factor[r] = np.float32(1.0)
        if norm > clip:
            n_clipped += 1
            factor[r] = np.float32(clip / norm)
    return n_clipped


@njit(cache=True, nogil=True)
def _scale_rows_bias(dz, factor, gb):
    """dz[r] *= factor[r] in place; gb = column sums of the scaled dz."""
    gb[:] = 0.0
    for r in range(dz.shape[0]):
        row, f = dz[r], factor[r]
        for c in range(row.shape[0]):
            v = row[c] * f
            row[c] = v
            gb[c] += v


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
def _sgd_plain(p, g, lr, scale):
    """_sgd with momentum 0 and no weight decay (fl's local training): the same value per element
    (adding the zero terms changes nothing), without streaming an unused momentum buffer."""
    for i in range(p.shape[0]):
        p[i] -= lr * (scale * g[i])


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


def gather(src_u8, idx, out, mean: float, std: float) -> None:
    """out[:len(idx)] = (src[idx] / 255 - mean) / std, as src * (1/(255 std)) - mean/std."""
    _gather(src_u8, idx, *normalisation(mean, std), out)


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
            da, w = ws.deltas[i - 1][:n], params[i][0]
            flat_t = ws.deltas_t[i - 1]
            if flat_t is not None and n <= TRANSPOSED_MAX_ROWS:  # few rows: see TRANSPOSED_MAX_ROWS
                da_t = flat_t[:w.shape[0] * n].reshape(w.shape[0], n)
                np.matmul(w, dz.T, out=da_t)                 # (fan_in, fan_out) @ (fan_out, B)
                _relu_backward_bias_t(da_t, a_prev, da, grads[i - 1][1])
            else:
                np.matmul(dz, w.T, out=da)                   # (B, fan_out) @ (fan_out, fan_in)
                _relu_backward_bias(da, a_prev, grads[i - 1][1])
            dz = da
    return float(loss)


def forward_backward_clipped(params, x, y, grads, ws, clip) -> tuple[float, int]:
    """grads = the sum over the batch of each sample's gradient clipped to L2 norm `clip` (all
    layers together, DP-SGD); returns (summed unclipped loss, number of samples clipped).

    As forward_backward, but every layer's delta is formed first, with the per-sample squared
    norms accumulated in the same kernels (input norms in the forward's bias + ReLU kernel);
    the first layer's kernel turns the norms into clip factors and scales its rows, the other
    deltas are scaled in their bias-sum pass, and only then run the weight-gradient GEMMs.
    Nothing is allocated: the norm and factor vectors are Workspace buffers."""
    n, last = x.shape[0], len(params) - 1
    asq_all, sq_all, factor_all = ws.clip_buffers()
    asq, sq, factor = asq_all[:, :n], sq_all[:n], factor_all[:n]
    _row_sumsq(x, asq[0])                                     # ||x_r||^2, layer 0's input
    a = x
    for i, (w, b) in enumerate(params):                       # forward, with the input norms
        z = ws.acts[i][:n]
        np.matmul(a, w, out=z)
        if i < last:
            _bias_relu_sumsq(z, b, asq[i + 1])
        else:
            _bias_act(z, b, False)
        a = z
    dz = ws.deltas[last][:n]
    loss = _softmax_xent_delta_sumsq(a, y, dz, asq[last], sq)
    for i in range(last, 0, -1):                              # deltas, unclipped, with norms
        da = ws.deltas[i - 1][:n]
        np.matmul(dz, params[i][0].T, out=da)                 # (B, fan_out) @ (fan_out, fan_in)
        if i > 1:
            _relu_backward_sumsq(da, ws.acts[i - 1][:n], asq[i - 1], sq)
        else:
            n_clipped = _relu_backward_clip_bias(da, ws.acts[0][:n], asq[0], sq, np.float64(clip),
                                                 factor, grads[0][1])
        dz = da
    if last == 0:
        n_clipped = _clip_factors(sq, np.float64(clip), factor)
    for i in range(last, -1, -1):
        dz = ws.deltas[i][:n]
        if i > 0 or last == 0:
            _scale_rows_bias(dz, factor, grads[i][1])
        a_prev = ws.acts[i - 1][:n] if i > 0 else x
        np.matmul(a_prev.T, dz, out=grads[i][0])              # (fan_in, B) @ (B, fan_out)
    return float(loss), int(n_clipped)


def evaluate(params, x, y, ws) -> tuple[int, float]:
    correct, loss = _eval_counts(_forward(params, x, ws), y)
    return int(correct), float(loss)


def sgd_update(p, g, buf, lr, momentum, weight_decay, scale) -> None:
    if momentum == 0 and weight_decay == 0:      # buf is then never read (PyTorch keeps none)
        _sgd_plain(p, g, np.float32(lr), np.float32(scale))
    else:
        _sgd(p, g, buf, np.float32(lr), np.float32(momentum), np.float32(weight_decay), np.float32(scale))


def adam_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, scale, t) -> None:
    f = np.float32
    _adam(p, g, m, v, f(lr), f(beta1), f(beta2), f(eps), f(weight_decay), f(scale),
          f(1 - beta1**t), f(1 - beta2**t))


# ---- --allreduce shm: a node's gradient slots summed and the update applied in one pass

@njit(cache=True, nogil=True, inline="always")
def _slot_sum(slots, i):
    """Coordinate i summed over the node's slots, in slot order (the same order in every kernel)."""
    g = slots[0, i]
    for s in range(1, slots.shape[0]):
        g += slots[s, i]
    return g


@njit(cache=True, nogil=True)
def _sum_slots(slots, lo, hi, out):
    for i in range(lo, hi):
        g = _slot_sum(slots, i)
        out[i - lo] = g


@njit(cache=True, nogil=True)
def _sgd_slots(slots, lo, hi, p, buf, lr, momentum, weight_decay, scale):
    for i in range(lo, hi):
        g = _slot_sum(slots, i)
        j = i - lo
        d = scale * g + weight_decay * p[i]
        b = momentum * buf[j] + d
        buf[j] = b
        p[i] -= lr * b


@njit(cache=True, nogil=True)
def _adam_slots(slots, lo, hi, p, m, v, lr, beta1, beta2, eps, weight_decay, scale, c1, c2):
    for i in range(lo, hi):
        g = _slot_sum(slots, i)
        j = i - lo
        d = scale * g + weight_decay * p[i]
        mi = beta1 * m[j] + (1 - beta1) * d
        vi = beta2 * v[j] + (1 - beta2) * d * d
        m[j] = mi
        v[j] = vi
        p[i] -= lr * (mi / c1) / (math.sqrt(vi / c2) + eps)


def sum_slots(slots, lo, hi, out) -> None:
    """out = the sum over the node's gradient slots (rows of `slots`) of columns lo:hi."""
    _sum_slots(slots, lo, hi, out)


def sgd_update_slots(slots, lo, hi, p, buf, lr, momentum, weight_decay, scale) -> None:
    """sgd_update of p[lo:hi] with the slots' summed gradient, in the same pass as the sum;
    buf is the state of the slice alone (ZeRO stage 1)."""
    f = np.float32
    _sgd_slots(slots, lo, hi, p, buf, f(lr), f(momentum), f(weight_decay), f(scale))


def adam_update_slots(slots, lo, hi, p, m, v, lr, beta1, beta2, eps, weight_decay, scale, t) -> None:
    f = np.float32
    _adam_slots(slots, lo, hi, p, m, v, f(lr), f(beta1), f(beta2), f(eps), f(weight_decay), f(scale),
                f(1 - beta1**t), f(1 - beta2**t))
