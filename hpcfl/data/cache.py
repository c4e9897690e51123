"""The data cache: IDX files (or one .npz) are read and validated once, by ONE rank, into
uncompressed .npy files with a manifest (SHA-256 of every array, pixel statistics); every rank
then memory-maps them (open_cache).

Data flow:

    IDX files (.gz or raw) or one .npz, in a possibly read-only folder
      -> read + validation (idx.py: header, length, shapes, counts, labels, published checksums)
      -> uncompressed .npy cache (written once, atomically, by ONE rank: prepare_cache), with a
         manifest holding the SHA-256 of every array file and the training-set pixel statistics
      -> verified at every open by that rank (a damaged cache is rebuilt once, with a warning)
      -> np.load(mmap_mode="r") on every rank (open_cache)
      -> each rank touches only the rows of its shard (shard.py)

Decompressing and validating happens once per source-file version; later runs find the cache
by stat() and re-hash its arrays (about 0.1 s for MNIST). No MPI here: the caller decides which
rank runs what."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..io.files import fsync_dir, umask
from .catalogue import IMAGE_SHAPE, MEAN, MNIST_SPEC, STD, Spec
from .download import _cache_home, data_dir_variable, missing_files
from .idx import _source, load_arrays

logger = logging.getLogger(__name__)

CACHE_VERSION = 2   # bump when the cache layout changes, so old caches are not reused
_MANIFEST = "manifest.json"
STALE_TEMP_SECONDS = 86400  # temp folders of crashed cache builds older than this are removed


# ---------------------------------------------------------------- cache

def _sources(source: Path, spec: Spec) -> dict[str, Path]:
    """{canonical name: the file read}: the .npz itself, or each IDX file as NAME.gz or NAME."""
    if spec.format == "npz":
        return {source.name: source}
    out = {}
    for name in spec.file_names:
        path = _source(source, name)
        assert path is not None, f"{name}: checked to exist (_check_sources)"
        out[name] = path
    return out


def _cache_dir_for(data_dir: Path, cache_root: Path, spec: Spec = MNIST_SPEC) -> tuple[Path, dict]:
    """Cache folder keyed by the dataset and its sources' (realpath, size, mtime_ns): found by
    stat() alone."""
    sources = {}
    for name, src in _sources(Path(data_dir), spec).items():
        st = src.stat()
        sources[name] = {"path": os.path.realpath(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    key = hashlib.sha256(json.dumps([CACHE_VERSION, spec.name, sources], sort_keys=True).encode())
    return cache_root / f"{spec.name}-v{CACHE_VERSION}-{key.hexdigest()[:16]}", sources


def _manifest(cache_dir: Path) -> dict | None:
    try:
        m = json.loads((cache_dir / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(m, dict) and m.get("complete") is True and isinstance(m.get("sources", {}), dict) \
        and all(isinstance(v, dict) for v in m.get("sources", {}).values())
    return m if ok else None


def _is_complete(cache_dir: Path) -> bool:
    return _manifest(cache_dir) is not None


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_cache(cache_dir: Path) -> str | None:
    """Why the cache is not intact (a file missing, of another size, or with another SHA-256
    than its manifest records), or None."""
    m = _manifest(cache_dir)
    if m is None:
        return f"no valid {_MANIFEST}"
    for name, want in m.get("arrays", {}).items():
        path = cache_dir / name
        try:
            size = path.stat().st_size
            if size != want["size"]:
                return f"{name} has {size} bytes, the manifest says {want['size']}"
            if _file_sha256(path) != want["sha256"]:
                return f"{name} does not match its SHA-256 in the manifest"
        except OSError as e:
            return f"{name}: {e.strerror or e}"
    return None if m.get("arrays") else "the manifest lists no arrays"


def _save(path: Path, array: np.ndarray) -> dict:
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": _file_sha256(path)}


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
            _discard(final)  # incomplete or damaged leftover, not ours: replace it
    raise DataError(f"{final}: cannot move the finished cache into place")


def _discard(path: Path) -> None:
    """Move a cache folder out of the way first (atomic), then delete it: a job that has its
    files memory-mapped keeps reading them, a new build never sees half of it."""
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def _prune(root: Path, keep: Path, sources: dict) -> None:
    """Remove temp folders of crashed builds older than a day, and earlier caches of the same
    source files (same paths, older versions): each is ~55 MB and nothing would use it again."""
    now, paths = time.time(), {s.get("path") for s in sources.values()}
    for entry in root.iterdir():
        try:
            if entry.name.startswith(".") and (".tmp-" in entry.name or ".trash-" in entry.name):
                if now - entry.stat().st_mtime > STALE_TEMP_SECONDS:
                    shutil.rmtree(entry, ignore_errors=True)
            elif entry != keep and entry.is_dir() and not entry.name.startswith("."):
                m = _manifest(entry)
                if m and {s.get("path") for s in m.get("sources", {}).values()} == paths:
                    _discard(entry)
        except OSError:
            continue


def cache_root(cache_root: str | os.PathLike | None = None) -> Path:
    return Path(cache_root or os.environ.get("HPCFL_CACHE_DIR")
                or _cache_home() / "hpcfl" / "cache").expanduser()


def prepare_cache(data_dir: str | os.PathLike, cache_root: str | os.PathLike | None = None,
                  spec: Spec = MNIST_SPEC) -> Path:
    """Validate a data set and convert it to an uncompressed .npy cache (ONE rank).

    Returns the cache folder. An existing cache for the same source files is verified against
    its manifest and returned without reading the sources; a damaged one is rebuilt, once, with
    a warning. The data folder is only read.
    """
    data_dir = Path(data_dir)
    _check_sources(data_dir, spec)
    root = globals()["cache_root"](cache_root)
    final, sources = _cache_dir_for(data_dir, root, spec)
    if _is_complete(final):
        damage = verify_cache(final)
        if damage is None:
            return final
        logger.warning(f"the data cache {final} is damaged ({damage}): rebuilding it from {data_dir}")
    tmp = _staging_dir(root, final)
    try:
        _build(tmp, data_dir, spec, sources)
        _discard(final) if final.exists() else None
        published = _publish(tmp, final)
        _prune(root, published, sources)
        return published
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed


def _check_sources(data_dir: Path, spec: Spec) -> None:
    """Every file of the data set is there (else one error naming the missing ones and how to
    get them)."""
    missing = missing_files(data_dir, spec)
    if not missing:
        return
    what = "file" if spec.format == "npz" else f"{spec.name.upper() if spec.name == 'mnist' else spec.name} files"
    raise DataError(f"{data_dir}: missing {what}: {', '.join(missing)}"
                    + ("" if spec.format == "npz" else " (each as NAME.gz or NAME)")
                    + "; download them (fetch-data) or copy them in and pass --data-dir"
                    + ("" if spec.format == "npz" else f" / set {data_dir_variable(spec.name)}"))


def _staging_dir(root: Path, final: Path) -> Path:
    """A fresh folder beside the cache's final place, to build it in and rename into place."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        os.chmod(tmp, 0o777 & ~umask())   # mkdtemp makes 0700: a shared cache root needs the umask's
    except OSError as e:
        raise DataError(f"{root}: cannot create the cache folder: {e.strerror or e}; "
                        "set HPCFL_CACHE_DIR to a writable folder") from e
    return tmp


def pixel_statistics(pixels: np.ndarray) -> tuple[float, float]:
    """(mean, std) of the training images' pixels scaled to [0, 1], in float64, 10,000 rows at
    a time, rounded to four decimals, as these statistics are usually quoted (MNIST: 0.1307,
    0.3081)."""
    total = sum(float(pixels[i:i + 10000].sum(dtype=np.float64)) for i in range(0, len(pixels), 10000))
    squares = sum(float((pixels[i:i + 10000].astype(np.float64) ** 2).sum())
                  for i in range(0, len(pixels), 10000))
    count = pixels.size
    mean = total / count / 255.0
    std = np.sqrt(max(squares / count / 255.0 ** 2 - mean ** 2, 0.0))
    return round(mean, 4), max(round(float(std), 4), 1e-4)


def _build(tmp: Path, data_dir: Path, spec: Spec, sources: dict) -> None:
    """The validated arrays as .npy files in tmp, then the manifest, written last: its
    presence means every array above is complete."""
    arrays, k, digests = load_arrays(data_dir, spec)
    x = arrays["train_x"]
    mean, std = pixel_statistics(x.reshape(len(x), -1))
    files, shapes = {}, {}
    for name, arr in arrays.items():
        flat = arr.reshape(len(arr), -1) if name.endswith("_x") else arr
        files[f"{name}.npy"] = _save(tmp / f"{name}.npy", flat)
        shapes[name] = list(flat.shape)
    for name, digest in digests.items():
        sources[name]["sha256"] = digest
    manifest = {"version": CACHE_VERSION, "complete": True, "dataset": spec.name,
                "image_shape": list(x.shape[1:]), "num_classes": k, "mean": mean, "std": std,
                "shapes": shapes, "arrays": files, "sources": sources}
    with open(tmp / _MANIFEST, "w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)


@dataclass(frozen=True)
class Dataset:
    """A data set on this rank: images flattened to rows (memory-mapped), labels in memory.

    `train_images` / `test_images` give the (N, H, W) view; `train_x` / `test_x` the (N, H*W)
    rows the kernels read."""
    train_x: np.ndarray   # (N, D) uint8, memory-mapped
    train_y: np.ndarray   # (N,) uint8
    test_x: np.ndarray
    test_y: np.ndarray
    name: str = "mnist"
    image_shape: tuple = IMAGE_SHAPE
    num_classes: int = 10
    mean: float = MEAN
    std: float = STD
    fingerprint: str = ""   # SHA-256 over the cached arrays' hashes: which data, whatever its path

    @property
    def n_train(self) -> int:
        return len(self.train_y)

    @property
    def n_test(self) -> int:
        return len(self.test_y)

    @property
    def input_size(self) -> int:
        return int(np.prod(self.image_shape))

    @property
    def train_images(self) -> np.ndarray:
        return self.train_x.reshape(len(self.train_x), *self.image_shape)

    @property
    def test_images(self) -> np.ndarray:
        return self.test_x.reshape(len(self.test_x), *self.image_shape)

    @property
    def train_labels(self) -> np.ndarray:
        return self.train_y

    @property
    def test_labels(self) -> np.ndarray:
        return self.test_y


MNIST = Dataset   # the name before other data sets existed


def open_cache(cache_dir: str | os.PathLike) -> Dataset:
    """Open a cache on any rank: images memory-mapped (pages load on demand), labels loaded.
    Checks what every rank can check cheaply (the manifest, each file's size, shapes and
    dtypes); rank 0 verified the hashes when it prepared the cache."""
    cache_dir = Path(cache_dir)
    m = _manifest(cache_dir)
    if m is None:
        hint = (" (the folder does not exist here: is the cache folder shared by every node? "
                "set HPCFL_CACHE_DIR to a folder all nodes see)" if not cache_dir.exists() else "")
        raise DataError(f"{cache_dir}: not a complete data cache (no valid {_MANIFEST}){hint}; "
                        "run prepare_cache first")
    arrays = {}
    for split in ("train", "test"):
        x_path, y_path = cache_dir / f"{split}_x.npy", cache_dir / f"{split}_y.npy"
        try:
            for p in (x_path, y_path):
                want = m["arrays"][p.name]["size"]
                if p.stat().st_size != want:
                    raise ValueError(f"{p.name} has {p.stat().st_size} bytes, the manifest says {want}")
            x, y = np.load(x_path, mmap_mode="r"), np.load(y_path)
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{x_path}: cannot load cached {split} split: {e}") from e
        d = int(np.prod(m["image_shape"]))
        if x.dtype != np.uint8 or y.dtype != np.uint8 or x.ndim != 2 \
                or x.shape[1] != d or y.shape != (len(x),):
            raise DataError(f"{x_path}: cached {split} split has shapes {x.shape}/{y.shape} "
                            f"and dtypes {x.dtype}/{y.dtype}; expected (N,{d})/(N,) uint8")
        arrays[f"{split}_x"], arrays[f"{split}_y"] = x, y
    digests = "".join(m["arrays"][f"{k}.npy"]["sha256"] for k in ("train_x", "train_y", "test_x", "test_y"))
    return Dataset(**arrays, name=m["dataset"], image_shape=tuple(m["image_shape"]),
                   num_classes=int(m["num_classes"]), mean=float(m["mean"]), std=float(m["std"]),
                   fingerprint=hashlib.sha256(digests.encode()).hexdigest()[:32])


