"""DP-FedAvg under secure aggregation (privacy.py's secure accounting) and the CSPRNG noise
(noise.py), each against an independent computation: dp-accounting's privacy loss
distributions (Gaussian, and built from the two densities of the audit's unequal pair), a
brute-force enumeration of participation patterns, SciPy's normal distribution."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from hpcfl.privacy import accountant as privacy
from hpcfl.privacy import noise, sampling
from hpcfl.privacy import plan as dpplan

pld = pytest.importorskip("dp_accounting.pld.privacy_loss_distribution")


# --------------------------------------------------------------------------- the accountant

@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("eps", [0.1, 1.0, 4.0])
def test_gaussian_delta_is_sandwiched_by_dp_accountings_pld(sigma, eps):
    ours = float(privacy.gaussian_delta(eps, np.array([1 / sigma]))[0])
    upper = pld.from_gaussian_mechanism(sigma).get_delta_for_epsilon(eps)
    lower = pld.from_gaussian_mechanism(sigma, pessimistic_estimate=False).get_delta_for_epsilon(eps)
    assert lower * (1 - 1e-6) - 1e-15 <= ours <= upper * (1 + 1e-6) + 1e-15


def test_public_participation_epsilon_is_dp_accountings_mixture_of_compositions():
    z, q, rounds, delta = 1.5, 0.2, 10, 1e-5
    ours = privacy.public_participation_epsilon(z, q, rounds, delta)
    dists = [(stats.binom.pmf(k, rounds, q), pld.from_gaussian_mechanism(z).self_compose(k))
             for k in range(1, rounds + 1)]

    def delta_of(eps):
        return sum(w * d.get_delta_for_epsilon(eps) for w, d in dists)

    assert delta_of(ours) <= delta * 1.001             # ours is enough for the (pessimistic) PLD
    assert delta_of(ours * 0.99) > delta               # and not loose by more than 1%


def test_the_accountant_with_varying_noise_is_the_enumeration_of_patterns_or_above():
    rng = np.random.default_rng(3)                     # test data: the rounds' noise multipliers
    zs, q, delta = rng.uniform(1.0, 3.0, 7).tolist(), 0.3, 1e-5
    acc = privacy.SecureAccountant(delta, q, z_plan=2.0)
    for z in zs:
        acc.compose(z)

    def delta_of(eps):
        total = 0.0
        for pattern in itertools.product([0, 1], repeat=len(zs)):
            mu = math.sqrt(sum(b / z**2 for b, z in zip(pattern, zs)))
            total += np.prod([q if b else 1 - q for b in pattern]) * \
                float(privacy.gaussian_delta(eps, np.array([mu]))[0])
        return total

    eps = acc.epsilon()
    assert delta_of(eps) <= delta * (1 + 1e-6)         # never below the exact value
    assert delta_of(eps * 0.97) > delta                # the grid costs less than 3%
    assert acc.epsilon(1.0) > eps                      # one more round only adds


def unequal_pair_epsilon(others: int, q: float, rounds: int, delta: float, z: float) -> float:
    """Finding 2's "true pair" under the old threat model: with client i present the server sees
    N(1, (others + 1) v), without it N(0, others v), v = z^2 / others, and i is present with
    probability q (amplification by a hidden sample). Built from the two densities on a grid."""
    v = z**2 / others
    sd = math.sqrt((others + 1) * v)
    y = np.arange(-14 * sd, 1 + 14 * sd, sd / 400)
    dy = y[1] - y[0]
    absent = stats.norm.pdf(y, 0, math.sqrt(others * v)) * dy
    present = (1 - q) * absent + q * stats.norm.pdf(y, 1, sd) * dy
    lp, la = np.log(np.maximum(present, 1e-300)), np.log(np.maximum(absent, 1e-300))
    eps = 0.0
    for upper, lower in ((lp, la), (la, lp)):
        d = pld.from_two_probability_mass_functions(dict(enumerate(lower)), dict(enumerate(upper)),
                                                    value_discretization_interval=1e-3)
        eps = max(eps, d.self_compose(rounds).get_epsilon_for_delta(delta))
    return eps


@pytest.mark.parametrize("others,q", [(9, 0.1), (4, 0.05)])
def test_secure_epsilon_bounds_the_audits_unequal_pair(others, q):
    # the audit's settings (10 clients a round at q 0.1, 5 at q 0.05; 100 rounds): the accounting
    # of public participation with only the other clients' shares is above that pair's epsilon
    z = 2.0
    ours = privacy.public_participation_epsilon(z, q, 100, 1e-5)
    assert ours >= unequal_pair_epsilon(others, q, 100, 1e-5, z)


def test_calibrate_secure_noise_meets_the_target_and_no_less_noise_does():
    z = privacy.calibrate_secure_noise(0.1, 20, 1e-5, 4.0)
    assert privacy.public_participation_epsilon(z, 0.1, 20, 1e-5) <= 4.0
    assert privacy.public_participation_epsilon(z / 1.002, 0.1, 20, 1e-5) > 4.0


def test_honest_quantile_by_hand():
    # 100 clients at q 0.1: survivors ~ Binomial(100, 0.1); its 5% quantile is 5 (P(<= 4) = 0.024,
    # P(<= 5) = 0.058); less the client itself and 1 colluder: 3
    assert sampling.honest_quantile(100, 0.1, 0.0, 1) == 3
    assert stats.binom.cdf(4, 100, 0.1) < 0.05 <= stats.binom.cdf(5, 100, 0.1)


@pytest.mark.parametrize("num_clients,q,dropout,target", [(100, 0.1, 0.0, 8.0), (100, 0.1, 0.1, 8.0),
                                                          (6000, 0.05, 0.1, 8.0), (100, 0.1, 0.1, 4.0)])
def test_finding_1_the_budget_is_never_exceeded_with_real_survivor_counts(num_clients, q, dropout, target):
    # the audit's settings, 100 rounds (20 at target 4), survivors drawn as the run draws them;
    # a round that would overshoot is withheld (collect.SecureCollector.withhold)
    rounds = 20 if target == 4.0 else 100
    z = privacy.calibrate_secure_noise(q, rounds, 1e-5, target)
    honest = sampling.honest_quantile(num_clients, q, dropout, 0)
    plan = dpplan.DpPlan(clip=0.2, z=z, q=q, expected=q * num_clients, noise_seed=1, delta=1e-5,
                          target=target, secure=True, share_std=z * 0.2 / math.sqrt(honest))
    rng = np.random.default_rng(num_clients)           # test data: the rounds' survivor counts
    released = 0
    for _ in range(rounds):
        survivors = rng.binomial(num_clients, q * (1 - dropout))
        zr = plan.round_noise(survivors)
        if plan.accountant.epsilon(zr) > target:
            break
        plan.compose_round(zr)
        released += 1
    assert plan.accountant.epsilon() <= target
    assert released >= 0.9 * rounds                    # sized for the 5% quantile: most rounds run


def test_colluders_and_the_client_itself_are_not_counted():
    plan = dpplan.DpPlan(clip=0.5, z=1.0, q=0.1, expected=10, noise_seed=1, delta=1e-5, secure=True,
                          share_std=0.25, colluders=2)
    assert plan.honest_shares(10) == 7 and plan.honest_shares(2) == 0
    assert plan.round_noise(10) == pytest.approx(0.25 * math.sqrt(7) / 0.5)
    acc = privacy.SecureAccountant(1e-5, 0.1, 1.0)
    acc.compose(0.0)                                   # nobody else's noise in a round i joined
    assert acc.epsilon() == math.inf                   # with probability q = 0.1 > delta


# ------------------------------------------------------------------------------ the noise

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_csprng_noise_is_standard_normal(dtype):
    # float64: a 64-bit word per draw; float32 (DP-SGD): the 32-bit kernel, half the keystream
    z = noise.standard_normal(noise.derive_key(5, "test"), 0, 2_000_000, dtype).astype(np.float64)
    assert abs(z.mean()) < 5 / math.sqrt(len(z)) and z.std() == pytest.approx(1.0, abs=5 * 0.0005)
    assert stats.kstest(z, "norm").pvalue > 1e-4
    for t in (1.0, 2.0, 3.0, 4.0):                     # the tails, where a ziggurat goes wrong first
        p = 2 * stats.norm.sf(t)
        assert abs((np.abs(z) > t).mean() - p) < 6 * math.sqrt(p / len(z))


def test_streams_and_keys_are_distinct_and_reproducible():
    k = noise.derive_key(7, "share", 3, 12)
    a = noise.standard_normal(k, 0, 10_001)
    assert np.array_equal(a, noise.standard_normal(k, 0, 10_001))
    for other in (noise.standard_normal(k, 1, 10_001),
                  noise.standard_normal(noise.derive_key(7, "share", 4, 12), 0, 10_001),
                  noise.standard_normal(noise.derive_key(7, "share", 3, 13), 0, 10_001),
                  noise.standard_normal(noise.derive_key(8, "share", 3, 12), 0, 10_001)):
        assert abs(np.corrcoef(a, other)[0, 1]) < 6 / math.sqrt(10_001)
    f32 = noise.Gaussian().standard_normal(k, 0, np.empty(10_001, np.float32))
    assert np.array_equal(f32, noise.Gaussian().standard_normal(k, 0, np.empty(10_001, np.float32)))


def test_a_noise_key_is_aes_ctr_under_hkdf():
    # the stream is AES-256-CTR from counter block (stream id, 0): checked against the cipher
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = noise.derive_key(1, "test")
    words = noise.Gaussian()._words(key, 9, 0, 4)
    want = Cipher(algorithms.AES(key), modes.CTR((9).to_bytes(8, "big") + bytes(8))).encryptor().update(bytes(32))
    assert words.tobytes() == want
    with pytest.raises(ValueError):
        noise.derive_key(-1, "test")
