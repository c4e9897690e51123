"""The batch scripts in jobs/, submitted for real to a SLURM cluster (CI: the single-node cluster
that .ci/slurm-up.sh starts on the test machine), with small settings so each runs in seconds.

All jobs are submitted at once and share the node; one of them is preempted with SIGUSR1
(as `#SBATCH --signal=B:USR1@...` would do before the time limit), requeues itself and resumes.
A requeued job may start again only after the credential lifetime (cred_expire, 30 s in CI).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import DATA_DIR, ROOT, needs_mnist


def cluster_answers() -> bool:
    if not shutil.which("sbatch"):
        return False
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "UP" in ping.stdout


pytestmark = [
    needs_mnist,
    pytest.mark.skipif(not cluster_answers(), reason="no SLURM cluster here (sbatch missing or "
                       "`scontrol ping` not UP); .ci/run starts one with .ci/slurm-up.sh"),
]

JOBS = ROOT / "jobs"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
DEADLINE_S = 240


class Job:
    def __init__(self, folder: Path, script: str, *options: str, **env: str):
        self.folder, self.script = folder, script
        full_env = {**os.environ, "HPCFL_PYTHON": sys.executable, "HPCFL_DATA_DIR": str(DATA_DIR),
                    "PYTHONUNBUFFERED": "1", **env}
        # --overcommit: two ranks even where the node has a single CPU
        proc = subprocess.run(["sbatch", "--parsable", "--overcommit", *options, str(JOBS / script)], cwd=folder,
                              env=full_env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"sbatch {script}: {proc.stderr}"
        self.id = proc.stdout.strip().split(";")[0]
        self.info: dict = {}

    def poll(self) -> dict:
        out = subprocess.run(["scontrol", "show", "job", "-o", self.id], capture_output=True,
                             text=True, timeout=30).stdout
        self.info = dict(re.findall(r"(\w+)=(\S*)", out))
        return self.info

    @property
    def done(self) -> bool:
        return self.info.get("JobState") in TERMINAL

    @property
    def log(self) -> str:
        name = self.script.replace(".sbatch", "")
        path = self.folder / f"hpcfl-{name}-{self.id}.out"
        return path.read_text() if path.exists() else ""

    @property
    def run_dir(self) -> Path:
        return self.folder / "runs" / self.id

    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]

    def describe(self) -> str:
        return f"job {self.id} ({self.script}): {self.info}\n--- log ---\n{self.log}"


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Submit every job, preempt one once it trains, and wait until all have ended."""
    folder = tmp_path_factory.mktemp("slurm")
    small = "--epochs 1 --batch-size 1000"                       # 60 steps
    submitted = {
        "dp-cpu": Job(folder, "dp-cpu.sbatch", "-n", "2", HPCFL_ARGS=small),
        # no GPU on the CI node: cancel the script's GPU request and train on the CPU
        "dp-gpu": Job(folder, "dp-gpu.sbatch", "-N", "1", "--ntasks-per-node=2", "-c", "1",
                      "--gpus-per-node=0", HPCFL_ARGS=f"{small} --backend numba"),
        "fl": Job(folder, "fl.sbatch", "-n", "2", HPCFL_ARGS="--rounds 2 --num-clients 20 --local-epochs 1"),
        "scaling": Job(folder, "scaling.sbatch", "-n", "2", HPCFL_SCALING_STEPS="10"),
        "preempted": Job(folder, "dp-cpu.sbatch", "-n", "2", HPCFL_ARGS="--epochs 4"),
        "killed": Job(folder, "dp-cpu.sbatch", "-n", "2", HPCFL_ARGS=small, HPCFL_FAULT="kill:1:5",
                      HPCFL_TESTING="1"),
        "cancelled": Job(folder, "dp-cpu.sbatch", "-n", "2", HPCFL_ARGS="--epochs 4"),
    }
    preempted, cancelled = submitted["preempted"], submitted["cancelled"]
    signalled = was_cancelled = False
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        for job in submitted.values():
            job.poll()
        # signal the batch shell as --signal=B:USR1 does, once training is under way
        if not signalled and "epoch   1" in preempted.log:
            subprocess.run(["scancel", "--signal=USR1", "--batch", preempted.id], check=True, timeout=30)
            signalled = True
        if not was_cancelled and "epoch   1" in cancelled.log:
            subprocess.run(["scancel", cancelled.id], check=True, timeout=30)
            was_cancelled = True
        if all(job.done for job in submitted.values()):
            break
        time.sleep(1)
    else:
        subprocess.run(["scancel", *[job.id for job in submitted.values()]], timeout=30)
        pytest.fail("jobs still running after %d s:\n%s" % (DEADLINE_S, "\n".join(
            job.describe() for job in submitted.values() if not job.done)))
    assert signalled, preempted.describe()
    assert was_cancelled, cancelled.describe()
    return submitted


def assert_trained(job: Job, records: int) -> None:
    assert job.info["JobState"] == "COMPLETED" and job.info["ExitCode"] == "0:0", job.describe()
    assert job.log.count("final test accuracy") == 1, job.describe()
    assert len(job.metrics()) == records, job.describe()
    assert (job.run_dir / "model" / "model.npz").exists()


def test_dp_cpu_job(jobs):
    job = jobs["dp-cpu"]
    assert_trained(job, 1)
    assert job.metrics()[0]["ranks"] == 2 and job.metrics()[0]["test_accuracy"] > 0.85
    assert "srun -n 2 --mpi=pmi2" in job.log
    assert [p.name for p in (job.run_dir / "checkpoints").iterdir()] == ["ckpt-000000060.npz"]


def test_dp_gpu_job_script_runs_on_cpu_when_told(jobs):
    assert_trained(jobs["dp-gpu"], 1)


def test_fl_job(jobs):
    job = jobs["fl"]
    assert_trained(job, 2)
    assert [r["round"] for r in job.metrics()] == [1, 2]


def test_scaling_sweep(jobs):
    job = jobs["scaling"]
    assert job.info["JobState"] == "COMPLETED", job.describe()
    rows = (job.run_dir / "scaling.csv").read_text().split()
    assert rows[0] == "kind,ranks,global_batch,samples_per_second,speedup,efficiency"
    assert [r.split(",")[:3] for r in rows[1:]] == [
        ["strong", "1", "1024"], ["strong", "2", "1024"], ["weak", "1", "128"], ["weak", "2", "256"]]


def test_preempted_job_checkpoints_requeues_and_resumes(jobs):
    job = jobs["preempted"]
    assert_trained(job, 4)
    assert job.info["Restarts"] == "1", job.describe()
    log = job.log
    for words in ("forwarding SIGUSR1", "stopped by SIGUSR1", "requeueing", "resuming from"):
        assert log.count(words) == 1, f"{words!r} missing\n{job.describe()}"
    assert [r["epoch"] for r in job.metrics()] == [1, 2, 3, 4]


def test_killed_rank_ends_the_job(jobs):
    job = jobs["killed"]
    assert job.info["JobState"] == "FAILED" and job.info["Restarts"] == "0", job.describe()
    assert "fault injection: kill on rank 1" in job.log
    # the survivor must not wait in a collective: srun --kill-on-bad-exit ends the step
    start, end = (time.mktime(time.strptime(job.info[k], "%Y-%m-%dT%H:%M:%S")) for k in ("StartTime", "EndTime"))
    assert end - start < 30, job.describe()


def test_cancelled_job_checkpoints_and_stays_cancelled(jobs):
    job = jobs["cancelled"]
    assert job.info["JobState"] == "CANCELLED" and job.info["Restarts"] == "0", job.describe()
    # the ranks get SIGTERM from Slurm and SIGUSR1 from the batch shell: either may come first
    assert "hpcfl: error: stopped by SIG" in job.log and "not requeueing" in job.log, job.describe()
    assert list((job.run_dir / "checkpoints").glob("ckpt-*.npz")), job.describe()
