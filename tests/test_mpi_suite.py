"""Runs tests/mpi under mpirun at 1, 2, 3 and 4 ranks (3 catches remainder bugs)."""
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import mpirun_cmd


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_mpi_suite(ranks):
    cmd = [*mpirun_cmd(ranks), sys.executable, "-m", "pytest", "--with-mpi", "-q",
           "-p", "no:cacheprovider", str(Path(__file__).parent / "mpi")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout
