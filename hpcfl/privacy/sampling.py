"""Who takes part, drawn so that every rank draws the same without communicating: DP-SGD's
Poisson batches (and the buffer size they fit in), and the honest survivors a secure DP round can
count on. The clients' sampling of federated rounds is fl/partition.py's."""
from __future__ import annotations

import math

import numpy as np

from .accountant import SECURE_QUANTILE, _check_count


def poisson_sample(n: int, q: float, seed: int, step: int) -> np.ndarray:
    """The sorted int64 indices of one Poisson batch: each of the n samples joins independently
    with probability q. A pure function of (n, q, seed, step), so every rank draws the same batch
    without communicating.
    Drawn as K ~ Binomial(n, q), then a uniform K-subset: the same distribution as n independent
    Bernoulli(q) draws, since under those the size is Binomial(n, q) and every subset of a given
    size has the same probability q^K (1-q)^(n-K). It costs O(K) instead of O(n) for small q."""
    n = _check_count("n", n, 0)
    if not 0 <= q <= 1:
        raise ValueError(f"sampling rate q must be in [0, 1], got {q!r}")
    rng = np.random.default_rng([seed, step, 0x9015])
    k = rng.binomial(n, q)
    idx = rng.choice(n, size=k, replace=False, shuffle=False).astype(np.int64)
    idx.sort()
    return idx


def _kl_bernoulli(a: float, q: float) -> float:
    """KL(Bernoulli(a) || Bernoulli(q)), 0 < q < 1, with 0 log 0 = 0."""
    out = a * math.log(a / q) if a > 0 else 0.0
    return out + ((1 - a) * math.log((1 - a) / (1 - q)) if a < 1 else 0.0)


def poisson_capacity(n: int, q: float, p_exceed: float = 1e-12) -> int:
    """A batch size c that a Poisson batch K ~ Binomial(n, q) exceeds with probability at most
    p_exceed, so that buffers of c rows can be preallocated. From the Chernoff bound in its
    relative-entropy form (Hoeffding 1963, Theorem 1): P(K >= k) <= exp(-n KL(k/n || q)) for
    k >= nq; c is the smallest integer >= ceil(nq) with exp(-n KL((c+1)/n || q)) <= p_exceed.
    About mean + sqrt(2 mean ln(1/p_exceed)) for small q: 220 for n = 60000, q = 128/60000."""
    n = _check_count("n", n, 0)
    if not 0 <= q <= 1:
        raise ValueError(f"sampling rate q must be in [0, 1], got {q!r}")
    if not 0 < p_exceed <= 1:
        raise ValueError(f"p_exceed must be in (0, 1], got {p_exceed!r}")
    lo = math.ceil(n * q)
    if q in (0, 1) or lo >= n:
        return lo                                      # K is n q surely, or c = n is never exceeded
    log_p = math.log(p_exceed)
    if -n * _kl_bernoulli((lo + 1) / n, q) <= log_p:
        return lo
    hi = n                                             # P(K > n) = 0: always enough
    while hi - lo > 1:                                 # the bound falls with c: bisect on it
        mid = (lo + hi) // 2
        if -n * _kl_bernoulli((mid + 1) / n, q) <= log_p:
            hi = mid
        else:
            lo = mid
    return hi


def honest_quantile(num_clients: int, q: float, dropout: float, colluders: int,
                    quantile: float = SECURE_QUANTILE) -> int:
    """A low quantile of the honest noise shares a client can count on in a round: the
    survivors (Binomial(num_clients, q (1 - dropout)) under Poisson sampling and independent
    dropouts) less itself and the colluders."""
    from scipy.stats import binom

    survivors = int(binom.ppf(quantile, num_clients, q * (1 - dropout)))
    return survivors - 1 - colluders
