"""What a job's launch must satisfy: the launcher's process count is the MPI world's (else N
copies would each train alone), and which node-local rank this process is (its GPU)."""
from __future__ import annotations

import os

from ..errors import UsageError
from .comm import Comm, library_version

# The launcher's word for how many processes this one was started with, most specific first:
# MPICH's hydra and srun --mpi=pmi2 set PMI_SIZE, Open MPI's mpirun OMPI_COMM_WORLD_SIZE, PMIx
# launchers PMIX_SIZE; SLURM_STEP_NUM_TASKS is what srun started (with any --mpi plugin).
_LAUNCH_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS")


def launched_size(environ=os.environ) -> tuple[str, int] | None:
    """(variable, N) from the first launcher variable set to an integer, or None."""
    for var in _LAUNCH_SIZE_VARS:
        value = environ.get(var, "").strip()
        if value.isdigit():
            return var, int(value)
    return None


def check_launch(world_size: int, environ=os.environ) -> None:
    """Refuse a job whose launcher started N > 1 processes that each see an MPI world of
    another size: N independent copies would each train alone and overwrite each other's output."""
    found = launched_size(environ)
    if found is None or found[1] <= 1 or found[1] == world_size:
        return
    var, n = found
    if var == "SLURM_STEP_NUM_TASKS":
        cause = ("srun started the tasks without a process-management interface that this MPI "
                 "understands: with the mpich wheel use `srun --mpi=pmi2` (not pmix or none), with "
                 "a site MPI the --mpi plugin it was built for (`srun --mpi=list`)")
    else:
        cause = ("the launcher belongs to another MPI library than the one mpi4py loaded "
                 f"({library_version()}): use the mpirun that comes with it (e.g. the one next to "
                 "this Python), or rebuild mpi4py against the launcher's MPI "
                 "(pip install --no-binary=mpi4py mpi4py)")
    raise UsageError(f"the launcher started {n} processes ({var}={n}) but MPI sees a world of "
                     f"{world_size}: {cause}", collective=True)


def local_rank(comm: Comm) -> int:
    """Rank among the processes of this node (for choosing a GPU)."""
    node = comm.node_comm()
    try:
        return node.rank
    finally:
        node.Free()
