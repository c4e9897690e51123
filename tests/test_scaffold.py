"""SCAFFOLD (Karimireddy et al. 2020, option II) with hpcfl's age limit on the control variates:
the formulas of fl/scaffold.py against independent computations on small arrays (a client's K
local steps simulated by hand), and end to end the run whose model the paper's rule made
non-finite (benchmarks/ROBUSTNESS.md, section 2)."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_clean_failure, needs_mnist, run_hpcfl

from hpcfl.config import Config
from hpcfl.fl import scaffold as aggregate

RNG = np.random.default_rng(7)
C, C_I = RNG.normal(size=5), RNG.normal(size=5)
C_KEPT = C.copy()


@pytest.mark.parametrize("c_i, age, max_age, expected, left_out", [
    (C_I, 3, 5, C - C_I, False),         # young enough: the paper's c - c_i
    (C_I, 5, 5, C - C_I, False),         # exactly max_age rounds old: still used
    (C_I, 6, 5, C, True),                # older: c alone
    (C_I, 250, 0, C - C_I, False),       # 0: every c_i is used, however old (the paper)
    (None, 0, 5, C, True),               # no c_i yet (first round): c alone, at any max_age
    (None, 0, 0, C, True),
])
def test_the_correction_leaves_out_a_variate_older_than_max_age(c_i, age, max_age, expected, left_out):
    got, out = aggregate.scaffold_correction(C, c_i, age, max_age)
    assert out is left_out
    np.testing.assert_array_equal(got, expected)
    got += 1.0                           # a copy: the caller may scale it without touching c
    np.testing.assert_array_equal(C, C_KEPT)


def local_steps(x, correction, lr, K, seed=0):
    """K corrected SGD steps from x on f(y) = 0.5 |A y - b|^2 plus fixed noise per step (a
    stochastic gradient); returns the final y and the mean of the gradients g(y) taken."""
    rng = np.random.default_rng(seed)
    A, b = rng.normal(size=(5, 5)) / 3, rng.normal(size=5)
    y, grads = x.copy(), []
    for _ in range(K):
        g = A.T @ (A @ y - b) + 0.1 * rng.normal(size=5)
        grads.append(g)
        y = y - lr * (g + correction)
    return y, np.mean(grads, axis=0)


@pytest.mark.parametrize("left_out", [False, True])
def test_option_ii_variate_is_the_mean_of_the_clients_own_gradients(left_out):
    x, K, lr = RNG.normal(size=5), 7, 0.05
    correction = C if left_out else C - C_I           # what the K steps added
    y, mean_grad = local_steps(x, correction, lr, K)
    new, dc = aggregate.scaffold_client_variate(C_I, C, x, y, K, lr, left_out)
    np.testing.assert_allclose(new, mean_grad, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dc, mean_grad - C_I, rtol=1e-10, atol=1e-12)   # against the stored c_i
    if not left_out:      # the paper's eq. 4 (option II), written out
        np.testing.assert_allclose(new, C_I - C + (x - y) / (K * lr), rtol=1e-12)


def test_server_variate_stays_the_mean_of_all_stored_variates():
    N = 6
    stored = {k: np.zeros(4) for k in range(N)}          # unseen clients count as 0
    c = np.zeros(4)
    for _rnd in range(5):
        sampled = RNG.choice(N, size=2, replace=False)
        dc_sum = np.zeros(4)
        for k in sampled:
            new = RNG.normal(size=4)
            dc_sum += new - stored[k]
            stored[k] = new
        c = aggregate.scaffold_server_variate(c, dc_sum, len(sampled), N)
        np.testing.assert_allclose(c, np.mean(list(stored.values()), axis=0), atol=1e-12)
    assert aggregate.scaffold_server_variate(c, np.ones(4), 0, N) is c       # no client reported


def test_the_default_leaves_out_variates_older_than_5_rounds():
    assert Config(mode="fl", scaffold=True).scaffold_max_age == 5


# ROBUSTNESS.md, section 2: the FedAvg paper's non-IID 2NN with --scaffold at local lr 0.1, seed 0.
# Only the last round is evaluated: evaluation changes nothing in the training. ~15 s a run.
PAPER_SPLIT = ["--mode", "fl", "--hidden", "200,200", "--num-clients", 100, "--client-fraction", 0.1,
               "--local-epochs", 1, "--local-batch-size", 10, "--partition", "shards", "--server-lr", 1.0,
               "--scaffold", "--rounds", 115, "--eval-every", 115, "--seed", 0, "--quiet"]


@needs_mnist
def test_the_default_stays_finite_where_the_papers_rule_diverged():
    # every c_i used however old (the paper's rule, before the age limit the only one) makes the
    # global model non-finite within these 115 rounds (round 113 with this seed on this machine:
    # the round is one seed's, so any round counts) ...
    proc = run_hpcfl(2, *PAPER_SPLIT, "--scaffold-max-age", 0, timeout=600)
    assert_clean_failure(proc, 1, "the server update made the global model non-finite in round ")
    # ... the default (c_i older than 5 rounds left out) trains past it
    proc = run_hpcfl(2, *PAPER_SPLIT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "non-finite" not in proc.stderr
    assert float(proc.stdout.split("final test accuracy ")[1].split("%")[0]) > 96.0


def test_a_client_whose_training_diverged_keeps_its_old_variate():
    # the server rejects its update and ignores its delta c_i; storing the NaN c_i would send,
    # once that c_i is left out for its age, a NaN delta c_i along with a good model
    from types import SimpleNamespace

    from hpcfl import backends
    from hpcfl.fl.context import FedContext
    from hpcfl.fl.scaffold import Scaffold

    ctx = FedContext(comm=SimpleNamespace(rank=0), leaders=SimpleNamespace(rank=0), leader=True, group=0,
                     n_groups=1, n=3, sizes=np.array([5, 5]), home=[[0, 1]])
    sc = Scaffold(ctx, backends.get("numpy"), local_lr=0.1, max_age=5)
    global_w = np.zeros(3)
    sc.start(0, 1)
    assert sc.left_out                    # no c_i yet: c alone
    dc = sc.finish(0, np.array([np.nan, 1.0, 1.0], np.float32), 2, 1, global_w)
    np.testing.assert_array_equal(dc, np.zeros(3))
    assert sc.pending == {}
    sc.start(1, 1)
    dc = sc.finish(1, np.array([-0.2, 0.0, 0.2], np.float32), 2, 1, global_w)     # (x - y) / (K lr), c = 0
    np.testing.assert_allclose(dc, [1.0, 0.0, -1.0], rtol=1e-6)
    assert list(sc.pending) == [1] and sc.pending[1][1] == 1
