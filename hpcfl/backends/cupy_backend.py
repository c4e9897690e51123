"""GPU backend: matrix products as cuBLAS SGEMMs, everything else in fused CUDA kernels (CuPy).

The same functions and signatures as numba_backend. Importing this module never imports CuPy
or touches a GPU: `unavailable_reason()` does that at run time, so `hpcfl info`, `--backend
auto` and CPU-only machines work whether or not CuPy is installed.

One training step on the device, for the 784-256-128-10 MLP (B rows):
    gather       uint8 rows -> normalised float32 x            (1 kernel; + 1 index upload)
    per layer    z = a @ W (SGEMM), then z += b and ReLU       (SGEMM + 1 kernel)
    softmax      dz = softmax(z) - onehot(y), bias grad, loss  (1 kernel, one block)
    per layer    dW = a.T @ dz (SGEMM); da = dz @ W.T (SGEMM), then da *= (a > 0) and the
                 bias grad as column sums of da                (1 kernel; + 1 when B > 256)
    loss         one 8-byte device -> host copy, the backend's one synchronisation in a step
Nothing is allocated on the device inside a step after the first: activations, deltas and
reduction scratch live in a Workspace sized for the largest batch. All reductions have a fixed
order (no atomics), so a step gives the same bits run after run on the same GPU model (as cuBLAS
promises for its SGEMMs).

Data: the trainer should copy the uint8 images to the device once (`upload_images`: 47 MB for
MNIST's training set); `gather` then reads device rows. Batch indices should be on the device
too (the trainers upload each epoch's order once): a host index array costs an upload, and a
pageable upload waits for the stream. With host images (a memmap) `gather` still works, through
one host-side fancy-index and one host -> device copy per step.

Devices: one GPU per rank, chosen by node-local rank (`select_device`). Before the trainer calls
it, the local rank is read from the launcher's environment, so the availability check of 8
ranks does not create 8 CUDA contexts on GPU 0.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os

import numpy as np

from .host import normalisation

cp = None                    # the cupy module, once _cupy() has imported it
_REASON: str | None = "not checked"      # cached unavailable_reason(); "not checked" before the first call
_DEVICE = None               # the device id select_device() chose

INSTALL_HINT = "pip install -e '.[gpu]' for CUDA 12 drivers, '.[gpu13]' for CUDA 13"
LIBS_HINT = ("CUDA libraries missing: pip install 'cupy-cuda12x[ctk]' (or load the site's CUDA "
             "module)")

# Environment variables in which launchers publish the node-local rank.
_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK",
                    "PMI_LOCAL_RANK", "PALS_LOCAL_RANKID", "SLURM_LOCALID", "LOCAL_RANK")


def __getattr__(name):
    """`xp` is the cupy module, imported on first use (PEP 562), never at import time."""
    if name == "xp":
        return _cupy()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _cupy():
    global cp
    if cp is None:
        import cupy

        cp = cupy
    return cp


# ---------------------------------------------------------------- availability and devices

def unavailable_reason() -> str | None:
    """None when a CUDA GPU is usable through CuPy, else why not (one clear line). Cached.

    Checks, in order: CuPy installed, an NVIDIA driver, a visible device, and a tiny kernel and
    SGEMM on it (the first kernel compile needs NVRTC, the SGEMM needs cuBLAS; CuPy 14 finds
    both in the CUDA toolkit or in the pip packages that `cupy-cuda12x[ctk]` brings).
    """
    global _REASON
    if _REASON == "not checked":
        _REASON = _check()
    return _REASON


def _check() -> str | None:
    try:
        spec = importlib.util.find_spec("cupy")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return f"cupy is not installed ({INSTALL_HINT})"
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return f"no usable CUDA GPU: no NVIDIA driver found ({exc})"
    try:
        cupy = _cupy()
    except Exception as exc:  # a broken install raises anything from ImportError to OSError
        return f"cupy cannot be imported ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"no usable CUDA GPU: {_one_line(exc)}"
    if count == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return "no usable CUDA GPU: no CUDA device found" + (
            f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
    try:
        if _DEVICE is None:
            select_device(_env_local_rank())
        wrong = _self_test()
        if wrong:
            return f"no usable CUDA GPU: {wrong}"
    except ImportError as exc:  # CuPy 14 raises ImportError when it cannot find a CUDA library
        return f"no usable CUDA GPU: {LIBS_HINT} ({_one_line(exc)})"
    except Exception as exc:
        text = _one_line(exc)
        if "nvrtc" in text.lower() or "cublas" in text.lower():
            return f"no usable CUDA GPU: {LIBS_HINT} ({text})"
        return f"no usable CUDA GPU: {text}"
    return None


def _self_test() -> str | None:
    """One SGEMM through our own cuBLAS binding and one of our kernels (compiled by NVRTC) on a
    tiny non-square case, against NumPy: None when right, else what was wrong."""
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.arange(6, dtype=np.float32).reshape(3, 2) - 2
    bias = np.array([0.5, -100.0], np.float32)
    want = np.maximum(a @ b + bias, 0)                      # small integers and halves: exact
    out = _cupy().empty((2, 2), np.float32)
    _blas_begin()
    _gemm(to_device(a), to_device(b), out)
    _elementwise("bias_relu")(to_device(bias), out)
    got = to_host(out)
    if not np.array_equal(got, want):
        return f"a test SGEMM and kernel gave {got.tolist()} instead of {want.tolist()}"
    return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _env_local_rank() -> int:
    """The node-local rank from the launcher's environment (mpirun, srun...), else 0."""
    for var in _LOCAL_RANK_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def select_device(local_rank: int) -> int:
    """Use GPU `local_rank % (visible GPUs)` in this process; returns its id.

    Call it with launch.local_rank(comm) before allocating anything on the device. More ranks
    than GPUs on a node share GPUs round-robin (correct; enable MPS for speed).
    """
    global _DEVICE
    cupy = _cupy()
    device = local_rank % cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(device).use()
    _DEVICE = device
    return device


def describe_gpu() -> str | None:
    """e.g. 'NVIDIA H100 80GB HBM3 (cc 9.0, 79 GiB), CUDA 12.4'; None when no GPU. Never raises."""
    try:
        if unavailable_reason():
            return None
        cupy = _cupy()
        device = cupy.cuda.runtime.getDevice()
        props = cupy.cuda.runtime.getDeviceProperties(device)
        name = props["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        gib = props["totalGlobalMem"] / 2**30
        runtime = cupy.cuda.runtime.runtimeGetVersion()
        text = (f"{name} (cc {props['major']}.{props['minor']}, {gib:.0f} GiB), "
                f"CUDA {runtime // 1000}.{runtime % 1000 // 10}")
        count = cupy.cuda.runtime.getDeviceCount()
        return text + (f", device {device} of {count}" if count > 1 else "")
    except Exception:
        return None


# ---------------------------------------------------------------- host <-> device

def to_device(a):
    return _cupy().asarray(a)


def to_host(a):
    cupy = _cupy()
    return a.get() if isinstance(a, cupy.ndarray) else np.asarray(a)


def synchronize() -> None:
    _cupy().cuda.get_current_stream().synchronize()


def upload_images(a):
    """Copy a host array (the uint8 images, or the labels) to the device once, C-contiguous."""
    return _cupy().asarray(np.ascontiguousarray(a))


# ---------------------------------------------------------------- kernels

# Reductions: a thread handles rows t, t + blockDim.x, ... and keeps its partial sums in
# registers; then warp shuffles and one warp finish the sum. Fixed order: deterministic.
_SOFTMAX_SRC = r"""
#define NC %(nc)d
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

// One block (blockDim.x a multiple of 32): dz = softmax(logits) - onehot(y), gb = column sums
// of dz, loss[0] = summed cross-entropy (float64).
extern "C" __global__ void __launch_bounds__(1024)
hpcfl_softmax_xent(const float* __restrict__ logits, const int* __restrict__ y, const int n,
                   float* __restrict__ dz, float* __restrict__ gb, double* __restrict__ loss)
{
    float acc[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) acc[c] = 0.f;
    double lsum = 0.0;
    for (int r = threadIdx.x; r < n; r += blockDim.x) {
        const float* z = logits + (size_t)r * NC;
        float* d = dz + (size_t)r * NC;
        float e[NC];
        float m = z[0];
#pragma unroll
        for (int c = 1; c < NC; ++c) m = fmaxf(m, z[c]);
        float s = 0.f;
#pragma unroll
        for (int c = 0; c < NC; ++c) { e[c] = expf(z[c] - m); s += e[c]; }
        const float inv = 1.f / s;
        const int label = y[r];
        lsum += (double)logf(s) + (double)m - (double)z[label];
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            const float g = e[c] * inv - (c == label ? 1.f : 0.f);
            d[c] = g;
            acc[c] += g;
        }
    }
    __shared__ float sh_acc[32][NC];
    __shared__ double sh_loss[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
    for (int c = 0; c < NC; ++c) acc[c] = warp_sum(acc[c]);
    lsum = warp_sum(lsum);
    if (lane == 0) {
#pragma unroll
        for (int c = 0; c < NC; ++c) sh_acc[warp][c] = acc[c];
        sh_loss[warp] = lsum;
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            const float v = warp_sum(lane < nwarps ? sh_acc[lane][c] : 0.f);
            if (lane == 0) gb[c] = v;
        }
        const double l = warp_sum(lane < nwarps ? sh_loss[lane] : 0.0);
        if (lane == 0) loss[0] = l;
    }
}

// One block: out[0] = number of rows whose argmax (first maximum) is y, out[1] = summed loss.
extern "C" __global__ void __launch_bounds__(1024)
hpcfl_eval_counts(const float* __restrict__ logits, const int* __restrict__ y, const int n,
                  double* __restrict__ out)
{
    double correct = 0.0, lsum = 0.0;
    for (int r = threadIdx.x; r < n; r += blockDim.x) {
        const float* z = logits + (size_t)r * NC;
        float m = z[0];
        int arg = 0;
#pragma unroll
        for (int c = 1; c < NC; ++c) if (z[c] > m) { m = z[c]; arg = c; }
        float s = 0.f;
#pragma unroll
        for (int c = 0; c < NC; ++c) s += expf(z[c] - m);
        const int label = y[r];
        lsum += (double)logf(s) + (double)m - (double)z[label];
        correct += (arg == label) ? 1.0 : 0.0;
    }
    __shared__ double sh[2][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    correct = warp_sum(correct);
    lsum = warp_sum(lsum);
    if (lane == 0) { sh[0][warp] = correct; sh[1][warp] = lsum; }
    __syncthreads();
    if (warp == 0) {
        const double c = warp_sum(lane < nwarps ? sh[0][lane] : 0.0);
        const double l = warp_sum(lane < nwarps ? sh[1][lane] : 0.0);
        if (lane == 0) { out[0] = c; out[1] = l; }
    }
}
"""

# ReLU backward fused with the bias gradient. Block (32, 32): threadIdx.x walks 32 adjacent
# columns (coalesced), threadIdx.y 32 row lanes; grid (ceil(F/32), R) splits the rows in R
# strided parts. out[blockIdx.y * F + col] = this part's column sum (with R == 1, out is gb).
_COLSUM_SRC = r"""
extern "C" __global__ void __launch_bounds__(1024)
hpcfl_relu_bwd_colsum(float* __restrict__ dz, const float* __restrict__ a, const int n,
                      const int F, float* __restrict__ out)
{
    __shared__ float sh[32][33];
    const int col = blockIdx.x * 32 + threadIdx.x;
    float acc = 0.f;
    if (col < F) {
        for (int r = blockIdx.y * 32 + threadIdx.y; r < n; r += gridDim.y * 32) {
            const size_t k = (size_t)r * F + col;
            const float v = a[k] <= 0.f ? 0.f : dz[k];
            dz[k] = v;
            acc += v;
        }
    }
    sh[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < F) {
        float s = 0.f;
        for (int j = 0; j < 32; ++j) s += sh[j][threadIdx.x];
        out[(size_t)blockIdx.y * F + col] = s;
    }
}

// gb[col] = sum over the R parts, in order.
extern "C" __global__ void
hpcfl_colsum_finish(const float* __restrict__ part, const int R, const int F,
                    float* __restrict__ gb)
{
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col < F) {
        float s = 0.f;
        for (int j = 0; j < R; ++j) s += part[(size_t)j * F + col];
        gb[col] = s;
    }
}
"""

# Per-sample gradient clipping (DP-SGD, forward_backward_clipped). Row norms take one warp per
# row (block (32, 8), grid ceil(n / 8)): lanes stride over the columns, a shuffle tree sums the
# lanes, so every row has one fixed order and no atomics. sq[r] collects sample r's squared
# gradient norm, sum over layers of (||a_r||^2 + 1) ||delta_r||^2 (a = the layer's input).
_CLIP_SRC = r"""
#define NC %(nc)d
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

// out[r] = ||a[r]||^2 (the network's input rows).
extern "C" __global__ void __launch_bounds__(256)
hpcfl_clip_row_sumsq(const float* __restrict__ a, const int n, const int F, float* __restrict__ out)
{
    const int r = blockIdx.x * blockDim.y + threadIdx.y;
    if (r >= n) return;                                   // the whole warp: it shares r
    const float* row = a + (size_t)r * F;
    float s = 0.f;
    for (int c = threadIdx.x; c < F; c += 32) { const float v = row[c]; s += v * v; }
    s = warp_sum(s);
    if (threadIdx.x == 0) out[r] = s;
}

// z = max(z + b, 0) in place; out[r] = ||z[r]||^2 (the next layer's input norms).
extern "C" __global__ void __launch_bounds__(256)
hpcfl_clip_bias_relu(float* __restrict__ z, const float* __restrict__ b, const int n, const int F,
                     float* __restrict__ out)
{
    const int r = blockIdx.x * blockDim.y + threadIdx.y;
    if (r >= n) return;
    float* row = z + (size_t)r * F;
    float s = 0.f;
    for (int c = threadIdx.x; c < F; c += 32) {
        const float v = fmaxf(row[c] + b[c], 0.f);
        row[c] = v;
        s += v * v;
    }
    s = warp_sum(s);
    if (threadIdx.x == 0) out[r] = s;
}

// One block (blockDim.x a multiple of 32): dz = softmax(logits) - onehot(y), no bias sum (it
// waits for the clipping); sq[r] = (asq[r] + 1) ||dz[r]||^2; loss[0] = summed cross-entropy.
extern "C" __global__ void __launch_bounds__(1024)
hpcfl_clip_softmax_xent(const float* __restrict__ logits, const int* __restrict__ y, const int n,
                        const float* __restrict__ asq, float* __restrict__ dz, float* __restrict__ sq,
                        double* __restrict__ loss)
{
    double lsum = 0.0;
    for (int r = threadIdx.x; r < n; r += blockDim.x) {
        const float* z = logits + (size_t)r * NC;
        float* d = dz + (size_t)r * NC;
        float e[NC];
        float m = z[0];
#pragma unroll
        for (int c = 1; c < NC; ++c) m = fmaxf(m, z[c]);
        float s = 0.f;
#pragma unroll
        for (int c = 0; c < NC; ++c) { e[c] = expf(z[c] - m); s += e[c]; }
        const float inv = 1.f / s;
        const int label = y[r];
        lsum += (double)logf(s) + (double)m - (double)z[label];
        float dsq = 0.f;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            const float g = e[c] * inv - (c == label ? 1.f : 0.f);
            d[c] = g;
            dsq += g * g;
        }
        sq[r] = (asq[r] + 1.f) * dsq;
    }
    __shared__ double sh_loss[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    lsum = warp_sum(lsum);
    if (lane == 0) sh_loss[warp] = lsum;
    __syncthreads();
    if (warp == 0) {
        const double l = warp_sum(lane < nwarps ? sh_loss[lane] : 0.0);
        if (lane == 0) loss[0] = l;
    }
}

// dz *= (a > 0) in place; sq[r] += (asq[r] + 1) ||dz[r]||^2 (asq: this layer's input norms).
extern "C" __global__ void __launch_bounds__(256)
hpcfl_clip_relu_bwd(float* __restrict__ dz, const float* __restrict__ a, const int n, const int F,
                    const float* __restrict__ asq, float* __restrict__ sq)
{
    const int r = blockIdx.x * blockDim.y + threadIdx.y;
    if (r >= n) return;
    float* row = dz + (size_t)r * F;
    const float* arow = a + (size_t)r * F;
    float s = 0.f;
    for (int c = threadIdx.x; c < F; c += 32) {
        const float v = arow[c] <= 0.f ? 0.f : row[c];
        row[c] = v;
        s += v * v;
    }
    s = warp_sum(s);
    if (threadIdx.x == 0) sq[r] += (asq[r] + 1.f) * s;
}

// One block: factor[r] = min(1, clip / sqrt(sq[r])) (1 when sq[r] is 0: never clipped);
// out[1] = the number of rows clipped (beside the loss in out[0]).
extern "C" __global__ void __launch_bounds__(1024)
hpcfl_clip_factors(const float* __restrict__ sq, const int n, const float clip,
                   float* __restrict__ factor, double* __restrict__ out)
{
    double count = 0.0;
    for (int r = threadIdx.x; r < n; r += blockDim.x) {
        const float norm = sqrtf(sq[r]);
        const bool clipped = norm > clip;
        factor[r] = clipped ? clip / norm : 1.f;
        count += clipped ? 1.0 : 0.0;
    }
    __shared__ double sh[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    count = warp_sum(count);
    if (lane == 0) sh[warp] = count;
    __syncthreads();
    if (warp == 0) {
        const double c = warp_sum(lane < nwarps ? sh[lane] : 0.0);
        if (lane == 0) out[1] = c;
    }
}

// dz[r] *= factor[r] in place and the column sums of the scaled dz, laid out as the ReLU
// backward's column sums: block (32, 32), grid (ceil(F/32), R), out[blockIdx.y * F + col].
extern "C" __global__ void __launch_bounds__(1024)
hpcfl_clip_scale_colsum(float* __restrict__ dz, const float* __restrict__ factor, const int n,
                        const int F, float* __restrict__ out)
{
    __shared__ float sh[32][33];
    const int col = blockIdx.x * 32 + threadIdx.x;
    float acc = 0.f;
    if (col < F) {
        for (int r = blockIdx.y * 32 + threadIdx.y; r < n; r += gridDim.y * 32) {
            const size_t k = (size_t)r * F + col;
            const float v = dz[k] * factor[r];
            dz[k] = v;
            acc += v;
        }
    }
    sh[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < F) {
        float s = 0.f;
        for (int j = 0; j < 32; ++j) s += sh[j][threadIdx.x];
        out[(size_t)blockIdx.y * F + col] = s;
    }
}
"""
_CLIP_ROWS = 8         # rows (warps) per block of the row-norm kernels

_ROWS_PER_PART = 256   # rows of one grid row of the column-sum kernel (8 per row lane)
_MAX_PARTS = 64        # at most 64 parts: 8192 rows give 32 parts, 256 blocks for F = 256

# ElementwiseKernel sources (in_params, out_params, body); compiled on first use.
_ELEMENTWISE = {
    "bias_relu": ("float32 b", "float32 z", "const float v = z + b; z = v < 0.f ? 0.f : v;"),
    "bias": ("float32 b", "float32 z", "z += b;"),
    "gather": ("raw uint8 src, raw I idx, int64 ncol, float32 scale, float32 shift", "float32 out",
               "const ptrdiff_t r = i / ncol;"
               " out = (float)src[(ptrdiff_t)idx[r] * ncol + (i - r * ncol)] * scale - shift;"),
    "normalise": ("uint8 s, float32 scale, float32 shift", "float32 out", "out = (float)s * scale - shift;"),
    "gather_labels": ("raw L labels, raw I idx", "int32 out", "out = (int)labels[idx[i]];"),
    "sgd": ("float32 g, float32 lr, float32 momentum, float32 wd, float32 scale", "float32 p, float32 buf",
            "const float d = scale * g + wd * p;"
            " const float bb = momentum * buf + d;"
            " buf = bb; p -= lr * bb;"),
    "adam": ("float32 g, float32 lr, float32 beta1, float32 omb1, float32 beta2, float32 omb2,"
             " float32 eps, float32 wd, float32 scale, float32 c1, float32 c2",
             "float32 p, float32 m, float32 v",
             "const float d = scale * g + wd * p;"
             " const float mi = beta1 * m + omb1 * d;"
             " const float vi = beta2 * v + omb2 * d * d;"
             " m = mi; v = vi;"
             " p -= lr * (mi / c1) / (sqrtf(vi / c2) + eps);"),
}

_kernels: dict = {}


def _elementwise(name: str):
    k = _kernels.get(name)
    if k is None:
        in_params, out_params, body = _ELEMENTWISE[name]
        k = _kernels[name] = _cupy().ElementwiseKernel(in_params, out_params, body, f"hpcfl_{name}")
    return k


def _raw(name: str, nc: int = 0):
    key = (name, nc)
    k = _kernels.get(key)
    if k is None:
        src = _SOFTMAX_SRC % {"nc": nc} if nc else _COLSUM_SRC
        k = _kernels[key] = _cupy().RawKernel(src, name)
    return k


def _clip_raw(name: str, nc: int):
    """A kernel of _CLIP_SRC (compiled for nc classes on first use)."""
    key = ("clip", name, nc)
    k = _kernels.get(key)
    if k is None:
        k = _kernels[key] = _cupy().RawKernel(_CLIP_SRC % {"nc": nc}, name)
    return k


# ---------------------------------------------------------------- cuBLAS

_OP_N, _OP_T = 0, 1            # CUBLAS_OP_N, CUBLAS_OP_T
_ALPHA = np.ones(1, np.float32)
_BETA = np.zeros(1, np.float32)
_blas: dict = {}               # the handle and sgemm of the current call (set by _blas_begin)


def _blas_begin() -> None:
    """Bind this device's cuBLAS handle to the current stream with host scalars (once a call)."""
    from cupy_backends.cuda.libs import cublas

    cupy = _cupy()
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    _blas["handle"], _blas["sgemm"] = handle, cublas.sgemm


def _sgemm(transa, transb, m, n, k, A, lda, B, ldb, C, ldc) -> None:
    """Column-major cuBLAS SGEMM, C = op(A) @ op(B), alpha 1, beta 0 (the tests swap in NumPy)."""
    _blas["sgemm"](_blas["handle"], transa, transb, m, n, k, _ALPHA.ctypes.data, A.data.ptr, lda,
                   B.data.ptr, ldb, _BETA.ctypes.data, C.data.ptr, ldc)


def _gemm(a, b, out, trans_a: bool = False, trans_b: bool = False) -> None:
    """out = op(a) @ op(b) for C-contiguous (row-major) float32 matrices: one SGEMM, no copy.

    cuBLAS is column-major, and a row-major (r, c) matrix is the column-major (c, r) matrix
    with leading dimension c. So compute out.T = op(b).T @ op(a).T in column-major terms:
    operands swapped, each transposed iff asked, leading dimensions = row lengths.
    """
    if not (a.flags.c_contiguous and b.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("_gemm needs C-contiguous matrices")
    m, k = a.shape[::-1] if trans_a else a.shape           # op(a) is (m, k), op(b) is (k, n)
    kb, n = b.shape[::-1] if trans_b else b.shape
    if (m, n) != out.shape or k != kb:
        raise ValueError(f"_gemm: shapes {a.shape}{'.T' * trans_a} @ {b.shape}{'.T' * trans_b} -> {out.shape}")
    _sgemm(_OP_T if trans_b else _OP_N, _OP_T if trans_a else _OP_N, n, m, k,
           b, b.shape[1], a, a.shape[1], out, n)


# ---------------------------------------------------------------- workspace and steps

def _threads(n: int) -> int:
    """Block size of the one-block reductions: whole warps, at most 1024."""
    return min(1024, max(32, -(-n // 32) * 32))


def _parts(n: int) -> int:
    return min(_MAX_PARTS, max(1, -(-n // _ROWS_PER_PART)))


class Workspace:
    """Device activations, deltas and reduction scratch for batches of up to max_batch rows."""

    def __init__(self, layout, max_batch: int):
        cupy = _cupy()
        self.max_batch = max_batch
        outs = layout.sizes[1:]
        self.n_classes = outs[-1]
        self.acts = [cupy.empty((max_batch, n), cupy.float32) for n in outs]    # a1..aL (aL = logits)
        self.deltas = [cupy.empty((max_batch, n), cupy.float32) for n in outs]  # dL/dz per layer
        self.parts = cupy.empty(_parts(max_batch) * max(outs), cupy.float32)    # column-sum parts
        self.y32 = cupy.empty(max_batch, cupy.int32)                            # labels as int32
        self.scalars = cupy.zeros(2, cupy.float64)       # loss, or (correct, loss)
        self.host = np.zeros(2, np.float64)              # their host copy
        self.n_layers = len(outs)
        self._clip: tuple | None = None

    def clip_buffers(self):
        """(asq, sq, factor) for forward_backward_clipped, allocated on its first call only:
        asq[l] = ||input row of layer l||^2 ((L, B)), sq = squared per-sample gradient norms
        ((B,)), factor = the per-sample clip factors ((B,)); all float32."""
        if self._clip is None:
            cupy = _cupy()
            self._clip = (cupy.empty((self.n_layers, self.max_batch), cupy.float32),
                          cupy.empty(self.max_batch, cupy.float32), cupy.empty(self.max_batch, cupy.float32))
        return self._clip


def _labels(y, ws):
    """y as a contiguous int32 device array (a copy into the workspace only if it is not)."""
    cupy = _cupy()
    if not isinstance(y, cupy.ndarray):
        y = cupy.asarray(y)
    if y.dtype != np.int32 or not y.flags.c_contiguous:
        out = ws.y32[: len(y)]
        out[...] = y
        return out
    return y


def _forward(params, x, ws):
    n, last = x.shape[0], len(params) - 1
    a = x
    for i, (w, b) in enumerate(params):
        z = ws.acts[i][:n]
        _gemm(a, w, z)                                               # (B, fan_in) @ (fan_in, fan_out)
        _elementwise("bias_relu" if i < last else "bias")(b, z)      # z += b (+ ReLU), in place
        a = z
    return a


def forward_backward(params, x, y, grads, ws, on_layer_ready=None) -> float:
    """Summed softmax cross-entropy of the batch; grads (views of the flat buffer) get the sums.

    on_layer_ready(i), if given, is called once the kernels that write layer i's gradients are
    queued (last layer first); a collective on them must synchronise the stream first, as
    hpcfl.comm does for device buffers. The returned Python float costs one 8-byte device ->
    host copy, which waits for the step's kernels. (dp.Replica.step adds the gradient
    collective, which waits for the stream unless it is NCCL, and one read of the reduced
    loss; indices already on the device cost no upload.)
    """
    n, last = x.shape[0], len(params) - 1
    _blas_begin()
    y = _labels(y, ws)
    logits = _forward(params, x, ws)
    dz = ws.deltas[last][:n]
    _raw("hpcfl_softmax_xent", ws.n_classes)(
        (1,), (_threads(n),), (logits, y, np.int32(n), dz, grads[last][1], ws.scalars))
    for i in range(last, -1, -1):
        a_prev = ws.acts[i - 1][:n] if i > 0 else x
        _gemm(a_prev, dz, grads[i][0], trans_a=True)                 # (fan_in, B) @ (B, fan_out)
        if on_layer_ready is not None:
            on_layer_ready(i)                                        # gb[i] was queued before gW[i]
        if i > 0:
            da = ws.deltas[i - 1][:n]
            _gemm(dz, params[i][0], da, trans_b=True)                # (B, fan_out) @ (fan_out, fan_in)
            _relu_backward_bias(da, a_prev, grads[i - 1][1], ws)
            dz = da
    ws.scalars[:1].get(out=ws.host[:1])
    return float(ws.host[0])


def _relu_backward_bias(da, a, gb, ws) -> None:
    """da *= (a > 0) in place; gb = column sums of the masked da."""
    n, F = da.shape
    parts = _parts(n)
    grid = (-(-F // 32), parts)
    out = gb if parts == 1 else ws.parts
    _raw("hpcfl_relu_bwd_colsum")(grid, (32, 32), (da, a, np.int32(n), np.int32(F), out))
    if parts > 1:
        _raw("hpcfl_colsum_finish")((-(-F // 256),), (256,), (ws.parts, np.int32(parts), np.int32(F), gb))


def forward_backward_clipped(params, x, y, grads, ws, clip) -> tuple[float, int]:
    """grads = the sum over the batch of each sample's gradient clipped to L2 norm `clip` (all
    layers together, DP-SGD); returns (summed unclipped loss, number of samples clipped).

    As forward_backward, but every layer's delta is formed first, the per-sample squared norms
    accumulated on the way (input norms in the hidden layers' bias + ReLU kernel); one kernel
    turns them into clip factors, each delta's rows are scaled in its bias-sum kernel, and
    only then run the weight-gradient SGEMMs. One 16-byte device -> host copy (loss, count)."""
    n, last = x.shape[0], len(params) - 1
    nc = ws.n_classes
    _blas_begin()
    y = _labels(y, ws)
    asq_all, sq_all, factor_all = ws.clip_buffers()
    asq, sq, factor = [asq_all[i][:n] for i in range(last + 1)], sq_all[:n], factor_all[:n]
    rows = ((-(-n // _CLIP_ROWS),), (32, _CLIP_ROWS))
    _clip_raw("hpcfl_clip_row_sumsq", nc)(*rows, (x, np.int32(n), np.int32(x.shape[1]), asq[0]))
    a = x
    for i, (w, b) in enumerate(params):
        z = ws.acts[i][:n]
        _gemm(a, w, z)                                               # (B, fan_in) @ (fan_in, fan_out)
        if i < last:
            _clip_raw("hpcfl_clip_bias_relu", nc)(*rows, (z, b, np.int32(n), np.int32(z.shape[1]), asq[i + 1]))
        else:
            _elementwise("bias")(b, z)
        a = z
    dz = ws.deltas[last][:n]
    _clip_raw("hpcfl_clip_softmax_xent", nc)(
        (1,), (_threads(n),), (a, y, np.int32(n), asq[last], dz, sq, ws.scalars))
    for i in range(last, 0, -1):                                     # every delta, unclipped
        da = ws.deltas[i - 1][:n]
        _gemm(dz, params[i][0], da, trans_b=True)                    # (B, fan_out) @ (fan_out, fan_in)
        _clip_raw("hpcfl_clip_relu_bwd", nc)(
            *rows, (da, ws.acts[i - 1][:n], np.int32(n), np.int32(da.shape[1]), asq[i - 1], sq))
        dz = da
    _clip_raw("hpcfl_clip_factors", nc)((1,), (_threads(n),), (sq, np.int32(n), np.float32(clip), factor, ws.scalars))
    for i in range(last, -1, -1):
        dz = ws.deltas[i][:n]
        _scale_rows_bias(dz, factor, grads[i][1], ws)
        a_prev = ws.acts[i - 1][:n] if i > 0 else x
        _gemm(a_prev, dz, grads[i][0], trans_a=True)                 # (fan_in, B) @ (B, fan_out)
    ws.scalars.get(out=ws.host)
    return float(ws.host[0]), int(ws.host[1])


def _scale_rows_bias(dz, factor, gb, ws) -> None:
    """dz[r] *= factor[r] in place; gb = column sums of the scaled dz."""
    n, F = dz.shape
    parts = _parts(n)
    grid = (-(-F // 32), parts)
    out = gb if parts == 1 else ws.parts
    _clip_raw("hpcfl_clip_scale_colsum", ws.n_classes)(grid, (32, 32), (dz, factor, np.int32(n), np.int32(F), out))
    if parts > 1:
        _raw("hpcfl_colsum_finish")((-(-F // 256),), (256,), (ws.parts, np.int32(parts), np.int32(F), gb))


def evaluate(params, x, y, ws) -> tuple[int, float]:
    """(number correct, summed loss) over the batch: one device -> host copy of both."""
    n = x.shape[0]
    _blas_begin()
    y = _labels(y, ws)
    logits = _forward(params, x, ws)
    _raw("hpcfl_eval_counts", ws.n_classes)((1,), (_threads(n),), (logits, y, np.int32(n), ws.scalars))
    ws.scalars.get(out=ws.host)
    return int(ws.host[0]), float(ws.host[1])


# ---------------------------------------------------------------- data

_scratch: dict = {}   # (device, name) -> grow-only device buffer
_in_flight: dict = {}  # name -> the host array of the latest host -> device copy, kept alive


def _buffer(name: str, size: int, dtype):
    cupy = _cupy()
    key = (cupy.cuda.runtime.getDevice(), name)
    buf = _scratch.get(key)
    if buf is None or buf.size < size:
        buf = _scratch[key] = cupy.empty(max(size, 1), dtype)
    return buf[:size]


def _device_index(idx):
    """idx on the device: a device array as it is; a host array copied into a reused buffer."""
    cupy = _cupy()
    if isinstance(idx, cupy.ndarray):
        return idx
    host = np.ascontiguousarray(idx, dtype=np.int64)
    dev = _buffer("idx", len(host), np.int64)
    dev.set(host)   # from pageable memory: the driver has staged `host` when this returns...
    _in_flight["idx"] = host   # ...and it stays alive until the next copy anyway
    return dev


def gather(src_u8, idx, out, mean: float, std: float) -> None:
    """out[:len(idx)] = (src[idx] / 255 - mean) / std; src on the device (fast) or the host."""
    n = len(idx)
    if n == 0:
        return
    cupy = _cupy()
    rows = out[:n]
    scale, shift = normalisation(mean, std)
    if isinstance(src_u8, cupy.ndarray):
        ncol = src_u8.size // src_u8.shape[0]
        _elementwise("gather")(src_u8, _device_index(idx), np.int64(ncol), scale, shift, rows)
    else:   # host images: gather on the host, one copy, normalise on the device
        host = np.ascontiguousarray(src_u8[to_host(idx)]).reshape(rows.shape)
        staged = _buffer("rows", host.size, np.uint8).reshape(rows.shape)
        staged.set(host)
        _in_flight["rows"] = host
        _elementwise("normalise")(staged, scale, shift, rows)


def gather_labels(labels, idx, out) -> None:
    """out[:len(idx)] = labels[idx] (int32); labels on the device or the host."""
    n = len(idx)
    if n == 0:
        return
    cupy = _cupy()
    if isinstance(labels, cupy.ndarray):
        _elementwise("gather_labels")(labels, _device_index(idx), out[:n])
    else:
        host = np.asarray(labels)[to_host(idx)].astype(np.int32)
        out[:n].set(host)
        _in_flight["labels"] = host


# ---------------------------------------------------------------- optimizers

def sgd_update(p, g, buf, lr, momentum, weight_decay, scale) -> None:
    f = np.float32
    _elementwise("sgd")(g, f(lr), f(momentum), f(weight_decay), f(scale), p, buf)


def adam_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, scale, t) -> None:
    f = np.float32
    _elementwise("adam")(g, f(lr), f(beta1), f(1 - beta1), f(beta2), f(1 - beta2), f(eps),
                         f(weight_decay), f(scale), f(1 - beta1**t), f(1 - beta2**t), p, m, v)
