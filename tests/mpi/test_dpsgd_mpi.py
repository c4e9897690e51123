"""DP-SGD under MPI, at 1, 2, 3 and 4 ranks: the noise lands once per coordinate with the stated
standard deviation whatever the rank count, a huge clip without noise is plain SGD, P ranks
give one process's model, and the reported epsilon is dp-accounting's."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hpcfl import backends
from hpcfl.config import Config
from hpcfl.core.replica import Replica
from hpcfl.io.report import Reporter
from hpcfl.parallel.comm import Comm
from hpcfl.privacy import accountant as privacy
from hpcfl.privacy import plan as dpplan
from hpcfl.training import dataparallel as dp
from hpcfl.training import dpsgd as dpsgd_parts


def subset(mnist, n):
    return dataclasses.replace(mnist, train_x=mnist.train_x[:n], train_y=mnist.train_y[:n])


def plan(z=1.0, clip=1.0, seed=7, q=0.01):
    return dpplan.DpPlan(clip=clip, z=z, q=q, expected=100.0, noise_seed=seed, delta=1e-5)


@pytest.mark.mpi
def test_the_noise_lands_once_per_coordinate_with_the_stated_std(comm):
    n = 235_146
    be = backends.get("numpy")
    total = np.zeros(n + 2, np.float32)
    noise = dpsgd_parts.GaussianNoise(plan(z=1.5, clip=0.8), n, comm.rank, comm.size, be)
    noise.step = 3
    noise(total)                                   # this rank's blocks, on a zero gradient
    comm.Allreduce_sum(total)
    alone = np.zeros(n + 2, np.float32)
    single = dpsgd_parts.GaussianNoise(plan(z=1.5, clip=0.8), n, 0, 1, be)
    single.step = 3
    single(alone)
    np.testing.assert_array_equal(total, alone)    # every coordinate once, whatever the rank count
    assert not total[-2:].any()                    # the stop and loss slots get none
    assert total[:n].std() == pytest.approx(1.5 * 0.8, rel=0.01)   # 235,146 draws: ~0.15% error
    assert abs(total[:n].mean()) < 5 * 1.2 / np.sqrt(n)
    other = np.zeros(n + 2, np.float32)
    single.step = 4
    single(other)
    assert np.corrcoef(other[:n], alone[:n])[0, 1] < 0.01    # a new draw every step


@pytest.mark.mpi
def test_a_huge_clip_without_noise_is_a_plain_sgd_step(comm, mnist):
    be = backends.get("numba")
    cfg = Config(optimizer="sgd", momentum=0.0, weight_decay=0.0, backend="numba")
    idx = np.arange(200, dtype=np.int64)
    plain = Replica(cfg, be, max_local_batch=200, norm=(mnist.mean, mnist.std))
    plain.step(comm, mnist.train_x, mnist.train_y, idx, 0.1, denominator=200.0)
    private = Replica(cfg, be, max_local_batch=200, norm=(mnist.mean, mnist.std))
    private.model.clip = 1e12
    private.pre_reduce.append(dpsgd_parts.GaussianNoise(plan(z=0.0), private.layout.n_params, comm.rank, comm.size, be))
    private.step(comm, mnist.train_x, mnist.train_y, idx, 0.1, denominator=200.0)
    a, b = plain.host_params(), private.host_params()
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-6   # the same GEMMs, reordered: ~1e-7
    assert private.model.clipped == 0


def dpsgd(comm, data, **kw):
    cfg = Config(backend="numba", quiet=True, dp_sgd=True, **kw)
    the_plan = dpplan.create_plan(cfg, comm, data.n_train)
    return dp.train(cfg, comm, data, backends.get("numba"), Reporter(cfg, rank=1), plan=the_plan)


@pytest.mark.mpi
def test_dp_sgd_p_ranks_give_the_single_process_model_and_dp_accountings_epsilon(comm, mnist):
    import dp_accounting

    data = subset(mnist, 4000)
    kw = dict(batch_size=200, epochs=2, lr=0.2, momentum=0.5, dp_noise=1.1, dp_clip=1.0, dp_noise_seed=5)
    out = dpsgd(comm, data, **kw)
    diff = None
    if comm.rank == 0:
        single = dpsgd(Comm.self_(), data, **kw)
        diff = float(np.linalg.norm(out.params - single.params) / np.linalg.norm(single.params))
        other = dpsgd(Comm.self_(), data, **{**kw, "dp_noise_seed": 6})
        assert np.linalg.norm(other.params - single.params) > 1e-3 * np.linalg.norm(single.params)
    assert comm.bcast(diff) < 1e-5                 # summation order only
    # --allreduce shm: each rank's noise slice lands in its own slot, summed once per coordinate
    shm = dpsgd(comm, data, **kw, allreduce="shm")
    assert np.linalg.norm(shm.params - out.params) / np.linalg.norm(out.params) < 1e-5
    q, steps = 200 / 4000, 4000 // 200
    for epoch, rec in enumerate(out.history, 1):
        accountant = dp_accounting.rdp.RdpAccountant(privacy.ORDERS)
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.1)), epoch * steps)
        assert rec["dp_epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
        assert rec["dp_noise"] == 1.1
        # the Poisson batches are secret: no loss, sample count or rate, clipping count
        assert not {"train_loss", "samples_per_second", "gflops_per_rank", "dp_clipped_fraction"} & set(rec)
    assert out.test_accuracy > 0.5
