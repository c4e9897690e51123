"""Who shares secrets with whom in a round of secure aggregation, with no cryptography: the
Shamir threshold, Bell et al. 2020's bounds on the neighbour count K of SecAgg+ (so that the
survivors' graph stays connected and each secret keeps t holders, except with probability
2^-SIGMA, when a share D of the clients drops out and a share G colludes), the neighbour graph
(a shuffled ring keyed by the round's transcript, fixed only once every key is committed) and
the round's parameters (RoundParams) every process knows before the round."""
from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

SIGMA = 40                         # statistical security parameter: failure probability <= 2^-40


def check_threshold(t: int, n_holders: int) -> int:
    if not 2 <= t <= n_holders:
        raise ValueError(f"secure aggregation threshold t={t} must satisfy 2 <= t <= {n_holders} "
                         f"(the number of share holders per client)")
    return t


def default_threshold(n_holders: int) -> int:
    """The smallest majority of the share holders: n_holders // 2 + 1."""
    return check_threshold(n_holders // 2 + 1, n_holders)


def holders_per_client(k: int | None, m: int) -> int:
    """Share holders of each client (itself and its neighbours) in neighbor_graph(m clients, k)."""
    if k is None or k >= m - 1:
        return m
    return k + 1 + (k % 2 and m % 2)


def min_neighbors(m: int, max_dropout: float, corrupt: float, sigma: int = SIGMA) -> int | None:
    """The smallest K for which the survivors' graph of a round of m clients stays connected
    once the dropped and the corrupt clients (each independently, with probability at most
    max_dropout and corrupt) are removed, except with probability 2^-sigma (Bell et al. 2020's
    requirement, bounded for this graph). The graph is the circulant with offsets 1..h, h = K/2,
    over a random ring: survivors next to each other on the ring are joined unless h consecutive
    clients between them are gone, so it splits only if two such gaps occur, and two gaps hold two
    disjoint windows of h removed clients: P(split) <= C(m, 2) p^(2h), p = max_dropout + corrupt.
    None: only the complete graph qualifies (the bound's K is m - 1 or more)."""
    p = max_dropout + corrupt
    if m < 3:
        return None
    if p <= 0:
        half = 1
    elif p >= 1:
        return None
    else:
        half = math.ceil((sigma * math.log(2) + math.log(math.comb(m, 2))) / (-2 * math.log(p)))
    k = 2 * half
    return k if k < m - 1 else None


def _binom_sf(t: int, n: int, p: float) -> float:
    """P(Binomial(n, p) >= t)."""
    return sum(math.comb(n, i) * p**i * (1 - p)**(n - i) for i in range(max(t, 0), n + 1))


def sparse_threshold(holders: int, m: int, corrupt: float, sigma: int = SIGMA) -> int:
    """t for a sparse graph: the smallest majority of the holders, raised until the corrupt
    clients among one client's holders reach t with probability at most 2^-sigma / m (Bell et
    al. 2020); at most the number of holders."""
    t = default_threshold(holders)
    while t < holders and corrupt > 0 and _binom_sf(t, holders, corrupt) > 2.0**-sigma / m:
        t += 1
    return t


def neighbor_graph(clients: Iterable[int], k: int | None,
                   round_seed: bytes | int) -> dict[int, tuple[int, ...]]:
    """The SecAgg+ communication graph: complete when k is None or k >= m-1, otherwise the
    Harary graph H(k, m) over a permutation of the clients drawn from round_seed (each client
    is joined to the k/2 nearest on either side of a shuffled ring). Odd k: with m even each
    client also joins the one opposite on the ring (exactly k-regular); with m odd no k-regular
    graph exists, so k+1 is used. Every process computes the same graph from the same seed."""
    clients = sorted({int(c) for c in clients})
    m = len(clients)
    if k is None or k >= m - 1:
        return {c: tuple(d for d in clients if d != c) for c in clients}
    if k < 1:
        raise ValueError(f"neighbour count k={k} must be at least 1")
    ring = shuffled_ring(clients, round_seed)
    if k % 2 and m % 2:
        k += 1
    offsets = list(range(1, k // 2 + 1)) + [-d for d in range(1, k // 2 + 1)]
    if k % 2:
        offsets.append(m // 2)
    return {c: tuple(sorted(ring[(p + d) % m] for d in offsets)) for p, c in enumerate(ring)}


def shuffled_ring(clients: Iterable[int], round_seed: bytes | int) -> list[int]:
    """The clients in the ring order of neighbor_graph: a permutation from a hash rather than a
    seeded numpy RNG (no 32-bit seed, the same everywhere)."""
    seed = round_seed if isinstance(round_seed, bytes) else str(int(round_seed)).encode()
    prefix = b"hpcfl-secagg/graph" + struct.pack("<I", len(seed)) + seed
    return sorted({int(c) for c in clients},
                  key=lambda c: hashlib.sha256(prefix + struct.pack("<Q", c)).digest())


def is_connected(graph: Mapping[int, Sequence[int]], nodes: Iterable[int]) -> bool:
    """Whether the subgraph of `graph` induced on `nodes` is connected (empty: False)."""
    nodes = set(nodes)
    if not nodes:
        return False
    start = min(nodes)
    seen, todo = {start}, [start]
    while todo:
        for d in graph[todo.pop()]:
            if d in nodes and d not in seen:
                seen.add(d)
                todo.append(d)
    return seen == nodes


@dataclass(frozen=True)
class RoundParams:
    """What every process knows before a round: server_round, the sampled clients U, the
    neighbour count k (None: complete graph), the Shamir threshold t, the vector length n
    (uint32 words) and min_survivors (module docstring). The graph itself is fixed only after
    stage 0, from the transcript (graph())."""

    server_round: int
    clients: tuple[int, ...]
    k: int | None
    threshold: int
    n: int
    min_survivors: int

    def __post_init__(self):
        if list(self.clients) != sorted(set(self.clients)):
            raise ValueError("clients must be sorted and distinct")
        if self.clients and not 0 <= self.clients[0] <= self.clients[-1] < 2**32 - 1:
            raise ValueError("client ids must be in [0, 2^32 - 2]")
        check_threshold(self.threshold, holders_per_client(self.k, len(self.clients)))
        if not self.threshold <= self.min_survivors <= len(self.clients):
            raise ValueError(f"min_survivors={self.min_survivors} must be between t={self.threshold} "
                             f"and the {len(self.clients)} sampled clients")
        if self.n < 1:
            raise ValueError(f"vector length n={self.n} must be positive")

    @classmethod
    def make(cls, server_round: int, clients: Iterable[int], n: int, k: int | None = None,
             threshold: int | None = None, corrupt: int = 0) -> RoundParams:
        """threshold defaults to the smallest majority of the holders; `corrupt` is how many
        colluding clients the consistency round must withstand."""
        clients = tuple(sorted({int(c) for c in clients}))
        m = len(clients)
        if threshold is None:
            threshold = default_threshold(holders_per_client(k, m))
        need = max(int(threshold), min((m + int(corrupt)) // 2 + 1, m))
        return cls(int(server_round), clients, k, int(threshold), int(n), need)

    def graph(self, members: Iterable[int], transcript: bytes) -> dict[int, tuple[int, ...]]:
        return neighbor_graph(members, self.k, transcript)


def holders(graph: Mapping[int, Sequence[int]], cid: int) -> tuple[int, ...]:
    """Who holds shares of cid's secrets: cid itself and its neighbours, sorted."""
    return tuple(sorted((cid,) + tuple(graph[cid])))
