"""A newcomer's first hour (issue 33): output that explains itself and the traps removed, each
checked as a user meets it, through the command line."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers import assert_clean_failure, needs_mnist, run_hpcfl


def test_hpcfl_privacy_gives_dp_accountings_epsilon_and_the_noise_for_a_target():
    import dp_accounting

    from hpcfl.privacy import accountant

    proc = run_hpcfl(1, "privacy", "--dp-sgd", "--dp-noise", 1.1, "--batch-size", 256, "--epochs", 60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    eps = float(re.search(r"epsilon = ([\d.]+) at delta = 1e-05", proc.stdout).group(1))
    direct = dp_accounting.rdp.RdpAccountant(accountant.ORDERS)
    direct.compose(dp_accounting.PoissonSampledDpEvent(256 / 60000, dp_accounting.GaussianDpEvent(1.1)),
                   60 * (60000 // 256))
    assert eps == pytest.approx(direct.get_epsilon(1e-5), rel=0.01)
    # the other way round: the noise for a target, which dp-accounting puts at the target
    proc = run_hpcfl(1, "privacy", "--dp-sgd", "--dp-epsilon", 2, "--dp-pca", 0, "--batch-size", 256,
                     "--epochs", 60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    z = float(re.search(r"noise multiplier z = ([\d.]+) \(calibrated", proc.stdout).group(1))
    direct = dp_accounting.rdp.RdpAccountant(accountant.ORDERS)
    direct.compose(dp_accounting.PoissonSampledDpEvent(256 / 60000, dp_accounting.GaussianDpEvent(z)),
                   60 * (60000 // 256))
    assert 1.99 < direct.get_epsilon(1e-5) <= 2.0
    proc = run_hpcfl(1, "privacy", "--mode", "fl", "--secure-agg", "--dp-epsilon", 4, "--rounds", 20)
    assert proc.returncode == 0 and "each client's own ledger stops it after 4 rounds" in proc.stdout
    assert_clean_failure(run_hpcfl(1, "privacy", "--epochs", 3), 2, "hpcfl privacy needs DP settings")


@needs_mnist
def test_dp_at_a_researchers_scale_warns_and_a_diverging_run_stops(tmp_path):
    # the researcher: 50 clients, 10 a round, epsilon 8, then the "obvious fix"
    small = ["--mode", "fl", "--num-clients", 50, "--client-fraction", 0.2, "--dp-epsilon", 8]
    proc = run_hpcfl(2, *small, "--server-opt", "fedavg", "--server-lr", 1, "--dp-clip", 1, "--rounds", 30,
                     "--metrics", tmp_path / "m.jsonl")
    warning, error = proc.stderr.index("10 expected clients per round"), proc.stderr.index("hpcfl: error")
    assert warning < error and "--num-clients 250" in proc.stderr             # said before training
    assert_clean_failure(proc, 1, "the training loss of most clients became non-finite in rounds", "--dp-clip")
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) < 30


@needs_mnist
@pytest.mark.parametrize("extra, says", [(["--mu", 0.01], "FedProx mu=0.01"), (["--scaffold"], "SCAFFOLD"),
                                         (["--server-opt", "fedadam"], "server fedadam"),
                                         (["--aggregator", "median"], "aggregator median")])
def test_the_banner_names_the_algorithm(extra, says):
    proc = run_hpcfl(1, "--mode", "fl", "--rounds", 1, "--hidden", 16, *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert says in proc.stdout.split("\n", 2)[1] or says in proc.stdout


@needs_mnist
def test_the_attack_demo_says_what_happened_each_round():
    proc = run_hpcfl(2, "--mode", "fl", "--secure-agg", "--server-attack", "route-drop", "--rounds", 2,
                     "--hidden", 16)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("  attack route-drop on client")]
    assert len(lines) == 2 and all("detected (client" in line and "learned: nothing" in line for line in lines)
    assert "skipped" not in proc.stderr                    # the attack's line says why, not a warning


@needs_mnist
def test_more_ranks_than_cores_warns_once():
    import os

    cores = len(os.sched_getaffinity(0))
    proc = run_hpcfl(cores + 1, "--max-steps", 3, "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.count(f"{cores + 1} ranks on") == 1 and "they share the cores" in proc.stderr


def test_running_from_the_folder_above_a_clone_names_the_folder_that_shadows_it(tmp_path):
    from helpers import ROOT

    (tmp_path / "hpcfl").symlink_to(ROOT)         # a clone named hpcfl, run from the folder above it
    proc = subprocess.run([sys.executable, "-m", "hpcfl", "--version"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"the folder {tmp_path / 'hpcfl'} shadows the installed hpcfl package" in proc.stderr


@needs_mnist
def test_a_batch_script_runs_locally_as_a_dry_run_and_sets_its_site_up_from_a_bare_environment(tmp_path):
    # `bash jobs/dp-cpu.sbatch` outside SLURM: mpirun on this machine. With a site that submits
    # with --export=NONE the job starts bare: the site file (HPCFL_SITE, default jobs/site.sh)
    # activates the venv and sets the data, and nothing else is needed
    import os

    from helpers import DATA_DIR, ROOT

    venv = os.path.dirname(os.path.dirname(sys.executable))
    site = tmp_path / "site.sh"
    site.write_text(f"source {venv}/bin/activate\nexport HPCFL_DATA_DIR={DATA_DIR}\n"
                    f"export HPCFL_CACHE_DIR={tmp_path}/cache\nexport HPCFL_ARGS='--max-steps 10 --quiet'\n"
                    "echo site loaded\n")
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HPCFL_SITE": str(site)}
    proc = subprocess.run(["bash", str(ROOT / "jobs" / "dp-cpu.sbatch")], cwd=tmp_path, env=bare,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "site loaded" in proc.stdout and "mpirun -n 2" in proc.stdout and "final test accuracy" in proc.stdout
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "model" / "model.npz").is_file() and (run / "metrics.jsonl").read_text()
