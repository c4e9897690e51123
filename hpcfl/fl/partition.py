"""How the training set is split among federated clients (McMahan et al. 2017; Hsu et al. 2019).

Each partition is a pure function of (labels, num_clients, seed, ...): every rank computes it
alone, without communicating, and then reads only the samples of the clients it trains.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike

from ..data.shard import shard_range
from ..errors import UsageError


def iid(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """A random permutation cut into num_clients nearly equal parts."""
    perm = np.random.default_rng([seed, 0x11D]).permutation(n)
    return [np.sort(perm[slice(*shard_range(n, k, num_clients))]) for k in range(num_clients)]


def shards(labels: np.ndarray, num_clients: int, seed: int, shards_per_client: int = 2) -> list[np.ndarray]:
    """The paper's pathological non-IID split: sort by label, cut into shards_per_client *
    num_clients equal shards (200 of 300 for 100 clients on MNIST), give each client
    shards_per_client random shards, so most clients see only 2 digits."""
    n_shards = shards_per_client * num_clients
    order = np.argsort(labels, kind="stable")          # by label, ties by index: deterministic
    bounds = [shard_range(len(labels), s, n_shards) for s in range(n_shards)]
    pick = np.random.default_rng([seed, 0x5AD]).permutation(n_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([order[slice(*bounds[s])] for s in row])) for row in pick]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Label skew: for every class, the share of each client is drawn from Dirichlet(alpha).
    Small alpha: each client holds few classes; huge alpha: close to IID."""
    rng = np.random.default_rng([seed, 0xD1A])
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(int(labels.max()) + 1):
        idx = rng.permutation(np.flatnonzero(labels == c))
        share = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(share)[:-1] * len(idx)).astype(np.int64)
        for k, piece in enumerate(np.split(idx, cuts)):
            parts[k].append(piece)
    return [np.sort(np.concatenate(p)) for p in parts]


def _shards(labels: np.ndarray, num_clients: int, seed: int, alpha: float) -> list[np.ndarray]:
    if 2 * num_clients > len(labels):
        raise UsageError(f"--partition shards needs 2 samples per client; {num_clients} clients "
                         f"are too many for {len(labels)} samples")
    return shards(labels, num_clients, seed)


# --partition's choices: (labels, num_clients, seed, alpha) -> each client's sample indices
PARTITIONS: dict[str, Callable[[np.ndarray, int, int, float], list[np.ndarray]]] = {
    "iid": lambda labels, num_clients, seed, alpha: iid(len(labels), num_clients, seed),
    "shards": _shards,
    "dirichlet": lambda labels, num_clients, seed, alpha: dirichlet(labels, num_clients, alpha, seed),
}


def create(scheme: str, labels: np.ndarray, num_clients: int, seed: int, alpha: float = 0.5) -> list[np.ndarray]:
    """The clients' sample indices; raises UsageError when a client would get no data."""
    n = len(labels)
    if num_clients > n:
        raise UsageError(f"--num-clients {num_clients} is more than the {n} training samples")
    if scheme not in PARTITIONS:
        raise UsageError(f"unknown partition {scheme!r}")
    parts = PARTITIONS[scheme](labels, num_clients, seed, alpha)
    empty = [k for k, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise UsageError(f"--partition {scheme}: {len(empty)} of {num_clients} clients get no data "
                         f"(first: client {empty[0]}); use fewer clients or a larger --alpha")
    return parts


def per_round(num_clients: int, fraction: float) -> int:
    """m = max(1, round(C*K)) (McMahan et al. 2017: m = max(C*K, 1))."""
    return max(1, int(round(fraction * num_clients)))


def sample_clients(num_clients: int, fraction: float, server_round: int, seed: int) -> np.ndarray:
    """The clients taking part in a round: max(1, round(C*K)) of them, seeded by the round, so
    every rank draws the same set without communicating (McMahan et al.: m = max(C*K, 1))."""
    m = per_round(num_clients, fraction)
    rng = np.random.default_rng([seed, server_round, 0xC11])
    return np.sort(rng.choice(num_clients, m, replace=False))


def assign_to_groups(clients: np.ndarray, sizes: np.ndarray, n_groups: int) -> list[list[int]]:
    """Balance the sampled clients over the rank groups by work (number of examples): largest
    first, each to the least-loaded group (LPT). Deterministic, so all ranks agree."""
    load = np.zeros(n_groups)
    groups: list[list[int]] = [[] for _ in range(n_groups)]
    for k in sorted(clients.tolist(), key=lambda k: (-sizes[k], k)):
        g = int(np.argmin(load))
        groups[g].append(k)
        load[g] += sizes[k]
    return groups


def dropouts(clients: ArrayLike, rate: float, server_round: int, seed: int) -> set[int]:
    """The sampled clients that drop out of a round (--dropout-rate): each independently with
    probability `rate`, seeded by the round, so every rank knows without communicating (a
    simulation: in a real deployment only their silence tells)."""
    clients = np.asarray(clients)
    if rate <= 0 or len(clients) == 0:
        return set()
    rng = np.random.default_rng([seed, server_round, 0xD0])
    return set(clients[rng.random(len(clients)) < rate].tolist())


def poisson_clients(num_clients: int, rate: float, server_round: int, seed: int,
                    attempt: int | None = None) -> np.ndarray:
    """DP-FedAvg's sampling: each client joins the round independently with probability `rate`
    (McMahan et al. 2018), drawn from the CSPRNG under a key from the secret seed (and the
    attempt of a resumed run; None: reproduced from --dp-noise-seed); a round may have no
    client at all."""
    from ..privacy import noise

    key = noise.derive_key(seed, "clients", *(() if attempt is None else (attempt,)))
    return np.flatnonzero(noise.bernoulli(key, server_round, num_clients, rate))


def stragglers(clients: ArrayLike, rate: float, server_round: int, seed: int) -> dict[int, float]:
    """The sampled clients that finish only part of their local work (--straggler-rate): each
    independently with probability `rate`, and then a share of its steps uniform in (0, 1]."""
    clients = np.asarray(clients, np.int64)
    if rate <= 0 or len(clients) == 0:
        return {}
    rng = np.random.default_rng([seed, server_round, 0x57A])
    slow = rng.random(len(clients)) < rate
    share = 1.0 - rng.random(len(clients))                 # (0, 1]
    return {int(k): float(u) for k, u, s in zip(clients, share, slow) if s}
