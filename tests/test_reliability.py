"""Faults, launch mistakes and bad values: each ends in one clear message, the same exit code on
every rank, within seconds, and leaves every file that existed before byte for byte as it was.
The numbers in the comments are the cases of the reliability issue (README: When things go wrong)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    DATA_DIR,
    ROOT,
    assert_clean_failure,
    launcher_rank_var,
    mpirun_cmd,
    needs_mnist,
    open_mpi,
    run_hpcfl,
)

from hpcfl import data
from hpcfl.config import Config
from hpcfl.errors import HpcflError
from hpcfl.io import checkpoint, locks

pytestmark = needs_mnist
SHORT = ["--max-steps", 20, "--quiet"]


def snapshot(folder: Path) -> dict:
    """Every file below folder, with its bytes (lock files of finished runs are gone anyway)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def timed(n, *args, env=None, timeout=120):
    t0 = time.monotonic()
    proc = run_hpcfl(n, *args, env=env, timeout=timeout)
    return proc, time.monotonic() - t0


# ---------------------------------------------------------------- 1. outputs only after every check

def test_1_refused_runs_leave_metrics_and_checkpoints_as_they_were(tmp_path):
    r = tmp_path / "r"
    outputs = ["--checkpoint-dir", r / "ck", "--metrics", r / "m.jsonl", "--out", r / "out"]
    proc = run_hpcfl(2, *SHORT, *outputs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    before = snapshot(r)
    assert "m.jsonl" in before and before["m.jsonl"]
    for base, args, code, words in [
        (SHORT, [], 2, ["holds the results of an earlier run", "--overwrite"]),
        (SHORT, ["--overwrite"], 2, ["already holds checkpoints", "--resume"]),
        (SHORT, ["--overwrite", "--batch-size", 60001], 2, ["--batch-size 60001 is larger than the training set"]),
        (["--quiet"], ["--overwrite", "--mode", "fl", "--partition", "dirichlet", "--alpha", 0.001,
                       "--num-clients", 2000], 2, ["get no data"]),
        (SHORT, ["--overwrite", "--hidden", "100000,100000"], 2, ["--hidden", "GiB"]),
        (["--quiet"], ["--resume", "--max-steps", 5], 2, ["at step 20", "past this run's last step 5"]),
    ]:
        proc = run_hpcfl(2, *base, *outputs, *args)
        assert_clean_failure(proc, code, *words)
        assert "epoch " not in proc.stdout, args      # refused before any training, not after it
        assert snapshot(r) == before, args          # byte for byte, and no new file


def test_1_4_a_second_run_on_the_outputs_of_a_running_one_is_refused(tmp_path):
    outputs = ["--checkpoint-dir", tmp_path / "ck", "--metrics", tmp_path / "m.jsonl"]
    first = subprocess.Popen([*mpirun_cmd(2), sys.executable, "-m", "hpcfl", "--epochs", "100", "--quiet",
                              *map(str, outputs)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "m.jsonl").exists() or not (tmp_path / "m.jsonl").read_text():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.2)
        written = (tmp_path / "m.jsonl").read_text()
        proc, seconds = timed(2, *SHORT, *outputs, "--resume")
        assert_clean_failure(proc, 2, "--checkpoint-dir", "in use by another run", "pid", "lock file")
        assert seconds < 60          # liveness: refused at once, not after waiting for the lock
        assert first.poll() is None                                    # still training
        assert (tmp_path / "m.jsonl").read_text().startswith(written)   # not truncated
    finally:
        first.send_signal(signal.SIGUSR1)                              # stop it: checkpoint, exit 75
        out, _ = first.communicate(timeout=120)
    assert first.returncode == 75, out
    assert (tmp_path / "m.jsonl").read_text().startswith(written)
    assert not list(tmp_path.rglob(locks.NAME)) and not list(tmp_path.glob(f".*{locks.NAME}"))


def test_4_two_runs_started_together_on_the_same_outputs_never_mix(tmp_path):
    outputs = ["--checkpoint-dir", tmp_path / "ck", "--metrics", tmp_path / "m.jsonl", "--out", tmp_path / "out"]
    procs = [subprocess.Popen([*mpirun_cmd(1), sys.executable, "-m", "hpcfl", "--max-steps", "200", "--quiet",
                               "--seed", str(seed), *map(str, outputs)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for seed in (1, 2)]
    results = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(out for code, out in results if code == 2)
    assert "in use by another run" in refused and refused.count("hpcfl: error") == 1
    winner = 1 + [code for code, _ in results].index(0)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["seed"] == winner
    assert checkpoint.load(checkpoint.list_checkpoints(tmp_path / "ck")[-1]).config["seed"] == winner
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 1


def test_4_a_stale_lock_of_a_dead_run_is_taken_over(tmp_path):
    (tmp_path / "ck").mkdir()
    dead = {"host": os.uname().nodename, "pid": 2 ** 22 - 3, "pid_start": "1", "started": "long ago"}
    (tmp_path / "ck" / locks.NAME).write_text(json.dumps(dead))
    proc = run_hpcfl(2, *SHORT, "--checkpoint-dir", tmp_path / "ck")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "taking over the lock" in proc.stderr and "not running" in proc.stderr
    assert not (tmp_path / "ck" / locks.NAME).exists()             # released at the end


def test_4_requeue_of_the_same_slurm_job_takes_its_lock_back(monkeypatch):
    theirs = {"host": "n1", "pid": 7, "slurm_job_id": "42", "slurm_restart": 0}
    assert locks.stale_reason(theirs, {"host": "n2", "pid": 9, "slurm_job_id": "42", "slurm_restart": 1})
    # another job's lock on another host: taken over only once SLURM says that job has ended
    # (with a real SLURM up, as in CI, job 42 does not exist; without one nothing is known)
    other = {"host": "n2", "pid": 9, "slurm_job_id": "43", "slurm_restart": 1}
    for alive, stale in ((True, False), (None, False), (False, True)):
        monkeypatch.setattr(locks, "_slurm_job_alive", lambda job, alive=alive: alive)
        assert bool(locks.stale_reason(theirs, other)) is stale, alive


# ---------------------------------------------------------------- 2. checks that can differ between ranks

@pytest.fixture
def broken_numba(tmp_path):
    d = tmp_path / "nn" / "numba"
    d.mkdir(parents=True)
    (d / "__init__.py").write_text('raise ImportError("broken numba")\n')
    return d.parent


def rank1_with_broken_numba(nn, *args):
    var = launcher_rank_var()
    script = (f'if [ "${var}" = 1 ]; then export PYTHONPATH={nn}; fi; '
              f'exec {sys.executable} -m hpcfl {" ".join(map(str, args))}')
    t0 = time.monotonic()
    proc = subprocess.run([*mpirun_cmd(2), "sh", "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, time.monotonic() - t0


def test_2_a_backend_missing_on_one_rank_is_one_message_naming_it(broken_numba):
    proc, seconds = rank1_with_broken_numba(broken_numba, "--backend", "numba", "--max-steps", 5)
    assert_clean_failure(proc, 2, "backend 'numba' is not usable", "broken numba", "on rank 1 of 2")
    assert seconds < 60          # liveness: every rank ends, none waits forever for rank 1


def test_2_backend_auto_resolves_to_one_backend_for_the_whole_job(broken_numba):
    proc, _ = rank1_with_broken_numba(broken_numba, "--max-steps", 5)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "backend numpy" in out and "--backend auto: using numpy on every rank" in out


# ---------------------------------------------------------------- 3. the stall watchdog

def test_3_a_stopped_rank_ends_the_job_after_the_stall_timeout():
    proc, seconds = timed(4, "--epochs", 5, "--quiet", "--stall-timeout", 5,
                          env={"HPCFL_FAULT": "stop:2:30"}, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert out.count("made no progress") == 1 and "--stall-timeout 5" in out, out
    assert "Traceback" not in out
    assert seconds < 45                     # liveness: start-up, 30 steps, 5 s of stall and the abort, no hang


# ---------------------------------------------------------------- 4. launch check

@pytest.mark.parametrize("var", ["SLURM_STEP_NUM_TASKS", "FOREIGN_SIZE"])
def test_4_processes_launched_apart_are_refused(tmp_path, var):
    if var == "FOREIGN_SIZE":                # the variable the other MPI's launcher would set
        var = "PMI_SIZE" if open_mpi() else "OMPI_COMM_WORLD_SIZE"
    env = {k: v for k, v in os.environ.items() if k not in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")}
    env[var] = "4"
    proc = subprocess.run([sys.executable, "-m", "hpcfl", "--max-steps", "5", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60, env=env)
    assert_clean_failure(proc, 2, f"{var}=4", "MPI sees a world of 1",
                         "srun --mpi=pmi2" if var == "SLURM_STEP_NUM_TASKS" else "another MPI library")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- 5. resume rules

FLR = ["--mode", "fl", "--num-clients", 20, "--client-fraction", 0.3, "--partition", "dirichlet",
       "--alpha", 0.5, "--quiet"]


def test_5_fl_resume_refuses_changed_data_settings(tmp_path):
    proc = run_hpcfl(2, *FLR, "--rounds", 2, "--checkpoint-dir", tmp_path / "ck")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    before = snapshot(tmp_path)
    for change, flag in [(["--alpha", 50], "--alpha 0.5"), (["--seed", 1], "--seed 0"),
                         (["--client-fraction", 0.5], "--client-fraction 0.3")]:
        proc = run_hpcfl(2, *FLR, "--rounds", 3, "--checkpoint-dir", tmp_path / "ck", "--resume", *change)
        assert_clean_failure(proc, 2, flag, "use the same settings")
        assert snapshot(tmp_path) == before
    # --optimizer means nothing in fl mode: refused by name (not silently ignored), the
    # checkpoints as they were
    proc = run_hpcfl(2, *FLR, "--rounds", 3, "--checkpoint-dir", tmp_path / "ck", "--resume",
                     "--optimizer", "adam")
    assert_clean_failure(proc, 2, "--optimizer applies to --mode dp only", "--server-opt")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- 6. values that can work

@pytest.mark.parametrize("args, words", [
    (["--momentum", "inf"], ["--momentum", "must be in [0, 1)"]),
    (["--momentum", "1"], ["--momentum", "must be in [0, 1)"]),
    (["--weight-decay", "inf"], ["--weight-decay", "finite"]),
    (["--mu", "inf"], ["--mu", "finite"]),
    (["--server-lr", "inf"], ["--server-lr", "finite"]),
    (["--lr", "1e400"], ["--lr", "finite"]),
    (["--stall-timeout", "-1"], ["--stall-timeout"]),
    (["--metrics", "."], ["--metrics .", "is a folder"]),
])
def test_6_values_that_cannot_work_are_usage_errors(args, words):
    proc = run_hpcfl(2, *args)
    assert_clean_failure(proc, 2, *words)
    assert "epoch " not in proc.stdout                 # refused before any training


def test_6_fedadam_trains_with_its_own_default_server_lr():
    proc = run_hpcfl(2, "--mode", "fl", "--server-opt", "fedadam", "--rounds", 3, "--num-clients", 20,
                     "--client-fraction", 0.5, "--quiet")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert float(out.split("final test accuracy ")[1].split("%")[0]) > 90


def test_6_a_diverging_server_names_the_server_learning_rate():
    proc = run_hpcfl(2, "--mode", "fl", "--server-lr", "1e30", "--rounds", 4, "--num-clients", 20, "--quiet")
    assert_clean_failure(proc, 1, "--server-lr")
    assert "--local-lr" not in proc.stderr


def test_6_a_local_batch_larger_than_every_client_is_full_batch_and_cheap():
    # cheap in memory: the buffers hold the largest client, not the asked batch (no speed is
    # asserted: that is for benchmarks)
    from hpcfl.config import Config
    from hpcfl.training import federated

    proc = run_hpcfl(2, "--mode", "fl", "--local-batch-size", 100000000, "--rounds", 2, "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cfg = Config(mode="fl", local_batch_size=100000000, ranks_per_client=2)
    assert federated.max_local_batch(cfg, np.array([600, 550, 610])) == 305


def test_6_threads_above_the_cores_are_capped_with_a_warning():
    proc = run_hpcfl(2, "--threads", 1000, *SHORT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cores = len(os.sched_getaffinity(0))
    assert proc.stderr.count(f"--threads 1000 is more than the {cores} core") == 1


# ---------------------------------------------------------------- 7. the data cache

@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCFL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def only_cache(root: Path) -> Path:
    (found,) = [p for p in root.iterdir() if not p.name.startswith(".")]
    return found


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_7_a_damaged_cache_is_rebuilt_once_with_a_warning(own_cache, damage):
    proc = run_hpcfl(2, *SHORT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    images = only_cache(own_cache) / "train_x.npy"
    good = images.read_bytes()
    blob = bytearray(good)
    if damage == "flip":
        for i in np.random.default_rng(0).choice(len(blob) - 200, 100, replace=False):
            blob[200 + i] ^= 0xFF
    else:
        blob = blob[: len(blob) // 2]
    images.write_bytes(bytes(blob))
    proc, seconds = timed(2, *SHORT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.count("is damaged") == 1 and "rebuilding it" in proc.stderr
    assert (only_cache(own_cache) / "train_x.npy").read_bytes() == good
    proc = run_hpcfl(2, *SHORT)                      # intact again: no warning
    assert proc.returncode == 0 and "damaged" not in proc.stderr


def test_7_cache_folders_follow_the_umask_and_old_ones_are_pruned(own_cache, tmp_path):
    src = tmp_path / "mnist"
    shutil.copytree(DATA_DIR, src)
    own_cache.mkdir()
    stale = own_cache / ".mnist-v2-0000.tmp-crashed"
    stale.mkdir()
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    fresh = own_cache / ".mnist-v2-0000.tmp-running"
    fresh.mkdir()
    old = os.umask(0o002)
    try:
        first = data.prepare_cache(src)
        assert (first.stat().st_mode & 0o777) == 0o775          # not mkdtemp's 0700
        assert (first / "train_x.npy").stat().st_mode & 0o777 == 0o664
        assert not stale.exists() and fresh.exists()            # only temp folders older than a day
        img = src / "train-images-idx3-ubyte.gz"
        os.utime(img, (img.stat().st_atime, img.stat().st_mtime + 10))   # a new version of the source
        second = data.prepare_cache(src)
    finally:
        os.umask(old)
    assert second != first and not first.exists()                # the superseded cache is gone
    assert data.verify_cache(second) is None


def test_7_a_cache_that_a_rank_cannot_see_says_the_folder_must_be_shared(tmp_path):
    with pytest.raises(HpcflError, match="shared by every node"):
        data.open_cache(tmp_path / "cache" / "mnist-v2-1234")


# ---------------------------------------------------------------- 8. fault injection only in tests

def test_8_a_fault_left_in_the_environment_is_ignored_without_the_test_switch():
    proc = run_hpcfl(2, *SHORT, env={"HPCFL_FAULT": "nan:0:3", "HPCFL_TESTING": "0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.count("HPCFL_FAULT=nan:0:3 is ignored") == 1


def test_8_a_malformed_fault_is_a_usage_error():
    assert_clean_failure(run_hpcfl(2, *SHORT, env={"HPCFL_FAULT": "nan:zero"}), 2, "HPCFL_FAULT", "KIND:RANK:STEP")


# ---------------------------------------------------------------- 9. checkpoints

def test_9_an_unreadable_checkpoint_stops_the_run_instead_of_resuming_an_older_one(tmp_path):
    proc = run_hpcfl(2, *SHORT, "--checkpoint-dir", tmp_path / "ck")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (tmp_path / "ck" / "ckpt-000000030.npz").mkdir()        # reading it fails with an OS error
    proc = run_hpcfl(2, "--max-steps", 40, "--quiet", "--checkpoint-dir", tmp_path / "ck", "--resume")
    assert_clean_failure(proc, 1, "cannot read the checkpoint", "ckpt-000000030.npz")


def test_9_rotation_never_deletes_a_newer_checkpoint_and_its_failure_is_a_warning(tmp_path, monkeypatch, capsys):
    cfg = Config(checkpoint_dir=str(tmp_path), keep_checkpoints=1)
    params = {"params": np.zeros(4, np.float32)}
    checkpoint.save(tmp_path, cfg, {"step": 468}, params)
    checkpoint.save(tmp_path, cfg, {"step": 100}, params)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt-000000100.npz", "ckpt-000000468.npz"]

    def refuse(self, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "unlink", refuse)
    assert checkpoint.save(tmp_path, cfg, {"step": 600}, params).name == "ckpt-000000600.npz"
    assert "could not be removed" in capsys.readouterr().err


def test_9_the_model_is_written_even_when_the_final_checkpoint_cannot_be(tmp_path, monkeypatch):
    from hpcfl import api

    real_save = checkpoint.save

    def disk_full(directory, cfg, meta, arrays):
        raise HpcflError(f"{directory}: cannot write the checkpoint (No space left on device)")

    monkeypatch.setattr(checkpoint, "save", disk_full)
    cfg = Config(max_steps=10, backend="numba", quiet=True, checkpoint_dir=str(tmp_path / "ck"),
                 out=str(tmp_path / "out"), data_dir=str(DATA_DIR))
    with pytest.raises(HpcflError, match="No space left"):
        api.train(cfg)
    assert (tmp_path / "out" / "model.npz").is_file()
    monkeypatch.setattr(checkpoint, "save", real_save)


# ---------------------------------------------------------------- 10. signals

def test_10_the_signal_handlers_are_in_place_before_mpi_init():
    code = ("import signal, sys\n"
            "import hpcfl.cli as cli, hpcfl.parallel.comm as comm\n"
            "comm.run_main = lambda fn, *a: print(signal.getsignal(signal.SIGTERM).__name__,"
            " signal.getsignal(signal.SIGUSR1).__name__, 'mpi4py.MPI' in sys.modules) or 0\n"
            "cli.main(['--max-steps', '1'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["_handler", "_handler", "False"], out.stdout + out.stderr


def test_10_fl_a_signal_on_one_rank_stops_every_client_group_within_a_local_step(tmp_path):
    # two client groups, one client each, 40 local epochs per round (several seconds); SIGTERM on
    # rank 1 alone at the start of round 2: rank 0's group hears of it through the stop notice
    args = ["--mode", "fl", "--num-clients", 10, "--client-fraction", 0.2, "--local-epochs", 40,
            "--rounds", 4, "--checkpoint-dir", tmp_path / "ck"]
    proc = run_hpcfl(2, *args, env={"HPCFL_FAULT": "term:1:2"}, timeout=300)
    assert_clean_failure(proc, 75, "during round 2", "ckpt-000000001.npz")
    round_1 = float(proc.stdout.split("round    1")[1].split(" s ")[0].split()[-1])
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "ck")] == ["ckpt-000000001.npz"]
    # the time from the signal to the exit, against a whole round: well under it
    t0 = time.monotonic()
    proc = run_hpcfl(2, *args[:-2], env={"HPCFL_FAULT": "term:1:1"}, timeout=300)
    assert proc.returncode == 75
    assert time.monotonic() - t0 < 15 + 0.5 * round_1


# ---------------------------------------------------------------- 11. security

def test_11_metrics_never_follow_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "m.jsonl").symlink_to(victim)
    proc = run_hpcfl(2, *SHORT, "--metrics", tmp_path / "m.jsonl")
    assert_clean_failure(proc, 2, "symbolic link")
    assert victim.read_text() == "precious\n"


def lib_sh(tmp_path, env: dict, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "t.sh"
    script.write_text(f"source {ROOT / 'jobs' / 'lib.sh'}\n{body}\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HPCFL_"))}
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                          env={**clean, "HPCFL_RUNS": str(tmp_path / "runs"), **env}, cwd=tmp_path)


def test_11_job_knobs_are_integers_and_hpcfl_args_are_never_evaluated(tmp_path):
    planted = tmp_path / "pwned"
    proc = lib_sh(tmp_path, {"HPCFL_MAX_REQUEUES": f"a[$(touch {planted})]"}, "echo reached")
    assert proc.returncode == 2 and "HPCFL_MAX_REQUEUES must be a non-negative integer" in proc.stdout
    assert "reached" not in proc.stdout and not planted.exists()
    proc = lib_sh(tmp_path, {"HPCFL_ARGS": f"--data-dir '/my data' $(touch {planted}) --lr 0.1"},
                  'printf "<%s>\\n" "${EXTRA_ARGS[@]}"')
    assert proc.stdout.splitlines() == ["<--data-dir>", "</my data>", "<$(touch>", f"<{planted})>",
                                        "<--lr>", "<0.1>"]
    assert not planted.exists()
    proc = lib_sh(tmp_path, {"HPCFL_ARGS": "--x 'unbalanced"}, "echo reached")
    assert proc.returncode == 2 and "reached" not in proc.stdout


def test_11_downloads_are_https_only_capped_and_bounded_in_time(tmp_path):
    with pytest.raises(ValueError, match="HTTPS only"):
        data.download._download("http://example.org/x.gz", tmp_path / "x.gz", "0" * 32, 5, time.monotonic() + 5)
    big = tmp_path / "big.gz"
    big.write_bytes(b"\0" * (3 << 20))
    with pytest.raises(ValueError, match="larger than 1 MiB"):
        data.download._download(big.as_uri(), tmp_path / "y.gz", "0" * 32, 5, time.monotonic() + 5, limit=1 << 20)
    with pytest.raises(ValueError, match="not done within"):
        data.download._download(big.as_uri(), tmp_path / "z.gz", "0" * 32, 5, time.monotonic() - 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.gz"]     # nothing half-written
    assert all(url.startswith("https://") for spec in data.CATALOGUE.values() for url in spec.urls)


@pytest.mark.skipif(os.geteuid() != 0, reason="slurm-up.sh runs as root only")
def test_11_slurm_up_refuses_to_touch_a_slurm_it_did_not_start(tmp_path):
    (tmp_path / "slurm.conf").write_text("ClusterName=production\n")
    for script in ("slurm-up.sh", "slurm-down.sh"):
        proc = subprocess.run(["bash", str(ROOT / ".ci" / script)], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "SLURM_UP_ETC": str(tmp_path)})
        assert proc.returncode == 3, proc.stderr
        assert "was not written by" in proc.stderr
    assert (tmp_path / "slurm.conf").read_text() == "ClusterName=production\n"


# ---------------------------------------------------------------- 12. Open MPI as well as MPICH

def test_12_info_names_the_mpi_library_without_a_nul_byte():
    proc = run_hpcfl(2, "info")
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("MPI: "))
    assert "\0" not in proc.stdout and ("Open MPI" in line if open_mpi() else "MPICH" in line), line
