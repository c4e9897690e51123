"""Private federated learning through the command line: secure aggregation and DP-FedAvg end to
end, their metrics, and every setting that cannot work (one message, exit 2, every rank)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from helpers import assert_clean_failure, needs_mnist, run_hpcfl, run_then_resume_without_seed

pytestmark = needs_mnist
FL = ["--mode", "fl", "--rounds", 2, "--num-clients", 20, "--client-fraction", 0.5, "--local-batch-size", 20]


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_secure_aggregation_end_to_end_reports_its_cost_and_matches_plain_fedavg(tmp_path):
    # 10 sampled clients: the complete graph (Bell et al.'s bound allows no sparser one), t = 6;
    # the 0.2 rate's dropouts are recovered, every round completes
    proc = run_hpcfl(3, *FL, "--secure-agg", "--dropout-rate", 0.2, "--quiet",
                     "--metrics", tmp_path / "m.jsonl", "--out", tmp_path / "secure")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rec in records(tmp_path / "m.jsonl"):
        assert rec["clients"] == 10 and 0 < rec["dropped"] <= 3 and rec["skipped"] is None
        # one masked vector each, 4 bytes x (2 limbs x 235,146 parameters + 6 tail words), and the
        # protocol's small messages (keys, shares, signatures, responses: a few kB a client)
        masked = 4 * (2 * 235_146 + 6) * (rec["clients"] - rec["dropped"])
        assert masked < rec["bytes_to_server"] < masked + 5_000 * rec["clients"]
        assert rec["bytes_from_server"] > 0 and rec["secagg_seconds"] > 0
        assert set(rec["secagg_stages"]) == {"keys", "shares", "masking", "unmasking"}
    # no dropouts, the paper's setting, 3 rounds: FedAvg in the clear up to the quantisation
    # (measured 7.5e-8; many more local steps amplify float32 rounding itself, secure or not)
    paper = ["--mode", "fl", "--rounds", 3, "--num-clients", 100, "--client-fraction", 0.1, "--quiet"]
    for name, extra in (("plain", []), ("secure2", ["--secure-agg"])):
        proc = run_hpcfl(2, *paper, *extra, "--out", tmp_path / name)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = (np.load(tmp_path / d / "model.npz")["params"] for d in ("plain", "secure2"))
    assert 0 < np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-4
    # finding 10: clients of 5000 samples take 500 local steps; the derived range clips nothing
    # and one round is FedAvg in the clear to float32 (measured 2.2e-8). Not more rounds: 500
    # local steps amplify that float32 rounding to 1.9e-2 after round 2 and 5.8e-2 after round 3
    # (before the derived range as well: the 5.8e-2 was this, not clipping)
    big = ["--mode", "fl", "--rounds", 1, "--num-clients", 12, "--client-fraction", 0.5, "--seed", 4, "--quiet"]
    for name, extra in (("plain12", []), ("secure12", ["--secure-agg", "--metrics", tmp_path / "s12.jsonl"])):
        proc = run_hpcfl(3, *big, *extra, "--out", tmp_path / name)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = (np.load(tmp_path / d / "model.npz")["params"] for d in ("plain12", "secure12"))
    assert 0 < np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-6
    assert all(r["secagg_clipped"] == 0 for r in records(tmp_path / "s12.jsonl"))


def test_dp_fedavg_end_to_end_reports_epsilon_and_calibrates_to_the_budget(tmp_path):
    proc = run_hpcfl(2, *FL, "--rounds", 3, "--dp-epsilon", 5, "--quiet", "--metrics", tmp_path / "m.jsonl")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = records(tmp_path / "m.jsonl")
    eps = [r["dp_epsilon"] for r in recs]
    assert eps == sorted(eps) and 4.5 < eps[-1] <= 5.0          # the planned rounds spend the budget
    assert all(r["dp_noise"] == recs[0]["dp_noise"] > 0 and r["dp_delta"] == 1e-5 for r in recs)


@pytest.mark.parametrize("args, words", [
    (FL + ["--secure-agg", "--client-fraction", 0.05], ["--secure-agg needs at least 2 clients per round"]),
    (FL + ["--secure-agg", "--secagg-threshold", 11], ["--secagg-threshold 11 must be at most the 10 share holders"]),
    (FL + ["--secure-agg", "--secagg-threshold", 1], ["--secagg-threshold 1 is below the 6 that 10 clients"]),
    (FL + ["--secure-agg", "--secagg-threshold", 5], ["--secagg-threshold 5 is below the 6"]),
    (FL + ["--dp-clip", 0, "--dp-noise", 1], ["--dp-clip", "must be positive"]),
    (FL + ["--dp-noise", -1], ["--dp-noise", "must be >= 0"]),
    (FL + ["--dp-epsilon", 0], ["--dp-epsilon", "must be positive"]),
    (FL + ["--dp-epsilon", 1, "--dp-delta", 1], ["--dp-delta", "(0, 1)"]),
    (FL + ["--dp-epsilon", 1e-9], ["--dp-epsilon 1e-09", "unreachable", "smallest epsilon reachable"]),
    (FL + ["--dp-noise", 1, "--dp-epsilon", 2], ["give --dp-noise or --dp-epsilon, not both"]),
    (FL + ["--dp-clip", 1], ["--dp-clip needs --dp-noise Z or --dp-epsilon E"]),
    (["--secure-agg"], ["--secure-agg is for --mode fl"]),
    (FL + ["--dp-sgd"], ["--dp-sgd is for --mode dp"]),
    (["--dp-clip", 1, "--dp-noise", 1], ["--dp-clip needs --dp-sgd in dp mode"]),
    (FL + ["--dropout-rate", 1], ["--dropout-rate", "[0, 1)"]),
])
def test_privacy_settings_that_cannot_work_exit_2_with_one_message(args, words):
    assert_clean_failure(run_hpcfl(2, *args), 2, *words)


DPSGD = ["--dp-sgd", "--dp-noise", 1.0, "--dp-noise-seed", 3, "--epochs", 2, "--batch-size", 512, "--lr", 0.5,
         "--quiet"]


def test_dp_sgd_resumes_bitwise_with_its_secret_seed_from_the_checkpoint(tmp_path):
    # a run reproduced from --dp-noise-seed, resumed without the option: the checkpoint holds the
    # seed (and that the run is seeded), so the batches and noise match; the ledger counts the
    # steps redone after the checkpoint once (the same releases), and epsilon is dp-accounting's
    import dp_accounting

    from hpcfl.privacy import accountant

    dirs = run_then_resume_without_seed(tmp_path, DPSGD, 150, extra=("--metrics", tmp_path / "m.jsonl"))
    a, b = (np.load(d / "model.npz")["params"] for d in dirs)
    assert np.array_equal(a, b)
    direct = dp_accounting.rdp.RdpAccountant(accountant.ORDERS)
    event = dp_accounting.PoissonSampledDpEvent(512 / 60000, dp_accounting.GaussianDpEvent(1.0))
    direct.compose(event, 2 * (60000 // 512))
    assert records(tmp_path / "m.jsonl")[-1]["dp_epsilon"] == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)


def test_dp_sgd_refuses_the_overlapped_allreduce():
    assert_clean_failure(run_hpcfl(2, "--dp-sgd", "--dp-noise", 1, "--allreduce", "overlap"), 2,
                         "--dp-sgd needs every layer's per-sample norms")


# ------------------------------------------- issue 25: secure DP runs reproduce and resume
SECURE_DP = ["--mode", "fl", "--secure-agg", "--dp-clip", 0.2, "--dp-noise", 1.0, "--dp-noise-seed", 7,
             "--seed", 3, "--quiet"]


def test_secure_dp_with_a_noise_seed_reproduces_bitwise_and_resumes_bitwise(tmp_path):
    for name in ("a", "b"):
        proc = run_hpcfl(2, *SECURE_DP, "--rounds", 3, "--out", tmp_path / name)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = (np.load(tmp_path / d / "model.npz")["params"] for d in ("a", "b"))
    assert np.array_equal(a, b)                       # every share derived from (seed, client, round)
    # SIGTERM on rank 1 in round 3: round 2's checkpoint, exit 75; resumed, the same model and epsilon
    proc = run_hpcfl(2, *SECURE_DP, "--rounds", 4, "--out", tmp_path / "whole", "--metrics", tmp_path / "w.jsonl")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_hpcfl(2, *SECURE_DP, "--rounds", 4, "--checkpoint-dir", tmp_path / "ck",
                     env={"HPCFL_FAULT": "term:1:3"})
    assert_clean_failure(proc, 75, "during round 3")
    proc = run_hpcfl(2, *SECURE_DP, "--rounds", 4, "--checkpoint-dir", tmp_path / "ck", "--resume",
                     "--out", tmp_path / "resumed", "--metrics", tmp_path / "r.jsonl")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = (np.load(tmp_path / d / "model.npz")["params"] for d in ("whole", "resumed"))
    assert np.array_equal(a, b)
    assert records(tmp_path / "r.jsonl")[-1]["dp_epsilon"] == records(tmp_path / "w.jsonl")[-1]["dp_epsilon"]


def test_secure_dp_shares_are_secret_without_a_seed_and_seed_derived_only_with_one(monkeypatch):
    # every rank, the server's included, holds the run's noise seed: a share keyed from it would
    # be the server's to remove. Without --dp-noise-seed no share is the seed-derived one; with
    # it, every share is (the positive control: the comparison can tell)
    import hpcfl
    from hpcfl.fl import secure
    from hpcfl.privacy import noise

    derived = []
    real = secure.SecureCollector.noise_share

    def spy(self, k):
        out = real(self, k)
        key = noise.derive_key(self.plan.noise_seed, "share", k, self.server_round)
        derived.append(bool(np.array_equal(out, noise.standard_normal(key, 0, self.n) * self.plan.share_std)))
        return out

    monkeypatch.setattr(secure.SecureCollector, "noise_share", spy)
    cfg = dict(mode="fl", secure_agg=True, dp_clip=0.2, dp_noise=1.0, rounds=1, num_clients=10,
               client_fraction=1.0, hidden=(16,), quiet=True)
    hpcfl.train(hpcfl.Config(**cfg))
    assert derived and not any(derived)
    derived.clear()
    hpcfl.train(hpcfl.Config(**cfg, dp_noise_seed=7))
    assert derived and all(derived)


def test_a_run_in_which_no_round_completes_fails_and_writes_no_model(tmp_path):
    proc = run_hpcfl(2, "--mode", "fl", "--secure-agg", "--dropout-rate", 0.9, "--secagg-max-dropout", 0.9,
                     "--rounds", 2, "--out", tmp_path / "out")
    assert_clean_failure(proc, 1, "no round completed in 2 round(s)", "clients survived")
    assert not (tmp_path / "out" / "model.npz").exists()


# ------------------------------------------------- issue 20's commands, as a user types them
@pytest.mark.parametrize("extra", [[], ["--dropout-rate", 0.1], ["--dp-colluders", 1]])
def test_secure_dp_epsilon_4_is_never_exceeded(tmp_path, extra):
    proc = run_hpcfl(2, "--mode", "fl", "--secure-agg", "--dp-epsilon", 4, "--rounds", 20, *extra, "--quiet",
                     "--metrics", tmp_path / "m.jsonl")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = records(tmp_path / "m.jsonl")
    assert recs and all(r["dp_epsilon"] <= 4 for r in recs)
    for r in recs:          # no exact count of the secret sample (clients, dropouts, bytes, loss)
        assert not {"clients", "dropped", "rejected", "samples_per_second", "bytes_to_server",
                    "train_loss", "dp_honest_shares"} & set(r)


def test_secagg_neighbors_below_bell_et_als_bound_exits_2_naming_it():
    assert_clean_failure(run_hpcfl(2, "--mode", "fl", "--secure-agg", "--secagg-neighbors", 2, "--num-clients", 100),
                         2, "--secagg-neighbors 2 is below Bell et al.'s bound", "2^-40")


@pytest.mark.parametrize("attack", ["empty-route", "key-swap", "lie-dropped", "split-graph", "route-drop"])
def test_every_server_attack_is_detected_and_learns_nothing(tmp_path, attack):
    proc = run_hpcfl(2, *FL, "--secure-agg", "--server-attack", attack, "--quiet", "--metrics", tmp_path / "m.jsonl")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = records(tmp_path / "m.jsonl")
    assert len(recs) == 2
    for r in recs:
        got = r["server_attack"]
        assert got["name"] == attack and got["detected"] and got["detected_by"]
        assert got["learned_individual"] is False and got["learned_partial"] is False
        assert got["colluders"] == 1 and got["words_recovered"] < 4      # ceil(0.05 x 10), never the target


@pytest.mark.parametrize("corrupt", ["0.05", "0"])
def test_route_drop_at_100_clients_a_round_learns_no_partial_sum(tmp_path, corrupt):
    # 100 clients a round: the complete graph with the admitted colluders (Bell et al.'s bound
    # against a server that names clients absent), the sparse graph (K = 16) without them, where
    # 58aac60's clients gave away the sums of arcs of the ring; a small model keeps it quick
    proc = run_hpcfl(2, "--mode", "fl", "--secure-agg", "--server-attack", "route-drop", "--num-clients", 100,
                     "--client-fraction", 1, "--hidden", 16, "--rounds", 1, "--secagg-corrupt-fraction", corrupt,
                     "--quiet", "--metrics", tmp_path / "m.jsonl")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (rec,) = records(tmp_path / "m.jsonl")
    got = rec["server_attack"]
    assert got["detected"] and not got["learned_individual"] and not got["learned_partial"]


# --------------------------------------------------------- issue 30: budgets that hold on resume
def test_finding_3_dp_sgd_resumed_for_more_epochs_stays_within_the_budget(tmp_path):
    # --dp-epsilon 1 for 1 epoch, resumed with --epochs 2: 58aac60 ended at epsilon 1.18. The
    # resumed run recalibrates z for the steps left, with the first attempt's as the prior
    ck = tmp_path / "ck"
    small = ["--dp-sgd", "--dp-epsilon", 1, "--dp-pca", 0, "--hidden", 16, "--batch-size", 8192]
    base = [*small, "--checkpoint-dir", ck, "--metrics", tmp_path / "m.jsonl"]
    proc = run_hpcfl(2, *base, "--epochs", 1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_hpcfl(2, *base, "--epochs", 2, "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    # the first epoch spent the budget: more than 4x the noise would be needed, so training
    # stops at the cap, with the model so far (exit 0), and says which
    assert "z stays, and training stops where the budget ends" in out and "training stops after step 7" in out
    recs = records(tmp_path / "m.jsonl")
    assert len(recs) == 2 and all(r["dp_epsilon"] <= 1.0 for r in recs) and "budget_stop" in recs[-1]
    # a resume with room left recalibrates instead: stopped after 1 of 2 planned epochs,
    # resumed for 3
    ck2 = tmp_path / "ck2"
    two = [*small, "--checkpoint-dir", ck2, "--metrics", tmp_path / "n.jsonl"]
    proc = run_hpcfl(2, *two, "--epochs", 2, env={"HPCFL_FAULT": "term:1:7"})
    assert_clean_failure(proc, 75, "after step 7")
    proc = run_hpcfl(2, *two, "--epochs", 3, "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "z recalibrated from" in proc.stdout + proc.stderr
    recs = records(tmp_path / "n.jsonl")
    assert recs[-1]["epoch"] == 3 and all(r["dp_epsilon"] <= 1.0 for r in recs) and recs[-1]["dp_epsilon"] > 0.99


def test_secure_dp_resumed_past_the_clients_budgets_stops_at_their_ledgers(tmp_path):
    # every client in every round (q 1), budget for 5 rounds; resumed for 10, the clients' own
    # ledgers (not the server) keep them out: round 6 is not released and training stops there,
    # exit 0, with the model of round 5 and no client past epsilon 4
    base = ["--mode", "fl", "--secure-agg", "--dp-epsilon", 4, "--num-clients", 20, "--client-fraction", 1,
            "--hidden", 16, "--checkpoint-dir", tmp_path / "ck", "--metrics", tmp_path / "m.jsonl", "--quiet"]
    proc = run_hpcfl(2, *base, "--rounds", 5)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_hpcfl(2, *base, "--rounds", 10, "--resume", "--out", tmp_path / "model")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "training stops with the model of round 5: the clients' own privacy budgets" in proc.stderr
    recs = records(tmp_path / "m.jsonl")
    assert [r["round"] for r in recs] == [1, 2, 3, 4, 5, 6] and recs[-1]["budget_stop"]
    assert all(r["skipped"] is None for r in recs[:5]) and recs[5]["test_accuracy"] is None
    assert max(r["dp_epsilon"] for r in recs) <= 4.0 and recs[4]["dp_epsilon"] > 3.99
    assert (tmp_path / "model" / "model.npz").is_file()


DPSGD_FRESH = ["--dp-sgd", "--dp-noise", 1.0, "--epochs", 2, "--batch-size", 4096, "--lr", 2.0, "--quiet",
               "--checkpoint-every", 1, "--keep-checkpoints", 2]


def direct_epsilon(steps, q=4096 / 60000, z=1.0):
    import dp_accounting

    from hpcfl.privacy import accountant

    acc = dp_accounting.rdp.RdpAccountant(accountant.ORDERS)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    return acc.get_epsilon(1e-5)


@pytest.mark.parametrize("seeded", [False, True])
def test_finding_4_a_redone_epoch_draws_fresh_noise_and_both_releases_are_composed(tmp_path, seeded):
    # a crash after epoch 2 was released but before its checkpoint: epoch 2's checkpoint is lost,
    # and the resumed run redoes epoch 2. Without a seed it draws fresh noise (the two releases
    # share no draw: their difference would be noise-free), and the ledger composes both; with
    # --dp-noise-seed the redone epoch is the same release, bitwise, and counts once
    seed = ["--dp-noise-seed", 5] if seeded else []
    ck = tmp_path / "ck"
    proc = run_hpcfl(2, *DPSGD_FRESH, *seed, "--checkpoint-dir", ck, "--out", tmp_path / "first")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = sorted(ck.glob("ckpt-*.npz"))[-1]
    last.unlink()                                   # lost in the crash
    proc = run_hpcfl(2, *DPSGD_FRESH, *seed, "--checkpoint-dir", ck, "--resume", "--out", tmp_path / "again",
                     "--metrics", tmp_path / "m.jsonl", "--overwrite")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = (np.load(tmp_path / d / "model.npz")["params"] for d in ("first", "again"))
    steps = 60000 // 4096
    eps = records(tmp_path / "m.jsonl")[-1]["dp_epsilon"]
    if seeded:
        assert np.array_equal(a, b) and eps == pytest.approx(direct_epsilon(2 * steps), rel=1e-9)
    else:
        assert not np.array_equal(a, b) and eps == pytest.approx(direct_epsilon(3 * steps), rel=1e-9)
    ledger = [json.loads(line) for line in (ck / "dp-ledger.jsonl").read_text().splitlines()]
    assert [e["start"] for e in ledger if "start" in e] == [0, 1]


def test_finding_4_a_seeded_resume_refuses_settings_that_change_its_releases(tmp_path):
    ck = tmp_path / "ck"
    proc = run_hpcfl(2, *DPSGD, "--checkpoint-dir", ck, env={"HPCFL_FAULT": "term:1:150"})
    assert_clean_failure(proc, 75, "after step 150")
    before = sorted(p.name for p in ck.iterdir())
    proc = run_hpcfl(2, *[a if a != 0.5 else 0.25 for a in DPSGD], "--checkpoint-dir", ck, "--resume")
    assert_clean_failure(proc, 2, "reproduced from --dp-noise-seed", "--lr 0.5 -> 0.25")
    assert sorted(p.name for p in ck.iterdir()) == before


def test_finding_5_central_dp_releases_noise_when_nobody_counts(monkeypatch):
    # Poisson sampling draws nobody in round 1: the round still releases (0 + noise) / qN, as the
    # accountant composes it; 58aac60 kept the model unchanged (an un-noised "nobody counted")
    import hpcfl
    from hpcfl.fl import partition

    real = partition.poisson_clients
    monkeypatch.setattr(partition, "poisson_clients",
                        lambda n, rate, r, seed, attempt=None: real(n, rate, r, seed, attempt)[:0] if r == 1 else
                        real(n, rate, r, seed, attempt))
    cfg = dict(mode="fl", num_clients=20, client_fraction=0.5, rounds=1, hidden=(16,), dp_clip=0.5, dp_noise=2.0,
               dp_noise_seed=3, server_opt="fedavg", server_lr=1.0, quiet=True)
    out = hpcfl.train(hpcfl.Config(**cfg))
    init = hpcfl.train(hpcfl.Config(**{**cfg, "rounds": 1, "dp_noise": 0.0, "dp_noise_seed": 3}))
    step = out.model.params.astype(np.float64) - init.model.params
    assert step.std() == pytest.approx(2.0 * 0.5 / (0.5 * 20), rel=0.05)    # z S / (q N), 10,506 draws
    assert out.history[0]["dp_epsilon"] > 0 and out.history[0]["skipped"] is None


def test_finding_8_under_secure_dp_no_message_names_a_client_or_counts_them(monkeypatch, capfd):
    # round 2 loses most of its clients after the key exchange: 58aac60 said "client 17 has 14
    # of its 21 share holders left"; under DP the message tells neither who nor how many
    import hpcfl
    from hpcfl.fl import partition

    def dropouts(clients, rate, server_round, seed):
        return set(np.asarray(clients)[:-3].tolist()) if server_round == 2 else set()

    monkeypatch.setattr(partition, "dropouts", dropouts)
    out = hpcfl.train(hpcfl.Config(mode="fl", secure_agg=True, dp_noise=1.0, dp_clip=0.2, num_clients=20,
                                   client_fraction=0.5, rounds=3, hidden=(16,), dp_noise_seed=1))
    assert out.history[1]["skipped"] and out.history[0]["skipped"] is None
    err = capfd.readouterr()
    text = err.out + err.err
    assert "round 2 skipped" in text
    rounds = "\n".join(line for line in text.splitlines() if re.search(r"round +\d", line))   # not the banner
    assert not re.search(r"client \d", rounds), rounds
    assert not re.search(r"\d+ (of|clients|survivors|share)", rounds), rounds
