"""DP-PCA for DP-SGD (--dp-pca K, Abadi et al. 2016 section 4): the projection against NumPy's
SVD, the noise's scale and symmetry, its privacy cost composed into the run's epsilon against
dp-accounting called directly, and the projection inside the saved model (evaluate, predict,
ONNX and a bitwise resume)."""
from __future__ import annotations

import json

import dp_accounting
import numpy as np
import pytest
from helpers import assert_clean_failure, needs_mnist, run_hpcfl, run_then_resume_without_seed

import hpcfl
from hpcfl.privacy import accountant as privacy
from hpcfl.privacy import mechanisms, noise
from hpcfl.privacy import plan as dpplan

KEY = noise.derive_key(5, "dp-pca")


def subspace_gap(a, b):
    """Spectral norm of the difference of the two column spaces' projectors."""
    return np.linalg.norm(a @ a.T - b @ b.T, 2)


def test_without_noise_the_directions_are_the_svd_of_the_unit_norm_rows():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (300, 16)).astype(np.uint8) * (rng.random((300, 16)) < 0.5)
    x[7] = 0                                                   # a blank image stays out of it
    units = x / np.maximum(np.linalg.norm(x.astype(float), axis=1, keepdims=True), 1e-300)
    _, s, vt = np.linalg.svd(units, full_matrices=False)
    assert s[4] - s[5] > 1e-3                                  # a well-defined top-5 subspace
    p = mechanisms.dp_pca(x, 5, 0.0, KEY)
    assert p.shape == (16, 5) and p.dtype == np.float32
    assert subspace_gap(p.astype(float), vt[:5].T) < 1e-5
    assert np.allclose(p.T.astype(float) @ p, np.eye(5), atol=1e-6)
    assert np.array_equal(p, mechanisms.dp_pca(x.reshape(300, 4, 4), 5, 0.0, KEY))   # images or rows


def noised_gram_directions(x, k, sigma, key):
    """The release computed independently: the Gram matrix of the unit-norm rows plus the
    mirrored N(0, sigma^2) upper triangle drawn from the key's stream, and NumPy's eigh."""
    x = x.reshape(len(x), -1).astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    units = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    d = x.shape[1]
    e = np.zeros((d, d))
    e[np.triu_indices(d)] = sigma * noise.standard_normal(key, 0, d * (d + 1) // 2)
    values, vectors = np.linalg.eigh(units.T @ units + np.triu(e) + np.triu(e, 1).T)
    return vectors[:, np.argsort(values)[::-1][:k]]


def test_the_release_is_the_gram_matrix_plus_noise_at_the_asked_scale():
    # a planted spectrum: rows near 6 directions with weights 60, 45, 40, 30, 25, 20 (their Gram
    # eigenvalues), noise sigma 4 of the same order; the release must be the top eigenvectors of
    # exactly Gram + noise(sigma). The same key at sigma / 100 or 100 sigma gives another subspace,
    # so a wrong scale cannot pass
    rng = np.random.default_rng(1)                 # test data
    d, k, sigma = 40, 6, 4.0
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0][:, :k]
    weights = np.array([60, 45, 40, 30, 25, 20])
    rows = np.repeat(basis.T, weights, axis=0) + 0.05 * rng.standard_normal((weights.sum(), d))
    x = np.clip(np.abs(rows) * 255, 0, 255).astype(np.uint8)
    got = mechanisms.dp_pca(x, k, sigma, KEY).astype(float)
    assert subspace_gap(got, noised_gram_directions(x, k, sigma, KEY)) < 1e-5
    for wrong in (sigma / 100, sigma * 100):
        assert subspace_gap(got, noised_gram_directions(x, k, wrong, KEY)) > 0.1
    other = mechanisms.dp_pca(x, k, sigma, noise.derive_key(6, "dp-pca")).astype(float)
    assert subspace_gap(other, got) > 0.1         # another key, another release
    assert np.allclose(got.T @ got, np.eye(k), atol=1e-5)


def test_the_budget_share_and_the_composed_epsilon_against_dp_accounting():
    q, steps, delta, target = 4096 / 60000, 60 * 14, 1e-5, 2.0
    sigma = privacy.pca_noise_for(target, delta)
    alone = dp_accounting.rdp.RdpAccountant(privacy.ORDERS)
    alone.compose(dp_accounting.GaussianDpEvent(sigma))
    assert alone.get_epsilon(delta) == pytest.approx(privacy.PCA_SHARE * target, rel=2e-3)
    z = privacy.calibrate_noise(q, steps, delta, target, prior=[(1.0, sigma, 1)])
    assert z > privacy.calibrate_noise(q, steps, delta, target)          # the PCA took its share

    def direct(zz):
        acc = dp_accounting.rdp.RdpAccountant(privacy.ORDERS)
        acc.compose(dp_accounting.GaussianDpEvent(sigma))
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(zz)), steps)
        return acc.get_epsilon(delta)

    assert direct(z) <= target < direct(z / 1.002)
    plan = dpplan.DpPlan(clip=0.5, z=z, q=q, expected=4096, noise_seed=1, delta=delta, pca=60, pca_noise=sigma)
    plan.accountant.compose(q, z, steps)
    assert plan.accountant.epsilon() == pytest.approx(direct(z), rel=1e-9)
    with pytest.raises(ValueError, match="spent before training"):
        privacy.calibrate_noise(q, steps, delta, 0.05, prior=[(1.0, 1.0, 1)])


def test_options_that_cannot_work_exit_2():
    assert_clean_failure(run_hpcfl(1, "--dp-pca", 60), 2, "--dp-pca is not read with --dp-sgd off")
    assert_clean_failure(run_hpcfl(1, "--dp-sgd", "--dp-noise", 1, "--dp-pca", 60), 2, "--dp-pca-noise")
    assert_clean_failure(run_hpcfl(1, "--dp-sgd", "--dp-noise", 1, "--dp-pca-noise", 9), 2, "--dp-pca K")
    assert_clean_failure(run_hpcfl(1, "--dp-sgd", "--dp-epsilon", 2, "--dp-pca", 0, "--dp-pca-noise", 9), 2,
                         "--dp-pca K")
    assert_clean_failure(run_hpcfl(1, "--dp-sgd", "--dp-epsilon", 2, "--dp-pca", 785), 2,
                         "more directions than the 784")


PCA = ["--dp-sgd", "--dp-epsilon", 2, "--dp-pca", 30, "--epochs", 3, "--dp-noise-seed", 4, "--quiet"]


@needs_mnist
def test_end_to_end_the_projection_is_part_of_the_model_and_of_epsilon(tmp_path):
    proc = run_hpcfl(2, *PCA, "--out", tmp_path / "m", "--metrics", tmp_path / "m.jsonl")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert recs[0]["dp_epsilon"] > privacy.PCA_SHARE * 2 and 1.99 < recs[-1]["dp_epsilon"] <= 2.0
    model = hpcfl.load_model(tmp_path / "m")
    assert model.projection.shape == (784, 30) and model.sizes[0] == 30
    images = np.asarray(hpcfl.load_dataset("mnist").test_x).reshape(-1, 28, 28)
    assert model.evaluate(images, hpcfl.load_dataset("mnist").test_y)["accuracy"] == recs[-1]["test_accuracy"]
    evaluated = run_hpcfl(1, "evaluate", "--model", tmp_path / "m", "--json")
    assert json.loads(evaluated.stdout)["accuracy"] == recs[-1]["test_accuracy"]
    onnxruntime = pytest.importorskip("onnxruntime")
    assert run_hpcfl(1, "export", "--model", tmp_path / "m", "--onnx", tmp_path / "m.onnx").returncode == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    logits, classes = session.run(["logits", "class"], {"pixels": images})
    assert np.abs(logits - model.logits(images)).max() <= 1e-4 and (classes == model.predict(images)).all()


@needs_mnist
def test_a_resumed_run_projects_with_the_checkpoints_seed_and_ends_bitwise(tmp_path):
    # resumed without --dp-noise-seed: the projection must come from the checkpoint's seed
    a, b = map(hpcfl.load_model, run_then_resume_without_seed(tmp_path, PCA, 20))
    assert np.array_equal(a.projection, b.projection) and np.array_equal(a.params, b.params)
