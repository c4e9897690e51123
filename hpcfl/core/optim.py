"""Optimizers over the flat parameter buffer, and learning-rate schedules.

The update itself is a backend kernel (one fused loop over all parameters); this module holds
the state buffers (momentum / Adam moments, the same flat layout as the parameters).
"""
from __future__ import annotations

import math


class SGD:
    """SGD with momentum and L2 weight decay (PyTorch's formulation)."""

    def __init__(self, backend, n: int, momentum: float, weight_decay: float):
        self.backend, self.momentum, self.weight_decay = backend, momentum, weight_decay
        self.buf = backend.xp.zeros(n, dtype=backend.xp.float32)

    def step(self, params, grads, lr: float, scale: float) -> None:
        """params -= update(scale * grads); `scale` turns a gradient sum into a mean."""
        self.backend.sgd_update(params, grads, self.buf, lr, self.momentum, self.weight_decay, scale)

    def state(self) -> dict:
        return {"buf": self.buf}

    def reset(self) -> None:
        """Back to a fresh optimizer, without allocating (fl clients restart every round)."""
        self.buf[...] = 0

    def load_state(self, state: dict) -> None:
        self.buf[...] = self.backend.to_device(state["buf"])


class Adam:
    def __init__(self, backend, n: int, weight_decay: float, beta1=0.9, beta2=0.999, eps=1e-8):
        self.backend, self.weight_decay = backend, weight_decay
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.m = backend.xp.zeros(n, dtype=backend.xp.float32)
        self.v = backend.xp.zeros(n, dtype=backend.xp.float32)
        self.t = 0

    def step(self, params, grads, lr: float, scale: float) -> None:
        self.t += 1
        self.backend.adam_update(params, grads, self.m, self.v, lr, self.beta1, self.beta2,
                                 self.eps, self.weight_decay, scale, self.t)

    def state(self) -> dict:
        return {"m": self.m, "v": self.v, "t": self.t}

    def reset(self) -> None:
        self.m[...] = 0
        self.v[...] = 0
        self.t = 0

    def load_state(self, state: dict) -> None:
        self.m[...] = self.backend.to_device(state["m"])
        self.v[...] = self.backend.to_device(state["v"])
        self.t = int(state["t"])


def make(name: str, backend, n: int, momentum: float, weight_decay: float):
    if name == "sgd":
        return SGD(backend, n, momentum, weight_decay)
    if name == "adam":
        return Adam(backend, n, weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def learning_rate(base: float, schedule: str, step: int, total_steps: int) -> float:
    """Constant, or cosine decay from `base` to 0 over `total_steps` (Loshchilov & Hutter)."""
    if schedule == "constant" or total_steps <= 0:
        return base
    return 0.5 * base * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
