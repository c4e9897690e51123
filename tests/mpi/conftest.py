import pytest
from helpers import DATA_DIR, have_mnist

from hpcfl import data as data_mod
from hpcfl.parallel.comm import Comm


@pytest.fixture(scope="session")
def comm():
    return Comm.world()


@pytest.fixture(scope="session")
def mnist(comm):
    if not have_mnist():
        pytest.skip(f"real MNIST not found in {DATA_DIR}")
    return data_mod.open_cache(comm.agree(lambda: str(data_mod.prepare_cache(DATA_DIR))))


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_rank():
    from hpcfl import backends

    backends.set_threads(1)
