"""Simulated attacks (hpcfl.fl.attacks): who is malicious, and what a malicious client sends."""
from __future__ import annotations

import numpy as np
import pytest

from hpcfl.fl import aggregators as robust
from hpcfl.fl import attacks


def test_kinds():
    assert attacks.KINDS == ("signflip", "scale", "gaussian", "nan", "labelflip")
    assert set(attacks.UPDATE_KINDS) | set(attacks.DATA_KINDS) == set(attacks.KINDS)


def test_malicious_clients_are_seeded_sized_and_distinct():
    a = attacks.malicious_clients(100, 0.2, seed=1)
    assert len(a) == 20 and len(set(a.tolist())) == 20 and a.min() >= 0 and a.max() < 100
    assert np.all(np.diff(a) > 0)                                           # increasing
    np.testing.assert_array_equal(a, attacks.malicious_clients(100, 0.2, seed=1))
    assert not np.array_equal(a, attacks.malicious_clients(100, 0.2, seed=2))
    assert len(attacks.malicious_clients(7, 0.3, seed=0)) == 2              # round(2.1)
    assert len(attacks.malicious_clients(10, 0.29, seed=0)) == 3            # round(2.9), not int(2.9)
    assert len(attacks.malicious_clients(20, 0.15, seed=0)) == 3            # round(3.0000000000000004)
    assert len(attacks.malicious_clients(10, 0.0, seed=0)) == 0


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_malicious_fraction_must_be_below_1(fraction):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        attacks.malicious_clients(10, fraction, seed=0)


def test_signflip_and_scale_by_hand():
    delta = np.array([1, -2], np.float32)
    rng = np.random.default_rng(0)
    out = attacks.poison_update("signflip", delta, 10.0, rng)
    np.testing.assert_array_equal(out, [-10, 20])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(attacks.poison_update("scale", delta, 3.0, rng), [3, -6])
    np.testing.assert_array_equal(delta, [1, -2])                           # the honest delta is not touched


def test_gaussian_noise_has_the_norm_of_the_delta():
    delta = np.zeros(1000, np.float32)
    delta[:2] = [3, 4]                                                      # norm 5
    out = attacks.poison_update("gaussian", delta, 10.0, np.random.default_rng(0))
    assert out.dtype == np.float32
    assert np.linalg.norm(out.astype(np.float64)) == pytest.approx(5.0, rel=1e-6)
    assert abs(out @ delta) / 25 < 0.2                                      # not along the delta
    np.testing.assert_array_equal(out, attacks.poison_update("gaussian", delta, 10.0, np.random.default_rng(0)))
    zero = attacks.poison_update("gaussian", np.zeros(5, np.float32), 1.0, np.random.default_rng(0))
    np.testing.assert_array_equal(zero, np.zeros(5))


def test_nan_update_is_all_nan_and_rejected_by_validation():
    out = attacks.poison_update("nan", np.ones(6, np.float32), 1.0, np.random.default_rng(0))
    assert out.dtype == np.float32 and np.isnan(out).all()
    assert "6 non-finite values (6 NaN, 0 inf)" in robust.validate(out, 6)


def test_poison_update_refuses_data_attacks_and_unknown_kinds():
    with pytest.raises(ValueError, match="data attack"):
        attacks.poison_update("labelflip", np.ones(2, np.float32), 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown attack 'zero'"):
        attacks.poison_update("zero", np.ones(2, np.float32), 1.0, np.random.default_rng(0))


def test_flip_labels_by_hand():
    labels = np.array([0, 1, 9, 3], np.uint8)
    out = attacks.flip_labels(labels, 10)
    np.testing.assert_array_equal(out, [9, 8, 0, 6])
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(attacks.flip_labels(out, 10), labels)    # an involution
    np.testing.assert_array_equal(attacks.flip_labels(np.array([0, 1, 2]), 3), [2, 1, 0])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        attacks.flip_labels(np.array([10], np.uint8), 10)
