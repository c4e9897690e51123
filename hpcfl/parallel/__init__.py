"""Distribution: the only package that talks MPI.

    comm.py   the MPI communicator wrapper (and SerialComm, NCCL, shared-memory windows), the
              launch checks, abort-on-error
    sync.py   how one step's gradients are summed over a replica's ranks (fused, overlap, shm)
"""
