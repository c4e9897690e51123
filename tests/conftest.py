"""`python -m pytest tests` runs everything: the serial tests, and (test_mpi_suite.py) the tests
in tests/mpi/ under `mpirun -n 1, 2, 3, 4 python -m pytest --with-mpi tests/mpi`."""
import os
from pathlib import Path

from helpers import DATA_DIR

os.environ.setdefault("HPCFL_DATA_DIR", str(DATA_DIR))


def pytest_ignore_collect(collection_path, config):
    """tests/mpi runs only under mpirun (--with-mpi), launched by test_mpi_suite.py."""
    if collection_path == Path(__file__).parent / "mpi" and not config.getoption("--with-mpi", False):
        return True
    return None
