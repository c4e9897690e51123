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


def test_the_noise_is_symmetric_with_the_asked_scale_and_keyed():
    # no data: the released matrix is the noise itself; its eigenvectors as a whole must then
    # reconstruct a symmetric matrix whose upper entries have std sigma
    d, sigma = 120, 3.0
    zero = np.zeros((4, d))
    full = mechanisms.dp_pca(zero, d, sigma, KEY).astype(float)
    assert np.allclose(full.T @ full, np.eye(d), atol=1e-4)
    draws = sigma * noise.standard_normal(KEY, 0, d * (d + 1) // 2)
    e = np.zeros((d, d))
    e[np.triu_indices(d)] = draws
    e = np.triu(e) + np.triu(e, 1).T
    values, vectors = np.linalg.eigh(e)
    top = vectors[:, np.argsort(values)[::-1][:10]]
    assert subspace_gap(mechanisms.dp_pca(zero, 10, sigma, KEY).astype(float), top) < 1e-4
    assert draws.std() == pytest.approx(sigma, rel=0.03)
    other = mechanisms.dp_pca(zero, 10, sigma, noise.derive_key(6, "dp-pca"))
    assert subspace_gap(other.astype(float), top) > 0.5        # another seed, another release


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
