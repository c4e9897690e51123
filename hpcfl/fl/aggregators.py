"""Validation and Byzantine-robust aggregation of client updates, with no MPI.

An update is a delta = client model - global model: a float32 vector of length n (~200,000).
The server stacks the m updates of a round into one (m, n) array `deltas` and applies one rule;
the new global model is global + aggregate(...). Every rule is a pure function of that array:

  mean          sum_i p_i delta_i, p_i = num_examples_i / sum  (FedAvg, McMahan et al. 2017)
  median        coordinate-wise median                          (Yin et al. 2018)
  trimmed-mean  coordinate-wise beta-trimmed mean               (Yin et al. 2018)
  krum          the update closest to its n - f - 2 neighbours  (Blanchard et al. 2017)
  multi-krum    the mean of the m_select best Krum scores       (Blanchard et al. 2017)
  norm-bounded  clip every delta to L2 norm M, then the mean    (Sun et al. 2019)
  fednova       deltas normalised by local steps tau_i          (Wang et al. 2020)

Only mean, norm-bounded and fednova use the clients' example counts: the robust rules treat
clients alike, because a Byzantine client can claim any num_examples it likes.
The papers' n is the number of clients (m here) and f the number of Byzantine ones; n stays n in
the error messages so that they read as the papers do. Validate updates (validate) before
aggregating: the rules assume finite values.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

_GRAM_BLOCK = 16_384        # columns per float64 block: the Gram matrix never copies all of deltas


def validate(update: np.ndarray, expected_size: int, max_norm: float | None = None) -> str | None:
    """Why the server rejects this update, or None when it is acceptable."""
    update = np.asarray(update)
    if update.ndim != 1 or update.size != expected_size:
        return f"has shape {update.shape}, expected a vector of {expected_size} values"
    if not np.issubdtype(update.dtype, np.floating):
        return f"has dtype {update.dtype}, expected floating point"
    # One pass without a temporary first: a float64 sum of float32-sized values cannot overflow,
    # so a finite sum means finite values (only an overflowing or non-finite sum needs a look).
    with np.errstate(over="ignore", invalid="ignore"):
        total = update.sum(dtype=np.float64)
    if not math.isfinite(total):
        finite = np.isfinite(update)
        if not finite.all():
            n_nan = int(np.isnan(update).sum())
            n_inf = update.size - int(finite.sum()) - n_nan
            return f"has {n_nan + n_inf} non-finite values ({n_nan} NaN, {n_inf} inf) of {update.size}"
    if max_norm is not None:
        norm = _norms(update[None, :])[0]
        if norm > max_norm:
            return f"has L2 norm {norm:.6g}, above max_norm {max_norm:g}"
    return None


def mean(deltas: np.ndarray, weights: ArrayLike | None = None) -> np.ndarray:
    """sum_i p_i delta_i with p_i = weights_i / sum(weights) (example counts, as FedAvg),
    accumulated in float64; weights None: the plain mean."""
    deltas = _stack(deltas)
    return _weighted_sum(deltas, _proportions(weights, len(deltas)))


def median(deltas: np.ndarray) -> np.ndarray:
    """Coordinate-wise median (Yin et al. 2018). An even number of clients has two middle values
    per coordinate: the median is their average (computed in float64), as np.median does."""
    deltas = _stack(deltas)
    m = len(deltas)
    s = np.sort(deltas, axis=0)                 # (m, n); faster than np.partition for a column sort
    if m % 2:
        return s[m // 2].copy()
    return ((s[m // 2 - 1].astype(np.float64) + s[m // 2]) / 2).astype(deltas.dtype)


def trimmed_mean(deltas: np.ndarray, beta: float) -> np.ndarray:
    """Coordinate-wise beta-trimmed mean (Yin et al. 2018): for every coordinate, drop the
    k = floor(beta * m) largest and the k smallest values and average the m - 2k others
    (unweighted, float64). beta = 0 is the plain mean; 0 <= beta < 0.5 keeps at least one."""
    deltas = _stack(deltas)
    m = len(deltas)
    _check_beta(beta)
    k = math.floor(beta * m)
    if m - 2 * k < 1:                           # cannot happen for beta < 0.5; guards rounding
        raise ValueError(f"trimmed-mean with beta {beta} drops all {m} values")
    if k == 0:
        return mean(deltas)
    s = np.sort(deltas, axis=0)                 # (m, n)
    return (s[k:m - k].sum(axis=0, dtype=np.float64) / (m - 2 * k)).astype(deltas.dtype)


def krum(deltas: np.ndarray, f: int) -> tuple[int, np.ndarray]:
    """Krum (Blanchard et al. 2017): score(i) = sum of the squared distances from delta_i to its
    n - f - 2 closest other deltas; the choice is the lowest score, exact ties to the lowest
    index. Needs n > 2f + 2. Returns (index, scores (m,) float64)."""
    deltas = _stack(deltas)
    m = len(deltas)
    _check_krum(m, f)
    d = _pairwise_sq_distances(deltas)          # (m, m)
    np.fill_diagonal(d, np.inf)                 # a delta is not its own neighbour
    k = m - f - 2
    scores = np.sort(d, axis=1)[:, :k].sum(axis=1)
    return int(np.argmin(scores)), scores       # argmin: the first of equal minima


def multi_krum(deltas: np.ndarray, f: int, m_select: int) -> tuple[np.ndarray, np.ndarray]:
    """Multi-Krum (Blanchard et al. 2017): the plain mean of the m_select deltas with the lowest
    Krum scores (scores computed once, on all n deltas; ties to the lowest index). m_select = 1 is
    Krum, m_select = n is the mean. Returns (mean, selected indices in increasing order)."""
    deltas = _stack(deltas)
    m = len(deltas)
    _check_m_select(m, m_select)
    _, scores = krum(deltas, f)
    selected = np.sort(np.argsort(scores, kind="stable")[:m_select])
    return mean(deltas[selected]), selected


def norm_bounded(deltas: np.ndarray, weights: ArrayLike | None, max_norm: float) -> np.ndarray:
    """Norm bounding (Sun et al. 2019, "Can You Really Backdoor Federated Learning?"): every
    delta becomes delta * min(1, max_norm / ||delta||_2), then the weighted mean. Deltas already
    within max_norm are left exactly as they are."""
    deltas = _stack(deltas)
    _check_max_norm(max_norm)
    p = _proportions(weights, len(deltas))
    norms = _norms(deltas)
    factor = np.minimum(1.0, max_norm / np.maximum(norms, np.finfo(np.float64).tiny))
    return _weighted_sum(deltas, p * factor)    # the clip factors folded into the weights


def fednova(deltas: np.ndarray, tau: ArrayLike, weights: ArrayLike | None) -> np.ndarray:
    """FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
    Federated Optimization") for clients that ran tau_i local SGD steps: normalised updates
    d_i = delta_i / tau_i, aggregated as tau_eff * sum_i p_i d_i with tau_eff = sum_i p_i tau_i
    and p_i = weights_i / sum(weights). With plain local SGD ||a_i||_1 = tau_i; local momentum
    would change that normaliser. Equal tau_i: the weighted mean (FedAvg)."""
    deltas = _stack(deltas)
    m = len(deltas)
    tau = np.asarray(tau, np.float64)
    if tau.shape != (m,) or not np.all(tau > 0):
        raise ValueError(f"fednova needs one positive step count per client: got tau {tau.tolist()} "
                         f"for {m} clients")
    p = _proportions(weights, m)
    tau_eff = float(p @ tau)
    return _weighted_sum(deltas, tau_eff * p / tau)    # sum_i (tau_eff p_i / tau_i) delta_i


@dataclass(frozen=True)
class RuleSettings:
    """The settings a rule may read: f Byzantine clients (krum, multi-krum), the trimmed share
    beta, multi-krum's m_select (None: n - f), norm-bounded's max_norm."""
    f: int = 0
    beta: float = 0.1
    m_select: int | None = None
    max_norm: float | None = None


class Aggregator(Protocol):
    """A rule of the server: the round's aggregate delta from the (m, n) stacked updates."""

    @property
    def gathered(self) -> bool:
        """True: the rule needs every update at the server (the leaders gather them); False: it
        is a weighted sum of (possibly clipped) updates, which one Reduce computes on the way."""

    def check(self, n_clients: int, settings: RuleSettings) -> None:
        """Raise ValueError when the rule cannot run on n_clients updates with these settings."""

    def __call__(self, deltas: np.ndarray, weights: np.ndarray | None, settings: RuleSettings) -> np.ndarray:
        """The aggregate delta (n,) of deltas (m, n), weights (m,) example counts or None."""


def _no_check(n_clients: int, settings: RuleSettings) -> None:
    pass


@dataclass(frozen=True)
class Rule:
    """An Aggregator from two functions."""
    apply: Callable[[np.ndarray, np.ndarray | None, RuleSettings], np.ndarray]
    check: Callable[[int, RuleSettings], None] = _no_check
    gathered: bool = True

    def __call__(self, deltas: np.ndarray, weights: np.ndarray | None, settings: RuleSettings) -> np.ndarray:
        return self.apply(deltas, weights, settings)


def _norm_bounded(deltas: np.ndarray, weights: np.ndarray | None, s: RuleSettings) -> np.ndarray:
    assert s.max_norm is not None, "checked by the rule"
    return norm_bounded(deltas, weights, s.max_norm)


def _multi_krum(deltas: np.ndarray, weights: np.ndarray | None, s: RuleSettings) -> np.ndarray:
    return multi_krum(deltas, s.f, len(deltas) - s.f if s.m_select is None else s.m_select)[0]


def _check_multi_krum(n_clients: int, s: RuleSettings) -> None:
    _check_krum(n_clients, s.f)
    if s.m_select is not None:
        _check_m_select(n_clients, s.m_select)


# --aggregator's choices; a new rule is one function above and one line in this table
AGGREGATORS: dict[str, Aggregator] = {
    "mean": Rule(lambda d, w, s: mean(d, w), gathered=False),
    "median": Rule(lambda d, w, s: median(d)),
    "trimmed-mean": Rule(lambda d, w, s: trimmed_mean(d, s.beta), lambda m, s: _check_beta(s.beta)),
    "krum": Rule(lambda d, w, s: d[krum(d, s.f)[0]].copy(), lambda m, s: _check_krum(m, s.f)),
    "multi-krum": Rule(_multi_krum, _check_multi_krum),
    "norm-bounded": Rule(_norm_bounded, lambda m, s: _check_max_norm(s.max_norm), gathered=False),
}
NAMES = tuple(AGGREGATORS)


def check(name: str, n_clients: int, f: int = 0, beta: float = 0.1, m_select: int | None = None,
          max_norm: float | None = None) -> None:
    """Raise ValueError when `name` cannot run on n_clients updates with these settings, so the
    trainer can refuse before training rather than fail at the first round."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; choose one of {', '.join(NAMES)}")
    if int(n_clients) != n_clients or n_clients < 1:
        raise ValueError(f"{name} needs at least one client update, got {n_clients}")
    AGGREGATORS[name].check(n_clients, RuleSettings(f, beta, m_select, max_norm))


def aggregate(name: str, deltas: np.ndarray, weights: ArrayLike | None = None, *, f: int = 0, beta: float = 0.1,
              m_select: int | None = None, max_norm: float | None = None) -> np.ndarray:
    """The round's aggregate delta (n,) by rule `name` (one of NAMES). weights (example counts)
    count only for mean and norm-bounded; multi-krum's m_select defaults to n - f."""
    deltas = _stack(deltas)
    check(name, len(deltas), f, beta, m_select, max_norm)
    w = None if weights is None else np.asarray(weights)
    return AGGREGATORS[name](deltas, w, RuleSettings(f, beta, m_select, max_norm))


def memory_bytes(m: int, n: int, dtype: DTypeLike = np.float32) -> int:
    """Bytes to hold the m individual updates of n values (the (m, n) array). median and
    trimmed-mean sort a copy, so they need twice this at their peak; krum and multi-krum add
    only an m x m Gram matrix and one float64 block of m x 16,384."""
    return int(m) * int(n) * np.dtype(dtype).itemsize


# ---- helpers ---------------------------------------------------------------------------------

def _stack(deltas: ArrayLike) -> np.ndarray:
    deltas = np.asarray(deltas)
    if deltas.ndim != 2 or len(deltas) == 0:
        raise ValueError(f"deltas must be an (m, n) array with m >= 1, got shape {deltas.shape}")
    return deltas


def _proportions(weights: ArrayLike | None, m: int) -> np.ndarray:
    """p_i = weights_i / sum(weights) as float64; None: equal weights."""
    if weights is None:
        return np.full(m, 1.0 / m)
    w = np.asarray(weights, np.float64)
    if w.shape != (m,) or not np.all(w >= 0) or not w.sum() > 0:
        raise ValueError(f"weights must be {m} non-negative numbers with a positive sum, "
                         f"got {w.tolist()}")
    return w / w.sum()


def _weighted_sum(deltas: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """sum_i coef_i delta_i, accumulated in float64 row by row (no (m, n) float64 copy)."""
    out = np.zeros(deltas.shape[1], np.float64)
    for c, delta in zip(coef.astype(np.float64), deltas):
        out += c * delta                        # np.float64 * float32 row -> float64
    return out.astype(deltas.dtype)


def _norms(deltas: np.ndarray) -> np.ndarray:
    """L2 norm of every row, in float64 (float32 squares overflow above ~1.8e19)."""
    return np.array([math.sqrt(np.dot(r, r)) for r in (row.astype(np.float64) for row in deltas)])


def _pairwise_sq_distances(deltas: np.ndarray) -> np.ndarray:
    """||x_i - x_j||^2 = G_ii + G_jj - 2 G_ij through the Gram matrix G = X X^T, accumulated in
    float64 over column blocks: one BLAS call per block instead of m^2 vector differences."""
    m, n = deltas.shape
    gram = np.zeros((m, m))
    for start in range(0, n, _GRAM_BLOCK):
        x = deltas[:, start:start + _GRAM_BLOCK].astype(np.float64)   # (m, block)
        gram += x @ x.T
    sq = np.diag(gram).copy()
    d = sq[:, None] + sq[None, :] - 2.0 * gram
    np.maximum(d, 0.0, out=d)                   # rounding can leave tiny negatives
    return d


def _check_krum(n: int, f: int) -> None:
    if int(f) != f or f < 0:
        raise ValueError(f"f (the number of Byzantine clients) must be a whole number >= 0, got {f}")
    if not n > 2 * f + 2:
        raise ValueError(f"krum needs n > 2f + 2 clients, got n = {n}, f = {f}: "
                         f"f = {f} needs at least {2 * f + 3} clients per round")


def _check_m_select(n: int, m_select: int) -> None:
    if int(m_select) != m_select or not 1 <= m_select <= n:
        raise ValueError(f"multi-krum's m_select must be between 1 and n = {n}, got {m_select}")


def _check_beta(beta: float) -> None:
    if not 0 <= beta < 0.5:
        raise ValueError(f"trimmed-mean needs 0 <= beta < 0.5, got beta = {beta}")


def _check_max_norm(max_norm: float | None) -> None:
    if max_norm is None or not max_norm > 0 or not math.isfinite(max_norm):
        raise ValueError(f"norm-bounded needs a positive, finite max_norm, got {max_norm}")
