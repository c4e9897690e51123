"""The CuPy (GPU) backend and device-buffer collectives.

Three layers, so that a machine without a GPU still checks most of it:
1. Always: the module imports and explains itself without CuPy or without a GPU, the CLI and the
   benchmark refuse cleanly, hpcfl.parallel.comm stages device buffers correctly (fake device arrays,
   fake MPI communicator), and the row-major -> cuBLAS argument mapping is right (a NumPy SGEMM).
2. Where a C++ compiler is found: the backend's own Python code runs end to end against the
   NumPy reference on a CPU emulation of CuPy: its CUDA sources are compiled by g++ and run
   with one coroutine per CUDA thread (barriers for __syncthreads and the warp shuffles), and
   its ElementwiseKernel bodies are compiled as loops. What this cannot check is CuPy's and
   cuBLAS's own behaviour, and the CUDA memory model: layer 3 does, on a GPU.
3. On a GPU only: the same comparisons on the device, the dp.Replica trainer, allocation-free
   steps, and a 2-rank Allreduce of device buffers under mpirun.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
import warnings

import numpy as np
import pytest
from helpers import (
    DATA_DIR,
    ROOT,
    assert_clean_failure,
    batch,
    check_optimizer_matches_reference,
    mpirun_cmd,
    needs_mnist,
    run_hpcfl,
)

from hpcfl import backends
from hpcfl.backends import cupy_backend as cb
from hpcfl.backends import numpy_backend as ref
from hpcfl.config import Config
from hpcfl.core import layout as model
from hpcfl.data import MEAN, STD
from hpcfl.errors import UsageError
from hpcfl.parallel import comm, nccl, sync
from hpcfl.training import dataparallel as dp

REASON = cb.unavailable_reason()
needs_gpu = pytest.mark.skipif(REASON is not None, reason=f"no usable GPU for the cupy backend: {REASON}")
LAYOUT = model.layout((256, 128))
SMALL = model.Layout((20, 16, 12, 10))
SMALL_784 = model.layout((16, 12))          # MNIST-shaped input, small hidden layers


def reference_step(lay, p, x, y):
    g = np.zeros_like(p)
    loss = ref.forward_backward(lay.views(p), x, y, lay.views(g), None)
    return loss, g


# ============================================================ 1. everywhere

def test_unavailable_reason_is_one_clear_line():
    if REASON is None:
        pytest.skip("a GPU is usable here")
    assert "\n" not in REASON
    assert REASON.startswith(("cupy is not installed (pip install -e '.[gpu]'", "no usable CUDA GPU: ",
                              "cupy cannot be imported")), REASON
    assert cb.describe_gpu() is None
    assert backends.gpu_description() is None


def test_auto_picks_numba_and_get_cupy_explains_without_a_gpu():
    if REASON is None:
        pytest.skip("a GPU is usable here")
    assert backends.resolve("auto") == "numba"
    with pytest.raises(backends.BackendUnavailable) as info:
        backends.get("cupy")
    assert str(info.value) == f"backend 'cupy' is not usable here: {REASON}"
    assert backends.available()["cupy"] == str(info.value)


BLOCK_CUPY = """
import sys
class _NoCupy:   # as if CuPy were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("cupy", "cupyx", "cupy_backends"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NoCupy())
"""


def test_without_cupy_installed():
    code = BLOCK_CUPY + textwrap.dedent("""
        from hpcfl import backends
        from hpcfl.backends import cupy_backend as cb
        print(cb.unavailable_reason())
        print(cb.describe_gpu())
        print(backends.resolve("auto"))
        try:
            backends.get("cupy")
        except backends.BackendUnavailable as exc:
            print(exc)
        from hpcfl.parallel import comm, launch, nccl, sync
        from hpcfl.errors import UsageError
        try:
            nccl.NcclComm(comm.Comm.self_())
        except UsageError as exc:
            print(exc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    hint = "pip install -e '.[gpu]' for CUDA 12 drivers, '.[gpu13]' for CUDA 13"   # the README's extras
    assert lines == [f"cupy is not installed ({hint})", "None", "numba",
                     f"backend 'cupy' is not usable here: cupy is not installed ({hint})",
                     "NCCL is not usable on every rank: cupy.cuda.nccl cannot be imported "
                     "(No module named 'cupy')"], proc.stdout


def test_cli_backend_cupy_exits_2_with_one_message():
    if REASON is None:
        pytest.skip("a GPU is usable here")
    assert_clean_failure(run_hpcfl(2, "--backend", "cupy", "--max-steps", 1), 2,
                         "backend 'cupy' is not usable here", REASON)


def test_gpu_bench_exits_2_with_a_clear_message_without_a_gpu():
    if REASON is None:
        pytest.skip("a GPU is usable here")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_bench.py")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.strip() == f"gpu_bench: needs a CUDA GPU: {REASON}"


def test_local_rank_comes_from_the_launchers_environment(monkeypatch):
    for var in cb._LOCAL_RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    assert cb._env_local_rank() == 0
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert cb._env_local_rank() == 3
    monkeypatch.setenv("MPI_LOCALRANKID", "1")           # mpich's hydra (earlier in the list)
    assert cb._env_local_rank() == 1


def numpy_sgemm(transa, transb, m, n, k, A, lda, B, ldb, C, ldc):
    """cuBLAS SGEMM semantics on NumPy buffers: column-major, leading dimensions checked."""
    def colmajor(buf, rows, cols, ld):
        flat = buf.reshape(-1)
        assert ld >= max(1, rows) and (cols - 1) * ld + rows <= flat.size, (rows, cols, ld, flat.size)
        return np.lib.stride_tricks.as_strided(flat, (rows, cols), (flat.itemsize, ld * flat.itemsize))
    op_a = colmajor(A, m, k, lda) if transa == cb._OP_N else colmajor(A, k, m, lda).T
    op_b = colmajor(B, k, n, ldb) if transb == cb._OP_N else colmajor(B, n, k, ldb).T
    colmajor(C, m, n, ldc)[...] = op_a @ op_b


@pytest.mark.parametrize("m, k, n", [(1, 784, 256), (37, 20, 16), (128, 1, 10), (5, 7, 1)])
def test_row_major_products_map_onto_column_major_sgemm(monkeypatch, m, k, n):
    monkeypatch.setattr(cb, "_sgemm", numpy_sgemm)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    for trans_a in (False, True):
        for trans_b in (False, True):
            a_arg = np.ascontiguousarray(a.T) if trans_a else a      # stored transposed
            b_arg = np.ascontiguousarray(b.T) if trans_b else b
            out = np.full((m, n), np.nan, np.float32)
            cb._gemm(a_arg, b_arg, out, trans_a=trans_a, trans_b=trans_b)
            np.testing.assert_allclose(out, a @ b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="C-contiguous"):
        cb._gemm(np.zeros((4, 6), np.float32)[:, ::2], np.zeros((3, 2), np.float32), np.zeros((4, 2), np.float32))
    f = np.float32
    with pytest.raises(ValueError, match=r"_gemm: shapes \(4, 3\) @ \(2, 2\) -> \(4, 2\)"):
        cb._gemm(np.zeros((4, 3), f), np.zeros((2, 2), f), np.zeros((4, 2), f))      # inner sizes differ
    with pytest.raises(ValueError, match="_gemm: shapes"):
        cb._gemm(np.zeros((3, 4), f), np.zeros((3, 2), f), np.zeros((3, 2), f), trans_a=True)   # wrong out


# ---- hpcfl.parallel.comm with device buffers (fake device arrays, fake MPI communicator) ----

class DevArray(np.ndarray):
    """A NumPy array playing a cupy.ndarray: get(out=) and set() as CuPy has them."""

    def get(self, out=None):
        if out is None:
            return np.array(self)
        assert type(out) is np.ndarray and out.shape == self.shape and out.dtype == self.dtype
        out[...] = self
        return out

    def set(self, arr):
        assert type(arr) is np.ndarray, "set() takes a host array"
        assert arr.dtype == self.dtype and arr.shape == self.shape and self.flags.c_contiguous
        np.copyto(self, arr)


class FakeDeviceBuffer:
    """A device buffer for hpcfl.parallel.comm: not a NumPy array (a cupy.ndarray is not one either)."""

    def __init__(self, a):
        self.a = np.asarray(a)

    dtype = property(lambda self: self.a.dtype)
    shape = property(lambda self: self.a.shape)
    size = property(lambda self: self.a.size)
    flags = property(lambda self: self.a.flags)

    def __getitem__(self, key):
        return FakeDeviceBuffer(self.a[key])

    def __setitem__(self, key, value):
        self.a[key] = value.a if isinstance(value, FakeDeviceBuffer) else value

    def __imul__(self, k):
        self.a *= k
        return self

    def __mul__(self, k):
        return FakeDeviceBuffer(self.a * k)

    def get(self, out=None):
        return DevArray.get(self.a.view(DevArray), out)

    def set(self, arr):
        DevArray.set(self.a.view(DevArray), arr)

    def tolist(self):
        return self.a.tolist()

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.a.ctypes.data, False), "version": 3}


def dev(a):
    return FakeDeviceBuffer(np.array(a))


class FakeMPIComm:
    """Every rank holds the same data: a sum multiplies by size, a broadcast fills with 7."""

    def __init__(self, rank=0, size=2, log=None):
        self.rank, self.size, self.log = rank, size, log if log is not None else []

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Allreduce(self, sendbuf, recvbuf, op):
        self.log.append(("Allreduce", type(recvbuf)))
        recvbuf *= self.size

    def Iallreduce(self, sendbuf, recvbuf, op):
        raise AssertionError("device buffers must not reach Iallreduce")

    def Bcast(self, buf, root=0):
        self.log.append(("Bcast", type(buf)))
        if self.rank != root:
            buf[...] = 7

    def Reduce(self, sendbuf, recvbuf, op, root=0):
        self.log.append(("Reduce", type(sendbuf), type(recvbuf)))
        if self.rank == root:
            recvbuf[...] = sendbuf * self.size


@pytest.fixture
def staging(monkeypatch):
    """hpcfl.parallel.comm with pinned memory and stream syncs replaced by recorders; not CUDA-aware."""
    log = []
    monkeypatch.setattr(comm, "_staging", comm._Staging())
    monkeypatch.setattr(comm, "_pinned_empty",
                        lambda size, dtype: log.append(("pinned", size)) or np.empty(size, dtype))
    monkeypatch.setattr(comm, "_sync_device", lambda: log.append(("sync",)))
    monkeypatch.setattr(comm, "_cuda_aware", False)
    return log


def test_numpy_buffers_go_to_mpi_untouched(staging):
    c = comm.Comm(FakeMPIComm(log=staging))
    buf = np.ones(5, np.float32)
    c.Allreduce_sum(buf)
    c.Bcast(buf)
    recv = np.zeros(5, np.float32)
    c.Reduce_sum(buf, recv)
    assert staging == [("Allreduce", np.ndarray), ("Bcast", np.ndarray), ("Reduce", np.ndarray, np.ndarray)]
    assert recv.tolist() == [4.0] * 5


def test_device_allreduce_is_staged_through_one_reused_pinned_buffer(staging):
    c = comm.Comm(FakeMPIComm(log=staging))
    buf = dev(np.arange(6, dtype=np.float32))
    for _ in range(3):
        c.Allreduce_sum(buf)
    np.testing.assert_array_equal(buf.a, np.arange(6) * 8)
    assert staging == [("pinned", 6)] + [("Allreduce", np.ndarray), ("sync",)] * 3   # host buffer in MPI
    c.Allreduce_sum(buf[:4])                              # smaller: the same pinned buffer
    assert ("pinned", 4) not in staging
    assert c.Iallreduce_sum(buf) is None                  # device: blocking, nothing to wait for
    np.testing.assert_array_equal(buf.a, [0, 32, 64, 96, 64, 80])


def test_device_buffers_go_to_a_cuda_aware_mpi_after_a_stream_sync(staging, monkeypatch):
    monkeypatch.setattr(comm, "_cuda_aware", True)
    c = comm.Comm(FakeMPIComm(log=staging))
    buf = dev(np.ones(3, np.float64))
    c.Allreduce_sum(buf)
    c.Bcast(buf)
    c.Reduce_sum(buf, dev(np.zeros(3)))
    assert staging == [("sync",), ("Allreduce", FakeDeviceBuffer), ("sync",), ("Bcast", FakeDeviceBuffer),
                       ("sync",), ("Reduce", FakeDeviceBuffer, FakeDeviceBuffer)]


def test_device_bcast_and_reduce_are_staged(staging):
    root, other = comm.Comm(FakeMPIComm(rank=0, log=staging)), comm.Comm(FakeMPIComm(rank=1, log=[]))
    a, b = dev(np.ones(4, np.float32)), dev(np.ones(4, np.float32))
    root.Bcast(a)
    other.Bcast(b)
    assert a.tolist() == [1.0] * 4 and b.tolist() == [7.0] * 4
    recv = dev(np.zeros(4, np.float32))
    root.Reduce_sum(a, recv)
    other.Reduce_sum(b, None)
    assert recv.tolist() == [2.0] * 4
    host_recv = np.zeros(4, np.float32)                   # device send, host receive
    root.Reduce_sum(a, host_recv)
    assert host_recv.tolist() == [2.0] * 4
    with pytest.raises(ValueError, match="C-contiguous"):
        root.Allreduce_sum(dev(np.ones((4, 4), np.float32))[:, ::2])


def test_cuda_awareness_is_queried_or_set_by_environment(monkeypatch):
    monkeypatch.setattr(comm, "_cuda_aware", None)
    monkeypatch.setenv("HPCFL_CUDA_AWARE_MPI", "1")
    assert comm.cuda_aware_mpi() is True
    monkeypatch.setattr(comm, "_cuda_aware", None)
    monkeypatch.setenv("HPCFL_CUDA_AWARE_MPI", "0")
    assert comm.cuda_aware_mpi() is False
    monkeypatch.setattr(comm, "_cuda_aware", None)
    monkeypatch.delenv("HPCFL_CUDA_AWARE_MPI")
    comm.Comm.self_()                                     # MPI initialised
    assert isinstance(comm.cuda_aware_mpi(), bool)        # asked the library (the mpich wheel: False)
    if sys.platform.startswith("linux"):
        assert any("libmpi" in p for p in comm._loaded_mpi_libraries())


def test_nccl_comm_without_nccl_is_a_clear_error():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from cupy.cuda import nccl as cupy_nccl
        if getattr(cupy_nccl, "available", False):
            pytest.skip("CuPy loads NCCL here")
    except ImportError:
        pass
    with pytest.raises(UsageError, match="NCCL is not usable on every rank: .*(cupy|libnccl)") as info:
        nccl.NcclComm(comm.Comm.self_())
    assert info.value.collective                          # agreed by all ranks: each exits 2


def test_ranks_sharing_a_gpu_are_named():
    assert nccl._shared_gpus([("n1", "0000:01:00.0"), ("n1", "0000:02:00.0"), ("n2", "0000:01:00.0")]) is None
    assert (nccl._shared_gpus([("n1", "0000:01:00.0"), ("n1", "0000:02:00.0"), ("n1", "0000:01:00.0")])
            == "ranks 0 and 2 share GPU 0000:01:00.0 on n1")


class RecordingReducer:
    """Stands in for an NcclComm: sums through the MPI communicator and records what it got."""

    def __init__(self, c):
        self.comm, self.bufs = c, []

    def Allreduce_sum(self, buf):
        self.bufs.append(buf)
        self.comm.Allreduce_sum(buf)


class NoAllreduceComm(comm.Comm):
    def Allreduce_sum(self, buf):
        raise AssertionError("the step's sum must go through the reducer")


def test_replica_sums_each_steps_gradients_through_its_reducer():
    """--allreduce nccl wiring: the whole gradbuf (gradients, stop votes, loss) goes to the
    reducer once per step, the communicator's MPI Allreduce not at all, and the model is the
    same as with MPI."""
    cfg = Config(hidden=(32, 16), batch_size=64, backend="numpy")
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (512, 784), dtype=np.uint8), rng.integers(0, 10, 512).astype(np.uint8)
    batches = [rng.permutation(512)[:64] for _ in range(5)]
    plain = dp.Replica(cfg, ref, 64, norm=(MEAN, STD))
    for idx in batches:
        plain.step(comm.Comm.self_(), images, labels, idx, cfg.lr)
    reducer = RecordingReducer(comm.Comm.self_())
    rep = dp.Replica(cfg, ref, 64, reducer=reducer, norm=(MEAN, STD))
    strict = NoAllreduceComm(comm.Comm.self_().mpicomm)
    for idx in batches:
        rep.step(strict, images, labels, idx, cfg.lr)
    assert len(reducer.bufs) == 5 and all(b is rep.sync.gradbuf for b in reducer.bufs)
    np.testing.assert_array_equal(rep.host_params(), plain.host_params())
    assert sync.gradient_reducer(cfg.replace(allreduce="nccl"), comm.Comm.self_()) is None   # 1 rank: no sum


def test_cli_allreduce_nccl_without_the_cupy_backend_exits_2():
    if REASON is None:
        pytest.skip("a GPU is usable here")
    assert_clean_failure(run_hpcfl(2, "--allreduce", "nccl", "--max-steps", 1), 2,
                         "--allreduce nccl sums GPU buffers: it needs --backend cupy (this run's backend is numba)")


RAW_SOURCES = [("softmax", cb._SOFTMAX_SRC % {"nc": 10}), ("colsum", cb._COLSUM_SRC),
               ("clip", cb._CLIP_SRC % {"nc": 10})]
RAW_KERNELS = ["hpcfl_softmax_xent", "hpcfl_eval_counts", "hpcfl_relu_bwd_colsum", "hpcfl_colsum_finish",
               "hpcfl_clip_row_sumsq", "hpcfl_clip_bias_relu", "hpcfl_clip_softmax_xent", "hpcfl_clip_relu_bwd",
               "hpcfl_clip_factors", "hpcfl_clip_scale_colsum"]      # the clip ones: tests/test_clipping.py


def test_cuda_sources_compile_with_nvrtc():
    """NVRTC compiles without a GPU: where CuPy finds it, the raw kernels are compiled for real."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:
        pytest.skip(f"no NVRTC here ({type(exc).__name__}); "
                    "test_cuda_sources_compile_with_nvcc_without_spills checks them")
    for name, source in RAW_SOURCES:
        prog = nvrtc.createProgram(source, f"{name}.cu", [], [])
        try:
            nvrtc.compileProgram(prog, ["-arch=compute_75", "--std=c++17"])
        except Exception:
            pytest.fail(f"{name}: {nvrtc.getProgramLog(prog)}")
        assert "hpcfl_" in nvrtc.getPTX(prog).decode(errors="replace")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])   # A100, H100/H200
def test_cuda_sources_compile_with_nvcc_without_spills(tmp_path, arch):
    """The CUDA toolkit's compiler needs no GPU either: compile the raw kernels to machine code
    for the GPUs we target and read ptxas' resource report. Each kernel must exist, fit its
    launch bounds (1024 threads: at most 64 registers) and spill nothing to local memory; the
    CUDA sources are the same bytes that CuPy hands to NVRTC at run time."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on PATH (CUDA toolkit not installed)")
    report = {}
    for name, source in RAW_SOURCES:
        src = tmp_path / f"{name}.cu"
        src.write_text(source)
        proc = subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-std=c++17", "-Xptxas", "-v",
                               "-o", str(tmp_path / f"{name}.cubin"), str(src)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{name} for {arch}:\n{proc.stderr}"
        entry = None
        for line in proc.stderr.splitlines():   # ptxas prints one block per kernel
            if "Compiling entry function" in line:
                entry = line.split("'")[1]
                report[entry] = {}
            elif entry and "spill stores" in line:
                report[entry]["spill"] = line.strip()
            elif entry and "Used" in line and "registers" in line:
                report[entry]["registers"] = int(line.split("Used")[1].split()[0])
    assert sorted(report) == sorted(RAW_KERNELS), report
    for kernel, info in report.items():
        assert info["spill"].startswith(
            "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"), (kernel, info)
        assert info["registers"] <= 64, (kernel, info)


# ============================================================ 2. the backend on a CPU emulation of CuPy

EMU_HEADER = r"""
// CUDA on one CPU thread: each CUDA thread of a block is a ucontext coroutine; a barrier
// (__syncthreads, and the two halves of a warp shuffle) yields until every participant has
// arrived. Blocks run one after the other. Deterministic, and cheap enough for 1024 threads.
#include <ucontext.h>
#include <cmath>
#include <cstddef>
#include <functional>
#include <math.h>
#include <vector>
struct dim3 { unsigned x, y, z; };
static dim3 blockIdx, blockDim, gridDim, threadIdx;
struct EmuBarrier { int need = 0, arrived = 0; long generation = 0; };
static int emu_tid;
static EmuBarrier emu_block;
static std::vector<EmuBarrier> emu_warps;
static std::vector<double> emu_slots;
static std::vector<ucontext_t> emu_ctx;
static std::vector<char> emu_stacks;
static std::vector<int> emu_done;
static std::function<void()> emu_body;
static ucontext_t emu_sched;
static const size_t EMU_STACK = 32 * 1024;
static void emu_wait(EmuBarrier& b) {
    const long generation = b.generation;
    if (++b.arrived == b.need) { b.arrived = 0; ++b.generation; return; }
    while (b.generation == generation) swapcontext(&emu_ctx[emu_tid], &emu_sched);
}
static void emu_entry() { emu_body(); emu_done[emu_tid] = 1; }
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
static inline void __syncthreads() { emu_wait(emu_block); }
template <class T> static T __shfl_down_sync(unsigned, T v, int offset) {
    const int lane = emu_tid & 31, warp = emu_tid >> 5;
    emu_slots[emu_tid] = (double)v;
    emu_wait(emu_warps[warp]);
    const T r = lane + offset < 32 ? (T)emu_slots[emu_tid + offset] : v;
    emu_wait(emu_warps[warp]);
    return r;
}
template <class F> static void emu_launch(unsigned gx, unsigned gy, unsigned bx, unsigned by, F body) {
    gridDim = {gx, gy, 1};
    blockDim = {bx, by, 1};
    const int nt = (int)(bx * by);
    emu_body = body;
    emu_slots.assign(nt, 0.0);
    emu_ctx.resize(nt);
    if (emu_stacks.size() < nt * EMU_STACK) emu_stacks.resize(nt * EMU_STACK);
    for (unsigned y = 0; y < gy; ++y)
        for (unsigned x = 0; x < gx; ++x) {
            blockIdx = {x, y, 0};
            emu_block = EmuBarrier{nt};
            emu_warps.assign(nt / 32, EmuBarrier{32});
            emu_done.assign(nt, 0);
            for (int t = 0; t < nt; ++t) {
                getcontext(&emu_ctx[t]);
                emu_ctx[t].uc_stack.ss_sp = &emu_stacks[t * EMU_STACK];
                emu_ctx[t].uc_stack.ss_size = EMU_STACK;
                emu_ctx[t].uc_link = &emu_sched;
                makecontext(&emu_ctx[t], emu_entry, 0);
            }
            for (int left = nt; left > 0;)
                for (int t = 0; t < nt; ++t) {
                    if (emu_done[t]) continue;
                    emu_tid = t;
                    threadIdx = {t % bx, t / bx, 0};
                    swapcontext(&emu_sched, &emu_ctx[t]);
                    left -= emu_done[t];
                }
        }
}
#define EMU(name, params, args) extern "C" void emu_##name(unsigned gx, unsigned gy, unsigned bx, \
    unsigned by, params) { emu_launch(gx, gy, bx, by, [&] { name args; }); }
#define P(...) __VA_ARGS__
"""

# name -> (C parameters, call arguments, dtype of each argument: f4/i4/f8 pointers, 'int' scalars)
EMU_RAW = {
    "hpcfl_softmax_xent": ("const float* z, const int* y, int n, float* dz, float* gb, double* loss",
                           "(z, y, n, dz, gb, loss)", ["f4", "i4", "int", "f4", "f4", "f8"]),
    "hpcfl_eval_counts": ("const float* z, const int* y, int n, double* out", "(z, y, n, out)",
                          ["f4", "i4", "int", "f8"]),
    "hpcfl_relu_bwd_colsum": ("float* dz, const float* a, int n, int F, float* out", "(dz, a, n, F, out)",
                              ["f4", "f4", "int", "int", "f4"]),
    "hpcfl_colsum_finish": ("const float* part, int R, int F, float* gb", "(part, R, F, gb)",
                            ["f4", "int", "int", "f4"]),
}

CTYPES = {"float32": "float", "float64": "double", "int32": "int", "int64": "long long",
          "uint8": "unsigned char", "bool": "bool"}


class Cxx:
    """Compiles C++ into shared libraries (cached by source) and loads them."""

    def __init__(self, folder):
        self.folder, self.libs = folder, {}
        self.compiler = shutil.which("g++") or shutil.which("c++")

    def build(self, source: str) -> ctypes.CDLL:
        key = hashlib.sha256(source.encode()).hexdigest()[:16]
        if key not in self.libs:
            src, lib = self.folder / f"{key}.cpp", self.folder / f"{key}.so"
            src.write_text(source)
            proc = subprocess.run([self.compiler, "-std=c++17", "-O1", "-shared", "-fPIC",
                                   "-o", str(lib), str(src)], capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr
            self.libs[key] = ctypes.CDLL(str(lib))
        return self.libs[key]


@pytest.fixture(scope="session")
def cxx(tmp_path_factory):
    c = Cxx(tmp_path_factory.mktemp("cuda_emulation"))
    if c.compiler is None:
        pytest.skip("no C++ compiler (g++) to emulate the CUDA kernels on the CPU")
    probe = subprocess.run([c.compiler, "-std=c++17", "-fsyntax-only", "-x", "c++", "-"],
                           input="#include <ucontext.h>\nint main() {}\n", capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the C++ compiler has no C++17 or no <ucontext.h>")
    return c


def _pointer(a, want):
    assert isinstance(a, DevArray), f"a host array ({type(a).__name__}) was passed to a device kernel"
    assert a.flags.c_contiguous, "a raw kernel pointer needs a contiguous array"
    assert a.dtype == np.dtype(want), f"kernel expects {want}, got {a.dtype}"
    return ctypes.c_void_p(a.ctypes.data)


class EmuRawKernel:
    def __init__(self, cxx, code, name):
        wrappers = "".join(f"EMU({k}, P({p}), {a})\n" for k, (p, a, _) in EMU_RAW.items() if k in code)
        self.lib, self.name = cxx.build(EMU_HEADER + code + wrappers), name

    def __call__(self, grid, block, args, shared_mem=0):
        (gx, gy), (bx, by) = (tuple(grid) + (1,))[:2], (tuple(block) + (1,))[:2]
        assert (bx * by) % 32 == 0 and bx * by <= 1024
        kinds = EMU_RAW[self.name][2]
        assert len(args) == len(kinds)
        cargs = []
        for a, kind in zip(args, kinds):
            if kind == "int":
                assert type(a) is np.int32, f"scalar kernel arguments must be np.int32, got {type(a)}"
                cargs.append(ctypes.c_int(int(a)))
            else:
                cargs.append(_pointer(a, kind))
        getattr(self.lib, f"emu_{self.name}")(*map(ctypes.c_uint, (gx, gy, bx, by)), *cargs)


class EmuElementwiseKernel:
    """ElementwiseKernel semantics: non-raw arguments broadcast to the output's shape, raw ones
    indexed by hand, typed scalars by value, placeholder types from the arguments' dtypes."""

    def __init__(self, cxx, in_params, out_params, body, name):
        self.cxx, self.body = cxx, body
        self.params = []
        for kind, spec in (("in", in_params), ("out", out_params)):
            for item in spec.split(","):
                words = item.split()
                raw = words[0] == "raw"
                self.params.append((kind, raw, words[-2], words[-1]))

    def __call__(self, *args):
        assert len(args) == len(self.params)
        types_ = {}
        for a, (_, _, t, _) in zip(args, self.params):
            if t not in CTYPES:                                   # a placeholder like I or L
                types_[t] = np.dtype(a.dtype).name
        dtype = lambda t: np.dtype(types_.get(t, t))
        shape = np.broadcast_shapes(*[a.shape for a, p in zip(args, self.params)
                                      if not p[1] and isinstance(a, np.ndarray)])
        decls, keep = [], []
        for k, (a, (kind, raw, t, name)) in enumerate(zip(args, self.params)):
            ct = CTYPES[dtype(t).name]
            if raw:
                buf = a
                _pointer(a, dtype(t))
                decls.append(f"Raw<{ct}> {name}{{({ct}*)ptrs[{k}]}};")
            elif isinstance(a, np.ndarray):
                assert isinstance(a, DevArray), f"host array for {name}"
                assert a.dtype == dtype(t), f"{name}: {a.dtype} for {t}"
                if kind == "out":
                    assert a.shape == shape and a.flags.c_contiguous
                    buf = a
                    decls.append(f"{ct}& {name} = (({ct}*)ptrs[{k}])[i];")
                else:
                    buf = np.ascontiguousarray(np.broadcast_to(a, shape))
                    decls.append(f"const {ct} {name} = (({ct}*)ptrs[{k}])[i];")
            else:
                assert kind == "in" and isinstance(a, (np.generic, int, float))
                buf = np.array(a, dtype(t))
                decls.append(f"const {ct} {name} = *({ct}*)ptrs[{k}];")
            keep.append(buf)
        typedefs = "".join(f"typedef {CTYPES[v]} {k};\n" for k, v in types_.items())
        source = ("#include <math.h>\n#include <cstddef>\n"
                  "template <class T> struct Raw { T* p; T& operator[](ptrdiff_t k) const { return p[k]; } };\n"
                  + typedefs + 'extern "C" void ew(long long size, void** ptrs) {\n'
                  "  for (long long i = 0; i < size; ++i) {\n    " + "\n    ".join(decls)
                  + "\n    " + self.body + "\n  }\n}\n")
        lib = self.cxx.build(source)
        ptrs = (ctypes.c_void_p * len(keep))(*[b.ctypes.data for b in keep])
        lib.ew(ctypes.c_longlong(int(np.prod(shape))), ptrs)


@pytest.fixture
def emu(monkeypatch, cxx):
    """cupy_backend running on `shim`, a CuPy stand-in whose kernels run on the CPU."""
    allocations = []

    def alloc(a):
        allocations.append(a.shape)
        return a.view(DevArray)

    def asarray(a, dtype=None):
        if isinstance(a, DevArray) and (dtype is None or a.dtype == dtype):
            return a
        return alloc(np.array(a, dtype=dtype))

    stream = types.SimpleNamespace(synchronize=lambda: None, ptr=0)
    shim = types.SimpleNamespace(
        ndarray=DevArray, float32=np.float32, float64=np.float64, int32=np.int32, int64=np.int64, uint8=np.uint8,
        empty=lambda shape, dtype=np.float64: alloc(np.empty(shape, dtype)),
        zeros=lambda shape, dtype=np.float64: alloc(np.zeros(shape, dtype)),
        empty_like=lambda a: alloc(np.empty_like(a)),
        subtract=np.subtract, asarray=asarray,
        cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDevice=lambda: 0),
                                   get_current_stream=lambda: stream),
        ElementwiseKernel=lambda i, o, body, name: EmuElementwiseKernel(cxx, i, o, body, name),
        RawKernel=lambda code, name: EmuRawKernel(cxx, code, name),
        allocations=allocations)
    monkeypatch.setattr(cb, "_cupy", lambda: shim)
    monkeypatch.setattr(cb, "_blas_begin", lambda: None)
    monkeypatch.setattr(cb, "_sgemm", numpy_sgemm)
    monkeypatch.setattr(cb, "_kernels", {})
    monkeypatch.setattr(cb, "_scratch", {})
    return shim


@pytest.mark.parametrize("lay, n", [(SMALL, 1), (SMALL, 37), (SMALL, 300), (SMALL, 1500), (LAYOUT, 45)])
def test_emulated_forward_backward_and_evaluate_match_reference(emu, lay, n):
    p = model.init_params(lay, 4)
    p[lay.views(p)[0][0].size:] += np.float32(0.01)      # non-zero biases
    x, y = batch(lay, n, seed=n)
    loss_ref, g_ref = reference_step(lay, p, x, y)
    ws = cb.Workspace(lay, max(n, 64))
    dp_, dg = cb.to_device(p), cb.to_device(np.full_like(p, np.nan))
    ready = []
    loss = cb.forward_backward(lay.views(dp_), cb.to_device(x), cb.to_device(y), lay.views(dg), ws,
                               on_layer_ready=ready.append)
    assert ready == list(range(lay.n_layers - 1, -1, -1))
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    np.testing.assert_allclose(cb.to_host(dg), g_ref, rtol=1e-4, atol=1e-5 * np.abs(g_ref).max())
    correct_ref, eval_loss_ref = ref.evaluate(lay.views(p), x, y, None)
    correct, eval_loss = cb.evaluate(lay.views(dp_), cb.to_device(x), cb.to_device(y), ws)
    assert (correct, eval_loss) == (correct_ref, pytest.approx(eval_loss_ref, rel=1e-5))
    assert isinstance(correct, int) and isinstance(loss, float)


def test_emulated_steps_allocate_nothing_after_the_first(emu):
    lay, n = SMALL, 300
    p = cb.to_device(model.init_params(lay, 0))
    g = emu.zeros(lay.n_params, np.float32)
    ws = cb.Workspace(lay, n)
    x, y = (cb.to_device(a) for a in batch(lay, n))
    images, labels = cb.upload_images(np.zeros((n, 20), np.uint8)), cb.upload_images(np.zeros(n, np.uint8))
    idx = np.arange(n)
    cb.gather(images, idx, x, MEAN, STD)                 # warm-up: the index buffer
    before = len(emu.allocations)
    for _ in range(2):
        cb.gather(images, idx, x, MEAN, STD)
        cb.gather_labels(labels, idx, y)
        cb.forward_backward(lay.views(p), x, y, lay.views(g), ws)
        cb.evaluate(lay.views(p), x, y, ws)
    assert emu.allocations[before:] == []


def check_gather(rows: int) -> None:
    """gather and gather_labels against the reference: device or host images and labels, with
    host, device int32 or device int64 indices (a third of the rows, into a larger buffer)."""
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (rows, 784), dtype=np.uint8)
    labels = rng.integers(0, 10, rows).astype(np.uint8)
    idx = rng.permutation(rows)[:rows * 17 // 50]
    n_out = rows * 2 // 5
    out_ref, y_ref = np.zeros((n_out, 784), np.float32), np.zeros(n_out, np.int32)
    ref.gather(src, idx, out_ref, MEAN, STD)
    ref.gather_labels(labels, idx, y_ref)
    for src_, idx_, labels_ in [(cb.upload_images(src), idx, cb.upload_images(labels)),               # host idx
                                (cb.upload_images(src), cb.to_device(idx.astype(np.int32)), cb.upload_images(labels)),
                                (src, idx, labels),                                                  # host data
                                (src, cb.to_device(idx), labels)]:                       # host data, device idx
        out, y = cb.xp.zeros((n_out, 784), np.float32), cb.xp.zeros(n_out, np.int32)
        cb.gather(src_, idx_, out, MEAN, STD)
        cb.gather_labels(labels_, idx_, y)
        np.testing.assert_allclose(cb.to_host(out), out_ref, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(cb.to_host(y), y_ref)


def test_emulated_gather_matches_reference_for_device_and_host_sources(emu):
    check_gather(50)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_emulated_optimizers_match_reference(emu, opt):
    check_optimizer_matches_reference(cb, opt, 1000)


def replica_run(backend, steps=4, batch_size=64, optimizer="sgd", data_on_device=False):
    """`steps` dp steps of one process on synthetic data; the final host parameters."""
    cfg = Config(hidden=(32, 16), batch_size=batch_size, optimizer=optimizer,
                 lr=0.05 if optimizer == "sgd" else 1e-3, backend="x")
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (512, 784), dtype=np.uint8)
    labels = rng.integers(0, 10, 512).astype(np.uint8)
    if data_on_device:
        images, labels = backend.upload_images(images), backend.upload_images(labels)
    rep = dp.Replica(cfg, backend, batch_size, norm=(MEAN, STD))
    c = comm.Comm.self_()
    losses = [rep.step(c, images, labels, rng.permutation(512)[:batch_size], cfg.lr) for _ in range(steps)]
    return rep.host_params(), losses


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_emulated_replica_follows_the_numpy_replica(emu, optimizer):
    want, want_losses = replica_run(ref, optimizer=optimizer)
    for on_device in (False, True):
        got, losses = replica_run(cb, optimizer=optimizer, data_on_device=on_device)
        assert losses == pytest.approx(want_losses, rel=1e-5)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


# ============================================================ 3. on a GPU

@needs_gpu
def test_gpu_is_described_and_selected():
    assert "cc " in cb.describe_gpu() and "CUDA " in cb.describe_gpu()
    assert cb.select_device(0) == 0
    assert backends.resolve("auto") == "cupy"


@needs_gpu
@pytest.mark.parametrize("n", [1, 37, 256, 300, 1000, 8192])
def test_gpu_forward_backward_and_evaluate_match_reference(n):
    p = model.init_params(LAYOUT, 4)
    x, y = batch(LAYOUT, n, seed=n)
    loss_ref, g_ref = reference_step(LAYOUT, p, x, y)
    ws = cb.Workspace(LAYOUT, n)
    dp_, dg = cb.to_device(p), cb.xp.full(p.shape, np.nan, np.float32)
    ready = []
    loss = cb.forward_backward(LAYOUT.views(dp_), cb.to_device(x), cb.to_device(y), LAYOUT.views(dg), ws,
                               on_layer_ready=ready.append)
    assert ready == [2, 1, 0]
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    # float32 sums in different orders: test_kernels' tolerance at 128 rows, widened like the
    # rounding error of a sum, with sqrt(rows)
    atol = 1e-5 * np.abs(g_ref).max() * max(1.0, np.sqrt(n / 128))
    np.testing.assert_allclose(cb.to_host(dg), g_ref, rtol=1e-4, atol=atol)
    correct_ref, eval_loss_ref = ref.evaluate(LAYOUT.views(p), x, y, None)
    correct, eval_loss = cb.evaluate(LAYOUT.views(dp_), cb.to_device(x), cb.to_device(y), ws)
    assert correct == correct_ref and eval_loss == pytest.approx(eval_loss_ref, rel=1e-5)


@needs_gpu
def test_gpu_gather_matches_reference_for_device_and_host_sources():
    check_gather(500)


@needs_gpu
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_gpu_optimizers_match_reference(opt):
    check_optimizer_matches_reference(cb, opt, 100_000)   # test_kernels runs 1000 on the GPU too


@needs_gpu
def test_gpu_steps_allocate_nothing_after_the_first():
    cp = cb.xp
    pool = cp.get_default_memory_pool()
    n = 8192
    p = cb.to_device(model.init_params(LAYOUT, 0))
    g = cp.zeros(LAYOUT.n_params, np.float32)
    ws = cb.Workspace(LAYOUT, n)
    images = cb.upload_images(np.random.default_rng(0).integers(0, 256, (n, 784), dtype=np.uint8))
    labels = cb.upload_images(np.zeros(n, np.uint8))
    x, y = cp.empty((n, 784), np.float32), cp.empty(n, np.int32)
    momentum = cp.zeros_like(g)
    idx = np.arange(n)

    def step():
        cb.gather(images, idx, x, MEAN, STD)
        cb.gather_labels(labels, idx, y)
        cb.forward_backward(LAYOUT.views(p), x, y, LAYOUT.views(g), ws)
        cb.sgd_update(p, g, momentum, 0.01, 0.9, 0.0, 1.0 / n)

    step()
    used, total = pool.used_bytes(), pool.total_bytes()
    for _ in range(3):
        step()
    assert (pool.used_bytes(), pool.total_bytes()) == (used, total)


@needs_gpu
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_gpu_replica_follows_the_numpy_replica(optimizer):
    want, want_losses = replica_run(ref, steps=10, optimizer=optimizer)
    for on_device in (False, True):
        got, losses = replica_run(cb, steps=10, optimizer=optimizer, data_on_device=on_device)
        assert losses == pytest.approx(want_losses, rel=1e-4)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4


GPU_MPI = """
import numpy as np, cupy as cp
from hpcfl.parallel import comm, launch, nccl, sync
from hpcfl.backends import cupy_backend as cb
c = comm.Comm.world()
cb.select_device(launch.local_rank(c))
buf = cp.arange(10, dtype=cp.float32) * (c.rank + 1)
c.Allreduce_sum(buf)
b = cp.full(4, c.rank, cp.float64)
c.Bcast(b, root=1)
recv = cp.zeros(10, cp.float32) if c.rank == 0 else None
c.Reduce_sum(buf, recv)
if c.rank == 0:
    assert np.array_equal(buf.get(), np.arange(10) * 3), buf
    assert np.array_equal(b.get(), np.ones(4)), b
    assert np.array_equal(recv.get(), np.arange(10) * 6), recv
    print("ok", comm.cuda_aware_mpi())
"""


@needs_gpu
@pytest.mark.parametrize("aware", ["0", "auto"])
def test_gpu_collectives_on_device_buffers_at_two_ranks(aware):
    env = {"HPCFL_CUDA_AWARE_MPI": "0"} if aware == "0" else {}
    proc = subprocess.run([*mpirun_cmd(2), sys.executable, "-c", GPU_MPI], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, **env})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


@needs_gpu
@needs_mnist
def test_gpu_nccl_allreduce_at_two_ranks(tmp_path):
    """--allreduce nccl: with a GPU per rank, the same model as MPI's sum (two addends: the
    same bits in any order); with one GPU for both ranks, one clear refusal."""
    common = ("--backend", "cupy", "--max-steps", 30, "--epochs", 1, "--quiet")
    proc = run_hpcfl(2, *common, "--allreduce", "nccl", "--out", tmp_path / "nccl")
    out = proc.stdout + proc.stderr
    if cb.xp.cuda.runtime.getDeviceCount() < 2:
        assert_clean_failure(proc, 2, "NCCL needs one GPU per rank, but ranks 0 and 1 share GPU")
        return
    assert proc.returncode == 0, out
    proc = run_hpcfl(2, *common, "--allreduce", "fused", "--out", tmp_path / "mpi")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with np.load(tmp_path / "nccl/model.npz") as a, np.load(tmp_path / "mpi/model.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])


def test_gpu_bench_json_becomes_targets_6a_6b_and_section_8(tmp_path):
    """benchmarks/report.py's reading of gpu_bench.json, on a made-up record of the shape
    gpu_bench.py --out writes (the numbers are arbitrary; none of them is a measurement)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import report
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = [{"implementation": impl, "batch": b, "epoch_seconds": t, "epoch_times": [t], "samples_per_second": 6e4 / t,
             "tflops": tf, "final_loss": 0.1}
            for impl, b, t, tf in [("hpcfl cupy", 128, 0.9, 0.1), ("PyTorch CUDA (torch 2.x)", 128, 1.2, 0.08),
                                   ("hpcfl cupy", 8192, 0.02, 30.0), ("PyTorch CUDA (torch 2.x)", 8192, 0.03, 20.0)]]
    record = {"command": "python benchmarks/gpu_bench.py --out x", "date": "d", "gpu": "G", "host": "h",
              "cupy": "14", "data": "MNIST", "model": [784, 256, 128, 10], "sgemm_tflops_8192": 50.0,
              "sgemm_tflops_shape": 40.0, "epochs": 3, "rows": rows}
    assert report._gpu_analysis(tmp_path) is None
    (tmp_path / "gpu_bench.json").write_text(json.dumps(record))
    g = report._gpu_analysis(tmp_path)
    assert g["vs_torch"] == pytest.approx(0.75) and g["gemm_fraction"] == pytest.approx(0.6)
    six = [t for t in report.targets({"gpu": g, "info": {}}) if t["target"].startswith("6")]
    assert [(t["ratio"], t["status"]) for t in six] == [("0.75", "**met**"), ("0.60", "**met**")]
    lines = []
    report._gpu(report.analyse(tmp_path), lines.append)
    assert "| hpcfl cupy | 8192 | 0.0200 | 3,000,000 | 30.00 | 60.0% | 0.1000 |" in lines


def test_emulated_self_test_of_the_availability_check(emu, monkeypatch):
    """unavailable_reason()'s check on a GPU: our SGEMM binding and a kernel against NumPy.
    It must pass where they are right (an earlier version compared with a wrong constant and
    would have declared every GPU unusable) and fail where the SGEMM is wrong."""
    assert cb._self_test() is None

    def transposed_result(transa, transb, m, n, k, A, lda, B, ldb, C, ldc):
        numpy_sgemm(transa, transb, m, n, k, A, lda, B, ldb, C, ldc)
        C[...] = C.reshape(n, m).T.reshape(C.shape)               # row/column-major mix-up
    monkeypatch.setattr(cb, "_sgemm", transposed_result)
    assert "a test SGEMM and kernel gave" in cb._self_test()


def test_emulated_gpu_bench_times_the_trainers_own_step(emu, monkeypatch):
    """benchmarks/gpu_bench.py's hpcfl side runs dp.Replica.step on device data (here on the
    CPU emulation, with a 256-sample 'epoch'); the loss it reports is the mean per sample."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    monkeypatch.setattr(gpu_bench, "N_TRAIN", 256)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (256, 784), dtype=np.uint8), rng.integers(0, 10, 256).astype(np.uint8)
    times, loss = gpu_bench.time_hpcfl(cb.upload_images(images), cb.upload_images(labels), SMALL_784, 64, 2)
    assert len(times) == 2 and all(t > 0 for t in times)
    assert 1.0 < loss < 4.0                                     # about ln(10) = 2.3 for a fresh model


@needs_gpu
def test_gpu_refuses_allreduce_overlap_with_one_message():
    assert_clean_failure(run_hpcfl(2, "--backend", "cupy", "--allreduce", "overlap", "--max-steps", 1), 2,
                         "--allreduce overlap works on host buffers only")


@needs_mnist
@pytest.mark.parametrize("mode_args", [
    ("--mode", "dp", "--max-steps", 5, "--epochs", 1, "--batch-size", 64),
    ("--mode", "fl", "--rounds", 1, "--num-clients", 200, "--client-fraction", 0.01, "--partition", "shards"),
], ids=["dp", "fl"])
def test_emulated_cli_runs_dp_and_fl_on_the_cupy_path(emu, monkeypatch, tmp_path, mode_args):
    """`python -m hpcfl --backend cupy` in one process on the CPU emulation, on real MNIST: the
    CLI's GPU branch (device selection, data uploaded once), the trainers with device-resident
    data and batch orders, evaluation, and the saved model; compared with the numpy backend."""
    from hpcfl import api, cli

    monkeypatch.setattr(cb, "unavailable_reason", lambda: None)
    chosen = []
    monkeypatch.setattr(cb, "select_device", lambda local_rank: chosen.append(local_rank) or 0)
    models = {}
    for backend in ("cupy", "numpy"):
        out = tmp_path / backend
        argv = [*map(str, mode_args), "--backend", backend, "--hidden", "16,12", "--quiet", "--out", str(out),
                "--data-dir", str(DATA_DIR)]
        api.train(cli.parse_config(argv, 1), comm=comm.Comm.self_())   # the CLI's composition root
        with np.load(out / "model.npz") as f:
            models[backend] = f["params"]
    assert chosen == [0]
    n_uploads = [a for a in emu.allocations if a in ((60000, 784), (10000, 784))]
    assert len(n_uploads) == 2                                   # train and test images, once each
    rel = np.linalg.norm(models["cupy"] - models["numpy"]) / np.linalg.norm(models["numpy"])
    assert rel < 1e-5, rel
