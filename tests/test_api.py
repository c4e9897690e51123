"""The Python API as a user meets it: the errors are exceptions, callbacks see every record and
can stop training (the documentation's examples run in test_docs.py)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from helpers import DATA_DIR, needs_mnist

import hpcfl

pytestmark = needs_mnist


def test_train_returns_a_result_and_callbacks_can_stop_it(tmp_path):
    seen = []

    def stop_after_two(record):
        seen.append(record["epoch"])
        if record["epoch"] == 2:
            raise hpcfl.StopTraining("enough")

    result = hpcfl.train(hpcfl.Config(epochs=5, max_steps=300, batch_size=256, hidden=(32,), quiet=True,
                                      data_dir=str(DATA_DIR)), callbacks=[stop_after_two])
    assert seen == [1, 2] and [r["epoch"] for r in result.history] == [1, 2]
    assert isinstance(result.model, hpcfl.Model) and result.model.sizes == (784, 32, 10)
    assert result.config.backend in ("numba", "numpy") and result.test_accuracy > 0.85
    data = hpcfl.load_dataset("mnist", DATA_DIR)
    assert result.model.evaluate(data.test_images, data.test_labels)["accuracy"] == result.test_accuracy
    p = result.model.predict_proba(data.test_x[:7])
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-9)
    assert (p.argmax(axis=1) == result.model.predict(data.test_images[:7])).all()


def test_errors_are_exceptions_not_exits_and_speak_the_apis_spelling():
    with pytest.raises(hpcfl.UsageError, match="^lr: must be positive"):
        hpcfl.train(hpcfl.Config(lr=-1.0))
    with pytest.raises(hpcfl.UsageError, match="dataset idx needs data_dir"):
        hpcfl.train(hpcfl.Config(dataset="idx"))
    with pytest.raises(hpcfl.UsageError, match="^rounds: must be an integer, got str '3'"):
        hpcfl.train(hpcfl.Config(rounds="3"))
    with pytest.raises(TypeError, match=r"Config\(rouds=...\): no such setting; did you mean rounds\?"):
        hpcfl.train(hpcfl.Config(rouds=3))
    with pytest.raises(hpcfl.UsageError, match="use local_lr"):
        hpcfl.train(hpcfl.Config(mode="fl", lr=0.3))
    with pytest.raises(hpcfl.DataError, match="missing"):
        hpcfl.load_dataset("mnist", "/nonexistent/folder", fetch=False)
    with pytest.raises(hpcfl.DataError, match="no such model file"):
        hpcfl.load_model("/nonexistent/model")
    assert issubclass(hpcfl.Preempted, hpcfl.HpcflError) and issubclass(hpcfl.DataError, hpcfl.HpcflError)


def test_a_model_file_of_hpcfl_0_1_loads_as_mnist(tmp_path):
    sizes = (784, 16, 10)
    params = np.random.default_rng(0).standard_normal(784 * 16 + 16 + 16 * 10 + 10).astype(np.float32)
    np.savez(tmp_path / "old.npz", params=params, sizes=np.array(sizes))
    m = hpcfl.load_model(tmp_path / "old.npz")
    assert m.dataset == "mnist" and (m.mean, m.std) == (0.1307, 0.3081) and m.sizes == sizes
    with pytest.raises(hpcfl.UsageError, match="do not fit this model"):
        m.predict(np.zeros((2, 20, 20), np.uint8))


def test_plot_overlays_runs_with_legends_from_their_settings(tmp_path):
    pytest.importorskip("matplotlib")
    from helpers import run_hpcfl

    for lr in ("0.05", "0.1"):
        run_dir = tmp_path / lr
        proc = run_hpcfl(2, "--epochs", 2, "--max-steps", 600, "--lr", lr, "--quiet", "--metrics",
                         run_dir / "metrics.jsonl", "--out", run_dir)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_hpcfl(1, "plot", tmp_path / "0.05" / "metrics.jsonl", tmp_path / "0.1" / "metrics.jsonl",
                     "-o", tmp_path / "runs.png")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    png = (tmp_path / "runs.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    from hpcfl.io import plots

    assert plots.legends(["a/metrics.jsonl", "b/metrics.jsonl"], [{"lr": 0.05, "seed": 0}, {"lr": 0.1, "seed": 0}]) \
        == ["metrics (lr=0.05)", "metrics (lr=0.1)"]


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path):
    code = ("import sys\nclass No:\n    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'matplotlib':\n            raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, No())\nfrom hpcfl.io import plots\n"
            "(__import__('pathlib').Path('r.jsonl')).write_text('{\"epoch\": 1, \"train_loss\": 1.0}\\n')\n"
            "try:\n    plots.plot_runs(['r.jsonl'], 'x.png')\nexcept Exception as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.stdout.strip() == "plot needs matplotlib: pip install -e '.[plot]'", proc.stdout + proc.stderr
