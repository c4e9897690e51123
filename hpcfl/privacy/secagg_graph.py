"""Who shares secrets with whom in a round of secure aggregation, with no cryptography: the
Shamir threshold, Bell et al. 2020's bounds on the neighbour count K of SecAgg+ (so that the
survivors' graph stays connected and each secret keeps t holders, except with probability
2^-SIGMA, when a share D of the clients drops out and a share G colludes; and so that a server
that names clients absent at will cannot cut the honest survivors apart through colluders), the
neighbour graph (a shuffled ring keyed by the round's transcript, fixed only once every key is
committed) and the round's parameters (RoundParams) every process knows before the round."""
from __future__ import annotations

import functools
import hashlib
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

SIGMA = 40                         # statistical security parameter: failure probability <= 2^-40
LIVENESS_SIGMA = 20                # an honest round aborts for too many absent neighbours <= 2^-20


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


@functools.lru_cache(maxsize=256)
def min_neighbors(m: int, max_dropout: float, corrupt: float, sigma: int = SIGMA) -> int | None:
    """The smallest even K for which a round of m clients is both live and private on the graph
    H(K, m) (the circulant with offsets 1..h, h = K/2, over a random ring), or None when only the
    complete graph qualifies (the bound's K is m - 1 or more). Clients drop out independently with
    probability at most max_dropout; each client colludes with probability `corrupt`.
    - Live: the survivors' graph stays connected once the dropped and the corrupt clients are
      removed, except with probability 2^-sigma. Survivors next to each other on the ring are
      joined unless h consecutive clients between them are gone, so it splits only if two such
      gaps occur, and two gaps hold two disjoint windows of h removed clients:
      P(split) <= C(m, 2) p^(2h), p = max_dropout + corrupt.
    - Private against a server that names any clients absent (dropped, or never sent shares):
      every client refuses a view in which some survivor has more than max_absent(K) absent
      neighbours. To cut the honest survivors apart the server needs two gaps of h clients that
      are absent or colluding; next to each gap an honest survivor sees its h neighbours on that
      side absent except the colluders among them, so each gap's first h clients hold at least
      h - max_absent colluders (a gap of absent clients alone is refused outright):
      P(two disjoint such windows) <= C(m, 2) P(Binomial(h, corrupt) >= h - max_absent)^2."""
    p = max_dropout + corrupt
    if m < 3 or p >= 1:
        return None
    for half in range(1, (m - 1) // 2 + 1):
        k = 2 * half
        if k >= m - 1:
            return None
        if p > 0 and math.comb(m, 2) * p ** k > 2.0 ** -sigma:
            continue
        if corrupt > 0:
            need = half - max_absent(k, m, max_dropout)       # colluders one window must hold
            if need <= 0 or math.comb(m, 2) * _binom_sf(need, half, corrupt) ** 2 > 2.0 ** -sigma:
                continue
        return k
    return None


@functools.lru_cache(maxsize=256)
def max_absent(degree: int, m: int, max_dropout: float, sigma: int = LIVENESS_SIGMA) -> int:
    """How many of a survivor's `degree` neighbours a client accepts as absent (Bell et al.'s
    bound on the dropouts a client tolerates): the smallest A such that, with every client
    dropping out independently with probability max_dropout, some one of the m clients has more
    than A absent neighbours with probability at most 2^-sigma (an honest round then aborts)."""
    a = math.floor(degree * max_dropout)
    while a < degree and m * _binom_sf(a + 1, degree, max_dropout) > 2.0 ** -sigma:
        a += 1
    return a


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
    (uint32 words), min_survivors (module docstring) and max_absent, how many absent neighbours
    any survivor may have in a view a client accepts (None: no bound; min_neighbors). The graph
    itself is fixed only after stage 0, from the transcript (graph())."""

    server_round: int
    clients: tuple[int, ...]
    k: int | None
    threshold: int
    n: int
    min_survivors: int
    max_absent: int | None = None

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
        if self.max_absent is not None and self.max_absent < 0:
            raise ValueError(f"max_absent={self.max_absent} must be >= 0")

    @classmethod
    def make(cls, server_round: int, clients: Iterable[int], n: int, k: int | None = None,
             threshold: int | None = None, corrupt: int = 0, max_absent: int | None = None,
             at_least: int = 0) -> RoundParams:
        """threshold defaults to the smallest majority of the holders; `corrupt` is how many
        colluding clients the consistency round must withstand; `at_least` raises min_survivors
        further (DP: the survivors whose noise shares make up the planned noise). ValueError when
        the round cannot reach them."""
        clients = tuple(sorted({int(c) for c in clients}))
        m = len(clients)
        if threshold is None:
            threshold = default_threshold(holders_per_client(k, m))
        need = max(int(threshold), min((m + int(corrupt)) // 2 + 1, m))
        if int(corrupt) + 2 > m:       # a sum of the colluders and one honest input is that input
            raise ValueError(f"{m} clients with {corrupt} admitted colluder(s) leave a sum of one honest "
                             f"client's update: a round needs {int(corrupt) + 2} or more")
        if at_least > m:
            raise ValueError(f"{m} clients cannot bring the {at_least} survivors a round needs")
        need = max(need, int(corrupt) + 2)
        return cls(int(server_round), clients, k, int(threshold), int(n), max(need, int(at_least)), max_absent)

    def graph(self, members: Iterable[int], transcript: bytes) -> dict[int, tuple[int, ...]]:
        return neighbor_graph(members, self.k, transcript)


def holders(graph: Mapping[int, Sequence[int]], cid: int) -> tuple[int, ...]:
    """Who holds shares of cid's secrets: cid itself and its neighbours, sorted."""
    return tuple(sorted((cid,) + tuple(graph[cid])))
