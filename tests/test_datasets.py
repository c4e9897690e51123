"""Data sets beyond MNIST: the catalogue's checks, any IDX set of another shape and class count,
.npz files, EMNIST's transposed images and 1-based letters, Debian's Fashion-MNIST end to end."""
from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_clean_failure, run_hpcfl

from hpcfl import data
from hpcfl.data import catalogue as datasets
from hpcfl.errors import DataError, UsageError

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
                                   reason="Debian's dataset-fashion-mnist is not installed "
                                          "(apt-get install dataset-fashion-mnist; CI installs it)")


def idx(array: np.ndarray) -> bytes:
    header = b"\0\0\x08" + bytes([array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def synthetic(folder: Path, names: dict, shape=(12, 10), classes=5, n=(600, 200), seed=0, offset=0) -> dict:
    """A learnable toy set: class c lights up row block c of the image, plus noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, count in zip(("train", "test"), n):
        y = rng.integers(0, classes, count)
        x = rng.integers(0, 60, (count, *shape))
        band = shape[0] // classes
        for c in range(classes):
            x[y == c, c * band:(c + 1) * band] += 150
        x = x.astype(np.uint8)
        img, lbl = names[split]
        (folder / f"{img}.gz").write_bytes(gzip.compress(idx(x)))
        (folder / lbl).write_bytes(idx((y + offset).astype(np.uint8)))
        out[split] = (x, y)
    return out


def test_catalogue_entries_are_complete_and_https():
    for name in ("mnist", "fashion-mnist", "kmnist", "emnist-digits", "emnist-letters", "emnist-balanced"):
        spec = datasets.get(name)
        assert spec.num_classes and spec.counts and spec.image_shape == (28, 28)
        assert spec.urls or spec.archive
        for url in list(spec.urls) + ([spec.archive[0]] if spec.archive else []):
            assert url.startswith("https://")
        if not spec.archive:
            assert set(spec.md5_gz) == {f"{f}.gz" for f in spec.file_names}
    assert datasets.get("emnist-letters").label_offset == 1 and datasets.get("emnist-letters").transposed
    with pytest.raises(UsageError, match="unknown"):
        datasets.get("cifar")


def test_idx_of_another_shape_and_class_count_is_validated_and_cached(tmp_path):
    arrays = synthetic(tmp_path / "toy", datasets.MNIST_FILES)
    spec = datasets.get("idx")
    path = data.prepare_cache(tmp_path / "toy", cache_root=tmp_path / "c", spec=spec)
    ds = data.open_cache(path)
    assert ds.name == "idx" and ds.image_shape == (12, 10) and ds.num_classes == 5 and ds.input_size == 120
    np.testing.assert_array_equal(ds.train_images, arrays["train"][0])
    np.testing.assert_array_equal(ds.test_labels, arrays["test"][1])
    pixels = arrays["train"][0].astype(np.float64) / 255
    assert ds.mean == pytest.approx(pixels.mean(), abs=1e-4) and ds.std == pytest.approx(pixels.std(), abs=1e-4)
    assert data.verify_cache(path) is None


def test_idx_labels_must_fit_and_shapes_must_agree(tmp_path):
    synthetic(tmp_path / "one", datasets.MNIST_FILES, classes=1)
    with pytest.raises(DataError, match="1 classes"):
        data.prepare_cache(tmp_path / "one", cache_root=tmp_path / "c", spec=datasets.get("idx"))
    synthetic(tmp_path / "mixed", datasets.MNIST_FILES)
    synthetic(tmp_path / "other", datasets.MNIST_FILES, shape=(8, 8))
    (tmp_path / "mixed" / "t10k-images-idx3-ubyte.gz").write_bytes(
        (tmp_path / "other" / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "mixed" / "t10k-labels-idx1-ubyte").write_bytes(
        (tmp_path / "other" / "t10k-labels-idx1-ubyte").read_bytes())
    with pytest.raises(DataError, match="train images are"):
        data.prepare_cache(tmp_path / "mixed", cache_root=tmp_path / "c", spec=datasets.get("idx"))


def test_a_catalogue_entry_refuses_files_that_are_not_its_own(tmp_path):
    synthetic(tmp_path / "k", datasets.MNIST_FILES, shape=(28, 28), classes=10)
    with pytest.raises(DataError, match="MD5"):                     # kmnist: published MD5 of the .gz
        data.prepare_cache(tmp_path / "k", cache_root=tmp_path / "c", spec=datasets.get("kmnist"))
    spec = dataclasses.replace(datasets.get("kmnist"), md5_gz={})   # no checksum to compare: counts
    with pytest.raises(DataError, match="600 train samples, but Kuzushiji-MNIST has 60000"):
        data.prepare_cache(tmp_path / "k", cache_root=tmp_path / "c", spec=spec)
    synthetic(tmp_path / "s", datasets.MNIST_FILES, shape=(20, 20))
    with pytest.raises(DataError, match="28x28 expected, found 20x20"):
        data.prepare_cache(tmp_path / "s", cache_root=tmp_path / "c", spec=datasets.get("fashion-mnist"))


def test_emnist_images_are_transposed_back_and_letters_start_at_zero(tmp_path):
    spec = dataclasses.replace(datasets.get("emnist-letters"), counts=None)
    stored = synthetic(tmp_path / "e", spec.files, shape=(28, 28), classes=26, offset=1)
    ds = data.open_cache(data.prepare_cache(tmp_path / "e", cache_root=tmp_path / "c", spec=spec))
    assert ds.num_classes == 26
    np.testing.assert_array_equal(ds.train_labels, stored["train"][1])            # 1..26 -> 0..25
    np.testing.assert_array_equal(ds.train_images, stored["train"][0].transpose(0, 2, 1))
    zero = dataclasses.replace(spec, label_offset=1)
    synthetic(tmp_path / "z", spec.files, shape=(28, 28), classes=26, offset=0)   # a 0 label: not letters
    with pytest.raises(DataError, match="below 1"):
        data.prepare_cache(tmp_path / "z", cache_root=tmp_path / "c", spec=zero)


def test_npz_data_sets(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (50, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=rng.integers(0, 3, 50), x_test=x[:10], y_test=np.arange(10) % 3)
    ds = data.open_cache(data.prepare_cache(tmp_path / "d.npz", cache_root=tmp_path / "c", spec=datasets.get("npz")))
    assert ds.image_shape == (6, 6) and ds.num_classes == 3 and ds.n_train == 50
    np.savez(tmp_path / "bad.npz", x_train=x.astype(np.float32), y_train=np.zeros(50, int), x_test=x,
             y_test=np.zeros(50, int))
    with pytest.raises(DataError, match="must be uint8"):
        data.prepare_cache(tmp_path / "bad.npz", cache_root=tmp_path / "c", spec=datasets.get("npz"))
    np.savez(tmp_path / "missing.npz", x_train=x)
    with pytest.raises(DataError, match="x_train, y_train, x_test, y_test"):
        data.prepare_cache(tmp_path / "missing.npz", cache_root=tmp_path / "c", spec=datasets.get("npz"))


def test_a_synthetic_idx_set_trains_end_to_end(tmp_path):
    synthetic(tmp_path / "toy", datasets.MNIST_FILES, n=(1200, 300))
    out = tmp_path / "out"
    proc = run_hpcfl(2, "--dataset", "idx", "--data-dir", tmp_path / "toy", "--hidden", "32", "--epochs", 3,
                     "--batch-size", 32, "--out", out, env={"HPCFL_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "model 120-32-5" in proc.stdout
    meta = json.loads(np.load(out / "model.npz")["meta"].tobytes())
    assert meta["dataset"] == "idx" and meta["image_shape"] == [12, 10] and meta["num_classes"] == 5
    assert float(proc.stdout.split("final test accuracy ")[1].split("%")[0]) > 90
    assert_clean_failure(run_hpcfl(2, "--dataset", "idx"), 2, "--dataset idx needs --data-dir")


@needs_fashion
def test_debians_fashion_mnist_trains_end_to_end_and_evaluates_to_the_same_accuracy(tmp_path):
    out = tmp_path / "out"
    proc = run_hpcfl(2, "--dataset", "fashion-mnist", "--data-dir", FASHION, "--epochs", 1, "--out", out,
                     "--metrics", tmp_path / "m.jsonl")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])
    assert last["test_accuracy"] > 0.80
    proc = run_hpcfl(1, "evaluate", "--model", out, "--data-dir", FASHION, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["dataset"] == "fashion-mnist" and result["accuracy"] == last["test_accuracy"]
    assert_clean_failure(run_hpcfl(2, "--dataset", "mnist", "--data-dir", FASHION, "--max-steps", 1), 1,
                         "does not match the published MNIST SHA-256")


def test_finding_7_under_dp_the_input_normalisation_is_fixed_not_measured(tmp_path):
    # the training set's mean and std are statistics of the private data: a DP run normalises with
    # constants fixed in advance (a public set's published ones; here, a set of one's own, 0.5/0.5)
    synthetic(tmp_path / "toy", datasets.MNIST_FILES, n=(1200, 300))
    common = ["--dataset", "idx", "--data-dir", tmp_path / "toy", "--hidden", "16", "--epochs", 1,
              "--batch-size", 256, "--quiet"]
    env = {"HPCFL_CACHE_DIR": str(tmp_path / "cache")}
    for name, extra in (("plain", []), ("dp", ["--dp-sgd", "--dp-noise", 1.0])):
        proc = run_hpcfl(2, *common, *extra, "--out", tmp_path / name, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    plain, dp = (json.loads(np.load(tmp_path / d / "model.npz")["meta"].tobytes()) for d in ("plain", "dp"))
    assert (dp["mean"], dp["std"]) == datasets.DP_NORM == (0.5, 0.5)
    x = np.frombuffer(gzip.decompress((tmp_path / "toy" / "train-images-idx3-ubyte.gz").read_bytes())[16:], np.uint8)
    assert plain["mean"] == pytest.approx(x.mean() / 255, abs=1e-4) != 0.5          # measured without DP
    assert datasets.dp_normalisation("mnist") == (0.1307, 0.3081)                     # MNIST's published ones
