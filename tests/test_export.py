"""ONNX export: onnxruntime, fed raw uint8 images, gives Model.logits and Model.predict on all of
MNIST's test set, for random and trained models of several depths and for a non-MNIST input."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from helpers import DATA_DIR, ROOT, needs_mnist  # noqa: E402

from hpcfl import data  # noqa: E402
from hpcfl.core import layout as model_mod  # noqa: E402
from hpcfl.core.model import Model, load_model  # noqa: E402
from hpcfl.errors import UsageError  # noqa: E402
from hpcfl.io import export  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def mnist_test():
    """(images uint8 (10000, 28, 28), labels) straight from the IDX files: no MPI, no cache."""
    def read(name):
        path = next(p for p in (DATA_DIR / f"{name}.gz", DATA_DIR / name) if p.is_file())
        return np.asarray(data.read_idx(path))

    return read("t10k-images-idx3-ubyte"), read("t10k-labels-idx1-ubyte")


def random_model(sizes, **kw) -> Model:
    """He-scaled weights and non-zero biases (a graph that dropped a bias must fail)."""
    rng = np.random.default_rng(0)
    lay = model_mod.Layout(tuple(sizes))
    params = np.empty(lay.n_params, np.float32)
    for w, b in lay.views(params):
        w[...] = rng.standard_normal(w.shape) * np.sqrt(2.0 / w.shape[0])
        b[...] = rng.standard_normal(b.shape) * 0.1
    return Model(tuple(sizes), params, num_classes=sizes[-1], **kw)


def sgd_trained_model(images, labels, sizes=(784, 64, 32, 10), steps=150, batch=128) -> Model:
    """A briefly trained model, without MPI: the reference backend's gradients and SGD step."""
    from hpcfl.backends import numpy_backend as ref

    lay = model_mod.Layout(sizes)
    params, buf = model_mod.init_params(lay, seed=0), np.zeros(lay.n_params, np.float32)
    grads = np.zeros_like(params)
    m = Model(sizes, params)
    scale, shift = np.float32(1 / (255 * m.std)), np.float32(m.mean / m.std)
    order = np.random.default_rng(0).permutation(len(images))
    for step in range(steps):
        idx = order[step * batch % len(order):][:batch]
        x = images[idx].reshape(len(idx), -1).astype(np.float32) * scale - shift
        ref.forward_backward(lay.views(params), x, labels[idx].astype(np.int64), lay.views(grads), None)
        ref.sgd_update(params, grads, buf, 0.1, 0.9, 1e-4, 1.0 / len(idx))
    return Model(sizes, params)


def run_onnx(blob: bytes, images: np.ndarray):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1      # CI shares 2 cores
    sess = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
    return sess.run(["logits", "class"], {"pixels": images})


def assert_same(m: Model, images: np.ndarray) -> float:
    logits, cls = run_onnx(export.to_onnx(m), images)
    ref = m.logits(images)
    assert logits.dtype == np.float32 and logits.shape == ref.shape
    assert cls.dtype == np.int64 and cls.shape == (len(images),)
    diff = float(np.abs(logits - ref).max())
    assert diff <= TOL, diff
    np.testing.assert_array_equal(cls, m.predict(images))
    return diff


@needs_mnist
@pytest.mark.parametrize("sizes", [(784, 64, 32, 10), (784, 64, 10), (784, 128, 64, 32, 10)],
                         ids=["2-hidden", "1-hidden", "3-hidden"])
def test_random_models_agree_on_all_mnist_test_images(mnist_test, sizes):
    images, _ = mnist_test
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert_same(random_model(sizes), images)


@needs_mnist
def test_a_trained_model_agrees_on_all_mnist_test_images(mnist_test):
    images, labels = mnist_test
    m = sgd_trained_model(images, labels)          # trained on the test set: only the export is tested
    assert m.evaluate(images, labels)["accuracy"] > 0.85
    diff = assert_same(m, images)
    print(f"max |logits_onnx - Model.logits| over 10000 images: {diff:.3g}")


@needs_mnist
def test_a_model_from_hpcfl_train_agrees(mnist_test):
    for dep in ("mpi4py", "threadpoolctl"):      # hpcfl.train's, absent from an onnx-only env
        pytest.importorskip(dep)
    import hpcfl

    result = hpcfl.train(hpcfl.Config(epochs=1, max_steps=100, batch_size=128, hidden=(32,), backend="numpy",
                                      quiet=True, data_dir=str(DATA_DIR)))
    assert_same(result.model, mnist_test[0])


def test_the_normalisation_comes_from_the_model():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (500, 8, 8), dtype=np.uint8)
    m = random_model((64, 16, 5), dataset="toy", image_shape=(8, 8), mean=0.42, std=0.17)
    assert_same(m, images)
    # the same weights with MNIST's statistics give other logits: the check above can tell
    mnist_like = Model(m.sizes, m.params, image_shape=(8, 8), num_classes=5)
    assert np.abs(mnist_like.logits(images) - m.logits(images)).max() > 10 * TOL


def test_any_batch_size_and_the_graph_rejects_other_shapes():
    m = random_model((64, 16, 5), image_shape=(8, 8), mean=0.5, std=0.25)
    blob = export.to_onnx(m)
    images = np.random.default_rng(2).integers(0, 256, (7, 8, 8), dtype=np.uint8)
    for n in (1, 3, 7):
        logits, cls = run_onnx(blob, images[:n])
        assert logits.shape == (n, 5) and cls.shape == (n,)
        np.testing.assert_array_equal(cls, m.predict(images[:n]))
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        run_onnx(blob, np.zeros((2, 28, 28), np.uint8))


def test_ties_go_to_the_first_largest_logit_as_in_predict():
    m = Model((64, 16, 5), np.zeros(64 * 16 + 16 + 16 * 5 + 5, np.float32), image_shape=(8, 8), num_classes=5)
    m.params[-5:] = [0, 1, 1, 0, 1]                    # logits = the last bias: classes 1, 2 and 4 tie
    images = np.random.default_rng(4).integers(0, 256, (6, 8, 8), dtype=np.uint8)
    _, cls = run_onnx(export.to_onnx(m), images)
    assert (m.predict(images) == 1).all()
    np.testing.assert_array_equal(cls, m.predict(images))


def test_the_graph_says_what_it_is():
    m = random_model((64, 16, 5), dataset="toy", image_shape=(8, 8), mean=0.42, std=0.17)
    proto = onnx.load_from_string(export.to_onnx(m))
    onnx.checker.check_model(proto, full_check=True)
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["dataset"] == "toy" and float(props["mean"]) == 0.42 and float(props["std"]) == 0.17
    assert props["hpcfl_version"] == __import__("hpcfl").__version__ and props["image_shape"] == "8,8"
    assert proto.doc_string and proto.graph.doc_string and proto.producer_name == "hpcfl"
    assert proto.ir_version <= onnx.IR_VERSION and proto.opset_import[0].version == export.OPSET
    (inp,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "pixels" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims == ["N", 8, 8]
    outs = {o.name: o.type.tensor_type for o in proto.graph.output}
    assert outs["logits"].elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in outs["logits"].shape.dim] == ["N", 5]
    assert outs["class"].elem_type == onnx.TensorProto.INT64
    assert [d.dim_param or d.dim_value for d in outs["class"].shape.dim] == ["N"]


def test_export_writes_a_file_that_loads(tmp_path):
    m = random_model((64, 16, 5), dataset="toy", image_shape=(8, 8), mean=0.42, std=0.17)
    out = export.export(m.save(tmp_path / "model"), tmp_path / "model.onnx")
    assert out == tmp_path / "model.onnx" and sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.onnx"]
    onnx.checker.check_model(str(out))
    images = np.random.default_rng(3).integers(0, 256, (50, 8, 8), dtype=np.uint8)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits, cls = sess.run(None, {"pixels": images})
    reloaded = load_model(tmp_path / "model")
    assert np.abs(logits - reloaded.logits(images)).max() <= TOL
    np.testing.assert_array_equal(cls, reloaded.predict(images))


def test_write_onnx_to_a_missing_folder_or_onto_a_folder_is_a_usage_error(tmp_path):
    m = random_model((64, 16, 5), image_shape=(8, 8))
    missing = tmp_path / "no" / "such"
    with pytest.raises(UsageError, match=f"folder {missing} does not exist"):
        export.write_onnx(m, missing / "m.onnx")
    with pytest.raises(UsageError, match="is a folder"):
        export.write_onnx(m, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_without_onnx_the_export_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)     # `import onnx` now raises ImportError
    with pytest.raises(UsageError, match=r"pip install -e '\.\[onnx\]'"):
        export.to_onnx(random_model((64, 16, 5), image_shape=(8, 8)))


def test_importing_the_module_does_not_import_onnx():
    code = "import sys, hpcfl.io.export; assert 'onnx' not in sys.modules and 'onnxruntime' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
