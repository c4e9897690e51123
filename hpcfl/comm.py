"""The only module that talks MPI.

`Comm` wraps an mpi4py communicator with the few collectives hpcfl needs: capitalised buffer
calls on NumPy arrays for the hot path, lowercase pickle calls for small metadata.
`run_main` is the abort-on-error policy: an error every rank agrees on ends each rank cleanly
(rank 0 prints it once); an error on one rank aborts the whole job, so no rank ever hangs
waiting in a collective for a peer that has died.
"""
from __future__ import annotations

import os
import sys
import traceback

import numpy as np

from .errors import HpcflError

_mpi = None


def _MPI():
    """Import mpi4py lazily so that `--help` and argument errors stay fast."""
    global _mpi
    if _mpi is None:
        # Keep mpi4py's default MPI_THREAD_MULTIPLE even though we call MPI from one thread:
        # measured with the mpich 5.0 wheel, any lower level makes oversubscribed ranks spin
        # without yielding (4 ranks on 2 cores: 900 ms per Allreduce step instead of 2.4 ms).
        from mpi4py import MPI

        _mpi = MPI
    return _mpi


class Request:
    """A pending non-blocking collective."""

    def __init__(self, req):
        self._req = req

    def Wait(self) -> None:
        self._req.Wait()


class Comm:
    def __init__(self, mpicomm=None):
        self.mpicomm = mpicomm if mpicomm is not None else _MPI().COMM_WORLD
        self.rank = self.mpicomm.Get_rank()
        self.size = self.mpicomm.Get_size()

    @classmethod
    def world(cls) -> "Comm":
        return cls()

    @classmethod
    def self_(cls) -> "Comm":
        """A communicator of this process alone (single-process runs inside tests)."""
        return cls(_MPI().COMM_SELF)

    # ---- buffer collectives (hot path) ----
    def Allreduce_sum(self, buf: np.ndarray) -> None:
        """In-place sum over all ranks."""
        if self.size > 1:
            self.mpicomm.Allreduce(_MPI().IN_PLACE, buf, op=_MPI().SUM)

    def Iallreduce_sum(self, buf: np.ndarray) -> Request | None:
        if self.size == 1:
            return None
        return Request(self.mpicomm.Iallreduce(_MPI().IN_PLACE, buf, op=_MPI().SUM))

    def Bcast(self, buf: np.ndarray, root: int = 0) -> None:
        if self.size > 1:
            self.mpicomm.Bcast(buf, root=root)

    def Reduce_sum(self, sendbuf: np.ndarray, recvbuf: np.ndarray | None, root: int = 0) -> None:
        """recvbuf (on root only) = sum of every rank's sendbuf."""
        if self.size == 1:
            recvbuf[...] = sendbuf
            return
        self.mpicomm.Reduce(sendbuf, recvbuf if self.rank == root else None, op=_MPI().SUM, root=root)

    # ---- small metadata (pickle) ----
    def allreduce(self, value, op: str = "sum"):
        if self.size == 1:
            return value
        mpi_op = {"sum": _MPI().SUM, "max": _MPI().MAX, "min": _MPI().MIN}[op]
        return self.mpicomm.allreduce(value, op=mpi_op)

    def bcast(self, obj, root: int = 0):
        return obj if self.size == 1 else self.mpicomm.bcast(obj, root=root)

    def allgather(self, obj) -> list:
        return [obj] if self.size == 1 else self.mpicomm.allgather(obj)

    def Barrier(self) -> None:
        self.mpicomm.Barrier()

    def Split(self, color: int, key: int) -> "Comm":
        return Comm(self.mpicomm.Split(color, key))

    def Free(self) -> None:
        if self.mpicomm not in (_MPI().COMM_WORLD, _MPI().COMM_SELF):
            self.mpicomm.Free()

    def Abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.mpicomm.Abort(code)

    def agree(self, fn, root: int = 0):
        """Run fn() on root only and broadcast its result; if it raised an HpcflError, raise
        the same error on every rank, marked collective so that each exits cleanly."""
        result = error = None
        if self.rank == root:
            try:
                result = fn()
            except HpcflError as exc:
                error = exc
        error = self.bcast(error, root)
        if error is not None:
            error.collective = True
            raise error
        return self.bcast(result, root)


def library_version() -> str:
    return _MPI().Get_library_version().strip().splitlines()[0]


def local_rank(comm: Comm) -> int:
    """Rank among the processes of this node (for choosing a GPU)."""
    mpi = _MPI()
    node = comm.mpicomm.Split_type(mpi.COMM_TYPE_SHARED, key=comm.rank)
    try:
        return node.Get_rank()
    finally:
        node.Free()


def run_main(fn, *args) -> int:
    """Run fn(comm, *args) on every rank with the abort-on-error policy; returns the exit code."""
    comm = Comm.world()
    try:
        return fn(comm, *args) or 0
    except HpcflError as exc:
        if exc.collective:
            if comm.rank == 0:
                print(f"hpcfl: error: {exc}", file=sys.stderr, flush=True)
            return exc.exit_code
        print(f"hpcfl: error on rank {comm.rank}: {exc}", file=sys.stderr, flush=True)
        comm.Abort(exc.exit_code)
    except BaseException as exc:  # a bug, or KeyboardInterrupt: take the whole job down now
        if os.environ.get("HPCFL_DEBUG"):
            traceback.print_exc()
        frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        where = f" ({os.path.basename(frame.filename)}:{frame.lineno})" if frame else ""
        print(f"hpcfl: rank {comm.rank} failed: {type(exc).__name__}: {exc}{where}; aborting all ranks"
              " (HPCFL_DEBUG=1 for the traceback)", file=sys.stderr, flush=True)
        comm.Abort(1)
    return 1
