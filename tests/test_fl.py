"""Federated learning's pure parts: partitions, client sampling, weighted averaging, server optimizers."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import DATA_DIR, needs_mnist

from hpcfl.config import Config
from hpcfl.errors import UsageError
from hpcfl.fl import partition
from hpcfl.fl import server_opt as aggregate


@pytest.fixture(scope="module")
def mnist_labels():
    from hpcfl import data

    return data.read_idx(data.idx._source(DATA_DIR, "train-labels-idx1-ubyte"))


def assert_exact_cover(parts, n):
    everything = np.concatenate(parts)
    assert len(everything) == n
    np.testing.assert_array_equal(np.sort(everything), np.arange(n))


@needs_mnist
@pytest.mark.parametrize("scheme", ["iid", "shards", "dirichlet"])
def test_partitions_assign_every_sample_exactly_once_and_deterministically(mnist_labels, scheme):
    parts = partition.create(scheme, mnist_labels, 100, seed=3, alpha=0.5)
    assert len(parts) == 100
    assert_exact_cover(parts, 60_000)
    again = partition.create(scheme, mnist_labels, 100, seed=3, alpha=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition.create(scheme, mnist_labels, 100, seed=4, alpha=0.5)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_clients_are_equal_sized():
    parts = partition.create("iid", np.zeros(1003, np.uint8), 10, seed=0)
    assert sorted(len(p) for p in parts) == [100] * 7 + [101] * 3


def test_shards_give_each_client_exactly_two_labels_when_classes_fill_whole_shards():
    # 10 labels x 40 samples, 20 clients -> 40 shards of 10: every shard holds a single label
    labels = np.repeat(np.arange(10), 40).astype(np.uint8)
    np.random.default_rng(0).shuffle(labels)
    parts = partition.create("shards", labels, 20, seed=1)
    assert_exact_cover(parts, 400)
    assert all(len(p) == 20 for p in parts)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    assert np.mean([len(np.unique(labels[p])) for p in parts]) > 1.5   # mostly two different digits


@needs_mnist
def test_shards_on_mnist_follow_the_paper(mnist_labels):
    parts = partition.create("shards", mnist_labels, 100, seed=0)
    assert all(len(p) == 600 for p in parts)                  # 200 shards of 300, 2 per client
    n_labels = [len(np.unique(mnist_labels[p])) for p in parts]
    # MNIST's class sizes are not multiples of 300, so a shard can straddle two digits
    assert max(n_labels) <= 4 and np.mean(n_labels) <= 2.5
    for p in parts:                                           # two digits dominate every client
        counts = np.sort(np.bincount(mnist_labels[p], minlength=10))[::-1]
        assert counts[:2].sum() >= 0.5 * len(p)


@needs_mnist
def test_dirichlet_skew_follows_alpha(mnist_labels):
    def mean_top2_share(alpha):
        parts = partition.create("dirichlet", mnist_labels, 20, seed=0, alpha=alpha)
        shares = [np.sort(np.bincount(mnist_labels[p], minlength=10))[::-1][:2].sum() / len(p) for p in parts]
        return float(np.mean(shares))

    assert mean_top2_share(0.1) > 0.7          # skewed: two digits dominate a client
    assert mean_top2_share(1e4) < 0.25         # near IID: two digits are about 2/10 of the data


def test_bad_partitions_are_usage_errors():
    labels = np.repeat(np.arange(10), 5).astype(np.uint8)
    with pytest.raises(UsageError, match="more than the 50 training samples"):
        partition.create("iid", labels, 51, seed=0)
    with pytest.raises(UsageError, match="get no data"):
        partition.create("dirichlet", labels, 40, seed=0, alpha=0.01)


def test_client_sampling_is_seeded_and_sized():
    a = partition.sample_clients(100, 0.1, server_round=7, seed=1)
    assert len(a) == 10 and len(set(a.tolist())) == 10 and a.max() < 100
    np.testing.assert_array_equal(a, partition.sample_clients(100, 0.1, 7, 1))
    assert not np.array_equal(a, partition.sample_clients(100, 0.1, 8, 1))
    assert len(partition.sample_clients(100, 0.001, 1, 1)) == 1        # max(C*K, 1)
    np.testing.assert_array_equal(partition.sample_clients(5, 1.0, 3, 0), np.arange(5))


def test_clients_are_balanced_over_groups_by_examples():
    sizes = np.array([100, 10, 60, 50, 40, 30])
    groups = partition.assign_to_groups(np.arange(6), sizes, 2)
    assert sorted(sum(groups, [])) == list(range(6))
    assert sorted(sizes[g].sum() for g in groups) == [140, 150]


def test_weighted_average_by_hand():
    w1, w2 = np.array([1.0, 2.0], np.float32), np.array([3.0, -2.0], np.float32)
    # (1*[1,2] + 3*[3,-2]) / 4 = [2.5, -1]
    np.testing.assert_allclose(aggregate.weighted_average([w1, w2], [1, 3]), [2.5, -1.0])
    # equal sizes: the plain mean
    np.testing.assert_allclose(aggregate.weighted_average([w1, w2], [5, 5]), [2.0, 0.0])


def test_fedavg_with_server_lr_1_takes_the_average_and_smaller_lr_interpolates():
    g = np.array([1.0, 1.0], np.float32)
    aggregate.create(Config(server_opt="fedavg", server_lr=1.0), 2).step(g, np.array([3.0, -1.0], np.float32))
    np.testing.assert_allclose(g, [3.0, -1.0])
    g = np.array([1.0, 1.0], np.float32)
    aggregate.create(Config(server_opt="fedavg", server_lr=0.5), 2).step(g, np.array([3.0, -1.0], np.float32))
    np.testing.assert_allclose(g, [2.0, 0.0])


def test_fedavgm_by_hand():
    opt = aggregate.create(Config(server_opt="fedavgm", server_lr=1.0, server_momentum=0.5), 1)
    g = np.array([1.0], np.float32)
    opt.step(g, np.array([0.0], np.float32))   # delta 1, v = 1, w = 0
    assert g[0] == pytest.approx(0.0)
    opt.step(g, np.array([-1.0], np.float32))  # delta 1, v = 0.5 + 1 = 1.5, w = -1.5
    assert g[0] == pytest.approx(-1.5)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_server_optimizers_follow_reddi_et_als_algorithm_2(name):
    # Reddi et al. 2021, Algorithm 2, written out here over three rounds: m the same for all three,
    # v by Adam's, Yogi's or Adagrad's rule (delta: global - average, the step subtracts)
    cfg = Config(mode="fl", server_opt=name, server_lr=0.1, server_beta1=0.9, server_beta2=0.99, server_eps=1e-3)
    opt = aggregate.create(cfg, 2)
    w = np.array([1.0, -2.0], np.float32)
    want, m, v = w.astype(np.float64), np.zeros(2), np.zeros(2)
    for avg in ([0.5, -1.0], [0.2, -1.5], [0.4, -0.1]):
        opt.step(w, np.array(avg, np.float32))
        d = want - np.array(avg)
        m = 0.9 * m + 0.1 * d
        v = {"fedadam": 0.99 * v + 0.01 * d * d, "fedyogi": v - 0.01 * d * d * np.sign(v - d * d),
             "fedadagrad": v + d * d}[name]
        want = want - 0.1 * m / (np.sqrt(v) + 1e-3)
    np.testing.assert_allclose(w, want, rtol=1e-5)
    assert Config(mode="fl", server_opt=name).server_lr == 0.01


def test_fedadam_by_hand():
    cfg = Config(server_opt="fedadam", server_lr=0.1, server_beta1=0.9, server_beta2=0.99, server_eps=1e-3)
    opt = aggregate.create(cfg, 1)
    g = np.array([1.0], np.float32)
    opt.step(g, np.array([0.5], np.float32))   # delta .5, m = .05, v = .0025, step = .1*.05/(.05+.001)
    assert g[0] == pytest.approx(1.0 - 0.1 * 0.05 / (0.05 + 1e-3), rel=1e-5)
