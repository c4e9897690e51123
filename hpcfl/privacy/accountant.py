"""Privacy accounting, with no MPI: RDP accounting of the Poisson-sampled Gaussian mechanism
(Abadi et al. 2016; Mironov et al. 2019) for DP-SGD and central DP-FedAvg, the accounting of
DP-FedAvg under secure aggregation (privacy-loss distributions of the true per-round pair), and
the calibration of the noise to a budget. Two accountants, one interface (AccountantProtocol:
compose a round's or step's noise, epsilon so far or after one more), made by create_accountant.

The accounting is dp-accounting's RdpAccountant; it is imported inside the functions that need
it, because non-private runs should neither require it nor pay its ~1 s import.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol

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


def _check_count(name: str, value: Any, low: int) -> int:
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


# DP-PCA's release (mechanisms.dp_pca) spends, when its noise is derived, this share of the budget
PCA_SHARE = 0.1     # the share of --dp-epsilon the DP-PCA release spends when its noise is derived


def pca_noise_for(target_epsilon: float, delta: float, share: float = PCA_SHARE) -> float:
    """The noise multiplier of the DP-PCA release that alone spends `share` of the budget."""
    return calibrate_noise(1.0, 1, delta, share * target_epsilon)


class AccountantProtocol(Protocol):
    """A run's running privacy cost: one event per DP-SGD step or DP-FedAvg round."""
    delta: float

    def step(self, z: float) -> None:
        """One more step or round whose noise multiplier is z."""

    def epsilon(self) -> float:
        """Epsilon at delta so far."""

    def epsilon_after(self, z: float) -> float:
        """Epsilon at delta after one more step or round at z (the check before it)."""

    def state(self) -> dict:
        """What a checkpoint keeps (JSON)."""

    def load_state(self, state: dict) -> None:
        """Back to a state() (replaces everything composed so far)."""


class Accountant:
    """The running privacy cost of a training run: one (q, z) event per step or round, epsilon
    at `delta` whenever asked. RDP composes by addition, so each distinct (q, z) is evaluated
    once (~0.1 s over ORDERS) and cached, and a step costs a vector add: what per-round
    reporting needs. The sum and the conversion are dp-accounting's (its per-event RDP and
    compute_epsilon); tests/test_privacy.py checks the result against epsilon() above."""

    def __init__(self, delta: float, q: float = 1.0):
        _check_delta(delta)
        self.delta, self.q = delta, q                 # q: the run's sampling rate, for step()
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
        rdp_total = self._rdp if q is None or z is None else self._rdp + self._event_rdp(q, z)
        if not self.events and q is None:
            return 0.0
        if not np.isfinite(rdp_total).all() and np.isinf(rdp_total).all():
            return math.inf
        from dp_accounting.rdp import rdp_privacy_accountant as rdp

        with _quiet_absl():
            return float(rdp.compute_epsilon(ORDERS, rdp_total, self.delta)[0])

    def step(self, z: float) -> None:
        self.compose(self.q, z)

    def epsilon_after(self, z: float) -> float:
        return self.epsilon(self.q, z)

    def state(self) -> dict:
        return {"events": [[q, z, c] for (q, z), c in self.events.items()]}

    def load_state(self, state: dict) -> None:
        self.events, self._rdp = {}, np.zeros(len(ORDERS))
        for q, z, count in state["events"]:
            self.compose(q, z, count)


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


def _epsilon_from_delta(delta_of: Callable[[float], float], delta: float, hi: float = 1.0) -> float:
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


def gdp_epsilon(mu: float, delta: float) -> float:
    """Epsilon at delta of mu-Gaussian DP (Dong, Roth and Su 2019): the Gaussian mechanism's
    exact profile at mu = sensitivity / noise std."""
    _check_delta(delta)
    if mu <= 0:
        return 0.0
    return _epsilon_from_delta(lambda e: float(gaussian_delta(e, np.array([mu]))[0]), delta)


def gdp_mu(epsilon: float, delta: float) -> float:
    """The largest mu whose mu-GDP guarantee is (epsilon, delta)-DP (gdp_epsilon's inverse)."""
    _check_delta(delta)
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
    lo, hi = 0.0, 1.0
    while float(gaussian_delta(epsilon, np.array([hi]))[0]) <= delta:
        lo, hi = hi, hi * 2
    for _ in range(100):                      # delta rises with mu: bisect to float precision
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(gaussian_delta(epsilon, np.array([mid]))[0]) <= delta else (lo, mid)
    return lo


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


PARTICIPATION_QUANTILE = 0.95   # secure: the noise lets a client join this quantile of its rounds


def planned_participation(q: float, rounds: int, quantile: float = PARTICIPATION_QUANTILE) -> int:
    """How many rounds a client's budget is planned for under secure aggregation: the `quantile`
    of Binomial(rounds, q), the rounds Poisson sampling gives it (all of them when q = 1)."""
    from scipy.stats import binom

    return max(1, int(binom.ppf(quantile, rounds, q)))


def calibrate_filter_noise(q: float, rounds: int, delta: float, target_epsilon: float) -> float:
    """The per-round z under secure aggregation, where each client keeps its own Gaussian-DP
    ledger (ClientsAccountant): a client that joins planned_participation(q, rounds) rounds, at
    1 / z^2 each, ends exactly at the mu of target_epsilon; one sampled more often stops
    joining before it passes the target."""
    mu = gdp_mu(target_epsilon, delta)
    return math.sqrt(planned_participation(q, rounds)) / mu * (1 + 1e-9)    # k rounds fit, no rounding over


class SecureAccountant:
    """The running epsilon of DP-FedAvg under secure aggregation (the block comment above):
    one z_r per round; z_r = 0 (no honest share besides the client's own) has infinite weight."""

    def __init__(self, delta: float, q: float, z_plan: float):
        _check_delta(delta)
        self.delta, self.q, self.z_plan = delta, q, z_plan
        self.grid = 1.0 / (z_plan ** 2 * GRID_PER_ROUND)    # the grid of mu^2
        self.zs: list[float] = []
        self._pmf = np.ones(1)                              # of mu^2 / step, finite part
        self._inf = 0.0                                     # P(i took part in a z_r = 0 round)

    def _grid(self, z: float) -> int | None:
        return None if z <= 0 else math.ceil((1.0 / z ** 2) / self.grid * (1 - 1e-12))

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
        w, mu = pmf[support], np.sqrt(support * self.grid)
        return _epsilon_from_delta(lambda e: inf + float(w @ gaussian_delta(e, mu)), self.delta)

    def step(self, z: float) -> None:
        self.compose(z)

    def epsilon_after(self, z: float) -> float:
        return self.epsilon(z)

    def state(self) -> dict:
        return {"rounds_z": list(self.zs)}

    def load_state(self, state: dict) -> None:
        self.zs, self._pmf, self._inf = [], np.ones(1), 0.0
        for z in state["rounds_z"]:
            self.compose(z)


class ClientsAccountant:
    """What the server reports under secure aggregation, where the clients keep the books: the
    largest spend among the clients' own ledgers (mu^2 of Gaussian DP, composed over the rounds
    each joined), as epsilon. Each client's ledger is a Gaussian-DP privacy filter: the mu_r^2
    of the rounds it joins add up, and it stops joining before the sum passes the mu of its
    budget (fully adaptive composition for Gaussian DP, Smith and Thakurta 2022), whatever
    rounds, survivor counts or sampling the server chooses."""

    def __init__(self, delta: float):
        _check_delta(delta)
        self.delta, self.max_mu2 = delta, 0.0

    def update(self, max_mu2: float) -> None:
        self.max_mu2 = max(self.max_mu2, float(max_mu2))

    def step(self, z: float) -> None:
        raise TypeError("under secure aggregation the clients compose their own rounds (update())")

    def epsilon(self) -> float:
        return gdp_epsilon(math.sqrt(self.max_mu2), self.delta) if self.max_mu2 < math.inf else math.inf

    def epsilon_after(self, z: float) -> float:
        return gdp_epsilon(math.sqrt(self.max_mu2 + 1 / z ** 2), self.delta) if z > 0 else math.inf

    def state(self) -> dict:
        return {"clients_max_mu2": self.max_mu2}

    def load_state(self, state: dict) -> None:
        self.max_mu2 = float(state.get("clients_max_mu2", 0.0))


# the accountants, by what they account: "rdp" (DP-SGD, central DP-FedAvg: the Poisson-sampled
# Gaussian), "secure" (DP-FedAvg under secure aggregation with honest sampling: the true
# per-round pair, the calibration's), "clients" (the clients' own ledgers under secure aggregation)
ACCOUNTANTS: dict[str, Callable[[float, float, float], AccountantProtocol]] = {
               "rdp": lambda delta, q, z_plan: Accountant(delta, q),
               "secure": lambda delta, q, z_plan: SecureAccountant(delta, q, z_plan),
               "clients": lambda delta, q, z_plan: ClientsAccountant(delta)}


def create_accountant(name: str, delta: float, q: float, z_plan: float) -> AccountantProtocol:
    """The accountant `name` for a run at sampling rate q whose planned noise is z_plan."""
    return ACCOUNTANTS[name](delta, q, z_plan)
