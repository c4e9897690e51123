"""NCCL for --allreduce nccl: collectives on CuPy device buffers, one GPU per rank. MPI (comm.py)
only sets it up: the ranks agree it can run and share the communicator's unique id."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import UsageError
from .comm import Comm, processor_name


class NcclComm:
    """NCCL collectives on CuPy device buffers among the ranks of `comm`, one GPU per rank
    (`--allreduce nccl`). Creating it is collective over `world` (default: `comm`), of which
    `comm` is one group: all ranks of the world agree that each can load NCCL and that no two
    ranks of one group share a GPU (NCCL refuses that), so a refusal is one UsageError on every
    rank, never a hang; then the group's rank 0 broadcasts its NCCL unique id over MPI.
    Blocking like Comm's collectives: each call runs on the current stream and waits for it.
    """

    def __init__(self, comm: Comm, world: Comm | None = None, group: int = 0):
        import warnings

        world = world or comm
        nccl: Any = None
        why = "CuPy is not installed"
        try:
            with warnings.catch_warnings():        # CuPy warns when libnccl is missing
                warnings.simplefilter("ignore")
                from cupy.cuda import nccl as module
            if getattr(module, "available", False):
                nccl = module
            else:
                why = "CuPy cannot load libnccl (pip install nvidia-nccl-cu12)"
        except ImportError as exc:
            why = f"cupy.cuda.nccl cannot be imported ({exc})"

        def loadable():
            if nccl is None:
                raise UsageError(f"NCCL is not usable on every rank: {why}")

        world.agree_all(loadable)
        where = world.allgather((group, processor_name(), _gpu_bus_id()))
        shared = _shared_gpus(where)
        if shared:
            raise UsageError(f"NCCL needs one GPU per rank, but {shared}: use --allreduce fused, "
                             "or at most as many ranks per node as GPUs", collective=True)
        self.comm, self._nccl = comm, nccl
        uid = comm.bcast(nccl.get_unique_id() if comm.rank == 0 else None)
        self._comm = nccl.NcclCommunicator(comm.size, uid, comm.rank)
        self._types = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
                       np.dtype(np.int32): nccl.NCCL_INT32, np.dtype(np.int64): nccl.NCCL_INT64}

    def _stream(self):
        import cupy

        return cupy.cuda.get_current_stream()

    def Allreduce_sum(self, buf) -> None:
        stream = self._stream()
        self._comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._types[buf.dtype],
                             self._nccl.NCCL_SUM, stream.ptr)
        stream.synchronize()

    def Bcast(self, buf, root: int = 0) -> None:
        stream = self._stream()
        self._comm.bcast(buf.data.ptr, buf.size, self._types[buf.dtype], root, stream.ptr)
        stream.synchronize()

    def Reduce_sum(self, sendbuf, recvbuf, root: int = 0) -> None:
        stream = self._stream()
        recv = recvbuf.data.ptr if self.comm.rank == root else 0   # NULL is fine off the root
        self._comm.reduce(sendbuf.data.ptr, recv, sendbuf.size, self._types[sendbuf.dtype],
                          self._nccl.NCCL_SUM, root, stream.ptr)
        stream.synchronize()

    def Free(self) -> None:
        self._comm.destroy()


def _gpu_bus_id() -> str:
    """The PCI bus id of this process's current GPU: the same id in every process that uses it."""
    import cupy

    return cupy.cuda.Device().pci_bus_id


def _shared_gpus(where: list) -> str | None:
    """From each rank's (group, host, GPU bus id): 'ranks 0 and 1 share GPU <id> on <host>' for
    the first two ranks of one group on one GPU, or None. Ranks of different groups (different
    NCCL communicators) may share a GPU."""
    first: dict[tuple, int] = {}
    for rank, key in enumerate(where):
        if key in first:
            return f"ranks {first[key]} and {rank} share GPU {key[-1]} on {key[-2]}"
        first[key] = rank
    return None
