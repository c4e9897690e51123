"""forward_backward_clipped (DP-SGD's per-sample clipping, Abadi et al. 2016) on every backend.

The reference here materialises what the backends must not: every sample's gradient, one row at
a time through the numpy reference's plain forward_backward in float64, its norm over all
parameters, the clip, the sum. The numpy, numba and (on the CPU emulation of test_cupy.py)
cupy backends must give that sum without forming per-sample gradients.
"""
from __future__ import annotations

import ctypes
import tracemalloc

import numpy as np
import pytest
import test_cupy
from helpers import batch
from test_cupy import cxx, emu  # noqa: F401  (fixtures: the C++ compiler, the CuPy emulation)

from hpcfl import backends
from hpcfl.backends import cupy_backend as cb
from hpcfl.backends import numpy_backend as ref
from hpcfl.core import layout as model

SMALL = model.Layout((20, 16, 12, 10))
LAYOUT = model.layout((256, 128))           # the MNIST MLP
ONE_LAYER = model.layout(())                # 784 -> 10, softmax regression: no hidden layer

needs_numba = pytest.mark.skipif(backends.available()["numba"] != "ok", reason="numba is not usable here")


def clip_batch(lay, n, seed):
    """Parameters and a batch whose per-sample gradient norms spread by a factor of 25 to 60
    (measured for CASES): each row of x is scaled by a log-uniform factor in [0.02, 2] (larger inputs make the MNIST
    MLP too confident for a float32 comparison: see check_clipped); non-zero biases."""
    p = model.init_params(lay, seed)
    p[lay.views(p)[0][0].size:] += np.float32(0.01)
    x, y = batch(lay, n, seed=seed)
    scale = np.exp(np.random.default_rng(seed).uniform(np.log(0.02), np.log(2.0), n))
    return p, (x * scale[:, None]).astype(np.float32), y


def per_sample_reference(lay, p, x, y):
    """(B, n_params) float64: sample i's gradient, the reference's forward_backward on row i."""
    p64 = lay.views(p.astype(np.float64))
    g = np.zeros((len(y), lay.n_params))
    for i in range(len(y)):
        ref.forward_backward(p64, x[i:i + 1].astype(np.float64), y[i:i + 1], lay.views(g[i]), None)
    return g


def clip_between(norms, k):
    """A clip value with exactly k samples above it, as far as possible from every norm."""
    s = np.sort(norms)[::-1]
    if k == 0:
        return 2.0 * s[0]
    if k == len(s):
        return s[-1] / 2.0
    return float(np.sqrt(s[k - 1] * s[k]))


def run_clipped(be, lay, p, x, y, clip, dtype=np.float32, ws=None):
    """be.forward_backward_clipped on host arrays: (host grads, loss, n_clipped)."""
    ws = ws if ws is not None else be.Workspace(lay, max(len(y), 1))
    g = be.to_device(np.full(lay.n_params, np.nan, dtype))      # every entry must be written
    loss, n_clipped = be.forward_backward_clipped(
        lay.views(be.to_device(p.astype(dtype))), be.to_device(x.astype(dtype)), be.to_device(y),
        lay.views(g), ws, clip)
    return be.to_host(g), loss, n_clipped


def check_clipped(be, lay, p, x, y, ks, dtype=np.float32):
    """For clips with k = each of `ks` samples above them: grads, loss and n_clipped of backend
    `be` against the float64 per-sample reference."""
    per_sample = per_sample_reference(lay, p, x, y)
    norms = np.linalg.norm(per_sample, axis=1)
    logits = ref._forward(lay.views(p.astype(np.float64)), x.astype(np.float64))[-1]
    p_true = np.exp(ref._log_softmax(logits)[np.arange(len(y)), y])
    # The premise of the float32 tolerance below: float32 forms a sample's d loss / d logit_y,
    # p_y - 1, with an absolute error of about u = 6e-8; for a confident sample (1 - p_y tiny)
    # that is a large RELATIVE error of its small gradient, harmless unclipped (it is small),
    # but a small clip gives every sample the same norm C, and then that relative error counts
    # in full. With 1 - p_y >= 1e-2 it stays below 6e-6 of the sample's norm.
    assert (1 - p_true).min() > 1e-2, "test data too confident for a float32 comparison"
    loss_ref = -float(ref._log_softmax(logits)[np.arange(len(y)), y].sum())
    for k in ks:
        clip = clip_between(norms, k)
        factor = np.minimum(1.0, clip / norms)
        want = (per_sample * factor[:, None]).sum(axis=0)
        got, loss, n_clipped = run_clipped(be, lay, p, x, y, clip, dtype)
        assert isinstance(n_clipped, int) and isinstance(loss, float)
        assert n_clipped == k == int((norms > clip).sum()), (k, clip, norms)
        assert loss == pytest.approx(loss_ref, rel=1e-5 if dtype == np.float32 else 1e-12)
        if dtype == np.float64:
            # the same float64 arithmetic, summed in another order: rounding, ~1e-16 relative
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
        else:
            # float32 (u = 6e-8): a sample's gradient carries ~sqrt(784) u = 2e-6 relative error from
            # the dot products, <= 6e-6 from the softmax (see the premise above) and its clip
            # factor that of its norm (~1e-6); summed over the batch, with errors of both signs,
            # 1e-5 of the largest entry covers it (the same budget as test_kernels'
            # backend-against-reference check; measured for numpy and numba: 1e-7 to 6e-7 of the
            # largest entry), while a 1e-3 change of
            # any sample's factor moves entries by far more (test_the_check_catches_wrong_clipping).
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    return norms


# (layout, batch, seed): batches of 1, sizes that are multiples of nothing in particular, one
# above the GPU column-sum's 256 rows per part, the MNIST MLP and a model without hidden layer
CASES = [(SMALL, 1, 0), (SMALL, 37, 1), (LAYOUT, 45, 2), (LAYOUT, 128, 3), (SMALL, 300, 4), (ONE_LAYER, 37, 5)]
CASE_IDS = [f"{'-'.join(map(str, lay.sizes))}-B{n}" for lay, n, _ in CASES]


def ks_for(n):
    """None, one, half and all of the samples above the clip: with half, the largest norms are
    several times above it and the smallest several times below (the norms spread 25-60x)."""
    return sorted({0, min(1, n), n // 2, n})


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("lay, n, seed", CASES, ids=CASE_IDS)
def test_reference_matches_per_sample_clipping(lay, n, seed, dtype):
    p, x, y = clip_batch(lay, n, seed)
    check_clipped(ref, lay, p, x, y, ks_for(n), dtype)


@needs_numba
@pytest.mark.parametrize("lay, n, seed", CASES, ids=CASE_IDS)
def test_numba_matches_per_sample_clipping(lay, n, seed):
    p, x, y = clip_batch(lay, n, seed)
    check_clipped(backends.get("numba"), lay, p, x, y, ks_for(n))


# ---- the cupy backend on test_cupy.py's CPU emulation, with the clipping kernels registered

EMU_CLIP = {   # name -> (C parameters, call arguments, argument kinds), as test_cupy.EMU_RAW
    "hpcfl_clip_row_sumsq": ("const float* a, int n, int F, float* out", "(a, n, F, out)",
                             ["f4", "int", "int", "f4"]),
    "hpcfl_clip_bias_relu": ("float* z, const float* b, int n, int F, float* out", "(z, b, n, F, out)",
                             ["f4", "f4", "int", "int", "f4"]),
    "hpcfl_clip_softmax_xent": ("const float* z, const int* y, int n, const float* asq, float* dz, float* sq,"
                                " double* loss", "(z, y, n, asq, dz, sq, loss)",
                                ["f4", "i4", "int", "f4", "f4", "f4", "f8"]),
    "hpcfl_clip_relu_bwd": ("float* dz, const float* a, int n, int F, const float* asq, float* sq",
                            "(dz, a, n, F, asq, sq)", ["f4", "f4", "int", "int", "f4", "f4"]),
    "hpcfl_clip_factors": ("const float* sq, int n, float clip, float* factor, double* out",
                           "(sq, n, clip, factor, out)", ["f4", "int", "float", "f4", "f8"]),
    "hpcfl_clip_scale_colsum": ("float* dz, const float* factor, int n, int F, float* out",
                                "(dz, factor, n, F, out)", ["f4", "f4", "int", "int", "f4"]),
}


class EmuClipKernel(test_cupy.EmuRawKernel):
    """test_cupy's raw-kernel emulation, plus float scalars (np.float32, as CuPy takes them)."""

    def __call__(self, grid, block, args, shared_mem=0):
        kinds = test_cupy.EMU_RAW[self.name][2]
        if "float" not in kinds:
            return super().__call__(grid, block, args, shared_mem)
        (gx, gy), (bx, by) = (tuple(grid) + (1,))[:2], (tuple(block) + (1,))[:2]
        assert (bx * by) % 32 == 0 and bx * by <= 1024 and len(args) == len(kinds)
        cargs = []
        for a, kind in zip(args, kinds):
            if kind in ("int", "float"):
                want = np.int32 if kind == "int" else np.float32
                assert type(a) is want, f"scalar kernel arguments must be {want.__name__}, got {type(a)}"
                cargs.append(ctypes.c_int(int(a)) if kind == "int" else ctypes.c_float(float(a)))
            else:
                cargs.append(test_cupy._pointer(a, kind))
        getattr(self.lib, f"emu_{self.name}")(*map(ctypes.c_uint, (gx, gy, bx, by)), *cargs)


@pytest.fixture
def emu_clip(emu, cxx, monkeypatch):  # noqa: F811  (emu, cxx: the fixtures imported from test_cupy)
    for name, spec in EMU_CLIP.items():
        monkeypatch.setitem(test_cupy.EMU_RAW, name, spec)
    monkeypatch.setattr(emu, "RawKernel", lambda code, name: EmuClipKernel(cxx, code, name))
    return emu


@pytest.mark.parametrize("lay, n, seed", CASES[:3] + CASES[4:], ids=CASE_IDS[:3] + CASE_IDS[4:])   # not B128: slow
def test_emulated_cupy_matches_per_sample_clipping(emu_clip, lay, n, seed):
    p, x, y = clip_batch(lay, n, seed)
    check_clipped(cb, lay, p, x, y, ks_for(n))


def test_emulated_cupy_allocates_nothing_after_the_first_clipped_step(emu_clip):
    lay, n = SMALL, 300
    p, x, y = clip_batch(lay, n, 0)
    ws = cb.Workspace(lay, n)
    assert ws._clip is None                              # plain training never pays for them
    dp_, dx, dy = cb.to_device(p), cb.to_device(x), cb.to_device(y)
    g = emu_clip.zeros(lay.n_params, np.float32)
    cb.forward_backward_clipped(lay.views(dp_), dx, dy, lay.views(g), ws, 1.0)
    before = len(emu_clip.allocations)
    for clip in (0.5, 2.0):
        cb.forward_backward_clipped(lay.views(dp_), dx, dy, lay.views(g), ws, clip)
    assert emu_clip.allocations[before:] == []


# ---- properties, on every backend

@pytest.fixture(params=["numpy", pytest.param("numba", marks=needs_numba), "cupy"])
def be(request):
    if request.param == "cupy":          # the CPU emulation (a GPU's own run is test_cupy's layer 3)
        request.getfixturevalue("emu_clip")
        return cb
    return ref if request.param == "numpy" else backends.get(request.param)


@pytest.mark.parametrize("lay, n", [(LAYOUT, 37), (SMALL, 300), (ONE_LAYER, 5)])
def test_huge_clip_is_plain_forward_backward(be, lay, n):
    """Nothing clipped: the summed gradient and loss of plain forward_backward."""
    p, x, y = clip_batch(lay, n, 7)
    ws = be.Workspace(lay, n)
    g_plain = be.to_device(np.zeros(lay.n_params, np.float32))
    loss_plain = be.forward_backward(lay.views(be.to_device(p)), be.to_device(x), be.to_device(y),
                                     lay.views(g_plain), ws)
    g, loss, n_clipped = run_clipped(be, lay, p, x, y, 1e30, ws=ws)
    assert n_clipped == 0
    assert loss == pytest.approx(loss_plain, rel=1e-6)
    g_plain = be.to_host(g_plain)
    # factor 1 everywhere: the same products, only the order of the bias sums may differ
    np.testing.assert_allclose(g, g_plain, rtol=1e-6, atol=1e-6 * np.abs(g_plain).max())


@pytest.mark.parametrize("lay", [LAYOUT, SMALL, ONE_LAYER])
def test_tiny_clip_clips_every_sample_to_norm_clip(be, lay):
    clip = 1e-3
    p, x, y = clip_batch(lay, 9, 8)
    norms = np.linalg.norm(per_sample_reference(lay, p, x, y), axis=1)
    assert norms.min() > 100 * clip                      # all far above it
    _, _, n_clipped = run_clipped(be, lay, p, x, y, clip)
    assert n_clipped == 9
    for i in range(3):                                   # a batch of one: its gradient IS the contribution
        g, _, n_clipped = run_clipped(be, lay, p, x[i:i + 1], y[i:i + 1], clip)
        assert n_clipped == 1
        assert np.linalg.norm(g.astype(np.float64)) == pytest.approx(clip, rel=1e-5)


def test_zero_gradient_is_not_clipped_and_zero_clip_zeroes_the_rest(be):
    """A sample whose gradient is exactly 0 (a one-hot softmax: the logit of its label 1000
    above the others, exp(-1000) = 0) has norm 0: factor 1, not counted, no 0/0. With clip 0
    every other sample is clipped to nothing."""
    lay = SMALL
    p, x, y = clip_batch(lay, 6, 9)
    w_last, b_last = lay.views(p)[-1]
    w_last[...] = 0.0
    b_last[...] = 0.0
    b_last[3] = 1000.0
    y[[0, 4]] = 3                                        # samples 0 and 4: zero gradients
    g, _, n_clipped = run_clipped(be, lay, p, x, y, 0.0)
    assert n_clipped == 4 and not g.any()                # all finite zeros (NaN != 0 would show)
    g, _, n_clipped = run_clipped(be, lay, p, x[[0, 4]], y[[0, 4]], 0.0)
    assert n_clipped == 0 and not g.any()


@pytest.mark.parametrize("n", [1, 2, 37])
def test_n_clipped_counts_the_samples_above_the_clip(be, n):
    """Every count from 0 to n, on a workspace larger than the batch."""
    lay = SMALL
    p, x, y = clip_batch(lay, n, 10 + n)
    norms = np.linalg.norm(per_sample_reference(lay, p, x, y), axis=1)
    ws = be.Workspace(lay, 64)                           # a larger workspace: row prefixes
    for k in range(n + 1):
        _, _, n_clipped = run_clipped(be, lay, p, x, y, clip_between(norms, k), ws=ws)
        assert n_clipped == k


def test_the_check_catches_wrong_clipping():
    """check_clipped's gradient comparison can fail: it rejects a clip off by 0.1%, clipping the
    batch's sum instead of each sample, and per-sample norms that leave out the biases (each
    mutant reports the right count and loss, so the gradients are what fails)."""
    lay = LAYOUT
    p, x, y = clip_batch(lay, 45, 2)

    class Mutant:
        Workspace = ref.Workspace
        to_device = to_host = staticmethod(lambda a: a)

        def __init__(self, how):
            self.how = how

        def forward_backward_clipped(self, params, x, y, grads, ws, clip):
            scratch = [(np.empty_like(w), np.empty_like(b)) for w, b in grads]
            loss, n_clipped = ref.forward_backward_clipped(params, x, y, scratch, ws, clip)   # the true count
            if self.how == "clip off by 0.1%":
                ref.forward_backward_clipped(params, x, y, grads, ws, clip * 1.001)
            elif self.how == "clip the sum":
                ref.forward_backward(params, x, y, grads, ws)
                total = np.sqrt(sum(float((a.astype(np.float64) ** 2).sum()) for wb in grads for a in wb))
                for wb in grads:
                    for a in wb:
                        a *= np.float32(min(1.0, clip / total))
            else:  # "no bias": per-sample squared norms ||a||^2 ||delta||^2, the weights' only
                acts = ref._forward(params, x)
                dz = np.exp(ref._log_softmax(acts[-1]))
                dz[np.arange(len(y)), y] -= 1.0
                deltas = [dz]
                for i in range(len(params) - 1, 0, -1):
                    deltas.insert(0, (deltas[0] @ params[i][0].T) * (acts[i] > 0))
                sq = sum((a.astype(np.float64) ** 2).sum(1) * (d.astype(np.float64) ** 2).sum(1)
                         for a, d in zip(acts, deltas))
                f = np.minimum(1.0, clip / np.sqrt(sq)).astype(np.float32)[:, None]
                for i, (a, d) in enumerate(zip(acts, deltas)):
                    grads[i][0][...] = a.T @ (d * f)
                    grads[i][1][...] = (d * f).sum(axis=0)
            return loss, n_clipped

    for how in ("clip off by 0.1%", "clip the sum", "no bias"):
        with pytest.raises(AssertionError, match="Not equal to tolerance"):
            check_clipped(Mutant(how), lay, p, x, y, [22])


@needs_numba
def test_numba_clipped_steps_allocate_nothing_after_the_first():
    """tracemalloc sees NumPy's buffers: after the first call (the Workspace's clip buffers),
    a step allocates nothing but a few small array views (measured: a peak of 1.4 kB, as plain
    forward_backward's 1.1 kB), while one (B,) float32 vector alone would be 8 kB here."""
    nb = backends.get("numba")
    lay, n = LAYOUT, 2000
    p, x, y = clip_batch(lay, n, 11)
    ws = nb.Workspace(lay, n)
    g = np.zeros(lay.n_params, np.float32)
    P, G = lay.views(p), lay.views(g)
    nb.forward_backward(P, x, y, G, ws)
    assert ws._clip is None                              # allocated only when needed
    nb.forward_backward_clipped(P, x, y, G, ws, 1.0)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for clip in (0.5, 1.0, 2.0):
            nb.forward_backward_clipped(P, x, y, G, ws, clip)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - base < 4000, peak - base
    assert current - base < 1000, current - base
