"""Helpers shared by the serial tests and the MPI tests."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("HPCFL_DATA_DIR") or ROOT.parent / "shared/data/mnist")


def have_mnist() -> bool:
    from hpcfl import data

    return not data.missing_files(DATA_DIR)


needs_mnist = pytest.mark.skipif(not have_mnist(), reason=f"real MNIST not found in {DATA_DIR}; set HPCFL_DATA_DIR")


def mpirun() -> str:
    """The mpirun next to this Python (the mpich wheel's) if there is one, else the PATH's."""
    local = Path(sys.executable).with_name("mpirun")
    return str(local) if local.exists() else (shutil.which("mpirun") or "mpirun")


def run_hpcfl(n: int, *args, env=None, timeout=300, cwd=None) -> subprocess.CompletedProcess:
    """`mpirun -n n python -m hpcfl *args`, captured."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [mpirun(), "-n", str(n), sys.executable, "-m", "hpcfl", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)


def assert_clean_failure(proc, code: int, *words: str) -> None:
    """Non-zero exit, the message printed exactly once, no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out
    assert "Traceback" not in out, out
    assert out.count("hpcfl: error") == 1, out
    for word in words:
        assert word in out, out
