"""Distribution: the only package that talks MPI (and NCCL).

    comm.py    the MPI communicator wrapper (buffer and pickle collectives, shared-memory windows,
               stop notices), agreed checks, the abort-on-error policy: the only mpi4py user
    sync.py    how a replica's ranks finish a step: Sync (fused, overlap, NCCL, shm), a registry
    nccl.py    NCCL collectives on GPU buffers (--allreduce nccl)
    launch.py  the launcher's process count against MPI's world; node-local ranks
    wire.py    the id-map wire format of per-client messages
"""
