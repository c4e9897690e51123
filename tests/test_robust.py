"""Validation and robust aggregation (hpcfl.fl.aggregators): small examples worked out by hand, the limits
of every rule's settings, and a sign-flipping attack that moves the mean but not the robust rules."""
from __future__ import annotations

import numpy as np
import pytest

from hpcfl.fl import aggregators as robust
from hpcfl.fl import attacks


def col(*values):
    """One-coordinate deltas: an (m, 1) float32 array."""
    return np.array(values, np.float32)[:, None]


# ---- validate --------------------------------------------------------------------------------

def test_validate_accepts_a_good_update():
    assert robust.validate(np.zeros(4, np.float32), 4) is None
    assert robust.validate(np.array([3, 4], np.float32), 2, max_norm=5.0) is None   # norm 5 is not above 5


def test_validate_rejects_wrong_sizes_and_shapes():
    assert "expected a vector of 4" in robust.validate(np.zeros(3, np.float32), 4)
    assert "(2, 2)" in robust.validate(np.zeros((2, 2), np.float32), 4)               # right size, not a vector
    assert "dtype int64" in robust.validate(np.zeros(4, np.int64), 4)


def test_validate_counts_non_finite_values():
    reason = robust.validate(np.array([1, np.nan, np.inf, -np.inf, 2], np.float32), 5)
    assert "3 non-finite values (1 NaN, 2 inf) of 5" in reason


def test_validate_checks_each_value_when_only_the_sum_overflows():
    # validate first sums in float64 (one pass); finite float64 values whose sum overflows must
    # still pass, and a NaN hidden by nothing else must still be caught
    assert robust.validate(np.array([1e308, 1e308], np.float64), 2) is None
    assert "1 non-finite values (1 NaN, 0 inf) of 3" in robust.validate(np.array([1e308, np.nan, 1.0]), 3)
    assert "2 non-finite values (0 NaN, 2 inf) of 2" in robust.validate(np.array([np.inf, -np.inf], np.float32), 2)


def test_validate_gives_the_norm_above_max_norm():
    assert robust.validate(np.array([3, 4], np.float32), 2, max_norm=4.9) == "has L2 norm 5, above max_norm 4.9"
    # float32 squares would overflow (1e20^2 > 3.4e38): the norm is taken in float64
    assert "L2 norm 1e+20" in robust.validate(np.array([1e20, 0], np.float32), 2, max_norm=1.0)


# ---- mean, median, trimmed mean --------------------------------------------------------------

def test_weighted_mean_by_hand():
    deltas = np.array([[1, 2], [3, -2]], np.float32)
    # (1*[1,2] + 3*[3,-2]) / 4 = [2.5, -1]
    np.testing.assert_array_equal(robust.mean(deltas, [1, 3]), [2.5, -1.0])
    np.testing.assert_array_equal(robust.mean(deltas, None), [2.0, 0.0])
    assert robust.mean(deltas, [1, 3]).dtype == np.float32
    with pytest.raises(ValueError, match="positive sum"):
        robust.mean(deltas, [0, 0])


def test_mean_accumulates_in_float64():
    # 1e8 + 1 - 1e8 in float32 is 0 (1e8 + 1 rounds to 1e8); in float64 it is 1, / 3
    deltas = col(1e8, 1, -1e8)
    assert robust.mean(deltas, [1, 1, 1])[0] == np.float32(1 / 3)


def test_median_odd_count_by_hand():
    # column 0 sorted: 1 2 3 -> 2; column 1 sorted: -1 0 5 -> 0
    deltas = np.array([[1, 5], [3, -1], [2, 0]], np.float32)
    np.testing.assert_array_equal(robust.median(deltas), [2.0, 0.0])


def test_median_even_count_averages_the_two_middle_values():
    # column 0 sorted: 1 2 4 100 -> (2+4)/2 = 3; column 1 sorted: -3 0 1 10 -> (0+1)/2 = 0.5
    deltas = np.array([[1, 0], [4, 10], [2, -3], [100, 1]], np.float32)
    np.testing.assert_array_equal(robust.median(deltas), [3.0, 0.5])


def test_median_with_ties():
    assert robust.median(col(1, 1, 5))[0] == 1.0
    assert robust.median(col(2, 9, 2, 2))[0] == 2.0       # sorted 2 2 2 9: (2+2)/2
    assert robust.median(col(7, 7))[0] == 7.0


def test_trimmed_mean_drops_the_largest_and_smallest_per_coordinate():
    # m = 5, beta = 0.2: k = 1 value dropped at each end, in each coordinate on its own
    # column 0: 1 2 3 4 100 -> drop 1 and 100 -> (2+3+4)/3 = 3
    # column 1: -50 0 0 6 9 -> drop -50 and 9 -> (0+0+6)/3 = 2
    deltas = np.array([[100, 0], [1, 9], [3, -50], [4, 6], [2, 0]], np.float32)
    np.testing.assert_array_equal(robust.trimmed_mean(deltas, 0.2), [3.0, 2.0])
    # beta = 0.19: floor(0.95) = 0, nothing dropped: the plain mean [22, -7]
    np.testing.assert_array_equal(robust.trimmed_mean(deltas, 0.19), [22.0, -7.0])


def test_trimmed_mean_keeping_the_middle_equals_the_median():
    rng = np.random.default_rng(0)
    even = rng.standard_normal((10, 50)).astype(np.float32)
    # m = 10, beta = 0.49: k = 4 dropped at each end, the 2 middle values averaged
    np.testing.assert_allclose(robust.trimmed_mean(even, 0.49), robust.median(even), rtol=1e-6)
    odd = even[:9]                              # k = floor(4.41) = 4: only the middle value stays
    np.testing.assert_array_equal(robust.trimmed_mean(odd, 0.49), robust.median(odd))


def test_trimmed_mean_with_beta_0_is_the_plain_mean():
    deltas = np.random.default_rng(1).standard_normal((7, 100)).astype(np.float32)
    np.testing.assert_allclose(robust.trimmed_mean(deltas, 0.0), deltas.mean(axis=0, dtype=np.float64),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("beta", [0.5, 0.7, -0.1])
def test_trimmed_mean_refuses_beta_outside_0_half(beta):
    with pytest.raises(ValueError, match="0 <= beta < 0.5"):
        robust.trimmed_mean(col(1, 2, 3), beta)


# ---- Krum and Multi-Krum ---------------------------------------------------------------------

# 1-D points 0 1 2 3 10, f = 1: each score sums the n - f - 2 = 2 smallest squared distances
#   0: 1, 4, 9, 100   -> 1 + 4  = 5
#   1: 1, 1, 4, 81    -> 1 + 1  = 2
#   2: 4, 1, 1, 64    -> 1 + 1  = 2
#   3: 9, 4, 1, 49    -> 1 + 4  = 5
#  10: 100, 81, 64, 49 -> 49 + 64 = 113
LINE = col(0, 1, 2, 3, 10)
LINE_SCORES = [5, 2, 2, 5, 113]


def test_krum_scores_by_hand_and_ties_go_to_the_lowest_index():
    index, scores = robust.krum(LINE, f=1)
    np.testing.assert_array_equal(scores, LINE_SCORES)
    assert index == 1                                    # 1 and 2 tie at 2
    index, scores = robust.krum(LINE[::-1], f=1)         # points 10 3 2 1 0: scores 113 5 2 2 5
    np.testing.assert_array_equal(scores, LINE_SCORES[::-1])
    assert index == 2


def test_krum_picks_the_honest_cluster_when_the_byzantine_ones_are_far():
    # honest: the corners of the unit square and its centre; f = 2 Byzantine close together far away
    # n = 7 > 2f + 2 = 6, neighbours n - f - 2 = 3
    #   centre: four corners at 0.5 each -> 1.5;  corner (0,0): centre 0.5 + two corners 1 + 1 -> 2.5
    #   (50,50): (50,51) at 1 + (1,1) at 2*49^2 + centre at 2*49.5^2 -> 1 + 4802 + 4900.5 = 9703.5
    deltas = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [0.5, 0.5], [50, 50], [50, 51]], np.float32)
    index, scores = robust.krum(deltas, f=2)
    assert index == 4
    np.testing.assert_allclose(scores[[0, 4, 5]], [2.5, 1.5, 9703.5])
    np.testing.assert_array_equal(robust.aggregate("krum", deltas, f=2), [0.5, 0.5])


def test_krum_at_the_limit_of_f():
    robust.krum(col(0, 1, 2, 3, 4), f=1)                 # n = 5 = 2f + 3: works
    with pytest.raises(ValueError, match=r"n > 2f \+ 2 clients, got n = 4, f = 1"):
        robust.krum(col(0, 1, 2, 3), f=1)                # n = 4 = 2f + 2
    index, scores = robust.krum(col(0, 1, 5), f=0)       # n = 3 = 2*0 + 3, 1 neighbour: 1 1 16
    assert index == 0 and scores.tolist() == [1, 1, 16]
    with pytest.raises(ValueError, match="got n = 2, f = 0"):
        robust.krum(col(0, 1), f=0)


def test_krum_is_fast_and_exact_enough_through_the_gram_matrix():
    # a common offset of 1000 makes |x|^2 ~ 1e6 * n while the distances are ~1: the float64
    # Gram matrix keeps them (float32 would lose them all)
    rng = np.random.default_rng(2)
    deltas = (1000 + rng.standard_normal((6, 5000))).astype(np.float32)
    d64 = deltas.astype(np.float64)
    direct = ((d64[:, None, :] - d64[None, :, :]) ** 2).sum(axis=2)
    np.fill_diagonal(direct, np.inf)
    expected = np.sort(direct, axis=1)[:, :6 - 1 - 2].sum(axis=1)
    _, scores = robust.krum(deltas, f=1)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


def test_multi_krum_by_hand():
    # LINE_SCORES 5 2 2 5 113: m_select = n - f = 4 drops only the point 10
    avg, selected = robust.multi_krum(LINE, f=1, m_select=4)
    assert selected.tolist() == [0, 1, 2, 3] and avg[0] == 1.5
    np.testing.assert_array_equal(robust.aggregate("multi-krum", LINE, f=1), [1.5])   # default n - f
    avg, selected = robust.multi_krum(LINE, f=1, m_select=1)             # Krum itself
    assert selected.tolist() == [1] and avg[0] == 1.0
    avg, selected = robust.multi_krum(LINE, f=1, m_select=3)             # 0 and 3 tie at 5: 0 wins
    assert selected.tolist() == [0, 1, 2] and avg[0] == 1.0
    avg, selected = robust.multi_krum(LINE, f=1, m_select=5)             # all: the plain mean
    assert selected.tolist() == [0, 1, 2, 3, 4] and avg[0] == 3.2
    with pytest.raises(ValueError, match="between 1 and n = 5, got 6"):
        robust.multi_krum(LINE, f=1, m_select=6)


# ---- norm bounding and FedNova ---------------------------------------------------------------

def test_norm_bounding_clips_large_deltas_and_leaves_small_ones_untouched():
    # [3,4] has norm 5 -> [0.6, 0.8]; [0.3,0.4] has norm 0.5 <= 1: kept
    deltas = np.array([[3, 4], [0.3, 0.4]], np.float32)
    np.testing.assert_allclose(robust.norm_bounded(deltas, [1, 1], 1.0), [0.45, 0.6], rtol=1e-6)
    # weights 1, 3: ([0.6, 0.8] + 3 [0.3, 0.4]) / 4 = [0.375, 0.5]
    np.testing.assert_allclose(robust.norm_bounded(deltas, [1, 3], 1.0), [0.375, 0.5], rtol=1e-6)
    # all within the bound (5 included): exactly the weighted mean
    np.testing.assert_array_equal(robust.norm_bounded(deltas, [1, 3], 5.0), robust.mean(deltas, [1, 3]))
    with pytest.raises(ValueError, match="positive, finite max_norm"):
        robust.norm_bounded(deltas, [1, 1], 0.0)


def test_fednova_by_hand():
    # deltas 2, 3 after tau 1, 3 steps: d = 2, 1
    deltas = col(2, 3)
    # p = .5 .5: tau_eff = 2, 2 * (.5*2 + .5*1) = 3 (FedAvg: 2.5)
    assert robust.fednova(deltas, [1, 3], [1, 1])[0] == pytest.approx(3.0)
    # p = .75 .25: tau_eff = .75 + .75 = 1.5, 1.5 * (.75*2 + .25*1) = 2.625 (FedAvg: 2.25)
    assert robust.fednova(deltas, [1, 3], [3, 1])[0] == pytest.approx(2.625)
    with pytest.raises(ValueError, match="positive step count"):
        robust.fednova(deltas, [1, 0], [1, 1])


def test_fednova_with_equal_steps_is_the_weighted_mean():
    # tau_i = tau: tau * sum_i p_i delta_i / tau = sum_i p_i delta_i
    deltas = np.random.default_rng(3).standard_normal((3, 100)).astype(np.float32)
    np.testing.assert_allclose(robust.fednova(deltas, [5, 5, 5], [10, 20, 30]),
                               robust.mean(deltas, [10, 20, 30]), rtol=1e-6, atol=1e-7)


# ---- dispatcher, settings, memory ------------------------------------------------------------

def test_aggregate_dispatches_to_each_rule():
    deltas = np.random.default_rng(4).standard_normal((7, 30)).astype(np.float32)
    w = [1, 2, 3, 4, 5, 6, 7]
    np.testing.assert_array_equal(robust.aggregate("mean", deltas, w), robust.mean(deltas, w))
    np.testing.assert_array_equal(robust.aggregate("median", deltas, w), robust.median(deltas))
    np.testing.assert_array_equal(robust.aggregate("trimmed-mean", deltas, w, beta=0.3),
                                  robust.trimmed_mean(deltas, 0.3))
    np.testing.assert_array_equal(robust.aggregate("krum", deltas, w, f=2),
                                  deltas[robust.krum(deltas, 2)[0]])
    np.testing.assert_array_equal(robust.aggregate("multi-krum", deltas, w, f=2, m_select=3),
                                  robust.multi_krum(deltas, 2, 3)[0])
    np.testing.assert_array_equal(robust.aggregate("norm-bounded", deltas, w, max_norm=2.0),
                                  robust.norm_bounded(deltas, w, 2.0))
    assert set(robust.NAMES) == {"mean", "median", "trimmed-mean", "krum", "multi-krum", "norm-bounded"}


@pytest.mark.parametrize("args, message", [
    (("krum", 6, 2), r"n > 2f \+ 2 clients, got n = 6, f = 2"),
    (("multi-krum", 4, 1), "got n = 4, f = 1"),
    (("krum", 10, -1), "whole number >= 0"),
    (("trimmed-mean", 10, 0, 0.5), "0 <= beta < 0.5"),
    (("norm-bounded", 10), "positive, finite max_norm"),
    (("multi-krum", 10, 2, 0.1, 0), "m_select must be between 1 and n = 10"),
    (("multi-krum", 10, 2, 0.1, 11), "got 11"),
    (("mean", 0), "at least one client"),
    (("average", 10), "unknown aggregator 'average'"),
])
def test_check_refuses_impossible_settings(args, message):
    with pytest.raises(ValueError, match=message):
        robust.check(*args)


def test_check_accepts_possible_settings():
    robust.check("krum", 7, f=2)                       # n = 2f + 3
    robust.check("multi-krum", 7, f=2, m_select=5)
    robust.check("trimmed-mean", 2, beta=0.49)
    robust.check("norm-bounded", 1, max_norm=0.1)
    robust.check("median", 2)
    with pytest.raises(ValueError, match="got n = 6, f = 2"):  # aggregate checks the round's own n
        robust.aggregate("krum", np.zeros((6, 3), np.float32), f=2)


def test_memory_bytes():
    assert robust.memory_bytes(100, 199_210, np.float32) == 100 * 199_210 * 4 == 79_684_000
    assert robust.memory_bytes(3, 10, "float64") == 240


# ---- an attack the robust rules survive -------------------------------------------------------

def angle_deg(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))))


def test_sign_flipping_moves_the_mean_but_not_median_trimmed_mean_or_krum():
    # 20 clients, honest deltas = u + noise around a common unit direction u (noise norm ~0.3, so
    # one honest delta is atan(0.3) ~ 17 degrees off u, their mean ~4); 4 (20%) send -10 x their
    # honest delta. Mean ~ (16 u - 40 u) / 20 = -1.2 u, plus their amplified noise: ~166 degrees.
    # Median and trimmed mean come out ~6 degrees off u (seeds 0-4), Krum's pick ~16.
    rng = np.random.default_rng(5)
    n, m = 2000, 20
    u = rng.standard_normal(n)
    u /= np.linalg.norm(u)
    deltas = (u + 0.3 * rng.standard_normal((m, n)) / np.sqrt(n)).astype(np.float32)
    bad = attacks.malicious_clients(m, 0.2, seed=0)
    assert len(bad) == 4
    for i in bad:
        deltas[i] = attacks.poison_update("signflip", deltas[i], 10.0, rng)

    assert angle_deg(robust.mean(deltas, None), u) > 150
    assert angle_deg(robust.median(deltas), u) < 15
    assert angle_deg(robust.trimmed_mean(deltas, 0.2), u) < 15
    index, _ = robust.krum(deltas, f=4)
    assert index not in bad and angle_deg(deltas[index], u) < 20
