"""Server optimizers of federated learning, with no MPI: FedAvg (McMahan et al. 2017), FedAvgM
(Hsu et al. 2019), and FedAdam, FedYogi and FedAdagrad (Reddi et al. 2021, "Adaptive Federated
Optimization", Algorithm 2), and their registry.

All of them see the round as one pseudo-gradient: delta = global - weighted average of the
client models. FedAvg with server_lr 1 simply takes the average.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np

if TYPE_CHECKING:
    from ..config import Config


class ServerOptimizer(Protocol):
    """What the server (rank 0) applies to the global model once per round."""
    state_vectors: ClassVar[int]      # float32 vectors of n values it keeps (the memory plan)

    def step(self, global_w: np.ndarray, average: np.ndarray) -> None:
        """Move global_w (n,) float32, in place, towards the round's average model."""

    def state(self) -> dict[str, np.ndarray]:
        """The arrays a checkpoint keeps."""

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Put back what state() returned."""


def weighted_average(models: list[np.ndarray], num_examples: list[int]) -> np.ndarray:
    """sum_k n_k w_k / sum_k n_k (what the MPI Reduce computes, written for the tests)."""
    total = float(sum(num_examples))
    out = np.zeros_like(models[0], dtype=np.float64)
    for w, n in zip(models, num_examples):
        out += (n / total) * w
    return out.astype(models[0].dtype)


class FedAvg:
    state_vectors: ClassVar[int] = 0

    def __init__(self, n: int, server_lr: float = 1.0):
        self.server_lr = server_lr

    @classmethod
    def from_config(cls, cfg: Config, n: int) -> FedAvg:
        return cls(n, cfg.server_lr)

    def step(self, global_w: np.ndarray, average: np.ndarray) -> None:
        """global_w <- global_w - server_lr * (global_w - average), in place."""
        global_w -= np.float32(self.server_lr) * (global_w - average)

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        for name, value in state.items():          # the arrays named by state()
            getattr(self, name)[...] = value


class FedAvgM(FedAvg):
    """Server momentum: v <- beta v + delta; w <- w - server_lr v."""
    state_vectors: ClassVar[int] = 1

    def __init__(self, n: int, server_lr: float = 1.0, momentum: float = 0.9):
        self.server_lr, self.momentum = server_lr, momentum
        self.v = np.zeros(n, np.float32)

    @classmethod
    def from_config(cls, cfg: Config, n: int) -> FedAvgM:
        return cls(n, cfg.server_lr, cfg.server_momentum)

    def step(self, global_w: np.ndarray, average: np.ndarray) -> None:
        self.v *= np.float32(self.momentum)
        self.v += global_w - average
        global_w -= np.float32(self.server_lr) * self.v

    def state(self) -> dict[str, np.ndarray]:
        return {"v": self.v}


class FedAdam(FedAvg):
    """Adam on the pseudo-gradient, without bias correction, with tau = eps (Reddi et al. 2021)."""
    state_vectors: ClassVar[int] = 2

    def __init__(self, n: int, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99,
                 eps: float = 1e-3):
        self.server_lr, self.beta1, self.beta2, self.eps = server_lr, beta1, beta2, eps
        self.m = np.zeros(n, np.float32)
        self.v = np.zeros(n, np.float32)

    @classmethod
    def from_config(cls, cfg: Config, n: int) -> FedAdam:
        return cls(n, cfg.server_lr, cfg.server_beta1, cfg.server_beta2, cfg.server_eps)

    def step(self, global_w: np.ndarray, average: np.ndarray) -> None:
        delta = global_w - average
        self.m *= np.float32(self.beta1)
        self.m += np.float32(1 - self.beta1) * delta
        self._second_moment(delta * delta)
        global_w -= np.float32(self.server_lr) * self.m / (np.sqrt(self.v) + np.float32(self.eps))

    def _second_moment(self, d2: np.ndarray) -> None:
        """Adam: v <- beta2 v + (1 - beta2) delta^2."""
        self.v *= np.float32(self.beta2)
        self.v += np.float32(1 - self.beta2) * d2

    def state(self) -> dict[str, np.ndarray]:
        return {"m": self.m, "v": self.v}


class FedYogi(FedAdam):
    """Yogi's additive second moment: v <- v - (1 - beta2) delta^2 sign(v - delta^2)."""

    def _second_moment(self, d2: np.ndarray) -> None:
        self.v -= np.float32(1 - self.beta2) * d2 * np.sign(self.v - d2)


class FedAdagrad(FedAdam):
    """Adagrad's sum of squares: v <- v + delta^2 (beta2 unused)."""

    def _second_moment(self, d2: np.ndarray) -> None:
        self.v += d2


# --server-opt's choices; a new server optimizer is one class here and one line in this table
SERVER_OPTIMIZERS: dict[str, type[FedAvg]] = {"fedavg": FedAvg, "fedavgm": FedAvgM, "fedadam": FedAdam,
                                              "fedyogi": FedYogi, "fedadagrad": FedAdagrad}


def create(cfg: Config, n: int) -> ServerOptimizer:
    """The server optimizer of --server-opt, for a model of n parameters."""
    return SERVER_OPTIMIZERS[cfg.server_opt].from_config(cfg, n)
