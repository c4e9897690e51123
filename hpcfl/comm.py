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

from .errors import HpcflError, UsageError

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
        """In-place sum over all ranks (a NumPy array, or a CuPy device array: _device_allreduce)."""
        if self.size > 1:
            if isinstance(buf, np.ndarray) or not _on_device(buf):
                self.mpicomm.Allreduce(_MPI().IN_PLACE, buf, op=_MPI().SUM)
            else:
                _device_allreduce(self.mpicomm, buf)

    def Iallreduce_sum(self, buf: np.ndarray) -> Request | None:
        if self.size == 1:
            return None
        if not isinstance(buf, np.ndarray) and _on_device(buf):    # blocking, done on return
            _device_allreduce(self.mpicomm, buf)
            return None
        return Request(self.mpicomm.Iallreduce(_MPI().IN_PLACE, buf, op=_MPI().SUM))

    @staticmethod
    def Waitall(requests) -> None:
        """Complete several pending collectives (None entries, from size-1 comms, are skipped)."""
        reqs = [r._req for r in requests if r is not None]
        if reqs:
            _MPI().Request.Waitall(reqs)

    def Bcast(self, buf: np.ndarray, root: int = 0) -> None:
        if self.size > 1:
            if isinstance(buf, np.ndarray) or not _on_device(buf):
                self.mpicomm.Bcast(buf, root=root)
            else:
                _device_bcast(self.mpicomm, buf, root)

    def Reduce_sum(self, sendbuf: np.ndarray, recvbuf: np.ndarray | None, root: int = 0) -> None:
        """recvbuf (on root only) = sum of every rank's sendbuf."""
        if self.size == 1:
            recvbuf[...] = sendbuf
            return
        if not (_on_device(sendbuf) or _on_device(recvbuf)):
            self.mpicomm.Reduce(sendbuf, recvbuf if self.rank == root else None, op=_MPI().SUM, root=root)
        else:
            _device_reduce(self.mpicomm, sendbuf, recvbuf, root)

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


# ---- device (GPU) buffers ----
# Comm's buffer collectives also take CuPy device arrays (C-contiguous), blocking like the
# NumPy ones. With a CUDA-aware MPI the device pointer goes to MPI directly, after the stream
# that produced the data is synchronised; otherwise the data is staged through a reused pinned
# host buffer: device -> host copy, MPI on the host, host -> device copy. NumPy arrays never
# come here (one isinstance check on the hot path).

_cuda_aware: bool | None = None


def _on_device(buf) -> bool:
    """A GPU array (CuPy, or anything with the CUDA array interface)."""
    return not isinstance(buf, np.ndarray) and hasattr(buf, "__cuda_array_interface__")


def cuda_aware_mpi() -> bool:
    """Whether the MPI library takes CUDA device pointers: HPCFL_CUDA_AWARE_MPI=1 or 0 decides;
    otherwise ask the library (MPIX_Query_cuda_support: MPICH >= 4, Open MPI, MVAPICH)."""
    global _cuda_aware
    if _cuda_aware is None:
        env = os.environ.get("HPCFL_CUDA_AWARE_MPI", "").strip()
        _cuda_aware = env == "1" if env in ("0", "1") else _query_cuda_support()
    return _cuda_aware


def _query_cuda_support() -> bool:
    query = getattr(_MPI(), "Query_cuda_support", None)   # mpi4py builds that wrap the MPIX call
    if query is not None:
        try:
            return bool(query())
        except Exception:
            pass
    import ctypes

    for path in _loaded_mpi_libraries():
        try:
            fn = ctypes.CDLL(path).MPIX_Query_cuda_support
        except (OSError, AttributeError):
            continue
        fn.restype, fn.argtypes = ctypes.c_int, []
        return bool(fn())
    return False


def _loaded_mpi_libraries() -> list[str]:
    """The MPI libraries mapped into this process (Linux), e.g. [.../libmpi.so.12]."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/libmpi" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith("libmpi"))


def _pinned_empty(size: int, dtype) -> np.ndarray:
    import cupyx

    return cupyx.empty_pinned(size, dtype)


def _sync_device() -> None:
    """Wait for the current CUDA stream: its kernels wrote the buffer MPI is about to read."""
    import cupy

    cupy.cuda.get_current_stream().synchronize()


class _Staging:
    """Pinned host stand-ins for device buffers, one per (slot, dtype), grown on demand and
    reused: pinned memory is slow to allocate and fast to copy."""

    def __init__(self):
        self.buffers: dict = {}

    def host(self, slot: str, buf) -> np.ndarray:
        if not buf.flags.c_contiguous:
            raise ValueError("a device buffer for MPI must be C-contiguous")
        key = (slot, np.dtype(buf.dtype).str)
        have = self.buffers.get(key)
        if have is None or have.size < buf.size:
            have = self.buffers[key] = _pinned_empty(buf.size, buf.dtype)
        return have[: buf.size].reshape(buf.shape)


_staging = _Staging()


def _device_allreduce(mpicomm, buf) -> None:
    mpi = _MPI()
    if cuda_aware_mpi():
        _sync_device()
        mpicomm.Allreduce(mpi.IN_PLACE, buf, op=mpi.SUM)
        return
    host = _staging.host("buf", buf)
    buf.get(out=host)                          # waits for the copy (and the kernels before it)
    mpicomm.Allreduce(mpi.IN_PLACE, host, op=mpi.SUM)
    buf.set(host)
    _sync_device()                             # blocking: the pinned buffer is free again


def _device_bcast(mpicomm, buf, root: int) -> None:
    if cuda_aware_mpi():
        _sync_device()
        mpicomm.Bcast(buf, root=root)
        return
    host = _staging.host("buf", buf)
    is_root = mpicomm.Get_rank() == root
    if is_root:
        buf.get(out=host)
    mpicomm.Bcast(host, root=root)
    if not is_root:
        buf.set(host)
        _sync_device()


def _device_reduce(mpicomm, sendbuf, recvbuf, root: int) -> None:
    """Reduce where sendbuf and/or recvbuf (root only) is a device array."""
    mpi = _MPI()
    is_root = mpicomm.Get_rank() == root
    if cuda_aware_mpi():
        _sync_device()
        mpicomm.Reduce(sendbuf, recvbuf if is_root else None, op=mpi.SUM, root=root)
        return
    send = sendbuf
    if not isinstance(sendbuf, np.ndarray):
        send = _staging.host("send", sendbuf)
        sendbuf.get(out=send)
    recv = None
    if is_root:
        recv = recvbuf if isinstance(recvbuf, np.ndarray) else _staging.host("recv", recvbuf)
    mpicomm.Reduce(send, recv, op=mpi.SUM, root=root)
    if is_root and recv is not recvbuf:
        recvbuf.set(recv)
        _sync_device()


class NcclComm:
    """NCCL collectives on CuPy device buffers among the ranks of `comm`, one GPU per rank
    (`--allreduce nccl`). Creating it is collective over `comm`: the ranks agree that each can
    load NCCL and that no two of them share a GPU (NCCL refuses that), so a refusal is one
    UsageError on every rank, never a hang; then rank 0's NCCL unique id is broadcast over MPI.
    Blocking like Comm's collectives: each call runs on the current stream and waits for it.
    """

    def __init__(self, comm: Comm):
        import warnings

        nccl, why = None, "CuPy is not installed"
        try:
            with warnings.catch_warnings():        # CuPy warns when libnccl is missing
                warnings.simplefilter("ignore")
                from cupy.cuda import nccl
            if not getattr(nccl, "available", False):
                why = "CuPy cannot load libnccl (pip install nvidia-nccl-cu12)"
                nccl = None
        except ImportError as exc:
            why = f"cupy.cuda.nccl cannot be imported ({exc})"
        if not comm.allreduce(int(nccl is not None), op="min"):   # every rank agrees, none hangs
            why = why if nccl is None else "another rank cannot use it"
            raise UsageError(f"NCCL is not usable on every rank: {why}", collective=True)
        shared = _shared_gpus(comm.allgather((_MPI().Get_processor_name(), _gpu_bus_id())))
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
    """From each rank's (host, GPU bus id): 'ranks 0 and 1 share GPU <id> on <host>', or None."""
    first = {}
    for rank, key in enumerate(where):
        if key in first:
            return f"ranks {first[key]} and {rank} share GPU {key[1]} on {key[0]}"
        first[key] = rank
    return None


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
