"""MNIST: locate, fetch, validate, cache, and shard the data set.

Data flow:

    IDX files (.gz or raw, in a possibly read-only data dir)
      -> read_idx + validation (header, length, shapes, labels 0..9, published SHA-256)
      -> uncompressed .npy cache (written once, atomically, by ONE rank: prepare_cache)
      -> np.load(mmap_mode="r") on every rank (open_cache)
      -> each rank touches only the rows of its shard (shard_range, epoch_permutation)

Decompressing and hashing 47 MB happens once per source-file version; later runs find the cache
by stat() alone. This module never imports MPI: the caller decides which rank runs what.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import HpcflError
from .files import atomic_write, fsync_dir


class DataError(HpcflError):
    """Bad/missing data. Message always names the file and the problem."""


MEAN, STD = 0.1307, 0.3081  # training-set pixel statistics after /255

SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FILES = [name for pair in SPLITS.values() for name in pair]

# Of the decompressed bytes: gzip output depends on the compressor, the content does not.
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# Of the published .gz downloads: lets fetch() reject a bad download before writing it in place.
MD5_GZ = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
URLS: list[str] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]

IMAGE_SHAPE = (28, 28)
CACHE_VERSION = 1  # bump when the cache layout changes, so old caches are not reused
_MANIFEST = "manifest.json"
_IDX_TYPES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "short",
              0x0C: "int", 0x0D: "float", 0x0E: "double"}


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
    if ndim not in (1, 3):
        raise DataError(f"{path}: unsupported number of dimensions {ndim} "
                        "(expected 1 for labels or 3 for images)")
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


# ---------------------------------------------------------------- locations

def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def default_data_dir() -> Path:
    return _cache_home() / "hpcfl" / "mnist"


def resolve_data_dir(cli_value: str | None) -> Path:
    """--data-dir, else $HPCFL_DATA_DIR, else the default."""
    value = cli_value or os.environ.get("HPCFL_DATA_DIR")
    return Path(value).expanduser() if value else default_data_dir()


def _source(data_dir: Path, name: str) -> Path | None:
    # Prefer the .gz: an interrupted gunzip leaves a partial raw file next to an intact .gz.
    for candidate in (data_dir / f"{name}.gz", data_dir / name):
        if candidate.is_file():
            return candidate
    return None


def missing_files(data_dir: str | os.PathLike) -> list[str]:
    """Canonical names for which neither NAME.gz nor NAME exists in data_dir."""
    return [name for name in FILES if _source(Path(data_dir), name) is None]


# ---------------------------------------------------------------- download

def _download(url: str, final: Path, md5: str, timeout: float) -> None:
    """Stream `url` into `final` atomically, refusing (and removing) it on an MD5 mismatch."""
    import urllib.request  # here, not at the top: it costs every rank ~15 ms of start-up

    def write(out):
        h = hashlib.md5()
        # Some hosts answer 403 to urllib's default User-Agent.
        request = urllib.request.Request(url, headers={"User-Agent": "hpcfl"})
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != md5:
            raise ValueError(f"MD5 {h.hexdigest()} != expected {md5}")

    atomic_write(final, write)


def fetch(data_dir: str | os.PathLike, urls: list[str] | None = None, timeout: float = 30) -> None:
    """Download the missing canonical .gz files into data_dir, trying each base URL in order.

    Files already present are kept: their content is checked (SHA-256) when the cache is built.
    HPCFL_MNIST_URLS (space-separated base URLs) replaces the default mirrors, e.g. a site mirror.
    """
    import http.client

    data_dir = Path(data_dir)
    if urls is None:
        urls = os.environ.get("HPCFL_MNIST_URLS", "").split() or URLS
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{data_dir}: cannot create the data folder: {e.strerror or e}") from e
    for name in FILES:
        fname = f"{name}.gz"
        final = data_dir / fname
        if name not in missing_files(data_dir):
            continue
        errors = []
        for base in urls:
            url = base if base.endswith("/") else base + "/"
            url += fname
            try:
                _download(url, final, MD5_GZ[fname], timeout)
                break
            except (OSError, http.client.HTTPException, ValueError) as e:
                errors.append(f"{url}: {e}")
        else:
            tried = "; ".join(errors) or "no URLs given"
            raise DataError(
                f"{final}: download failed from every URL ({tried}). To stage the data by hand, "
                f"copy the four MNIST files ({', '.join(f + '.gz' for f in FILES)}) into "
                f"{data_dir}, or pass --data-dir / set HPCFL_DATA_DIR to a folder that has them.")


# ---------------------------------------------------------------- cache

def _cache_dir_for(data_dir: Path, cache_root: Path) -> tuple[Path, dict]:
    """Cache folder keyed by the sources' (realpath, size, mtime_ns): found by stat() alone."""
    sources = {}
    for name in FILES:
        src = _source(data_dir, name)
        st = src.stat()
        sources[name] = {"path": os.path.realpath(src), "size": st.st_size,
                         "mtime_ns": st.st_mtime_ns}
    key = hashlib.sha256(json.dumps([CACHE_VERSION, sources], sort_keys=True).encode())
    return cache_root / f"mnist-v{CACHE_VERSION}-{key.hexdigest()[:16]}", sources


def _is_complete(cache_dir: Path) -> bool:
    try:
        return json.loads((cache_dir / _MANIFEST).read_text()).get("complete") is True
    except (OSError, ValueError, AttributeError):
        return False


def _load_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read and structurally validate one split: images (N,784), labels, {name: (path, sha256)}."""
    img_name, lbl_name = SPLITS[split]
    img_path, lbl_path = _source(data_dir, img_name), _source(data_dir, lbl_name)
    img_bytes, lbl_bytes = _read_bytes(img_path), _read_bytes(lbl_path)
    images, labels = _parse_idx(img_path, img_bytes), _parse_idx(lbl_path, lbl_bytes)
    if images.ndim != 3:
        raise DataError(f"{img_path}: expected images (N,28,28), found shape {images.shape}")
    if images.shape[1:] != IMAGE_SHAPE:
        h, w = images.shape[1:]
        raise DataError(f"{img_path}: wrong image size: 28x28 expected, found {h}x{w}")
    if labels.ndim != 1:
        raise DataError(f"{lbl_path}: expected labels (N,), found shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{img_path} and {lbl_path}: {len(images)} images but "
                        f"{len(labels)} labels")
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{lbl_path}: label {labels[i]} at index {i} outside 0..9")
    # Hashed here while the bytes are at hand; checked by the caller once every file has
    # passed the structural checks, which explain a problem better than a hash does.
    sha = {img_name: (img_path, hashlib.sha256(img_bytes).hexdigest()),
           lbl_name: (lbl_path, hashlib.sha256(lbl_bytes).hexdigest())}
    return images.reshape(len(images), -1), labels, sha


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def _publish(tmp: Path, final: Path) -> Path:
    """Atomically rename a finished temp dir into place; the first complete writer wins."""
    for _ in range(2):
        try:
            os.rename(tmp, final)
            fsync_dir(final.parent)
            return final
        except OSError:
            if _is_complete(final):  # a concurrent writer got there first: use theirs
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            shutil.rmtree(final, ignore_errors=True)  # incomplete leftover, not ours: replace it
    raise DataError(f"{final}: cannot move the finished cache into place")


def prepare_cache(data_dir: str | os.PathLike,
                  cache_root: str | os.PathLike | None = None) -> Path:
    """Validate the four IDX files and convert them to an uncompressed .npy cache (ONE rank).

    Returns the cache folder. An existing complete cache for the same source files is
    returned without reading them. The data dir is only read.
    """
    data_dir = Path(data_dir)
    missing = missing_files(data_dir)
    if missing:
        raise DataError(f"{data_dir}: missing MNIST files: {', '.join(missing)} "
                        "(each as NAME.gz or NAME); download them (fetch) or copy them in "
                        "and pass --data-dir / set HPCFL_DATA_DIR")
    root = Path(cache_root or os.environ.get("HPCFL_CACHE_DIR")
                or _cache_home() / "hpcfl" / "cache").expanduser()
    final, sources = _cache_dir_for(data_dir, root)
    if _is_complete(final):
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    except OSError as e:
        raise DataError(f"{root}: cannot create the cache folder: {e.strerror or e}; "
                        "set HPCFL_CACHE_DIR to a writable folder") from e
    try:
        shapes, sha = {}, {}
        for split in SPLITS:
            x, y, split_sha = _load_split(data_dir, split)
            sha.update(split_sha)
            for suffix, arr in (("x", x), ("y", y)):
                _save(tmp / f"{split}_{suffix}.npy", arr)
                shapes[f"{split}_{suffix}"] = list(arr.shape)
            del x, y  # free the decompressed train set before reading the test set
        for name, (path, digest) in sha.items():
            if digest != SHA256[name]:
                raise DataError(f"{path}: content does not match the published MNIST SHA-256 "
                                f"(expected {SHA256[name]}, found {digest}); the file is "
                                "damaged or not the canonical MNIST")
            sources[name]["sha256"] = digest
        # Written last: its presence means every array above is complete.
        manifest = {"version": CACHE_VERSION, "complete": True, "shapes": shapes,
                    "sources": sources}
        with open(tmp / _MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        return _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed


@dataclass(frozen=True)
class MNIST:
    train_x: np.ndarray  # (N, 784) uint8, memory-mapped
    train_y: np.ndarray  # (N,) uint8, in memory
    test_x: np.ndarray
    test_y: np.ndarray

    @property
    def n_train(self) -> int:
        return len(self.train_y)

    @property
    def n_test(self) -> int:
        return len(self.test_y)


def open_cache(cache_dir: str | os.PathLike) -> MNIST:
    """Open a cache on any rank: images memory-mapped (pages load on demand), labels loaded."""
    cache_dir = Path(cache_dir)
    if not _is_complete(cache_dir):
        raise DataError(f"{cache_dir}: not a complete MNIST cache (no valid {_MANIFEST}); "
                        "run prepare_cache first")
    arrays = {}
    for split in SPLITS:
        x_path, y_path = cache_dir / f"{split}_x.npy", cache_dir / f"{split}_y.npy"
        try:
            x, y = np.load(x_path, mmap_mode="r"), np.load(y_path)
        except (OSError, ValueError) as e:
            raise DataError(f"{x_path}: cannot load cached {split} split: {e}") from e
        if x.dtype != np.uint8 or y.dtype != np.uint8 or x.ndim != 2 \
                or x.shape[1] != 784 or y.shape != (len(x),):
            raise DataError(f"{x_path}: cached {split} split has shapes {x.shape}/{y.shape} "
                            f"and dtypes {x.dtype}/{y.dtype}; expected (N,784)/(N,) uint8")
        arrays[f"{split}_x"], arrays[f"{split}_y"] = x, y
    return MNIST(**arrays)


# ---------------------------------------------------------------- sharding

def shard_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of rank's block; the first n % size ranks get one extra row."""
    if size < 1 or not 0 <= rank < size or n < 0:
        raise ValueError(f"shard_range: need n >= 0 and 0 <= rank < size, got {n=} {rank=} {size=}")
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """Shuffle order for one epoch: a pure function of (seed, epoch), so equal on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)
