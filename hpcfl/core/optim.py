"""Optimizers over the flat parameter buffer, and learning-rate schedules.

The update itself is a backend kernel (one fused loop over all parameters); this module holds
the state buffers (momentum / Adam moments, the same flat layout as the parameters).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from ..backends.base import Backend


class Optimizer(Protocol):
    """An update rule over one flat float32 buffer; its state has the buffer's layout."""
    state_vectors: ClassVar[int]      # state buffers of n floats (the memory plan)

    def step(self, params: Any, grads: Any, lr: float, scale: float) -> None:
        """params -= update(scale * grads); `scale` turns a gradient sum into a mean."""

    def state(self) -> dict[str, Any]:
        """The buffers (and counters) a checkpoint keeps."""

    def reset(self) -> None:
        """Back to a fresh optimizer, without allocating (fl clients restart every round)."""

    def load_state(self, state: dict[str, Any]) -> None:
        """Put back what state() returned."""


class SGD:
    """SGD with momentum and L2 weight decay (PyTorch's formulation)."""
    state_vectors: ClassVar[int] = 1

    def __init__(self, backend: Backend, n: int, momentum: float, weight_decay: float):
        self.backend, self.momentum, self.weight_decay = backend, momentum, weight_decay
        self.buf = backend.xp.zeros(n, dtype=backend.xp.float32)

    def step(self, params: Any, grads: Any, lr: float, scale: float) -> None:
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
    state_vectors: ClassVar[int] = 2

    def __init__(self, backend: Backend, n: int, weight_decay: float, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8):
        self.backend, self.weight_decay = backend, weight_decay
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.m = backend.xp.zeros(n, dtype=backend.xp.float32)
        self.v = backend.xp.zeros(n, dtype=backend.xp.float32)
        self.t = 0

    def step(self, params: Any, grads: Any, lr: float, scale: float) -> None:
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


# --optimizer's choices: (backend, n, momentum, weight_decay) -> Optimizer
OPTIMIZERS: dict[str, Callable[[Backend, int, float, float], Optimizer]] = {
    "sgd": SGD,
    "adam": lambda backend, n, momentum, weight_decay: Adam(backend, n, weight_decay),
}
STATE_VECTORS = {"sgd": SGD.state_vectors, "adam": Adam.state_vectors}


def create(name: str, backend: Backend, n: int, momentum: float, weight_decay: float) -> Optimizer:
    """The optimizer `name` over n parameters (momentum is SGD's; Adam's betas are fixed)."""
    return OPTIMIZERS[name](backend, n, momentum, weight_decay)


def learning_rate(base: float, schedule: str, step: int, total_steps: int) -> float:
    """Constant, or cosine decay from `base` to 0 over `total_steps` (Loshchilov & Hutter)."""
    if schedule == "constant" or total_steps <= 0:
        return base
    return 0.5 * base * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
