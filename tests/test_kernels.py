"""The reference backend against finite differences; every other backend against the reference."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import batch, check_optimizer_matches_reference

from hpcfl import backends
from hpcfl.backends import numpy_backend as ref
from hpcfl.backends.base import HOST_MEMBERS, MEMBERS
from hpcfl.core import layout as model
from hpcfl.core import optim
from hpcfl.data import MEAN, STD

SMALL = model.Layout((20, 16, 12, 10))   # small enough for a float64 finite-difference check


def test_layout_views_tile_the_flat_buffer():
    lay = model.layout((256, 128))
    assert lay.sizes == (784, 256, 128, 10)
    assert lay.n_params == 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10 == 235_146
    flat = np.arange(lay.n_params, dtype=np.float32)
    views = lay.views(flat)
    seen = np.concatenate([a.ravel() for wb in views for a in wb])
    np.testing.assert_array_equal(seen, flat)      # in order, no gap, no overlap
    views[1][0][0, 0] = -1.0
    assert flat[784 * 256 + 256] == -1.0           # a view, not a copy


def test_he_init_is_seeded_and_scaled():
    lay = model.layout((256, 128))
    a, b = model.init_params(lay, 1), model.init_params(lay, 1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, model.init_params(lay, 2))
    w1, b1 = lay.views(a)[0]
    assert abs(w1.std() - np.sqrt(2 / 784)) < 0.01 * np.sqrt(2 / 784) * 10
    assert not b1.any()


def test_flops_per_sample_counts_the_gemms():
    # forward 2*MACs, weight gradients 2*MACs, input gradients 2*MACs except for layer 1
    assert model.layout((256, 128)).flops_per_sample() == 2 * (2 * 234_752 + 32_768 + 1_280)


def test_reference_gradient_matches_finite_differences():
    lay = SMALL
    flat = model.init_params(lay, 3).astype(np.float64)
    flat += np.random.default_rng(1).normal(0, 0.05, flat.shape)   # non-zero biases too
    x, y = batch(lay, 7, dtype=np.float64)
    grad = np.zeros_like(flat)
    ref.forward_backward(lay.views(flat), x, y, lay.views(grad), None)

    def loss(p):
        return ref.evaluate(lay.views(p), x, y, None)[1]

    rng, eps = np.random.default_rng(2), 1e-6
    for i in rng.choice(lay.n_params, 60, replace=False):
        e = np.zeros_like(flat)
        e[i] = eps
        fd = (loss(flat + e) - loss(flat - e)) / (2 * eps)
        assert fd == pytest.approx(grad[i], rel=1e-5, abs=1e-8), i


def test_reference_loss_is_the_cross_entropy():
    lay = SMALL
    p = model.init_params(lay, 0)
    x, y = batch(lay, 5)
    logits = x
    for i, (w, b) in enumerate(lay.views(p)):
        logits = logits @ w + b
        logits = np.maximum(logits, 0) if i < lay.n_layers - 1 else logits
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = -np.log(prob[np.arange(5), y]).sum()
    g = np.zeros_like(p)
    assert ref.forward_backward(lay.views(p), x, y, lay.views(g), None) == pytest.approx(expected, rel=1e-5)


OTHERS = [n for n in ("numba", "cupy") if backends.available()[n] == "ok"]


@pytest.fixture(params=OTHERS)
def be(request):
    return backends.get(request.param)


def test_cupy_skip_reason_is_stated():
    status = backends.available()["cupy"]
    assert status == "ok" or "cupy" in status.lower() or "gpu" in status.lower()


@pytest.mark.parametrize("n", [1, 37, 128])
def test_backend_forward_backward_matches_reference(be, n):
    lay = model.layout((256, 128))
    p = model.init_params(lay, 4)
    x, y = batch(lay, n, seed=n)
    g_ref, g = np.zeros_like(p), np.zeros_like(p)
    loss_ref = ref.forward_backward(lay.views(p), x, y, lay.views(g_ref), None)
    ws = be.Workspace(lay, 128)
    dp, dg = be.to_device(p), be.to_device(g)
    loss = be.forward_backward(lay.views(dp), be.to_device(x), be.to_device(y), lay.views(dg), ws)
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    # float32 GEMMs with different summation orders: agree to ~1e-6 relative to the largest entry
    np.testing.assert_allclose(be.to_host(dg), g_ref, rtol=1e-4, atol=1e-5 * np.abs(g_ref).max())
    correct_ref, eval_loss_ref = ref.evaluate(lay.views(p), x, y, None)
    correct, eval_loss = be.evaluate(lay.views(dp), be.to_device(x), be.to_device(y), ws)
    assert correct == correct_ref
    assert eval_loss == pytest.approx(eval_loss_ref, rel=1e-5)


def test_on_layer_ready_reports_each_layer_once_its_gradients_are_final(be):
    # --allreduce overlap starts reducing layer i inside this callback: its gradients must not
    # change afterwards, and the layers come last first (the order every rank starts them in)
    check_on_layer_ready(be)


def test_reference_on_layer_ready():
    check_on_layer_ready(ref)


def check_on_layer_ready(be):
    lay = model.layout((256, 128))
    p, g = be.to_device(model.init_params(lay, 4)), be.to_device(np.zeros(lay.n_params, np.float32))
    x, y = batch(lay, 32)
    seen = []

    def ready(i):
        seen.append((i, [be.to_host(a).copy() for a in lay.views(g)[i]]))

    be.forward_backward(lay.views(p), be.to_device(x), be.to_device(y), lay.views(g), be.Workspace(lay, 32),
                        on_layer_ready=ready)
    assert [i for i, _ in seen] == [2, 1, 0]
    for i, (w, b) in seen:
        gw, gb = lay.views(be.to_host(g))[i]
        np.testing.assert_array_equal(w, gw)
        np.testing.assert_array_equal(b, gb)


def test_transposed_input_gradient_is_the_plain_one():
    # Few rows: backward computes da = dz @ W.T as W @ dz.T and masks it while transposing back
    from hpcfl.backends import numba_backend as nb

    rng = np.random.default_rng(2)
    da_t = rng.standard_normal((30, 7)).astype(np.float32)
    a = rng.standard_normal((7, 30)).astype(np.float32)
    a[0, 0], a[1, 1] = np.nan, 0.0                           # the same test a <= 0 in both kernels
    dz, gb = np.empty((7, 30), np.float32), np.empty(30, np.float32)
    nb._relu_backward_bias_t(da_t, a, dz, gb)
    plain, gb_plain = np.ascontiguousarray(da_t.T), np.empty(30, np.float32)
    nb._relu_backward_bias(plain, a, gb_plain)
    np.testing.assert_array_equal(dz, plain)
    np.testing.assert_array_equal(gb, gb_plain)
    # whole backward passes, with and without the transposed form (at 20 rows it is taken for
    # the 256 x 128 layer): the same gradients (BLAS gave the same bits where measured)
    lay = model.layout((256, 128))
    p = model.init_params(lay, 4)
    x, y = batch(lay, 20)
    ws_t, ws_plain = nb.Workspace(lay, 64), nb.Workspace(lay, 64)
    assert ws_t.deltas_t[0] is not None
    ws_plain.deltas_t = [None] * len(ws_plain.deltas_t)
    g_t, g_plain = np.zeros(lay.n_params, np.float32), np.zeros(lay.n_params, np.float32)
    loss_t = nb.forward_backward(lay.views(p), x, y, lay.views(g_t), ws_t)
    loss_plain = nb.forward_backward(lay.views(p), x, y, lay.views(g_plain), ws_plain)
    assert loss_t == loss_plain
    np.testing.assert_allclose(g_t, g_plain, rtol=1e-6, atol=1e-7 * np.abs(g_plain).max())


def test_momentum_free_sgd_is_the_general_kernel_without_the_buffer():
    # fl's local SGD (momentum 0, no weight decay) skips the momentum buffer: same values
    from hpcfl.backends import numba_backend as nb

    rng = np.random.default_rng(3)
    p0, g = rng.standard_normal(10_000).astype(np.float32), rng.standard_normal(10_000).astype(np.float32)
    p_general, buf = p0.copy(), np.zeros_like(p0)
    nb._sgd(p_general, g, buf, np.float32(0.1), np.float32(0.0), np.float32(0.0), np.float32(0.1))
    p = p0.copy()
    nb.sgd_update(p, g, np.zeros_like(p0), 0.1, 0.0, 0.0, 0.1)
    np.testing.assert_array_equal(p, p_general)
    p_ref = p0.copy()
    ref.sgd_update(p_ref, g, np.zeros_like(p0), 0.1, 0.0, 0.0, 0.1)
    np.testing.assert_allclose(p, p_ref, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(p, p0)


@pytest.mark.parametrize("name", backends.NAMES)
def test_every_backend_module_provides_the_backend_protocol(name):
    # backends.get() types its module as base.Backend; a member left out would fail only when a
    # trainer reached for it, on that backend (the cupy module is checked without a GPU)
    import importlib

    mod = importlib.import_module(f"hpcfl.backends.{name}_backend")
    members = HOST_MEMBERS if name != "cupy" else MEMBERS
    missing = [m for m in members if m != "xp" and not callable(getattr(mod, m, None))]
    assert not missing, f"{name} lacks {missing}"
    if name != "cupy":                  # cupy's xp is the cupy module, imported on first use
        assert mod.xp is np


def test_backend_gather_matches_reference(be):
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (50, 784), dtype=np.uint8)
    labels = rng.integers(0, 10, 50).astype(np.uint8)
    idx = rng.permutation(50)[:17]
    out_ref, out = np.zeros((20, 784), np.float32), be.xp.zeros((20, 784), np.float32)
    ref.gather(src, idx, out_ref, MEAN, STD)
    be.gather(be.to_device(src), be.to_device(idx), out, MEAN, STD)
    np.testing.assert_allclose(be.to_host(out), out_ref, rtol=1e-6, atol=1e-6)
    assert abs(out_ref[:17].mean() - ((src[idx] / 255).mean() - 0.1307) / 0.3081) < 1e-5
    y_ref, y = np.zeros(20, np.int32), be.xp.zeros(20, np.int32)
    ref.gather_labels(labels, idx, y_ref)
    be.gather_labels(be.to_device(labels), be.to_device(idx), y)
    np.testing.assert_array_equal(be.to_host(y), y_ref)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_backend_optimizer_matches_reference(be, opt):
    check_optimizer_matches_reference(be, opt, 1000)


def test_reference_sgd_is_pytorch_sgd_by_hand():
    p, g, buf = np.array([1.0], np.float32), np.array([2.0], np.float32), np.array([0.5], np.float32)
    ref.sgd_update(p, g, buf, lr=0.1, momentum=0.9, weight_decay=0.01, scale=0.5)
    # d = 0.5*2 + 0.01*1 = 1.01; buf = 0.9*0.5 + 1.01 = 1.46; p = 1 - 0.1*1.46 = 0.854
    assert buf[0] == pytest.approx(1.46) and p[0] == pytest.approx(0.854)


def test_reference_adam_first_step_moves_by_lr():
    p, g = np.array([1.0, -1.0], np.float32), np.array([3.0, -0.2], np.float32)
    m, v = np.zeros(2, np.float32), np.zeros(2, np.float32)
    ref.adam_update(p, g, m, v, 0.01, 0.9, 0.999, 1e-8, 0.0, 1.0, 1)
    # bias-corrected first step is lr * sign(g)
    np.testing.assert_allclose(p, [0.99, -0.99], rtol=1e-5)


def test_reference_adam_over_five_steps_with_weight_decay_by_the_papers_formula():
    # Kingma & Ba's Algorithm 1, with L2 weight decay added to the gradient (PyTorch's Adam),
    # written out here in float64 from the paper: five steps, a gradient that changes sign
    lr, b1, b2, eps, wd, scale = 0.01, 0.9, 0.999, 1e-8, 0.05, 0.5
    grads = [np.array([3.0, -0.2, 0.0]), np.array([-1.0, 0.4, 1e-3]), np.array([0.5, 0.5, -2.0]),
             np.array([2.0, -3.0, 0.1]), np.array([-0.1, 0.0, 0.7])]
    p = np.array([1.0, -1.0, 0.25], np.float32)
    m, v = np.zeros(3, np.float32), np.zeros(3, np.float32)
    want, mw, vw = p.astype(np.float64), np.zeros(3), np.zeros(3)
    for t, g in enumerate(grads, 1):
        ref.adam_update(p, g.astype(np.float32), m, v, lr, b1, b2, eps, wd, scale, t)
        d = scale * g + wd * want
        mw = b1 * mw + (1 - b1) * d
        vw = b2 * vw + (1 - b2) * d * d
        want = want - lr * (mw / (1 - b1**t)) / (np.sqrt(vw / (1 - b2**t)) + eps)
    np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-7)
    assert np.abs(want - (1.0 - 5 * 0.01)).min() > 1e-3           # not five sign steps: the test can tell


def test_cosine_schedule():
    assert optim.learning_rate(0.1, "cosine", 0, 100) == pytest.approx(0.1)
    assert optim.learning_rate(0.1, "cosine", 50, 100) == pytest.approx(0.05)
    assert optim.learning_rate(0.1, "cosine", 100, 100) == pytest.approx(0.0)
    assert optim.learning_rate(0.1, "constant", 70, 100) == 0.1
