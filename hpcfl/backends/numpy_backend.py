"""The reference backend: plain NumPy, written for clarity. Every other backend is tested against it."""
from __future__ import annotations

import numpy as np

from .host import synchronize, to_device, to_host, upload_images  # noqa: F401  (backend API)

xp = np


def unavailable_reason() -> str | None:
    return None


class Workspace:
    """The reference allocates freely; the workspace only records the batch capacity."""

    def __init__(self, layout, max_batch: int):
        self.max_batch = max_batch


def gather(src_u8: np.ndarray, idx: np.ndarray, out: np.ndarray, mean: float, std: float) -> None:
    """out[:len(idx)] = (src[idx] / 255 - mean) / std (the data set's pixel statistics)."""
    out[: len(idx)] = (src_u8[idx].astype(np.float32) / 255.0 - mean) / std


def gather_labels(labels, idx, out) -> None:
    out[: len(idx)] = labels[idx]


def _forward(params, x):
    """Returns the activations [x, a1, ..., logits]; hidden layers use ReLU."""
    acts = [x]
    for i, (w, b) in enumerate(params):
        z = acts[-1] @ w + b
        acts.append(np.maximum(z, 0) if i < len(params) - 1 else z)
    return acts


def _log_softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def forward_backward(params, x, y, grads, ws, on_layer_ready=None) -> float:
    """Sum of softmax cross-entropy over the batch; fills grads with the summed gradients.

    on_layer_ready(i), if given, is called as soon as layer i's gradients are final (last
    layer first): the caller may start reducing them while the backward pass goes on."""
    acts = _forward(params, x)
    logp = _log_softmax(acts[-1])
    rows = np.arange(len(y))
    loss = -float(logp[rows, y].astype(np.float64).sum())
    dz = np.exp(logp)                        # (B, 10) softmax
    dz[rows, y] -= 1.0                       # d loss / d logits
    for i in range(len(params) - 1, -1, -1):
        w, _ = params[i]
        gw, gb = grads[i]
        gw[...] = acts[i].T @ dz
        gb[...] = dz.sum(axis=0)
        if on_layer_ready is not None:
            on_layer_ready(i)
        if i > 0:
            dz = (dz @ w.T) * (acts[i] > 0)  # ReLU backward
    return loss


def forward_backward_clipped(params, x, y, grads, ws, clip) -> tuple[float, int]:
    """DP-SGD's summed gradient: each sample's gradient (all layers' W and b together) clipped
    to L2 norm `clip`, then summed into grads; returns (summed unclipped loss, samples clipped).

    No per-sample gradient is formed (Goodfellow 2015; the ghost norm of Li et al. 2022): sample
    i's gradient of layer l is the outer product a_i delta_i^T plus the bias part delta_i, so
    its squared norm is (||a_i||^2 + 1) ||delta_i||^2. Backprop is linear in the deltas, so
    scaling delta_i (every layer's row i) by factor_i = min(1, clip / norm_i) clips sample i."""
    acts = _forward(params, x)
    logp = _log_softmax(acts[-1])
    rows = np.arange(len(y))
    loss = -float(logp[rows, y].astype(np.float64).sum())
    dz = np.exp(logp)
    dz[rows, y] -= 1.0
    deltas = [dz]                            # every layer's unclipped delta, last layer first
    for i in range(len(params) - 1, 0, -1):
        deltas.insert(0, (deltas[0] @ params[i][0].T) * (acts[i] > 0))
    sq = np.zeros(len(y))                    # (B,) squared per-sample gradient norms, float64
    for a, d in zip(acts, deltas):           # a = the layer's input
        sq += ((a.astype(np.float64) ** 2).sum(axis=1) + 1.0) * (d.astype(np.float64) ** 2).sum(axis=1)
    norm = np.sqrt(sq)
    clipped = norm > clip
    factor = np.ones_like(norm)
    factor[clipped] = clip / norm[clipped]   # norm 0 is never clipped: factor 1
    for i, (a, d) in enumerate(zip(acts, deltas)):
        d = d * factor[:, None].astype(d.dtype)
        grads[i][0][...] = a.T @ d
        grads[i][1][...] = d.sum(axis=0)
    return loss, int(clipped.sum())


def evaluate(params, x, y, ws) -> tuple[int, float]:
    """(number correct, summed loss) over the batch."""
    logits = _forward(params, x)[-1]
    logp = _log_softmax(logits)
    correct = int((logits.argmax(axis=1) == y).sum())
    return correct, -float(logp[np.arange(len(y)), y].astype(np.float64).sum())


def sgd_update(p, g, buf, lr, momentum, weight_decay, scale) -> None:
    """PyTorch-style SGD: d = scale*g + wd*p; buf = momentum*buf + d; p -= lr*buf."""
    d = np.float32(scale) * g + np.float32(weight_decay) * p
    buf *= np.float32(momentum)
    buf += d
    p -= np.float32(lr) * buf


def adam_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, scale, t) -> None:
    """Adam (Kingma & Ba) with L2 weight decay added to the gradient; t counts from 1."""
    d = np.float32(scale) * g + np.float32(weight_decay) * p
    m *= np.float32(beta1)
    m += np.float32(1 - beta1) * d
    v *= np.float32(beta2)
    v += np.float32(1 - beta2) * d * d
    mhat = m / np.float32(1 - beta1**t)
    vhat = v / np.float32(1 - beta2**t)
    p -= np.float32(lr) * mhat / (np.sqrt(vhat) + np.float32(eps))


def sum_slots(slots, lo, hi, out) -> None:
    """out = the sum over the node's gradient slots (rows of `slots`) of columns lo:hi."""
    out[...] = slots[0, lo:hi]
    for s in range(1, slots.shape[0]):
        out += slots[s, lo:hi]


def sgd_update_slots(slots, lo, hi, p, buf, lr, momentum, weight_decay, scale) -> None:
    """sgd_update of p[lo:hi] with the slots' summed gradient (buf: the slice's own state)."""
    g = np.empty(hi - lo, np.float32)
    sum_slots(slots, lo, hi, g)
    sgd_update(p[lo:hi], g, buf, lr, momentum, weight_decay, scale)


def adam_update_slots(slots, lo, hi, p, m, v, lr, beta1, beta2, eps, weight_decay, scale, t) -> None:
    g = np.empty(hi - lo, np.float32)
    sum_slots(slots, lo, hi, g)
    adam_update(p[lo:hi], g, m, v, lr, beta1, beta2, eps, weight_decay, scale, t)
