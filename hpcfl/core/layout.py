"""The MLP: layer sizes, He initialisation, and one flat float32 buffer with per-layer views.

All parameters live in ONE contiguous buffer so a step needs one collective (Horovod's tensor
fusion, DDP's bucket), the optimizer is one fused loop, and a checkpoint is one array.
The model knows nothing about distribution or backends.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_INPUT, N_CLASSES = 784, 10


@dataclass(frozen=True)
class Layout:
    """Where each layer's W (fan_in, fan_out) and b (fan_out,) sit in the flat buffer."""

    sizes: tuple[int, ...]  # e.g. (784, 256, 128, 10)

    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1

    @property
    def n_params(self) -> int:
        return sum(i * o + o for i, o in zip(self.sizes[:-1], self.sizes[1:]))

    def flops_per_sample(self) -> int:
        """FLOPs of one forward + backward pass for one sample (the GEMMs only).

        forward x@W for every layer, backward a.T@dz for every layer, and dz@W.T for every
        layer but the first (the gradient w.r.t. the input is never needed).
        """
        macs = [i * o for i, o in zip(self.sizes[:-1], self.sizes[1:])]
        return 2 * (2 * sum(macs) + sum(macs[1:]))

    def views(self, flat: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(W, b), ...] as views into `flat` (works for any array module with reshape)."""
        if flat.shape != (self.n_params,):
            raise ValueError(f"flat buffer has shape {flat.shape}, expected ({self.n_params},)")
        out, off = [], 0
        for i, o in zip(self.sizes[:-1], self.sizes[1:]):
            w = flat[off:off + i * o].reshape(i, o)
            off += i * o
            b = flat[off:off + o]
            off += o
            out.append((w, b))
        return out


def layout(hidden: tuple[int, ...], n_input: int = N_INPUT, n_classes: int = N_CLASSES) -> Layout:
    """input -> hidden... -> classes; the input and class counts follow the data (MNIST's by default)."""
    return Layout((n_input, *hidden, n_classes))


def init_params(lay: Layout, seed: int) -> np.ndarray:
    """He-normal weights, zero biases. A pure function of (layout, seed): identical on all ranks."""
    rng = np.random.default_rng([seed, 0x5EED])
    flat = np.zeros(lay.n_params, dtype=np.float32)
    for w, _ in lay.views(flat):
        w[...] = rng.standard_normal(w.shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / w.shape[0]))
    return flat
