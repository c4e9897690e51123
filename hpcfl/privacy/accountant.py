"""The differential-privacy math of hpcfl, with no MPI: RDP accounting of the Poisson-sampled
Gaussian mechanism (Abadi et al. 2016; Mironov et al. 2019), noise calibration, Poisson batch
sampling for DP-SGD, and the clipping and noise of DP-FedAvg (McMahan et al. 2018).

The accounting is dp-accounting's RdpAccountant; it is imported inside the functions that need
it, because non-private runs should neither require it nor pay its ~1 s import.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from collections.abc import Iterable

import numpy as np

# RDP orders: dp-accounting's DEFAULT_RDP_ORDERS (1.1..10.9 by 0.1, 11..63, 128, 256, 512, 1024)
# plus two extensions. A grid order a factor (1 + r) from the best one loses about r^2/2 of
# epsilon for the plain Gaussian, and more under subsampling, whose RDP climbs steeply past the
# best order: the defaults' gap 63 -> 128 made small epsilons up to 32% loose (q = 128/60000,
# z = 3, 1400 steps: 0.127 instead of 0.096), and their end at 1024 floors epsilon at 0.0035 for
# delta = 1e-5.
# - 64..1024 at ratio 2^(1/8), then on to 4096 at ratio 2^(1/4): within 0.3% of a dense grid for
#   every epsilon down to ~0.002, and a floor of 0.00054 at delta = 1e-5 (see _epsilon_floor).
# - 1.15..1.95 between the defaults' tenths: large epsilons (few survivors under secure
#   aggregation, tiny noise) have their best order near 1, where (a - 1) doubles from 1.1 to 1.2;
#   eps ~ 90 goes from 6% to 0.9% above the dense grid. Below 1.1 the conversion term alone,
#   log(1/delta)/(a - 1), is over 100: useless.
# Integer orders cost dp-accounting O(a) each, so the top of the grid is most of the ~0.1 s that
# one (q < 1, z) takes; the count of a composition costs nothing.
ORDERS: tuple[float, ...] = tuple(sorted(set(
    [1 + x / 10.0 for x in range(1, 100)]              # the defaults' fractional orders
    + [round(1.05 + x / 10.0, 2) for x in range(1, 10)]  # 1.15, 1.25, ..., 1.95
    + list(range(11, 64))                              # the defaults' small integers
    + [round(64 * 2 ** (k / 8)) for k in range(33)]    # 64, 70, 76, ..., 1024 (holds 128..1024)
    + [round(1024 * 2 ** (k / 4)) for k in range(1, 9)]  # 1218, 1448, ..., 4096
)))

_MAX_BRACKET = 40                                      # doublings/halvings of z from 1


@contextlib.contextmanager
def _quiet_absl():
    """Mute dp-accounting's absl warnings for the duration of a call. At small orders and small
    noise its series for fractional orders may not converge; it then drops that order, which can
    only loosen the bound, and says so once per order and composition: noise, not news.
    When absl's handler sits on the root logger (programs started by absl.app), absl verbosity
    is the root level, so both levels are saved and put back as they were."""
    from absl import logging as absl_logging

    absl_logger, root = logging.getLogger("absl"), logging.getLogger()
    saved = absl_logging.get_verbosity(), absl_logger.level, root.level
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(saved[0])
        absl_logger.setLevel(saved[1])
        root.setLevel(saved[2])


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _check_count(name: str, value, low: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def epsilon(events: Iterable[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at `delta` after all `events`, each (q, z, count): `count` steps of the Gaussian
    mechanism with noise multiplier z (noise std / L2 sensitivity) on a Poisson sample of rate q.
    q = 1 is the plain Gaussian mechanism; z = 0 (with count > 0) gives inf; count 0 adds nothing.
    All events compose in one RdpAccountant over ORDERS, so rounds with different z (secure
    aggregation with dropouts) are accounted exactly, not by their worst case.
    Raises ValueError for q outside (0, 1], z < 0, count < 0 or delta outside (0, 1)."""
    _check_delta(delta)
    totals: dict[tuple[float, float], int] = {}        # identical events: one RDP evaluation
    for q, z, count in events:
        if not 0 < q <= 1:
            raise ValueError(f"sampling rate q must be in (0, 1], got {q!r}")
        if not z >= 0:                                  # also rejects nan
            raise ValueError(f"noise multiplier z must be >= 0, got {z!r}")
        count = _check_count("count", count, 0)
        if count:
            key = (float(q), float(z))
            totals[key] = totals.get(key, 0) + count
    if any(z == 0 for _, z in totals):
        return math.inf                                # unnoised releases: no guarantee at all
    if not totals:
        return 0.0

    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant(ORDERS)
    with _quiet_absl():
        for (q, z), count in totals.items():
            event = dp_accounting.GaussianDpEvent(z)
            if q < 1:
                event = dp_accounting.PoissonSampledDpEvent(q, event)
            accountant.compose(event, count)
        return float(accountant.get_epsilon(delta))


def _epsilon_floor(delta: float) -> float:
    """The infimum of epsilon over all noise levels: as z grows every RDP value goes to 0 and
    dp-accounting's conversion (Canonne et al. 2020, Asoodeh et al. 2021), epsilon = rdp +
    log(1 - 1/a) - log(delta a)/(a - 1), tends to this term, smallest at the largest order.
    (Its other bound, via the KL divergence, only gives epsilon 0 once every RDP value is under
    ~delta^2: noise in the thousands of times the sensitivity. Not a useful calibration.)"""
    return min(math.log1p(-1 / a) - math.log(delta * a) / (a - 1) for a in ORDERS if a > 1.01)


def calibrate_noise(q: float, steps: int, delta: float, target_epsilon: float,
                    rtol: float = 1e-3, prior: Iterable[tuple[float, float, int]] = ()) -> float:
    """The smallest noise multiplier z, to a relative `rtol`, such that `steps` compositions of
    the Gaussian mechanism on Poisson samples of rate q end at epsilon(delta) <= target_epsilon,
    after the `prior` events (q, z, count) of the same run (DP-PCA's release: --dp-pca).
    Bisection on log z keeps a bracket eps(lo) > target >= eps(hi) and returns hi: the result
    always meets the target, and z / (1 + rtol) does not.
    Raises ValueError for bad arguments, and when the target is at or below what RDP over ORDERS
    can certify with any noise (about 5e-4 for delta = 1e-5; see _epsilon_floor)."""
    if not 0 < q <= 1:
        raise ValueError(f"sampling rate q must be in (0, 1], got {q!r}")
    steps = _check_count("steps", steps, 1)
    _check_delta(delta)
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")
    floor = _epsilon_floor(delta)
    unreachable = (f"target_epsilon={target_epsilon:g} is unreachable with q={q:g}, steps={steps}, "
                   f"delta={delta:g}: the smallest epsilon reachable is {floor:.4g} (not attained: "
                   f"it is the limit as the noise grows; the RDP-to-DP conversion term "
                   f"log(1/(delta*a))/(a-1) + log(1-1/a) at the largest RDP order a={max(ORDERS):g}); "
                   f"ask for a larger epsilon or delta")
    if target_epsilon <= floor:
        raise ValueError(unreachable)
    prior = list(prior)
    if prior and epsilon(prior, delta) >= target_epsilon:
        raise ValueError(f"target_epsilon={target_epsilon:g} is spent before training: the earlier "
                         f"releases alone cost {epsilon(prior, delta):.4g}")

    def meets(z: float) -> bool:
        return epsilon([*prior, (q, z, steps)], delta) <= target_epsilon

    lo = hi = 1.0
    if meets(hi):                                      # walk down until the target fails
        for _ in range(_MAX_BRACKET):
            lo /= 2
            if not meets(lo):
                break
            hi = lo
        else:
            return hi                                  # met with z = 2^-40: any noise will do
    else:                                              # walk up until the target is met
        for _ in range(_MAX_BRACKET):
            hi *= 2
            if meets(hi):
                break
            lo = hi
        else:
            raise ValueError(unreachable)
    while hi > lo * (1 + rtol):
        mid = math.sqrt(lo * hi)
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return hi


# ------------------------------------------------------------------------------------ DP-PCA
# Abadi et al. 2016, section 4: each training image as a vector scaled to unit L2 norm, their
# Gram matrix A = sum x x^T (one image changes it by x x^T: Frobenius norm 1, and its upper
# triangle, the part released, has L2 norm <= 1), the Gaussian mechanism on the upper triangle
# (mirrored: a symmetric release), then the top K eigenvectors of the noisy matrix. The input
# of the MLP is then the standardised image times those K directions.
PCA_SHARE = 0.1     # the share of --dp-epsilon the DP-PCA release spends when its noise is derived


def pca_noise_for(target_epsilon: float, delta: float, share: float = PCA_SHARE) -> float:
    """The noise multiplier of the DP-PCA release that alone spends `share` of the budget."""
    return calibrate_noise(1.0, 1, delta, share * target_epsilon)


def dp_pca(images: np.ndarray, k: int, sigma: float, key: bytes) -> np.ndarray:
    """The (d, k) float32 matrix of the top-k eigenvectors (columns, eigenvalue descending, each
    with its largest entry positive) of sum_i x_i x_i^T + N, x_i = image i / ||image i|| (a zero
    image stays zero) and N symmetric with N(0, sigma^2) upper-triangle entries drawn from the
    CSPRNG stream of `key` (noise.py). images: (n, d) or (n, h, w), any dtype."""
    from ..privacy import noise

    images = np.asarray(images)
    d = int(np.prod(images.shape[1:]))
    if not 1 <= k <= d:
        raise ValueError(f"--dp-pca {k}: must be between 1 and the {d} input values")
    gram = np.zeros((d, d))
    for a in range(0, len(images), 10_000):        # in float64, 10,000 rows at a time
        x = images[a:a + 10_000].reshape(-1, d).astype(np.float64)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
        gram += x.T @ x
    upper = np.triu_indices(d)
    e = np.zeros((d, d))
    e[upper] = sigma * noise.standard_normal(key, 0, len(upper[0]))
    gram += np.triu(e) + np.triu(e, 1).T
    values, vectors = np.linalg.eigh(gram)
    top = vectors[:, np.argsort(values)[::-1][:k]]
    top *= np.sign(top[np.abs(top).argmax(axis=0), np.arange(k)])      # a fixed sign per column
    return top.astype(np.float32)


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


def clip_l2(vector: np.ndarray, S: float) -> tuple[np.ndarray, float]:
    """(vector * min(1, S / ||vector||), ||vector||): a client's update clipped to L2 norm S, so
    that it moves the sum by at most S (DP-FedAvg's sensitivity). The norm sums squares in
    float64: float32 would lose digits over 235,146 terms. Returns a new array, of vector's dtype
    when that is floating (float64 otherwise)."""
    if not S > 0:
        raise ValueError(f"clipping norm S must be > 0, got {S!r}")
    vector = np.asarray(vector)
    flat = vector.astype(np.float64).ravel()
    norm = math.sqrt(float(flat @ flat))
    scale = min(1.0, S / norm) if norm > 0 else 1.0
    dtype = vector.dtype if np.issubdtype(vector.dtype, np.floating) else np.float64
    return (vector * dtype.type(scale)).astype(dtype, copy=False), norm


def noise_std(z: float, S: float) -> float:
    """The std of the Gaussian noise on a sum of updates clipped to S: z times the sensitivity."""
    if not z >= 0 or not S > 0:
        raise ValueError(f"need z >= 0 and S > 0, got z={z!r}, S={S!r}")
    return z * S


class Accountant:
    """The running privacy cost of a training run: one (q, z) event per step or round, epsilon
    at `delta` whenever asked. RDP composes by addition, so each distinct (q, z) is evaluated
    once (~0.1 s over ORDERS) and cached, and a step costs a vector add: what per-round
    reporting needs. The sum and the conversion are dp-accounting's (its per-event RDP and
    compute_epsilon); tests/test_privacy.py checks the result against epsilon() above."""

    def __init__(self, delta: float):
        _check_delta(delta)
        self.delta = delta
        self.events: dict[tuple[float, float], int] = {}
        self._rdp = np.zeros(len(ORDERS))
        self._cache: dict[tuple[float, float], np.ndarray] = {}

    def _event_rdp(self, q: float, z: float) -> np.ndarray:
        key = (float(q), float(z))
        if key not in self._cache:
            if z == 0:
                self._cache[key] = np.full(len(ORDERS), np.inf)
            else:
                from dp_accounting.rdp import rdp_privacy_accountant as rdp

                with _quiet_absl():
                    self._cache[key] = np.asarray(
                        rdp._compute_rdp_poisson_subsampled_gaussian(q, z, ORDERS), np.float64)
        return self._cache[key]

    def compose(self, q: float, z: float, count: int = 1) -> None:
        if not 0 < q <= 1 or not z >= 0:
            raise ValueError(f"need 0 < q <= 1 and z >= 0, got q={q!r}, z={z!r}")
        count = _check_count("count", count, 0)
        if count:
            self._rdp = self._rdp + count * self._event_rdp(q, z)
            key = (float(q), float(z))
            self.events[key] = self.events.get(key, 0) + count

    def epsilon(self, q: float | None = None, z: float | None = None) -> float:
        """Epsilon so far, or after one more (q, z) step (for the check before it)."""
        rdp_total = self._rdp if q is None else self._rdp + self._event_rdp(q, z)
        if not self.events and q is None:
            return 0.0
        if not np.isfinite(rdp_total).all() and np.isinf(rdp_total).all():
            return math.inf
        from dp_accounting.rdp import rdp_privacy_accountant as rdp

        with _quiet_absl():
            return float(rdp.compute_epsilon(ORDERS, rdp_total, self.delta)[0])


@dataclass
class DpPlan:
    """The differential privacy of one run: the clip S (sensitivity), the noise multiplier z,
    the sampling rate q (clients per round in fl, samples per step in dp), the expected number
    sampled (the fixed denominator q N), the secret seed of the noise and of the sampling, and
    the running accountant."""
    clip: float
    z: float
    q: float
    expected: float
    noise_seed: int
    delta: float
    accountant: Accountant = field(repr=False, default=None)
    target: float | None = None        # --dp-epsilon: no round may take epsilon past it
    secure: bool = False               # DP-FedAvg under secure aggregation (SecureAccountant)
    share_std: float = 0.0             # secure: each client's noise share, per coordinate
    colluders: int = 0                 # secure: clients whose shares do not count (--dp-colluders)
    pca: int = 0                       # DP-SGD: --dp-pca K (0: off)
    pca_noise: float = 0.0             # its release's noise multiplier

    def __post_init__(self):
        if self.accountant is None:
            self.accountant = (SecureAccountant(self.delta, self.q, self.z) if self.secure
                               else Accountant(self.delta))
            if self.pca:               # released once, before training, from every image
                self.accountant.compose(1.0, self.pca_noise, 1)

    def honest_shares(self, survivors: int) -> int:
        """The noise shares of a round of `survivors` that protect a client: not its own, not
        the colluders'."""
        return max(0, survivors - 1 - self.colluders)

    def round_noise(self, survivors: int) -> float:
        """The noise multiplier a secure round of `survivors` is accounted with."""
        return self.share_std * math.sqrt(self.honest_shares(survivors)) / self.clip

    def compose_round(self, z: float) -> None:
        if self.secure:
            self.accountant.compose(z)
        else:
            self.accountant.compose(self.q, z)

    def state(self) -> dict:
        """What a checkpoint keeps: the seed (whoever holds a checkpoint can remove the noise:
        README) and the privacy spent so far."""
        if self.secure:
            return {"noise_seed": self.noise_seed, "z": self.z, "rounds_z": self.accountant.state()}
        return {"noise_seed": self.noise_seed, "z": self.z,
                "events": [[q, z, c] for (q, z), c in self.accountant.events.items()]}

    def load_state(self, state: dict) -> None:
        self.noise_seed = int(state["noise_seed"])
        if self.secure:
            self.accountant = SecureAccountant(self.delta, self.q, self.z)
            self.accountant.load_state(state["rounds_z"])
            return
        self.accountant = Accountant(self.delta)
        for q, z, count in state["events"]:
            self.accountant.compose(q, z, count)


# ------------------------------------------------------------ DP-FedAvg under secure aggregation
#
# The threat model: the server (and up to --dp-colluders clients) see every sum the protocol
# releases and which clients take part in each round (the server relays their messages), so the
# sampling amplifies nothing against them. Neighbouring runs differ in one client's data, which
# the client replaces by a zero update while still taking part and adding its noise share (the
# zero-out relation of Kairouz et al. 2021, "Practical and Private (Deep) Learning without
# Sampling or Shuffling"). A round in which client i takes part then releases
# sum_{j != i} (x_j + n_j) + x_i + n_i with ||x_i|| <= S: the Gaussian mechanism whose noise is
# the shares the adversary does not know. Counted are only the honest shares other than i's own
# (survivors - 1 - colluders), a lower bound in every case (i's own share and any client absent
# from the round only add noise), so each round is accounted with
#   z_r = share_std * sqrt(survivors - 1 - colluders) / S.
# Rounds compose as Gaussian DP (Dong, Roth and Su 2019: mu^2 adds up), and which rounds i takes
# part in is public but independent of the data: the privacy profile is the mixture over i's
# participation (each round with probability q) of the Gaussian profile (Balle and Wang 2018):
#   delta(eps) = E[ delta_G(eps; mu) ],  mu^2 = sum over i's rounds of 1 / z_r^2.
# The weights 1/z_r^2 are rounded up to a grid (which only raises delta) so the distribution of
# mu^2 is one exact convolution per round.

SECURE_QUANTILE = 0.05     # the noise is sized for the 5% quantile of the honest survivors
GRID_PER_ROUND = 64        # grid steps per planned round weight 1/z^2


def gaussian_delta(eps: float, mu: np.ndarray) -> np.ndarray:
    """The exact delta(eps) of the Gaussian mechanism with sensitivity / noise std = mu (Balle
    and Wang 2018, Theorem 8): Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2); mu = 0 gives 0."""
    from scipy.special import log_ndtr, ndtr

    mu = np.asarray(mu, np.float64)
    out = np.zeros_like(mu)
    pos = mu > 0
    m = mu[pos]
    out[pos] = np.maximum(ndtr(-eps / m + m / 2) - np.exp(eps + log_ndtr(-eps / m - m / 2)), 0.0)
    return out


def _epsilon_from_delta(delta_of, delta: float, hi: float = 1.0) -> float:
    """The smallest eps with delta_of(eps) <= delta, by bisection (delta_of falls with eps)."""
    if delta_of(0.0) <= delta:
        return 0.0
    while delta_of(hi) > delta:
        hi *= 2
        if hi > 1e6:
            return math.inf
    lo = 0.0
    while hi - lo > 1e-7 * max(1.0, hi):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if delta_of(mid) <= delta else (mid, hi)
    return hi


def public_participation_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    """Epsilon after `rounds` rounds at the same z, each joined with probability q:
    delta(eps) = sum_k Binomial(k; rounds, q) delta_G(eps; sqrt(k) / z)."""
    from scipy.stats import binom

    if z <= 0:
        return math.inf
    k = np.arange(rounds + 1)
    w = binom.pmf(k, rounds, q)
    mu = np.sqrt(k) / z
    return _epsilon_from_delta(lambda e: float(w @ gaussian_delta(e, mu)), delta)


def calibrate_secure_noise(q: float, rounds: int, delta: float, target_epsilon: float,
                           rtol: float = 1e-3) -> float:
    """The smallest per-round z (to rtol) with public_participation_epsilon <= target."""
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    lo, hi = 1e-3, 1.0
    while public_participation_epsilon(hi, q, rounds, delta) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"target_epsilon={target_epsilon:g} is unreachable")
    while hi > lo * (1 + rtol):
        mid = math.sqrt(lo * hi)
        if public_participation_epsilon(mid, q, rounds, delta) <= target_epsilon:
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


class SecureAccountant:
    """The running epsilon of DP-FedAvg under secure aggregation (the block comment above):
    one z_r per round; z_r = 0 (no honest share besides the client's own) has infinite weight."""

    def __init__(self, delta: float, q: float, z_plan: float):
        _check_delta(delta)
        self.delta, self.q, self.z_plan = delta, q, z_plan
        self.step = 1.0 / (z_plan ** 2 * GRID_PER_ROUND)    # the grid of mu^2
        self.zs: list[float] = []
        self._pmf = np.ones(1)                              # of mu^2 / step, finite part
        self._inf = 0.0                                     # P(i took part in a z_r = 0 round)

    def _grid(self, z: float) -> int | None:
        return None if z <= 0 else math.ceil((1.0 / z ** 2) / self.step * (1 - 1e-12))

    def _compose_pmf(self, pmf, inf, z):
        k = self._grid(z)
        if k is None:
            return pmf * (1 - self.q), inf + (1 - inf) * self.q
        out = np.zeros(len(pmf) + k)
        out[:len(pmf)] += (1 - self.q) * pmf
        out[k:] += self.q * pmf
        return out, inf

    def compose(self, z: float) -> None:
        self._pmf, self._inf = self._compose_pmf(self._pmf, self._inf, z)
        self.zs.append(float(z))

    def epsilon(self, *more: float) -> float:
        """Epsilon so far, or after further rounds at the given z (for the check before one)."""
        pmf, inf = self._pmf, self._inf
        for z in more:
            pmf, inf = self._compose_pmf(pmf, inf, z)
        if inf > self.delta:
            return math.inf
        support = np.flatnonzero(pmf > 0)
        w, mu = pmf[support], np.sqrt(support * self.step)
        return _epsilon_from_delta(lambda e: inf + float(w @ gaussian_delta(e, mu)), self.delta)

    def state(self) -> list[float]:
        return list(self.zs)

    def load_state(self, zs) -> None:
        self.zs, self._pmf, self._inf = [], np.ones(1), 0.0
        for z in zs:
            self.compose(z)
