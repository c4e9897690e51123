"""`python -m pytest tests` runs everything: the serial tests, and (test_mpi_suite.py) the tests
in tests/mpi/ under `mpirun -n 1, 2, 3, 4 python -m pytest --with-mpi tests/mpi`.

Most tests need the real MNIST. Without it the run stops at once with one message saying how to
point the tests at it, instead of skipping half of them and passing: set HPCFL_DATA_DIR to a
folder with the four MNIST files (CI: ../shared/data/mnist), or HPCFL_TESTS_WITHOUT_DATA=1 to
run only the tests that need no data (the others are then skipped, each saying why).
"""
import os
from pathlib import Path

import pytest
from helpers import DATA_DIR, have_mnist

os.environ.setdefault("HPCFL_DATA_DIR", str(DATA_DIR))


def pytest_ignore_collect(collection_path, config):
    """tests/mpi runs only under mpirun (--with-mpi), launched by test_mpi_suite.py."""
    if collection_path == Path(__file__).parent / "mpi" and not config.getoption("--with-mpi", False):
        return True
    return None


def pytest_sessionstart(session):
    if not have_mnist() and os.environ.get("HPCFL_TESTS_WITHOUT_DATA") != "1":
        pytest.exit(f"the tests need the real MNIST, and {DATA_DIR} does not have it: set HPCFL_DATA_DIR "
                    "to a folder with the four files (python -m hpcfl fetch-data --data-dir DIR downloads "
                    "them), or set HPCFL_TESTS_WITHOUT_DATA=1 to run only the tests that need none",
                    returncode=4)


@pytest.fixture(autouse=True)
def hpcfl_messages():
    """hpcfl's messages shown as a run shows them (log.configure: rank 0 on stdout and stderr),
    also for the tests that call its parts directly, without hpcfl.train or the command line."""
    from hpcfl import cli, log

    log.configure(cli._launcher_rank())
    yield
    log.reset()
