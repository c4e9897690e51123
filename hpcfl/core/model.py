"""A trained model outside training: predict, evaluate, save and load (the .npz format).

model.npz, as written by `--out DIR` (DIR/model.npz) and `Model.save` (plain arrays, read with
pickling disabled):

    params   float32 (P,)   every weight and bias, layer by layer: W1 (fan_in, fan_out) row-major,
                            then b1 (fan_out,), then W2, b2, ... (model.Layout.views)
    sizes    int64 (L+1,)   layer widths, input first, e.g. [784, 256, 128, 10]
    meta     uint8          UTF-8 JSON: {"format": 2, "dataset": "mnist", "image_shape": [28, 28],
                            "num_classes": 10, "mean": 0.1307, "std": 0.3081, "activation": "relu",
                            "input": "(pixel / 255 - mean) / std"}
    projection float32 (H*W, K)  only in a model trained with --dp-pca K (format 3; "input" then
                            says "((pixel / 255 - mean) / std) @ projection"); sizes[0] is K

The network: x = (pixel / 255 - mean) / std over the flattened uint8 image (row-major, H*W
values), times the projection if there is one; h = relu(h @ W + b) for every hidden layer;
logits = h @ W_L + b_L; probabilities = softmax(logits); the predicted class is the first
largest logit. A model.npz without `meta` (hpcfl 0.1) is an MNIST model with mean 0.1307 and std 0.3081.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from ..core import layout as model_mod
from ..errors import DataError, UsageError
from ..io.files import atomic_write

FORMAT = 3           # 3: with a DP-PCA projection; a model without one is still written as 2
CHUNK = 1000      # rows per forward pass, as in training's evaluation (the same float32 results)


def input_constants(mean: float, std: float) -> tuple[np.float32, np.float32]:
    """(scale, shift) of the input in float32: x = pixel * scale - shift = (pixel / 255 - mean) / std.
    One definition for the kernels' gather, inference, DP-PCA's projected training rows and the
    ONNX graph, so that all of them round alike."""
    return np.float32(1.0 / (255.0 * std)), np.float32(mean / std)


def input_rows(pixels: np.ndarray, mean: float, std: float, projection: np.ndarray | None = None) -> np.ndarray:
    """The float32 rows the MLP takes from (n, H*W) uint8 pixels: standardised, then projected."""
    scale, shift = input_constants(mean, std)
    rows = pixels.astype(np.float32) * scale - shift
    return rows if projection is None else rows @ projection


@dataclass
class Model:
    sizes: tuple
    params: np.ndarray
    dataset: str = "mnist"
    image_shape: tuple = (28, 28)
    num_classes: int = 10
    mean: float = 0.1307
    std: float = 0.3081
    projection: np.ndarray | None = None     # DP-PCA's (H*W, K) directions (--dp-pca K)

    def __post_init__(self):
        self.sizes = tuple(int(s) for s in self.sizes)
        self.params = np.ascontiguousarray(self.params, dtype=np.float32)
        if self.projection is not None:
            self.projection = np.ascontiguousarray(self.projection, dtype=np.float32)
            if self.projection.ndim != 2 or self.projection.shape[1] != self.sizes[0]:
                raise DataError(f"model: a projection of shape {self.projection.shape} does not feed "
                                f"{self.sizes[0]} inputs")
        self.layout = model_mod.Layout(self.sizes)
        if self.params.shape != (self.layout.n_params,):
            raise DataError(f"model: {self.params.size} parameters, but sizes {list(self.sizes)} "
                            f"need {self.layout.n_params}")

    @property
    def input_size(self) -> int:
        """Values per image the model takes (H*W; the projection's rows under DP-PCA)."""
        return self.sizes[0] if self.projection is None else self.projection.shape[0]

    @property
    def meta(self) -> dict:
        plain = self.projection is None
        return {"format": 2 if plain else FORMAT, "dataset": self.dataset,
                "image_shape": list(self.image_shape), "num_classes": self.num_classes, "mean": self.mean,
                "std": self.std, "activation": "relu",
                "input": "(pixel / 255 - mean) / std" + ("" if plain else " @ projection")}

    def _rows(self, images: ArrayLike) -> np.ndarray:
        x = np.asarray(images)
        if x.dtype != np.uint8:
            raise UsageError(f"images must be uint8 (0..255), got {x.dtype}")
        d = self.input_size
        if x.ndim >= 2 and int(np.prod(x.shape[1:])) == d:
            return x.reshape(len(x), d)
        raise UsageError(f"images of shape {x.shape} do not fit this model: it takes "
                         f"{'x'.join(map(str, self.image_shape))} images ({d} values each), "
                         f"as (N, {', '.join(map(str, self.image_shape))}) or (N, {d})")

    def logits(self, images: ArrayLike) -> np.ndarray:
        """(N, classes) float32 logits, computed CHUNK rows at a time."""
        from ..backends import numpy_backend as ref

        x, views = self._rows(images), self.layout.views(self.params)
        out = np.empty((len(x), self.sizes[-1]), np.float32)
        for start in range(0, len(x), CHUNK):
            rows = input_rows(x[start:start + CHUNK], self.mean, self.std, self.projection)
            out[start:start + len(rows)] = ref._forward(views, rows)[-1]
        return out

    def predict_proba(self, images: ArrayLike) -> np.ndarray:
        z = self.logits(images).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, images: ArrayLike) -> np.ndarray:
        return self.logits(images).argmax(axis=1)

    def evaluate(self, images: ArrayLike, labels: ArrayLike) -> dict:
        """accuracy, mean cross-entropy loss, per-class accuracy, confusion matrix (rows: true
        class, columns: predicted)."""
        y = np.asarray(labels).astype(np.int64)
        z = self.logits(images).astype(np.float64)
        if len(y) != len(z):
            raise UsageError(f"{len(z)} images but {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
            raise UsageError(f"labels must be in 0..{self.num_classes - 1}")
        pred = z.argmax(axis=1)
        m = z.max(axis=1, keepdims=True)
        logp = z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))
        k = self.num_classes
        confusion = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
        per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
        return {"accuracy": float((pred == y).mean()) if len(y) else float("nan"),
                "loss": float(-logp[np.arange(len(y)), y].mean()) if len(y) else float("nan"),
                "samples": int(len(y)), "per_class_accuracy": per_class.tolist(),
                "confusion": confusion.tolist()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write model.npz (atomically). `path` is a .npz file or a folder."""
        path = Path(path)
        if path.suffix != ".npz":
            path.mkdir(parents=True, exist_ok=True)
            path = path / "model.npz"
        meta = np.frombuffer(json.dumps(self.meta, sort_keys=True).encode(), np.uint8)
        extra = {} if self.projection is None else {"projection": self.projection}
        atomic_write(path, lambda f: np.savez(f, params=self.params, sizes=np.array(self.sizes, np.int64),
                                              meta=meta, **extra))  # type: ignore[arg-type]
        return path


def load_model(path: str | os.PathLike) -> Model:
    """A model from a folder written by --out (its model.npz) or from a .npz file."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.npz"
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"PK\x03\x04":           # np.load would offer to unpickle anything else
            raise DataError(f"{path}: not an hpcfl model (a model.npz is a zip archive; this file "
                            f"starts with {magic!r})")
        with np.load(path, allow_pickle=False) as z:
            params, sizes = z["params"], z["sizes"]
            meta = json.loads(z["meta"].tobytes()) if "meta" in z.files else {}
            projection = z["projection"] if "projection" in z.files else None
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such model file (a folder written by --out holds model.npz)") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the model ({e.strerror or e})") from e
    except Exception as e:   # truncated zip, missing array, bad JSON
        raise DataError(f"{path}: not an hpcfl model ({type(e).__name__}: {e})") from e
    if meta.get("format", FORMAT) > FORMAT:
        raise DataError(f"{path}: model format {meta['format']} is newer than this hpcfl reads ({FORMAT})")
    return Model(tuple(sizes.tolist()), params, dataset=meta.get("dataset", "mnist"),
                 image_shape=tuple(meta.get("image_shape", (28, 28))),
                 num_classes=int(meta.get("num_classes", int(sizes[-1]))),
                 mean=float(meta.get("mean", 0.1307)), std=float(meta.get("std", 0.3081)),
                 projection=projection)
