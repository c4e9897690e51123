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


def test_calibrate_filter_noise_fits_the_planned_rounds_and_no_more():
    # each client's own ledger is Gaussian DP: k rounds at z cost k / z^2 in mu^2; the noise lets
    # a client take the 95% quantile of the rounds Poisson sampling gives it, and not one more
    for q, rounds, target in [(0.1, 20, 4.0), (0.05, 100, 8.0), (1.0, 20, 4.0)]:
        z = privacy.calibrate_filter_noise(q, rounds, 1e-5, target)
        k = int(stats.binom.ppf(0.95, rounds, q))
        assert privacy.planned_participation(q, rounds) == k
        # independently: dp-accounting's PLD of k Gaussian mechanisms (one with std z / sqrt(k))
        assert pld.from_gaussian_mechanism(z / math.sqrt(k)).get_epsilon_for_delta(1e-5) <= target * 1.002
        assert pld.from_gaussian_mechanism(z / math.sqrt(k + 1)).get_epsilon_for_delta(1e-5) > target


def test_gdp_epsilon_and_mu_against_dp_accountings_pld():
    for mu in (0.3, 1.0, 2.5):
        ours = privacy.gdp_epsilon(mu, 1e-5)
        upper = pld.from_gaussian_mechanism(1 / mu).get_epsilon_for_delta(1e-5)
        lower = pld.from_gaussian_mechanism(1 / mu, pessimistic_estimate=False).get_epsilon_for_delta(1e-5)
        assert lower * (1 - 1e-3) <= ours <= upper * (1 + 1e-3)
        assert privacy.gdp_mu(ours, 1e-5) == pytest.approx(mu, rel=1e-6)


def plan_for(num_clients, q, dropout, rounds, target, colluders=0, corrupt=0.05):
    """A secure DP plan as create_plan makes it for these settings (clip 0.2)."""
    z = privacy.calibrate_filter_noise(q, rounds, 1e-5, target)
    honest = sampling.honest_quantile(num_clients, q, dropout, colluders, corrupt_fraction=corrupt)
    return dpplan.DpPlan(clip=0.2, z=z, q=q, expected=q * num_clients, noise_seed=1, delta=1e-5,
                         target=target, secure=True, share_std=z * 0.2 / math.sqrt(honest),
                         colluders=colluders, corrupt_fraction=corrupt, accept_honest=honest)


@pytest.mark.parametrize("num_clients,q,dropout,target,thin", [(100, 0.1, 0.0, 8.0, False),
                                                               (100, 0.1, 0.1, 8.0, True),
                                                               (6000, 0.05, 0.1, 8.0, True),
                                                               (100, 0.1, 0.1, 4.0, True)])
def test_finding_2_no_client_passes_its_budget_whatever_the_survivor_counts(num_clients, q, dropout, target, thin):
    # the audit's settings, 100 rounds (20 at target 4), rounds drawn as a run draws them; with
    # `thin` the server names only the fewest survivors the clients accept (thin-survivors).
    # Each client keeps its own books (ledger.ClientBooks) and joins only while it can afford the
    # round; every view a client accepts carries at least the planned noise
    from hpcfl.privacy.ledger import ClientBooks, Ledger

    rounds = 20 if target == 4.0 else 100
    plan = plan_for(num_clients, q, dropout, rounds, target)
    books = ClientBooks(Ledger(None), {}, plan.mu2_budget)
    rng = np.random.default_rng(num_clients)           # test data: who is sampled and who drops
    released = 0
    for r in range(rounds):
        sampled = np.flatnonzero(rng.random(num_clients) < q)
        alive = [int(k) for k in sampled if rng.random() >= dropout and books.can_afford(int(k), plan.round_mu2)]
        need = plan.min_survivors(len(sampled))
        if len(alive) < need:
            continue
        survivors = need if thin else len(alive)
        assert plan.round_noise(survivors, len(sampled)) >= plan.z * (1 - 1e-9)
        books.spend(r, alive, plan.round_mu2, "0")
        released += 1
    worst = max(books.spent.values())
    assert worst <= plan.mu2_budget
    assert pld.from_gaussian_mechanism(1 / math.sqrt(worst)).get_epsilon_for_delta(1e-5) <= target * 1.002
    assert released >= 0.9 * rounds                    # sized for the 5% quantile: most rounds run


def test_a_few_clients_out_of_budget_skip_a_round_and_only_a_spent_federation_stops():
    # the README's secure DP run (6000 clients, q 0.05, epsilon 8, 100 rounds), rounds drawn as a
    # run draws them, then 100 more on the same books (a resume past the plan). Clients sampled
    # more often than planned run out late in the run and push a round below min_survivors now
    # and then: a skipped round, not the end (the first such round came at 72-81 of 100, where
    # an earlier rule stopped). Training ends when a round of the expected size could not be
    # paid for at the share of clients still able to
    from hpcfl.privacy.ledger import ClientBooks, Ledger

    plan = plan_for(6000, 0.05, 0.0, 100, 8.0)
    assert not plan.out_of_budget(290, 0) and not plan.out_of_budget(290, 3)
    assert plan.out_of_budget(300, 300) and plan.out_of_budget(300, 60)
    books = ClientBooks(Ledger(None), {}, plan.mu2_budget)
    rng = np.random.default_rng(0)
    released, skipped_with_refusals, stop = 0, 0, None
    for r in range(200):
        sampled = np.flatnonzero(rng.random(6000) < 0.05)
        afford = [int(k) for k in sampled if books.can_afford(int(k), plan.round_mu2)]
        refused = len(sampled) - len(afford)
        if len(afford) < plan.min_survivors(len(sampled)):
            skipped_with_refusals += refused > 0
            if plan.out_of_budget(len(sampled), refused):
                stop = r
                break
            continue
        books.spend(r, afford, plan.round_mu2, "0")
        released += 1
        if r == 99:
            assert released >= 90 and skipped_with_refusals >= 1
    assert stop is not None and 100 < stop < 200
    assert max(books.spent.values()) <= plan.mu2_budget
    spent = sum(1 for k in range(6000) if not books.can_afford(k, plan.round_mu2))
    assert spent >= 0.05 * 6000            # sized for the 95% quantile: by then 5% are out


def test_a_seeded_redo_of_a_round_is_the_same_release_and_an_unseeded_one_a_new_one(tmp_path):
    # a client whose budget took exactly 3 rounds spent the last in round 3; the run crashed
    # before its checkpoint and the resume redoes round 3. Seeded, the redo is bitwise the same
    # release: the client joins it again (refusing would change the survivors, and two sums that
    # differ by one client's input would share one draw of noise) and its spend stays 3 rounds.
    # Unseeded, the redo draws fresh noise: a new release, which the budget no longer covers
    from hpcfl.privacy.ledger import ClientBooks

    for kind, joins_redo in (("seeded", True), ("0", False)):
        folder = tmp_path / kind
        folder.mkdir()
        books = ClientBooks.open(str(folder), 0, [7], budget=3.0)
        for r in (1, 2, 3):
            assert books.can_afford(7, 1.0, r, kind)
            books.spend(r, [7], 1.0, kind)
        again = ClientBooks.open(str(folder), 0, [7], budget=3.0)        # the resumed run's books
        redo = kind if kind == "seeded" else "1"                       # an unseeded attempt's own noise
        assert again.can_afford(7, 1.0, 3, redo) is joins_redo
        assert not again.can_afford(7, 1.0, 4, redo)
        if joins_redo:
            again.spend(3, [7], 1.0, redo)
            assert again.spent[7] == 3.0 == ClientBooks.open(str(folder), 0, [7], budget=3.0).spent[7]


def test_the_colluders_secure_aggregation_admits_are_counted_out_of_the_noise():
    # one adversary, one set of numbers: --dp-colluders at least, and ceil(G m) of m sampled
    plan = dpplan.DpPlan(clip=0.5, z=1.0, q=0.1, expected=10, noise_seed=1, delta=1e-5, secure=True,
                         share_std=0.25, colluders=2, corrupt_fraction=0.05)
    assert plan.honest_shares(10, 10) == 7 and plan.honest_shares(2, 2) == 0
    assert plan.honest_shares(100, 100) == 94                  # ceil(0.05 x 100) = 5 > 2
    assert plan.round_noise(10, 10) == pytest.approx(0.25 * math.sqrt(7) / 0.5)
    assert sampling.honest_quantile(100, 1.0, 0.0, 0, corrupt_fraction=0.05) == 100 - 1 - 5
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


def test_each_attempt_draws_its_own_noise_and_batches_and_a_seeded_run_the_same():
    # a resumed run redoes releases: with fresh keys per attempt they share no draw (the same
    # noise on other data would cancel out of their difference); a run reproduced from
    # --dp-noise-seed (attempt None) redoes exactly the same release
    from hpcfl import backends
    from hpcfl.fl import partition
    from hpcfl.training.dpsgd import GaussianNoise

    plan = dpplan.DpPlan(clip=1.0, z=1.0, q=0.01, expected=10, noise_seed=5, delta=1e-5)
    draws, batches, clients = {}, {}, {}
    for attempt in (0, 1, None):
        plan.attempt = attempt
        gaussian = GaussianNoise(plan, 1000, 0, 1, backends.get("numpy"))
        gaussian.step = 3
        buf = np.zeros(1000, np.float32)
        gaussian(buf)
        draws[attempt] = buf
        batches[attempt] = sampling.poisson_sample(60000, 0.01, 5, 3, attempt)
        clients[attempt] = partition.poisson_clients(1000, 0.1, 3, 5, attempt)
    for got in (draws, batches, clients):
        assert not np.array_equal(got[0], got[1]) and not np.array_equal(got[0], got[None])
    assert abs(np.corrcoef(draws[0], draws[1])[0, 1]) < 0.15          # independent, not shifted copies
    plan.attempt = None
    again = np.zeros(1000, np.float32)
    gaussian = GaussianNoise(plan, 1000, 0, 1, backends.get("numpy"))
    gaussian.step = 3
    gaussian(again)
    assert np.array_equal(again, draws[None])
