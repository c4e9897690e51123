"""Server-side math of federated learning, with no MPI: weighted averaging and the server
optimizers FedAvg (McMahan et al. 2017), FedAvgM (Hsu et al. 2019) and FedAdam (Reddi et al. 2021).

All of them see the round as one pseudo-gradient: delta = global - weighted average of the
client models. FedAvg with server_lr 1 simply takes the average.
"""
from __future__ import annotations

import numpy as np


def weighted_average(models: list[np.ndarray], num_examples: list[int]) -> np.ndarray:
    """sum_k n_k w_k / sum_k n_k (what the MPI Reduce computes, written for the tests)."""
    total = float(sum(num_examples))
    out = np.zeros_like(models[0], dtype=np.float64)
    for w, n in zip(models, num_examples):
        out += (n / total) * w
    return out.astype(models[0].dtype)


class FedAvg:
    def __init__(self, n: int, server_lr: float = 1.0):
        self.server_lr = server_lr

    def step(self, global_w: np.ndarray, average: np.ndarray) -> None:
        """global_w <- global_w - server_lr * (global_w - average), in place."""
        global_w -= np.float32(self.server_lr) * (global_w - average)

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        for name, value in state.items():          # the arrays named by state()
            getattr(self, name)[...] = value


class FedAvgM(FedAvg):
    """Server momentum: v <- beta v + delta; w <- w - server_lr v."""

    def __init__(self, n: int, server_lr: float = 1.0, momentum: float = 0.9):
        self.server_lr, self.momentum = server_lr, momentum
        self.v = np.zeros(n, np.float32)

    def step(self, global_w, average) -> None:
        self.v *= np.float32(self.momentum)
        self.v += global_w - average
        global_w -= np.float32(self.server_lr) * self.v

    def state(self) -> dict:
        return {"v": self.v}


class FedAdam(FedAvg):
    """Adam on the pseudo-gradient, without bias correction, with tau = eps (Reddi et al. 2021)."""

    def __init__(self, n: int, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99,
                 eps: float = 1e-3):
        self.server_lr, self.beta1, self.beta2, self.eps = server_lr, beta1, beta2, eps
        self.m = np.zeros(n, np.float32)
        self.v = np.zeros(n, np.float32)

    def step(self, global_w, average) -> None:
        delta = global_w - average
        self.m *= np.float32(self.beta1)
        self.m += np.float32(1 - self.beta1) * delta
        self.v *= np.float32(self.beta2)
        self.v += np.float32(1 - self.beta2) * delta * delta
        global_w -= np.float32(self.server_lr) * self.m / (np.sqrt(self.v) + np.float32(self.eps))

    def state(self) -> dict:
        return {"m": self.m, "v": self.v}


def make(cfg, n: int):
    lr = cfg.server_lr                    # derived by Config when not given
    if cfg.server_opt == "fedavg":
        return FedAvg(n, lr)
    if cfg.server_opt == "fedavgm":
        return FedAvgM(n, lr, cfg.server_momentum)
    if cfg.server_opt == "fedadam":
        return FedAdam(n, lr, cfg.server_beta1, cfg.server_beta2, cfg.server_eps)
    raise ValueError(f"unknown server optimizer {cfg.server_opt!r}")


# ---- SCAFFOLD (Karimireddy et al. 2020, Algorithm 1 with option II control variates)

def scaffold_correction(c: np.ndarray, c_i: np.ndarray | None, age: int, max_age: int) -> tuple[np.ndarray, bool]:
    """What each local step adds to the client's gradient: c - c_i (Algorithm 1), and whether
    c_i was left out: then it is c alone, as in the client's first round (no c_i yet), also when
    max_age > 0 and c_i was computed more than max_age rounds ago. A c_i is a mean of gradients
    at an old global model: with 10% of the clients per round it is ~10 rounds old, and the
    paper has no rule for that (its client-sampling analysis only shrinks the step size);
    correcting with old c_i made SCAFFOLD diverge at local lr 0.1 (benchmarks/ROBUSTNESS.md)."""
    if c_i is None or (max_age > 0 and age > max_age):
        return c.copy(), True
    return c - c_i, False


def scaffold_client_variate(c_i: np.ndarray, c: np.ndarray, x: np.ndarray, y: np.ndarray,
                            steps: int, local_lr: float, left_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """c_i+ = c_i - c + (x - y) / (K eta_l) (option II, eq. 4: no extra gradient pass), from the
    global model x and the client's model y after its K local steps at learning rate eta_l:
    the mean of the client's own gradients along those steps, since each moved y by
    -eta_l (g_i(y) - c_i + c). When the correction left c_i out (scaffold_correction), each step
    moved y by -eta_l (g_i(y) + c), and that mean is -c + (x - y) / (K eta_l). Returns (c_i+,
    delta c_i = c_i+ - c_i): against the stored c_i, the one the server's c holds."""
    new = (-c if left_out else c_i - c) + (x - y) / (steps * local_lr)
    return new, new - c_i


def scaffold_server_variate(c: np.ndarray, dc_sum: np.ndarray, count: int, num_clients: int) -> np.ndarray:
    """c <- c + (|S| / N) * mean over the round's clients S of delta c_i = c + sum / N (eq. 5):
    c stays the mean of all N stored c_i (0 for a client not seen yet)."""
    return c + dc_sum / num_clients if count else c
