"""Reading a data set of MNIST's form from its files: IDX (.gz or raw) or one .npz, validated.

Header, length, shapes and counts are checked against the catalogue's spec; labels must be
0..K-1; files whose published checksums the catalogue knows must match them."""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError
from .catalogue import Spec

logger = logging.getLogger(__name__)

_IDX_TYPES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "short",
              0x0C: "int", 0x0D: "float", 0x0E: "double"}
MAX_CLASSES = 256           # labels are stored as uint8: 0..255


# ---------------------------------------------------------------- IDX reading

def _read_bytes(path: Path) -> bytes:
    """The file's decompressed bytes; gzip is detected by its magic, not by the file name."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: corrupt or truncated gzip stream ({e})") from e


def _parse_idx(path: Path, data: bytes) -> np.ndarray:
    if len(data) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file: bad magic bytes {data[:4].hex(' ')} "
                        "(expected 00 00 <type> <ndim>)")
    code, ndim = data[2], data[3]
    if code != 0x08:
        kind = _IDX_TYPES.get(code, "unknown")
        raise DataError(f"{path}: unsupported IDX data type code 0x{code:02x} ({kind}); "
                        "MNIST uses 0x08 (unsigned byte)")
    if ndim not in (1, 3, 4):
        raise DataError(f"{path}: unsupported number of dimensions {ndim} "
                        "(expected 1 for labels or 3 for images; 4 for images with channels)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated header: expected {header} bytes, found {len(data)}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if any(d == 0 for d in dims):
        raise DataError(f"{path}: dimensions {dims} must all be positive")
    expected, found = int(np.prod(dims)), len(data) - header
    if found < expected:
        raise DataError(f"{path}: truncated: expected {expected} bytes of data, found {found}")
    if found > expected:
        raise DataError(f"{path}: {found - expected} trailing bytes after the "
                        f"{expected} bytes of data")
    # A read-only view of `data`: no copy of the 47 MB image file.
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a gzip or raw IDX file of unsigned bytes (read-only array). Raises DataError."""
    path = Path(path)
    return _parse_idx(path, _read_bytes(path))


# ---------------------------------------------------------------- reading a whole data set

def _validate_split(spec: Spec, split: str, x: np.ndarray, y: np.ndarray, where: str) -> None:
    """Shapes, counts and labels of one split; the message names the file and the difference."""
    if x.ndim < 2:
        raise DataError(f"{where}: expected images (N, H, W), found shape {x.shape}")
    if spec.image_shape is not None and x.shape[1:] != spec.image_shape:
        want = "x".join(map(str, spec.image_shape))
        raise DataError(f"{where}: wrong image size: {want} expected, found {'x'.join(map(str, x.shape[1:]))}")
    if y.ndim != 1:
        raise DataError(f"{where}: expected labels (N,), found shape {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{where}: {len(x)} images but {len(y)} labels")


def _check_labels(spec: Spec, labels: dict, where: dict) -> int:
    """Shift EMNIST letters to 0..25, check every label, return the class count K."""
    if spec.num_classes is None:
        low = min(int(y.min()) for y in labels.values())
        if low < 0:
            raise DataError(f"{where['train']}: negative label {low}")
        k = max(int(y.max()) for y in labels.values()) + 1
        if not 2 <= k <= MAX_CLASSES:
            raise DataError(f"{where['train']}: labels give {k} classes; 2 to {MAX_CLASSES} are supported")
        return k
    for split, y in labels.items():
        bad = np.flatnonzero((y < 0) | (y >= spec.num_classes))
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{where[split]}: label {y[i] + spec.label_offset} at index {i} outside "
                            f"{spec.label_offset}..{spec.num_classes - 1 + spec.label_offset}")
    return spec.num_classes


def _load_idx(data_dir: Path, spec: Spec) -> tuple[dict, dict, dict]:
    """Arrays {train_x, train_y, test_x, test_y} (images (N, H, W)), sources, label paths."""
    arrays, hashes, where = {}, {}, {}
    for split, (img_name, lbl_name) in spec.files.items():
        img_path, lbl_path = _source(data_dir, img_name), _source(data_dir, lbl_name)
        assert img_path is not None and lbl_path is not None      # _check_sources found them
        img_bytes, lbl_bytes = _read_bytes(img_path), _read_bytes(lbl_path)
        x, y = _parse_idx(img_path, img_bytes), _parse_idx(lbl_path, lbl_bytes)
        if x.ndim == 1:
            raise DataError(f"{img_path}: expected images (N,28,28), found shape {x.shape}")
        _validate_split(spec, split, x, y, f"{img_path} and {lbl_path}" if len(x) != len(y) else
                        str(lbl_path if y.ndim != 1 else img_path))
        if spec.transposed:                        # EMNIST: column-major images
            x = np.ascontiguousarray(x.transpose(0, 2, 1))
        if spec.label_offset:
            if y.min() < spec.label_offset:
                raise DataError(f"{lbl_path}: label {int(y.min())} below {spec.label_offset} "
                                f"({spec.name} labels start at {spec.label_offset})")
            y = (y - spec.label_offset).astype(np.uint8)
        arrays[f"{split}_x"], arrays[f"{split}_y"] = x, y
        where[split] = lbl_path
        # Hashed here while the bytes are at hand; compared once every file has passed the
        # structural checks, which explain a problem better than a hash does.
        for name, path, blob in ((img_name, img_path, img_bytes), (lbl_name, lbl_path, lbl_bytes)):
            hashes[name] = (path, hashlib.sha256(blob).hexdigest())
    return arrays, hashes, where


def _check_published(spec: Spec, hashes: dict) -> None:
    """The content must match the published SHA-256 where known; else the .gz download its
    published MD5 (a raw file without a known content hash can only be checked structurally)."""
    sha256, md5_gz = spec.sha256, spec.md5_gz
    label = spec.title.split(" (")[0]
    for name, (path, digest) in hashes.items():
        if name in sha256:
            if digest != sha256[name]:
                raise DataError(f"{path}: content does not match the published {label} SHA-256 "
                                f"(expected {sha256[name]}, found {digest}); the file is "
                                f"damaged or not the canonical {label}")
        elif f"{name}.gz" in md5_gz and path.name.endswith(".gz"):
            md5 = hashlib.md5(path.read_bytes()).hexdigest()
            if md5 != md5_gz[f"{name}.gz"]:
                raise DataError(f"{path}: MD5 {md5} does not match the published "
                                f"{md5_gz[name + '.gz']} of {label}")
        elif spec.sha256 or spec.md5_gz or spec.archive:
            logger.warning(f"{path}: no published checksum of this form to compare with (only checked for "
                 "shape, counts and labels)")


def load_arrays(source: Path, spec: Spec) -> tuple[dict, int, dict]:
    """Read and validate a whole data set: ({train_x, train_y, test_x, test_y}, K, checksums)."""
    if spec.format == "npz":
        try:
            with np.load(source, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        except KeyError as e:
            raise DataError(f"{source}: missing array {e}; a .npz needs x_train, y_train, x_test, y_test")
        except Exception as e:
            raise DataError(f"{source}: cannot read it as .npz ({type(e).__name__}: {e})") from e
        arrays = {"train_x": arrays["x_train"], "train_y": arrays["y_train"],
                  "test_x": arrays["x_test"], "test_y": arrays["y_test"]}
        for split in ("train", "test"):
            x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
            if x.dtype != np.uint8:
                raise DataError(f"{source}: x_{split} has dtype {x.dtype}; images must be uint8 (0..255)")
            if not np.issubdtype(y.dtype, np.integer):
                raise DataError(f"{source}: y_{split} has dtype {y.dtype}; labels must be integers")
            _validate_split(spec, split, x, y, f"{source} ({split})")
        where = {"train": f"{source} (y_train)", "test": f"{source} (y_test)"}
        hashes: dict = {}
    else:
        arrays, hashes, where = _load_idx(source, spec)
    k = _check_labels(spec, {s: arrays[f"{s}_y"] for s in ("train", "test")}, where)
    if arrays["train_x"].shape[1:] != arrays["test_x"].shape[1:]:
        raise DataError(f"{source}: train images are {arrays['train_x'].shape[1:]} but test images "
                        f"{arrays['test_x'].shape[1:]}")
    _check_published(spec, hashes)
    for split in ("train", "test"):   # only reached unchecked where no content hash is published
        n = len(arrays[f"{split}_y"])
        if spec.counts is not None and n != spec.counts[split]:
            raise DataError(f"{where[split]}: {n} {split} samples, but {spec.title.split(' (')[0]} has "
                            f"{spec.counts[split]}: not this data set, or a subset of it")
    arrays = {k_: (a.astype(np.uint8) if k_.endswith("_y") else a) for k_, a in arrays.items()}
    return arrays, k, {name: digest for name, (_, digest) in hashes.items()}


# ---------------------------------------------------------------- locating a file
def _source(data_dir: Path, name: str) -> Path | None:
    # Prefer the .gz: an interrupted gunzip leaves a partial raw file next to an intact .gz.
    for candidate in (data_dir / f"{name}.gz", data_dir / name):
        if candidate.is_file():
            return candidate
    return None
