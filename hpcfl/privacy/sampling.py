"""Who takes part, drawn so that every rank draws the same without communicating: DP-SGD's
Poisson batches (and the buffer size they fit in), and the honest survivors a secure DP round can
count on. The clients' sampling of federated rounds is fl/partition.py's."""
from __future__ import annotations

import math

import numpy as np

from .accountant import SECURE_QUANTILE, _check_count


def poisson_sample(n: int, q: float, seed: int, step: int, attempt: int | None = None) -> np.ndarray:
    """The sorted int64 indices of one Poisson batch: each of the n samples joins independently
    with probability q, drawn from the CSPRNG (noise.bernoulli: AES-256-CTR under a key derived
    from the secret seed, so that nobody without the seed can predict or reconstruct a batch from
    others). A pure function of (n, q, seed, step, attempt), so every rank draws the same batch
    without communicating; `attempt` (None: a run reproduced from --dp-noise-seed) keys each
    attempt of a resumed run afresh."""
    from . import noise

    n = _check_count("n", n, 0)
    if not 0 <= q <= 1:
        raise ValueError(f"sampling rate q must be in [0, 1], got {q!r}")
    key = noise.derive_key(seed, "batch", *(() if attempt is None else (attempt,)))
    return np.flatnonzero(noise.bernoulli(key, step, n, q)).astype(np.int64)


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


def corrupt_count(sampled: int, colluders: int, corrupt_fraction: float) -> int:
    """The colluding clients a round of `sampled` clients is assumed to hold: --dp-colluders C at
    least, and the share G that secure aggregation withstands (one adversary, one set of
    numbers): max(C, ceil(G m))."""
    return max(int(colluders), math.ceil(corrupt_fraction * sampled - 1e-12))


def honest_quantile(num_clients: int, q: float, dropout: float, colluders: int,
                    quantile: float = SECURE_QUANTILE, corrupt_fraction: float = 0.0) -> int:
    """A low quantile of the honest noise shares besides its own that a client can count on in a
    round: H = S - 1 - corrupt_count(M), with M ~ Binomial(num_clients, q) sampled under Poisson
    sampling and S ~ Binomial(M, 1 - dropout) surviving; the largest h with P(H < h) <= quantile."""
    from scipy.stats import binom

    lo, hi = int(binom.ppf(1e-12, num_clients, q)), int(binom.isf(1e-12, num_clients, q))
    ms = np.arange(lo, hi + 1)
    pm = binom.pmf(ms, num_clients, q)
    need = np.array([corrupt_count(int(m), colluders, corrupt_fraction) + 1 for m in ms])

    def below(h: int) -> float:                   # P(H < h) = P(S < h + need(M))
        return float(pm @ binom.cdf(h + need - 1, ms, 1 - dropout))

    h = int(binom.ppf(quantile, num_clients, q * (1 - dropout)))     # above the answer: walk down
    while h > -1 - colluders and below(h) > quantile:
        h -= 1
    while below(h + 1) <= quantile:
        h += 1
    return h
