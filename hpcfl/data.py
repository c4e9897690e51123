"""Data sets of MNIST's form: locate, fetch, validate, cache, and shard them.

Data flow:

    IDX files (.gz or raw) or one .npz, in a possibly read-only folder
      -> read + validation (header, length, shapes, counts, labels 0..K-1, published checksums)
      -> uncompressed .npy cache (written once, atomically, by ONE rank: prepare_cache), with a
         manifest holding the SHA-256 of every array file and the training-set pixel statistics
      -> verified at every open by that rank (a damaged cache is rebuilt once, with a warning)
      -> np.load(mmap_mode="r") on every rank (open_cache)
      -> each rank touches only the rows of its shard (shard_range, epoch_permutation)

Decompressing and validating happens once per source-file version; later runs find the cache
by stat() and re-hash its arrays (about 0.1 s for MNIST). This module never imports MPI: the
caller decides which rank runs what.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import datasets
from .datasets import Spec
from .errors import DataError  # noqa: F401  (re-exported: hpcfl.data.DataError)
from .files import atomic_write, fsync_dir, umask

MNIST_SPEC = datasets.CATALOGUE["mnist"]
MEAN, STD = 0.1307, 0.3081  # MNIST's training-set pixel statistics after /255 (measured in tests)
SPLITS = MNIST_SPEC.files
FILES = MNIST_SPEC.file_names
SHA256 = MNIST_SPEC.sha256
MD5_GZ = MNIST_SPEC.md5_gz
URLS = list(MNIST_SPEC.urls)
IMAGE_SHAPE = (28, 28)

CACHE_VERSION = 2   # bump when the cache layout changes, so old caches are not reused
_MANIFEST = "manifest.json"
_IDX_TYPES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "short",
              0x0C: "int", 0x0D: "float", 0x0E: "double"}
MAX_CLASSES = 256           # labels are stored as uint8: 0..255
DOWNLOAD_LIMIT = 1 << 30    # bytes per download (EMNIST's archive is 536 MB)
DOWNLOAD_DEADLINE = 300.0   # seconds for one file, all mirrors together: the other ranks wait
STALE_TEMP_SECONDS = 86400  # temp folders of crashed cache builds older than this are removed


def warn(message: str) -> None:
    from . import log

    log.warning(message)


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


# ---------------------------------------------------------------- locations

def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def default_data_dir(dataset: str = "mnist") -> Path:
    return _cache_home() / "hpcfl" / dataset


def data_dir_variable(dataset: str) -> str:
    """The environment variable naming a catalogue data set's folder: HPCFL_DATA_DIR_FASHION_MNIST
    for fashion-mnist (HPCFL_DATA_DIR, where the tests and CI keep MNIST, also works for mnist)."""
    return "HPCFL_DATA_DIR_" + dataset.upper().replace("-", "_")


def resolve_data_dir(cli_value: str | None, dataset: str = "mnist") -> Path:
    """--data-dir, else $HPCFL_DATA_DIR_<NAME> (or $HPCFL_DATA_DIR for mnist), else the user
    cache folder of the dataset."""
    value = (cli_value or os.environ.get(data_dir_variable(dataset))
             or (os.environ.get("HPCFL_DATA_DIR") if dataset == "mnist" else None))
    if not value and dataset in ("idx", "npz"):
        from .errors import UsageError

        raise UsageError(f"--dataset {dataset} needs --data-dir (a folder of four IDX files, or a .npz file)")
    return Path(value).expanduser() if value else default_data_dir(dataset)


def _source(data_dir: Path, name: str) -> Path | None:
    # Prefer the .gz: an interrupted gunzip leaves a partial raw file next to an intact .gz.
    for candidate in (data_dir / f"{name}.gz", data_dir / name):
        if candidate.is_file():
            return candidate
    return None


def missing_files(data_dir: str | os.PathLike, spec: Spec = MNIST_SPEC) -> list[str]:
    """For IDX data: canonical names for which neither NAME.gz nor NAME exists in data_dir.
    For npz: the file itself, if it is missing."""
    data_dir = Path(data_dir)
    if spec.format == "npz":
        return [] if data_dir.is_file() else [str(data_dir)]
    return [name for name in spec.file_names if _source(data_dir, name) is None]


# ---------------------------------------------------------------- download

def _https_only(url: str) -> None:
    if not url.startswith(("https://", "file:")):
        raise ValueError(f"refusing {url.split(':', 1)[0]}: downloads use HTTPS only "
                         "(or file: for a local mirror)")


def _download(url: str, final: Path, md5: str, timeout: float, deadline: float,
              limit: int = DOWNLOAD_LIMIT) -> None:
    """Stream `url` into `final` atomically, refusing (and removing) it on an MD5 mismatch, past
    `limit` bytes, past the monotonic `deadline`, or on a redirect away from HTTPS."""
    import urllib.request  # here, not at the top: it costs every rank ~15 ms of start-up

    class HttpsRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            _https_only(newurl)
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    _https_only(url)
    opener = urllib.request.build_opener(HttpsRedirects)

    def write(out):
        h, size = hashlib.md5(), 0
        # Some hosts answer 403 to urllib's default User-Agent.
        request = urllib.request.Request(url, headers={"User-Agent": "hpcfl"})
        with opener.open(request, timeout=timeout) as resp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                size += len(chunk)
                if size > limit:
                    raise ValueError(f"larger than {limit >> 20} MiB: not the published file")
                if time.monotonic() > deadline:
                    raise ValueError(f"not done within {DOWNLOAD_DEADLINE:.0f} s")
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != md5:
            raise ValueError(f"MD5 {h.hexdigest()} != expected {md5}")

    atomic_write(final, write)


def _mirrors(spec: Spec, urls) -> list[str]:
    env = os.environ.get(f"HPCFL_{spec.name.upper().replace('-', '_')}_URLS", "").split()
    return list(urls if urls is not None else env or spec.urls)


def fetch(data_dir: str | os.PathLike, urls: list[str] | None = None, timeout: float = 30,
          spec: Spec = MNIST_SPEC) -> None:
    """Download the missing canonical .gz files into data_dir, trying each base URL in order.

    Files already present are kept: their content is checked when the cache is built.
    HPCFL_<NAME>_URLS (e.g. HPCFL_MNIST_URLS: space-separated base URLs) replaces the default
    mirrors, e.g. with a site mirror. HTTPS only (and file: for local mirrors): the checksums
    would catch a tampered file anyway, but an eavesdropper need not learn what a job reads.
    """
    data_dir = Path(data_dir)
    if spec.format != "idx" or not (spec.urls or spec.archive or urls):
        raise DataError(f"--dataset {spec.name}: nothing to download; point --data-dir at the files")
    created = not data_dir.exists()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{data_dir}: cannot create the data folder: {e.strerror or e}") from e
    try:
        if spec.archive is not None:
            return _fetch_archive(data_dir, spec, urls, timeout)
        _fetch_files(data_dir, spec, urls, timeout)
    except BaseException:
        if created and not any(data_dir.iterdir()):   # a failed offline run leaves no empty folder
            data_dir.rmdir()
        raise


def _fetch_files(data_dir: Path, spec: Spec, urls, timeout) -> None:
    import http.client

    for name in spec.file_names:
        fname = f"{name}.gz"
        final = data_dir / fname
        if name not in missing_files(data_dir, spec):
            continue
        errors, deadline = [], time.monotonic() + DOWNLOAD_DEADLINE
        for base in _mirrors(spec, urls):
            url = (base if base.endswith("/") else base + "/") + fname
            try:
                md5 = (MD5_GZ if spec is MNIST_SPEC else spec.md5_gz)[fname]   # (tests patch MD5_GZ)
                _download(url, final, md5, timeout, deadline)
                break
            except (OSError, http.client.HTTPException, ValueError) as e:
                errors.append(f"{url}: {e}")
        else:
            tried = "; ".join(errors) or "no URLs given"
            raise DataError(
                f"{final}: download failed from every URL ({tried}). To stage the data by hand, "
                f"copy the four {spec.name} files ({', '.join(f + '.gz' for f in spec.file_names)}) "
                f"into {data_dir}, or pass --data-dir / set {data_dir_variable(spec.name)} to a folder "
                f"that has them.")


def _fetch_archive(data_dir: Path, spec: Spec, urls, timeout) -> None:
    """EMNIST comes as one zip (published MD5) holding every subset: fetch it once beside the
    data, extract this subset's four .gz files."""
    import http.client
    import zipfile

    if not missing_files(data_dir, spec):
        return
    url, md5, folder = spec.archive
    archive = data_dir / Path(url).name
    if not archive.is_file():
        errors, deadline = [], time.monotonic() + DOWNLOAD_DEADLINE * 4
        for candidate in _mirrors(spec, urls) or [url]:
            if not candidate.endswith(".zip"):
                candidate = (candidate if candidate.endswith("/") else candidate + "/") + archive.name
            try:
                _download(candidate, archive, md5, timeout, deadline)
                break
            except (OSError, http.client.HTTPException, ValueError) as e:
                errors.append(f"{candidate}: {e}")
        else:
            raise DataError(f"{archive}: download failed ({'; '.join(errors)}). To stage the data by "
                            f"hand, copy {', '.join(f + '.gz' for f in spec.file_names)} into {data_dir}.")
    try:
        with zipfile.ZipFile(archive) as z:
            for name in spec.file_names:
                blob = z.read(f"{folder}/{name}.gz")
                atomic_write(data_dir / f"{name}.gz", lambda f: f.write(blob))
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"{archive}: cannot extract the {spec.name} files ({e})") from e


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
    sha256 = SHA256 if spec is MNIST_SPEC else spec.sha256   # (the tests patch the module's)
    md5_gz = MD5_GZ if spec is MNIST_SPEC else spec.md5_gz
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
            warn(f"{path}: no published checksum of this form to compare with (only checked for "
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
        hashes = {}
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


# ---------------------------------------------------------------- cache

def _sources(source: Path, spec: Spec) -> dict[str, Path]:
    """{canonical name: the file read}: the .npz itself, or each IDX file as NAME.gz or NAME."""
    if spec.format == "npz":
        return {source.name: source}
    return {name: _source(source, name) for name in spec.file_names}


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
    missing = missing_files(data_dir, spec)
    if missing:
        what = "file" if spec.format == "npz" else f"{spec.name.upper() if spec.name == 'mnist' else spec.name} files"
        raise DataError(f"{data_dir}: missing {what}: {', '.join(missing)}"
                        + ("" if spec.format == "npz" else " (each as NAME.gz or NAME)")
                        + "; download them (fetch-data) or copy them in and pass --data-dir"
                        + ("" if spec.format == "npz" else f" / set {data_dir_variable(spec.name)}"))
    root = globals()["cache_root"](cache_root)
    final, sources = _cache_dir_for(data_dir, root, spec)
    if _is_complete(final):
        damage = verify_cache(final)
        if damage is None:
            return final
        warn(f"the data cache {final} is damaged ({damage}): rebuilding it from {data_dir}")
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        os.chmod(tmp, 0o777 & ~umask())   # mkdtemp makes 0700: a shared cache root needs the umask's
    except OSError as e:
        raise DataError(f"{root}: cannot create the cache folder: {e.strerror or e}; "
                        "set HPCFL_CACHE_DIR to a writable folder") from e
    try:
        arrays, k, digests = load_arrays(data_dir, spec)
        x = arrays["train_x"]
        pixels = x.reshape(len(x), -1)
        # normalisation statistics of the training set, in float64, 10,000 rows at a time
        total = sum(float(pixels[i:i + 10000].sum(dtype=np.float64)) for i in range(0, len(pixels), 10000))
        squares = sum(float((pixels[i:i + 10000].astype(np.float64) ** 2).sum())
                      for i in range(0, len(pixels), 10000))
        count = pixels.size
        mean = total / count / 255.0
        std = np.sqrt(max(squares / count / 255.0 ** 2 - mean ** 2, 0.0))
        # four decimals, as these statistics are usually quoted (MNIST: 0.1307, 0.3081)
        mean, std = round(mean, 4), max(round(float(std), 4), 1e-4)
        files, shapes = {}, {}
        for name, arr in arrays.items():
            flat = arr.reshape(len(arr), -1) if name.endswith("_x") else arr
            files[f"{name}.npy"] = _save(tmp / f"{name}.npy", flat)
            shapes[name] = list(flat.shape)
        for name, digest in digests.items():
            sources[name]["sha256"] = digest
        # Written last: its presence means every array above is complete.
        manifest = {"version": CACHE_VERSION, "complete": True, "dataset": spec.name,
                    "image_shape": list(x.shape[1:]), "num_classes": k, "mean": mean, "std": std,
                    "shapes": shapes, "arrays": files, "sources": sources}
        with open(tmp / _MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        del arrays, x, pixels
        _discard(final) if final.exists() else None
        published = _publish(tmp, final)
        _prune(root, published, sources)
        return published
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed


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
