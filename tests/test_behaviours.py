"""Behaviours a user relies on that had no test of their own (issue 36), each checked against a
computation of this file's: --target-accuracy, predict and fetch-data as commands, EMNIST's
archive, --secagg-range when it cuts, multi-krum / --krum-m and norm-bounded end to end, the
label-flipping, scaling and Gaussian attacks, hpcfl.train under mpirun with an mpi4py
communicator, StopTraining and handle_signals in fl, the HTTPS-only redirect, --log-file and
--schedule cosine through the command line."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from helpers import DATA_DIR, mpirun_cmd, needs_mnist, run_hpcfl

import hpcfl
from hpcfl import data
from hpcfl.data import catalogue, download
from hpcfl.fl import aggregators, attacks, collectors

pytestmark = needs_mnist
TINY = dict(hidden=(16,), quiet=True)


def test_target_accuracy_ends_training_at_the_first_unit_that_reaches_it(capfd):
    out = hpcfl.train(hpcfl.Config(epochs=6, batch_size=128, target_accuracy=0.9, hidden=(16,)))
    accs = [r["test_accuracy"] for r in out.history]
    assert accs[-1] >= 0.9 and all(a < 0.9 for a in accs[:-1]) and len(accs) < 6
    assert "reached the target accuracy 90.00%" in capfd.readouterr().out


def idx_bytes(images: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    return header + images.tobytes()


def test_predict_reads_idx_and_npy_and_agrees_with_the_model(tmp_path):
    hpcfl.train(hpcfl.Config(max_steps=100, batch_size=128, out=str(tmp_path / "model"), **TINY))
    model = hpcfl.load_model(tmp_path / "model")
    images = hpcfl.load_dataset("mnist").test_images[:40]
    np.save(tmp_path / "x.npy", images)
    (tmp_path / "x-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    want = model.predict(images).tolist()
    for name in ("x.npy", "x-idx3-ubyte.gz"):
        proc = run_hpcfl(1, "predict", "--model", tmp_path / "model", tmp_path / name)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert [int(v) for v in proc.stdout.split()] == want


def test_fetch_data_verifies_what_is_there_and_names_a_damaged_file(tmp_path):
    # files already in --data-dir are not downloaded again: fetch-data checks their content
    # (MNIST's published SHA-256) and builds the cache; a flipped label is named
    import shutil

    shutil.copytree(DATA_DIR, tmp_path / "d")
    env = {"HPCFL_CACHE_DIR": str(tmp_path / "c"), "HPCFL_MNIST_URLS": (tmp_path / "void").as_uri() + "/"}
    proc = run_hpcfl(1, "fetch-data", "--data-dir", tmp_path / "d", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    labels = tmp_path / "d" / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[8 + 5] = (raw[8 + 5] + 1) % 10                       # still a valid label: only the hash can tell
    labels.write_bytes(gzip.compress(bytes(raw)))
    env["HPCFL_CACHE_DIR"] = str(tmp_path / "c2")
    proc = run_hpcfl(1, "fetch-data", "--data-dir", tmp_path / "d", env=env)
    assert proc.returncode == hpcfl.DataError.exit_code and "t10k-labels-idx1-ubyte" in proc.stderr
    assert "SHA-256" in proc.stderr and proc.stderr.count("hpcfl: error") == 1


def test_emnist_comes_out_of_its_archive(tmp_path):
    spec = catalogue.get("emnist-digits")
    rng = np.random.default_rng(0)                # a small stand-in archive with EMNIST's layout
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in spec.file_names:
            z.writestr(f"gzip/{name}.gz", gzip.compress(idx_bytes(rng.integers(0, 255, (3, 4, 4), dtype=np.uint8))))
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "gzip.zip").write_bytes(buf.getvalue())
    md5 = hashlib.md5(buf.getvalue()).hexdigest()
    local = dataclasses.replace(spec, archive=((tmp_path / "srv" / "gzip.zip").as_uri(), md5, "gzip"))
    data.fetch(tmp_path / "d", spec=local)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        for name in spec.file_names:
            assert (tmp_path / "d" / f"{name}.gz").read_bytes() == z.read(f"gzip/{name}.gz")
    bad = dataclasses.replace(local, archive=(local.archive[0], "0" * 32, "gzip"))
    with pytest.raises(hpcfl.DataError, match="download failed"):
        data.fetch(tmp_path / "e", spec=bad)


def test_a_redirect_away_from_https_is_refused():
    import urllib.request

    handler = download.https_redirects()
    req = urllib.request.Request("https://example.org/mnist.gz")
    with pytest.raises(ValueError, match="refusing http: downloads use HTTPS only"):
        handler.redirect_request(req, None, 302, "Found", {}, "http://example.org/mnist.gz")
    assert handler.redirect_request(req, None, 302, "Found", {}, "https://mirror.example/m.gz") is not None


FL = dict(mode="fl", num_clients=10, client_fraction=1.0, rounds=1, server_opt="fedavg", server_lr=1.0,
          local_batch_size=50, **TINY)


def test_secagg_range_clips_what_it_must_and_counts_it():
    # a range far below the real updates: every coordinate that moved more is cut to +-R, the
    # count is in the record, and the model moves by at most R (the mean of clipped updates)
    r = 1e-3
    init = hpcfl.train(hpcfl.Config(**{**FL, "local_lr": 1e-30}))
    out = hpcfl.train(hpcfl.Config(**FL, secure_agg=True, secagg_range=r))
    step = out.model.params.astype(np.float64) - init.model.params
    assert out.history[0]["secagg_clipped"] > 1000
    assert np.abs(step).max() <= r + 1e-7 and np.abs(step).max() > 0.9 * r     # (float32 weights)


def recorded(monkeypatch, cls):
    """{client: (its delta, n_k), "global": the round's global model} of each run: call the
    returned function to start recording a new run."""
    runs = []
    add = cls.add

    def recording(self, update):
        runs[-1][update.client] = (update.params.astype(np.float64) - self.global_w, update.num_examples)
        runs[-1]["global"] = self.global_w.copy()
        add(self, update)
    monkeypatch.setattr(cls, "add", recording)

    def new_run():
        runs.append({})
        return runs[-1]
    return new_run


@pytest.mark.parametrize("extra", [dict(aggregator="multi-krum", byzantine=2, krum_m=4),
                                   dict(aggregator="norm-bounded", max_update_norm=0.05)])
def test_robust_rules_end_to_end_are_their_pure_functions_on_the_updates(monkeypatch, extra):
    cls = collectors.GatheredCollector if extra["aggregator"] == "multi-krum" else collectors.PlainCollector
    seen = recorded(monkeypatch, cls)()
    out = hpcfl.train(hpcfl.Config(**FL, **extra))
    clients = sorted(k for k in seen if k != "global")
    deltas = np.stack([seen[k][0] for k in clients])
    if extra["aggregator"] == "multi-krum":
        deltas = deltas.astype(np.float32)               # what the clients send under the robust rules
    want = seen["global"] + aggregators.aggregate(extra["aggregator"], deltas, np.array([seen[k][1] for k in clients]),
                                                   f=extra.get("byzantine", 0), m_select=extra.get("krum_m"),
                                                   max_norm=extra.get("max_update_norm"))
    np.testing.assert_allclose(out.model.params, want, rtol=0, atol=1e-6)
    mean = seen["global"] + aggregators.mean(deltas, [seen[k][1] for k in clients])
    assert np.abs(mean - want).max() > 1e-4                     # the rule is not the mean


@pytest.mark.parametrize("kind", ["labelflip", "scale", "gaussian"])
def test_each_attack_changes_what_the_malicious_clients_send(monkeypatch, kind):
    run = recorded(monkeypatch, collectors.PlainCollector)
    seen = run()
    cfg = dict(**FL, attack=kind, malicious_fraction=0.3, seed=4)
    hpcfl.train(hpcfl.Config(**cfg))
    bad = set(attacks.malicious_clients(10, 0.3, 4).tolist())
    assert len(bad) == 3
    clean = run()
    hpcfl.train(hpcfl.Config(**{k: v for k, v in cfg.items() if k not in ("attack", "malicious_fraction")}))
    for k in range(10):
        gap = np.abs(seen[k][0] - clean[k][0]).max()
        assert (gap > 1e-3) if k in bad else (gap == 0), (kind, k, gap)
    if kind == "scale":                                  # lambda x the honest delta, exactly
        k = min(bad)
        np.testing.assert_allclose(seen[k][0], 10.0 * clean[k][0], rtol=1e-5, atol=1e-7)


def test_train_under_mpirun_with_an_mpi4py_communicator(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        "from mpi4py import MPI\nimport hpcfl\n"
        "comm = MPI.COMM_WORLD.Dup()\n"
        "r = hpcfl.train(hpcfl.Config(max_steps=30, batch_size=128, hidden=(16,), quiet=True), comm=comm)\n"
        f"open(f'{tmp_path}/rank{{comm.Get_rank()}}', 'w').write(f'{{comm.Get_size()}} {{r.test_accuracy}} '\n"
        "                                                    f'{float(r.model.params.sum())}')\n")
    proc = subprocess.run([*mpirun_cmd(2), sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HPCFL_DATA_DIR": str(DATA_DIR)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = ((tmp_path / f"rank{r}").read_text().split() for r in (0, 1))
    assert a[0] == "2" and a == b                     # two ranks, one job, the same result on both


def test_stop_training_and_handle_signals_in_fl(tmp_path):
    seen = []

    def stop_at_two(record):
        seen.append(record["round"])
        if record["round"] == 2:
            raise hpcfl.StopTraining("enough")

    out = hpcfl.train(hpcfl.Config(**{**FL, "rounds": 5}), callbacks=[stop_at_two])
    assert seen == [1, 2] and [r["round"] for r in out.history] == [1, 2]

    def term_at_one(record):                  # SIGTERM during the run: a checkpoint, then Preempted
        if record["round"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    from hpcfl.runtime import preempt

    try:
        with pytest.raises(hpcfl.Preempted, match="run again with resume=True to continue"):
            hpcfl.train(hpcfl.Config(**{**FL, "rounds": 5, "checkpoint_dir": str(tmp_path / "ck")}),
                        callbacks=[term_at_one], handle_signals=True)
        assert sorted(p.name for p in (tmp_path / "ck").glob("ckpt-*.npz"))
        # the process is on its way out: hpcfl's handler stays, so that a second signal cannot
        # kill it before it exits with its code (preempt.handling)
        assert signal.getsignal(signal.SIGTERM) is preempt._handler
    finally:
        preempt.uninstall()              # the test process as it was, whatever failed above


def test_log_file_and_the_cosine_schedule_through_the_command_line(tmp_path):
    common = ["--max-steps", 40, "--batch-size", 128, "--hidden", 16, "--seed", 1]
    proc = run_hpcfl(2, *common, "--schedule", "cosine", "--log-file", tmp_path / "run.log", "--out", tmp_path / "c")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (tmp_path / "run.log").read_text()
    assert "epoch   1" in log and "final test accuracy" in log
    assert json.loads((tmp_path / "c" / "config.json").read_text())["schedule"] == "cosine"
    proc = run_hpcfl(2, *common, "--schedule", "constant", "--out", tmp_path / "k")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = (np.load(tmp_path / d / "model.npz")["params"] for d in ("c", "k"))
    assert not np.array_equal(a, b)                  # the schedule changed the steps
