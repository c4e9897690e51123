"""Secure aggregation and client-level DP under MPI, at 1, 2, 3 and 4 ranks (test_mpi_suite.py),
with client groups of 1 and (where the rank count allows) 2 ranks. Every check compares with an
independent computation: the plain sum mod 2^32 of what the clients put in, plain FedAvg,
dp-accounting called directly, the noise's stated standard deviation."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import stats

from hpcfl import backends
from hpcfl.config import Config
from hpcfl.errors import TrainingError
from hpcfl.fl import collectors as collect
from hpcfl.fl import partition
from hpcfl.fl import secure as secure_collector
from hpcfl.io.report import Reporter
from hpcfl.parallel.comm import Comm
from hpcfl.privacy import accountant as privacy
from hpcfl.privacy import plan as dpplan
from hpcfl.privacy import sampling, secagg
from hpcfl.runtime import testing
from hpcfl.training import federated as fl

# plain FedAvg on the server (server lr 1, no momentum), not the DP defaults (fedavgm, a server lr
# scaled by the clients per round): the tests
# read the noise and the sums straight off the global model's step
BASE = dict(num_clients=20, client_fraction=0.5, rounds=1, local_epochs=1, local_batch_size=20, local_lr=0.05,
            server_opt="fedavg", server_lr=1.0)


def subset(mnist, n):
    return dataclasses.replace(mnist, train_x=mnist.train_x[:n], train_y=mnist.train_y[:n])


def run(comm, data, **kw):
    cfg = Config(mode="fl", backend="numba", quiet=True, **{**BASE, **kw})
    plan = dpplan.create_plan(cfg, comm, data.n_train)
    return fl.train(cfg, comm, data, backends.get("numba"), Reporter(cfg, rank=1), plan=plan)


def group_sizes(comm):
    return [1] + ([2] if comm.size % 2 == 0 and comm.size > 1 else [])


@pytest.fixture
def record(monkeypatch):
    """What the leaders put in (each client's uint32 vector) and what the server unmasks."""
    seen = {"inputs": {}, "totals": [], "uploads": {}}
    add, aggregate = secure_collector.SecureCollector.add, secagg.Server.aggregate

    def recording_add(self, update):
        add(self, update)
        seen["inputs"][update.client] = self.inputs[update.client].copy()

    def recording_aggregate(self, *args):
        total = aggregate(self, *args)
        seen["totals"].append(total.copy())
        return total

    class Uploads(testing.Hooks):
        def uploads(self, server_round, uploads):
            seen["uploads"].update({k: v.copy() for k, v in uploads.items()})

    monkeypatch.setattr(secure_collector.SecureCollector, "add", recording_add)
    monkeypatch.setattr(secagg.Server, "aggregate", recording_aggregate)
    with testing.installed(Uploads()):
        yield seen


def all_inputs(comm, seen) -> dict:
    merged = {}
    for part in comm.allgather(seen["inputs"]):
        merged.update(part)
    return merged


@pytest.mark.mpi
@pytest.mark.parametrize("neighbors", [None, 4])
def test_the_unmasked_sum_is_the_plain_sum_exactly(comm, mnist, record, neighbors):
    for R in group_sizes(comm):
        record["inputs"].clear(), record["totals"].clear()
        # K = 4 of 10 only when no dropout nor collusion is assumed (Bell et al.'s bound otherwise)
        sparse = dict(secagg_max_dropout=0.0, secagg_corrupt_fraction=0.0) if neighbors else {}
        run(comm, subset(mnist, 2000), secure_agg=True, secagg_neighbors=neighbors, ranks_per_client=R, **sparse)
        inputs = all_inputs(comm, record)
        if comm.rank == 0:
            assert len(inputs) == 10
            expected = np.zeros_like(next(iter(inputs.values())))
            for x in inputs.values():
                expected += x                      # uint32: the sum mod 2^32
            (total,) = record["totals"]
            assert np.array_equal(total, expected)


@pytest.mark.mpi
def test_the_model_is_plain_fedavg_within_the_quantisation_bound(comm, mnist):
    data = subset(mnist, 2000)
    for R in group_sizes(comm):
        plain = run(comm, data, rounds=3, ranks_per_client=R).params
        secure = run(comm, data, rounds=3, secure_agg=True, ranks_per_client=R).params
        rel = np.linalg.norm(secure - plain) / np.linalg.norm(plain)
        assert rel < 1e-4, rel                    # measured: ~1e-7 (issue: within 1e-4 after 3 rounds)
        assert not np.array_equal(secure, plain)  # quantised: not the same bits (the test can tell)


@pytest.mark.mpi
def test_every_upload_looks_uniform_and_uncorrelated_with_the_update(comm, mnist, record):
    run(comm, subset(mnist, 2000), secure_agg=True, ranks_per_client=1)
    inputs = all_inputs(comm, record)
    if comm.rank == 0:
        assert set(record["uploads"]) == set(inputs)
        for k, y in record["uploads"].items():
            for lane in range(4):                                   # every byte of every word
                counts = np.bincount((y >> np.uint32(8 * lane)) & np.uint32(255), minlength=256)
                chi2 = ((counts - len(y) / 256) ** 2 / (len(y) / 256)).sum()
                assert stats.chi2.sf(chi2, 255) > 1e-6, (k, lane, chi2)
            # every word masked, the tail's too (weight, steps, loss...): a masked word equals its
            # input with probability 2^-32, so none of the ~470,000 should
            assert np.count_nonzero(y == inputs[k]) <= 1, (k, np.flatnonzero(y == inputs[k])[:5])
            assert (y[-secure_collector.TAIL:] != inputs[k][-secure_collector.TAIL:]).all()
            x = inputs[k][:-secure_collector.TAIL].view(np.int32).astype(np.float64)
            r = np.corrcoef(x, y[:-secure_collector.TAIL].astype(np.float64))[0, 1]
            assert abs(r) < 6 / np.sqrt(len(y)), (k, r)             # ~0 within 6 standard errors
            assert abs(np.corrcoef(x, inputs[k][:-secure_collector.TAIL].view(np.int32))[0, 1] - 1) < 1e-9


def drop_the_first(monkeypatch, count):
    def first(clients, rate, server_round, seed):
        return set(np.asarray(clients)[:count].tolist())
    monkeypatch.setattr(partition, "dropouts", first)


@pytest.mark.mpi
def test_up_to_n_minus_t_dropouts_still_give_the_survivors_exact_sum(comm, mnist, record, monkeypatch):
    m, t = 10, 6                                   # default threshold: the smallest majority of 10
    drop_the_first(monkeypatch, m - t)
    out = run(comm, subset(mnist, 2000), secure_agg=True, ranks_per_client=1)
    inputs = all_inputs(comm, record)
    assert len(inputs) == t                        # the dropped never trained nor reported
    assert out.history[0]["dropped"] == m - t
    if comm.rank == 0:
        expected = sum((x.astype(np.uint64) for x in inputs.values()), np.zeros(1, np.uint64)).astype(np.uint32)
        assert np.array_equal(record["totals"][0], expected)


@pytest.mark.mpi
def test_one_dropout_more_skips_every_round_and_the_run_fails_naming_why(comm, mnist, monkeypatch, capfd):
    # issue 25: a run in which no round completes is an error, not the initial model as a result
    data = subset(mnist, 2000)
    drop_the_first(monkeypatch, 5)                 # 5 survivors < the 6 a round of 10 needs
    with pytest.raises(TrainingError, match="no round completed in 2 round.*5 of 10 clients survived, "
                                            "fewer than the 6 needed") as info:
        run(comm, data, secure_agg=True, ranks_per_client=1, rounds=2)
    assert info.value.collective
    err = capfd.readouterr().err
    if comm.rank == 0:
        assert err.count("skipped, the global model is unchanged") == 2


@pytest.mark.mpi
def test_a_tampered_ciphertext_fails_authentication_naming_the_clients(comm, mnist, monkeypatch):
    def flip_one(server_round, routed):
        receiver = min(routed)
        held = secagg.decode_map(routed[receiver])
        sender = min(held)
        bad = bytearray(held[sender])
        bad[-1] ^= 1
        held[sender] = bytes(bad)
        return {**routed, receiver: secagg.encode_map(held)}

    class Tamper(testing.Hooks):
        def relay(self, server_round, routed):
            return flip_one(server_round, routed)

    with testing.installed(Tamper()), \
            pytest.raises(TrainingError,
                          match=r"share ciphertext from client \d+ to client \d+ failed authentication") as info:
        run(comm, subset(mnist, 2000), secure_agg=True, ranks_per_client=1)
    assert info.value.collective and "no model was built" in str(info.value)


# ------------------------------------------------------------------ client-level DP

def sampled(n, q, server_round, seed):
    """The clients a seeded DP run samples, drawn here from the seed as every rank draws them."""
    return partition.poisson_clients(n, q, server_round, seed, None)


@pytest.mark.mpi
@pytest.mark.parametrize("secure", [False, True])
def test_the_dp_noise_has_the_stated_standard_deviation(comm, mnist, secure, monkeypatch):
    # no learning (a tiny local lr): the global model moves by the noise alone, divided by q N
    z, S, q, N = 2.0, 0.5, 0.5, 20
    kw = dict(local_lr=1e-12, dp_noise=z, dp_clip=S, secure_agg=secure, dp_noise_seed=3)
    if secure:      # one client's training diverges: it still adds its noise share (zero-out)
        add = secure_collector.SecureCollector.add

        def diverge_first(self, update):
            if update.client == min(self.sampled):
                update = dataclasses.replace(update, loss_sum=float("nan"))
            add(self, update)
        monkeypatch.setattr(secure_collector.SecureCollector, "add", diverge_first)
    out = run(comm, subset(mnist, 2000), **kw)
    init = fl.Federation(Config(mode="fl", **BASE), Comm.self_(), subset(mnist, 2000),
                         backends.get("numba")).global_w
    step = out.params.astype(np.float64) - init
    m = len(sampled(N, q, 1, 3))
    plan = dpplan.create_plan(Config(mode="fl", quiet=True, **{**BASE, **kw}), Comm.self_(), 2000)
    # central: N(0, z^2 S^2) once; secure: m shares of N(0, share_std^2) each, share_std sized for
    # the fewest honest shares a client accepts (5% quantile, with the admitted colluders counted out)
    if secure:
        honest = sampling.honest_quantile(N, q, 0.0, 0, corrupt_fraction=0.05)
        assert plan.share_std == pytest.approx(z * S / np.sqrt(honest)) and plan.accept_honest == honest
        assert "rejected" not in out.history[0] and "clients" not in out.history[0]   # no counts under DP
    want = (plan.share_std * np.sqrt(m) if secure else z * S) / (q * N)
    assert abs(step.mean()) < 5 * want / np.sqrt(step.size)
    assert step.std() == pytest.approx(want, rel=0.01)   # 235,146 coordinates: ~0.15% standard error


def epsilon_by_enumeration(zs, q, delta):
    """The secure accounting computed independently: every pattern of the rounds a client took
    part in, its Gaussian composition from dp-accounting's PLD, mixed by the pattern's chance."""
    import itertools

    from dp_accounting.pld import privacy_loss_distribution as pld

    parts = []
    for pattern in itertools.product([0, 1], repeat=len(zs)):
        mu2 = sum(b / z**2 for b, z in zip(pattern, zs))
        if mu2 > 0:
            parts.append((np.prod([q if b else 1 - q for b in pattern]),
                          pld.from_gaussian_mechanism(1 / np.sqrt(mu2), value_discretization_interval=1e-3)))

    def delta_of(eps):
        return sum(chance * d.get_delta_for_epsilon(eps) for chance, d in parts)

    lo, hi = 0.0, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if delta_of(mid) <= delta else (mid, hi)
    return hi


def gdp_epsilon_by_pld(mu2, delta):
    """A client's epsilon computed independently: its rounds' Gaussian mechanisms composed as one
    (mu^2 adds up), dp-accounting's PLD of a Gaussian with std 1 / mu (pessimistic in its grid)."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    gaussian = pld.from_gaussian_mechanism(1 / np.sqrt(mu2), value_discretization_interval=1e-4)
    return gaussian.get_epsilon_for_delta(delta)


@pytest.mark.mpi
@pytest.mark.parametrize("secure", [False, True])
def test_dp_epsilon_is_what_dp_accounting_computes_directly(comm, mnist, secure, monkeypatch):
    import dp_accounting

    if secure:
        drop_the_first(monkeypatch, 1)             # a dropout: it never masks, so it spends nothing
    out = run(comm, subset(mnist, 2000), rounds=3, dp_noise=1.3, secure_agg=secure, dp_noise_seed=1)
    accountant = dp_accounting.rdp.RdpAccountant(privacy.ORDERS)
    joined: dict[int, int] = {}
    for rec in out.history:
        assert rec["dp_noise"] == 1.3
        if secure:
            # each client's own ledger: 1 / z^2 for every round it masked in; the record the largest
            for k in sampled(20, 0.5, rec["round"], 1)[1:]:
                joined[int(k)] = joined.get(int(k), 0) + 1
            exact = gdp_epsilon_by_pld(max(joined.values()) / 1.3 ** 2, 1e-5)
            assert exact * (1 - 2e-3) <= rec["dp_epsilon"] <= exact * (1 + 1e-6)
        else:
            accountant.compose(dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.3)))
            assert rec["dp_epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


@pytest.mark.mpi
def test_central_dp_p_ranks_give_the_single_process_model(comm, mnist):
    data = subset(mnist, 2000)
    kw = dict(rounds=2, dp_noise=0.8, dp_clip=1.0, dp_noise_seed=11,
              ranks_per_client=2 if comm.size % 2 == 0 else 1)
    out = run(comm, data, **kw)
    diff = None
    if comm.rank == 0:
        single = run(Comm.self_(), data, **{**kw, "ranks_per_client": 1})
        diff = float(np.linalg.norm(out.params - single.params) / np.linalg.norm(single.params))
        other = run(Comm.self_(), data, **{**kw, "ranks_per_client": 1, "dp_noise_seed": 12})
        assert np.linalg.norm(other.params - single.params) > 100 * 1e-5 * np.linalg.norm(single.params)
    assert comm.bcast(diff) < 1e-5


@pytest.mark.mpi
def test_clients_stop_joining_at_their_own_budget_and_no_record_passes_it(comm, mnist, monkeypatch):
    # the noise is planned for 2 rounds per client (the calibration believes in fewer
    # participations than Poisson sampling at q = 0.5 gives): the clients' own ledgers stop them
    # at their budget, rounds run out of clients, and training stops; no record passes the target
    monkeypatch.setattr(privacy, "planned_participation", lambda q, rounds, quantile=0.95: 2)
    out = run(comm, subset(mnist, 2000), rounds=8, dp_epsilon=6.0, secure_agg=True, dp_noise_seed=2)
    recs = out.history
    assert "budget_stop" in recs[-1] and "own privacy budgets" in recs[-1]["budget_stop"]
    assert len(recs) < 8 and all(r["dp_epsilon"] <= 6.0 for r in recs)
    assert out.extra["dp_epsilon"] <= 6.0
    # independently: a client joins until a third round would pass mu(6); the largest ledger then
    mu2 = privacy.gdp_mu(6.0, 1e-5) ** 2
    assert recs[-1]["dp_epsilon"] == pytest.approx(gdp_epsilon_by_pld(mu2, 1e-5), rel=2e-3)


@pytest.mark.mpi
def test_finding_8_under_central_dp_a_rejected_client_is_neither_counted_nor_named(comm, mnist, monkeypatch, capfd):
    add = collect.CentralDpCollector.add

    def diverge_first(self, update):
        add(self, dataclasses.replace(update, loss_sum=float("nan")) if update.client == 3 else update)
    monkeypatch.setattr(collect.CentralDpCollector, "add", diverge_first)
    monkeypatch.setattr(partition, "poisson_clients",
                        lambda n, rate, r, seed, attempt=None: np.arange(0, 20, 2) + (r % 2 == 0) * 1)
    out = run(comm, subset(mnist, 2000), rounds=2, dp_noise=1.0, dp_noise_seed=4)
    assert not any({"rejected", "clients", "dropped"} & set(r) for r in out.history)
    err = capfd.readouterr().err
    if comm.rank == 0:
        assert "client 3" not in err and "rejected" not in err
