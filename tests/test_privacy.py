"""Differential-privacy math: accounting against dp-accounting called directly and against the
Gaussian mechanism's RDP by hand, calibration, Poisson sampling statistics, clipping and the
secure-aggregation noise multiplier worked out by hand."""
from __future__ import annotations

import logging
import math
import struct

import numpy as np
import pytest

from hpcfl.privacy import accountant as privacy
from hpcfl.privacy import mechanisms, sampling

dp_accounting = pytest.importorskip("dp_accounting")
stats = pytest.importorskip("scipy.stats")

Q_MNIST = 128 / 60000                                  # batch 128 of 60,000 samples


def direct_epsilon(events, delta, orders=privacy.ORDERS):
    """The same accounting spelled out with dp-accounting: one composition per event, unmerged
    (dp-accounting refuses count 0, which composes nothing)."""
    accountant = dp_accounting.rdp.RdpAccountant(orders)
    for q, z, count in (e for e in events if e[2]):
        event = dp_accounting.GaussianDpEvent(z)
        if q < 1:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        accountant.compose(event, count)
    return accountant.get_epsilon(delta)


# --- epsilon ---------------------------------------------------------------------------------

@pytest.mark.parametrize("q, z, steps, delta", [
    (0.05, 1.0, 100, 1e-5),
    (Q_MNIST, 1.1, 5000, 1e-5),
    (Q_MNIST, 3.0, 1400, 1e-6),
    (1.0, 2.0, 10, 1e-5),
])
def test_epsilon_matches_dp_accounting(q, z, steps, delta):
    assert privacy.epsilon([(q, z, steps)], delta) == pytest.approx(
        direct_epsilon([(q, z, steps)], delta), rel=1e-12)


def test_full_batch_is_the_gaussian_mechanism_by_hand():
    """q = 1: the RDP of T Gaussian steps is T a / (2 z^2) (Mironov 2017, Prop. 7), converted
    with epsilon = rdp + log(1 - 1/a) - log(delta a) / (a - 1) (Canonne et al. 2020)."""
    T, z, delta = 10, 2.0, 1e-5
    by_hand = min(T * a / (2 * z * z) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
                  for a in privacy.ORDERS if a > 1.01)
    assert privacy.epsilon([(1.0, z, T)], delta) == pytest.approx(by_hand, rel=1e-12)


def test_heterogeneous_events_compose_like_dp_accounting():
    # secure aggregation: rounds with different effective z, and a repeated event that epsilon()
    # merges into one composition
    events = [(0.01, 1.0, 300), (0.01, 0.7, 100), (1.0, 5.0, 3), (0.01, 1.0, 200), (0.01, 0.9, 0)]
    eps = privacy.epsilon(events, 1e-5)
    assert eps == pytest.approx(direct_epsilon(events, 1e-5), rel=1e-12)
    # more than its parts, less than its worst case
    assert eps > privacy.epsilon([(0.01, 1.0, 500)], 1e-5)
    assert eps < privacy.epsilon([(0.01, 0.7, 500), (1.0, 5.0, 3)], 1e-5)


def test_epsilon_grows_with_steps_and_falls_with_noise():
    by_steps = [privacy.epsilon([(Q_MNIST, 1.0, t)], 1e-5) for t in (10, 100, 1000, 10000)]
    assert all(a < b for a, b in zip(by_steps, by_steps[1:]))
    by_noise = [privacy.epsilon([(Q_MNIST, z, 1000)], 1e-5) for z in (0.6, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:]))


def test_edge_events():
    assert privacy.epsilon([], 1e-5) == 0.0
    assert privacy.epsilon([(0.01, 1.0, 0)], 1e-5) == 0.0                 # count 0: nothing
    assert privacy.epsilon([(0.01, 1.0, 10), (0.5, 0.0, 1)], 1e-5) == math.inf
    assert privacy.epsilon([(0.5, 0.0, 0), (0.01, 1.0, 10)], 1e-5) == privacy.epsilon([(0.01, 1.0, 10)], 1e-5)
    for bad in [(0.0, 1.0, 1), (1.5, 1.0, 1), (0.1, -1.0, 1), (0.1, math.nan, 1), (0.1, 1.0, -1), (0.1, 1.0, 1.5)]:
        with pytest.raises(ValueError):
            privacy.epsilon([bad], 1e-5)
    for delta in (0.0, 1.0, -1e-5):
        with pytest.raises(ValueError, match="delta"):
            privacy.epsilon([(0.1, 1.0, 1)], delta)


def test_orders_extend_the_defaults_and_tighten_small_epsilons():
    defaults = dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS
    assert set(defaults) <= set(privacy.ORDERS)
    for q, z, steps in [(Q_MNIST, 1.1, 1400), (0.05, 0.5, 1400), (0.01, 5.0, 100)]:
        assert privacy.epsilon([(q, z, steps)], 1e-5) <= direct_epsilon([(q, z, steps)], 1e-5, defaults)
    # z = 3 over one MNIST run: the best order, ~109, falls in the defaults' gap 63..128
    ours = privacy.epsilon([(Q_MNIST, 3.0, 1400)], 1e-5)
    assert ours < 0.8 * direct_epsilon([(Q_MNIST, 3.0, 1400)], 1e-5, defaults)


def test_convergence_warnings_are_silenced_and_logging_restored(caplog):
    events = [(0.05, 0.5, 1400)]                       # small z: fractional orders do not converge
    absl_logging = pytest.importorskip("absl.logging")
    before = absl_logging.get_verbosity(), logging.getLogger("absl").level, logging.getLogger().level
    with caplog.at_level(logging.WARNING):
        direct_epsilon(events, 1e-5)
    assert any("converge" in r.getMessage() for r in caplog.records)     # there is something to mute
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        privacy.epsilon(events, 1e-5)
    assert not caplog.records
    assert (absl_logging.get_verbosity(), logging.getLogger("absl").level, logging.getLogger().level) == before


def test_silencing_restores_the_root_level_under_absl_handler():
    """Under absl.app, absl's handler sits on the root logger and absl verbosity sets the root
    level: a user's INFO must survive an epsilon() call."""
    absl_logging = pytest.importorskip("absl.logging")
    root, handler = logging.getLogger(), absl_logging.get_absl_handler()
    saved_level, had_handler = root.level, handler in root.handlers
    try:
        if not had_handler:
            root.addHandler(handler)
        root.setLevel(logging.INFO)
        privacy.epsilon([(0.05, 1.0, 10)], 1e-5)
        assert root.level == logging.INFO
    finally:
        if not had_handler:
            root.removeHandler(handler)
        root.setLevel(saved_level)


# --- calibrate_noise -------------------------------------------------------------------------

@pytest.mark.parametrize("q, steps, target", [
    (Q_MNIST, 1400, 0.5),
    (Q_MNIST, 1400, 8.0),
    (0.05, 100, 2.0),
    (1.0, 100, 1.0),
    (1.0, 10, 8.0),
])
def test_calibrate_noise_is_tight(q, steps, target):
    delta = 1e-5
    z = privacy.calibrate_noise(q, steps, delta, target)
    assert privacy.epsilon([(q, z, steps)], delta) <= target
    assert privacy.epsilon([(q, z * (1 - 2e-3), steps)], delta) > target


def test_calibrate_noise_reaches_down_to_the_orders_floor():
    # the floor by dp-accounting itself: a tiny RDP (above delta^2, so that its KL bound stays
    # out) at every order converts to floor + 1e-9
    delta = 1e-5
    floor = dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon(
        privacy.ORDERS, [1e-9] * len(privacy.ORDERS), delta)[0] - 1e-9
    assert 4e-4 < floor < 7e-4
    with pytest.raises(ValueError) as info:
        privacy.calibrate_noise(Q_MNIST, 1400, delta, 1e-4)
    message = str(info.value)
    assert f"{floor:.4g}" in message and "4096" in message and "unreachable" in message
    with pytest.raises(ValueError, match="unreachable"):
        privacy.calibrate_noise(1.0, 10, delta, floor)
    z = privacy.calibrate_noise(1.0, 10, delta, 3 * floor)   # just above: reachable, with much noise
    assert privacy.epsilon([(1.0, z, 10)], delta) <= 3 * floor and z > 100


@pytest.mark.parametrize("q, steps, delta, target", [
    (0.0, 100, 1e-5, 1.0), (1.5, 100, 1e-5, 1.0), (0.01, 0, 1e-5, 1.0), (0.01, 2.5, 1e-5, 1.0),
    (0.01, 100, 0.0, 1.0), (0.01, 100, 1.0, 1.0), (0.01, 100, 1e-5, 0.0), (0.01, 100, 1e-5, -1.0),
])
def test_calibrate_noise_rejects_bad_inputs(q, steps, delta, target):
    with pytest.raises(ValueError):
        privacy.calibrate_noise(q, steps, delta, target)


# --- Poisson sampling ------------------------------------------------------------------------

def test_poisson_sample_is_a_pure_function_of_its_arguments():
    a = sampling.poisson_sample(60000, Q_MNIST, seed=1, step=5)
    assert a.dtype == np.int64 and np.all(np.diff(a) > 0) and a[0] >= 0 and a[-1] < 60000
    np.testing.assert_array_equal(a, sampling.poisson_sample(60000, Q_MNIST, seed=1, step=5))
    assert not np.array_equal(a, sampling.poisson_sample(60000, Q_MNIST, seed=1, step=6))
    assert not np.array_equal(a, sampling.poisson_sample(60000, Q_MNIST, seed=2, step=5))
    assert len(sampling.poisson_sample(10, 0.0, 0, 0)) == 0
    np.testing.assert_array_equal(sampling.poisson_sample(10, 1.0, 0, 0), np.arange(10))


def test_finding_8_poisson_batches_and_client_samples_come_from_the_csprng():
    # independently: the AES-256-CTR keystream of the HKDF key (cryptography called directly),
    # its 64-bit words below floor(q 2^64); not a PCG64 seeded from the secret
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.hashes import SHA256
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    from hpcfl.fl import partition

    def keystream_bernoulli(seed, purpose, ids, stream, n, q):
        info = b"hpcfl-noise/" + purpose + b"".join(struct.pack("<q", i) for i in ids)
        key = HKDF(algorithm=SHA256(), length=32, salt=None, info=info).derive(seed.to_bytes(32, "little"))
        enc = Cipher(algorithms.AES(key), modes.CTR(struct.pack(">QQ", stream, 0))).encryptor()
        words = np.frombuffer(enc.update(bytes(8 * n)), np.uint64)
        return np.flatnonzero(words < np.uint64(int(q * 2**64)))

    seed = 2**200 + 12345
    got = sampling.poisson_sample(60000, Q_MNIST, seed, step=9, attempt=2)
    np.testing.assert_array_equal(got, keystream_bernoulli(seed, b"batch", [2], 9, 60000, Q_MNIST))
    np.testing.assert_array_equal(sampling.poisson_sample(60000, Q_MNIST, seed, step=9),     # seeded: no attempt
                                  keystream_bernoulli(seed, b"batch", [], 9, 60000, Q_MNIST))
    assert not np.array_equal(got, sampling.poisson_sample(60000, Q_MNIST, seed, step=9, attempt=3))
    np.testing.assert_array_equal(partition.poisson_clients(6000, 0.05, 4, seed, 1),
                                  keystream_bernoulli(seed, b"clients", [1], 4, 6000, 0.05))


def test_poisson_batch_size_is_binomial():
    """Over M steps the mean size has std sqrt(nq(1-q)/M) and the sample variance std about
    nq(1-q) sqrt(2/(M-1)) (the binomial's excess kurtosis, ~1/128, is negligible): 5 of each."""
    n, q, M = 60000, Q_MNIST, 4000
    sizes = np.array([len(sampling.poisson_sample(n, q, seed=0, step=t)) for t in range(M)])
    var = n * q * (1 - q)
    assert abs(sizes.mean() - n * q) < 5 * math.sqrt(var / M)
    assert abs(sizes.var(ddof=1) - var) < 5 * var * math.sqrt(2 / (M - 1))


def test_poisson_inclusion_is_uniform_over_indices():
    """Under Poisson sampling the M inclusion counts of the n indices are independent
    Binomial(M, q), so the sum of their squared standardised deviations is ~ chi2(n); both tails
    are checked (too uniform would betray a stratified, non-independent draw)."""
    n, q, M = 500, 0.1, 2000
    counts = np.zeros(n)
    for t in range(M):
        counts[sampling.poisson_sample(n, q, seed=3, step=t)] += 1
    chi2 = float(((counts - M * q) ** 2).sum() / (M * q * (1 - q)))
    assert 1e-6 < stats.chi2.sf(chi2, n) < 1 - 1e-6


def test_poisson_sample_has_the_law_of_independent_bernoullis():
    """n = 4: all 16 subsets, each of probability q^k (1-q)^(4-k) under independent draws
    (Pearson chi-square, 15 degrees of freedom)."""
    n, q, M = 4, 0.3, 20000
    seen = np.zeros(2 ** n)
    for t in range(M):
        seen[sum(1 << int(i) for i in sampling.poisson_sample(n, q, seed=4, step=t))] += 1
    k = np.array([bin(mask).count("1") for mask in range(2 ** n)])
    expected = M * q ** k * (1 - q) ** (n - k)
    assert stats.chi2.sf(float(((seen - expected) ** 2 / expected).sum()), 2 ** n - 1) > 1e-6


@pytest.mark.parametrize("n, q", [(60000, Q_MNIST), (60000, 0.5), (1000, 0.01), (50, 0.9)])
@pytest.mark.parametrize("p_exceed", [1e-2, 1e-6, 1e-12])
def test_poisson_capacity_bounds_the_exact_binomial_tail(n, q, p_exceed):
    c = sampling.poisson_capacity(n, q, p_exceed)
    assert n * q <= c <= n
    assert stats.binom.sf(c, n, q) <= p_exceed        # P(K > c), exactly
    exact = int(stats.binom.isf(p_exceed, n, q))      # about the smallest valid capacity
    assert c - n * q <= 1.5 * (exact - n * q) + 2      # Chernoff is not far off


def test_poisson_capacity_holds_for_drawn_batches():
    n, q, p_exceed, M = 60000, Q_MNIST, 1e-2, 5000
    c = sampling.poisson_capacity(n, q, p_exceed)
    sizes = np.array([len(sampling.poisson_sample(n, q, seed=9, step=t)) for t in range(M)])
    assert (sizes > c).mean() < p_exceed
    assert sampling.poisson_capacity(n, q) == 220       # the default 1e-12, as documented
    assert sampling.poisson_capacity(100, 0.0) == 0 and sampling.poisson_capacity(100, 1.0) == 100
    assert sampling.poisson_capacity(0, 0.5) == 0
    with pytest.raises(ValueError):
        sampling.poisson_capacity(100, 0.1, 0.0)


# --- DP-FedAvg helpers -----------------------------------------------------------------------

def test_clip_l2_by_hand():
    v = np.array([3.0, 4.0], np.float32)               # norm 5
    kept, norm = mechanisms.clip_l2(v, 10.0)
    np.testing.assert_array_equal(kept, [3.0, 4.0])
    assert norm == 5.0 and kept.dtype == np.float32 and kept is not v
    clipped, norm = mechanisms.clip_l2(v, 2.5)            # scaled by 2.5 / 5
    np.testing.assert_allclose(clipped, [1.5, 2.0], rtol=1e-7)
    assert norm == 5.0 and clipped.dtype == np.float32
    np.testing.assert_array_equal(v, [3.0, 4.0])       # the input is left alone
    zero, norm = mechanisms.clip_l2(np.zeros(3, np.float32), 1.0)
    assert norm == 0.0 and not zero.any()
    with pytest.raises(ValueError):
        mechanisms.clip_l2(v, 0.0)


def test_clip_l2_norm_accumulates_in_float64():
    v = np.full(235146, 0.1, np.float32)               # the MLP's parameter count
    by_hand = float(np.float32(0.1)) * math.sqrt(235146)
    # float64 summation of 235,146 terms errs by at most n * 2^-53 ~ 3e-11 (relative), whatever
    # order BLAS picks; a float32 accumulation would be off by ~1e-4
    assert mechanisms.clip_l2(v, 1.0)[1] == pytest.approx(by_hand, rel=1e-10)
    clipped, _ = mechanisms.clip_l2(v, 1.0)
    assert float(np.sqrt((clipped.astype(np.float64) ** 2).sum())) == pytest.approx(1.0, rel=1e-6)


def test_noise_std_by_hand():
    assert mechanisms.noise_std(1.1, 0.5) == pytest.approx(0.55)
    with pytest.raises(ValueError):
        mechanisms.noise_std(1.0, 0.0)
