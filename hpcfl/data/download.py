"""Where a data set lives and how it gets there: folders, environment variables, downloads with
checksums (HTTPS only, mirrors in turn, a size limit and a deadline)."""
from __future__ import annotations

import hashlib
import os
import time
import zlib
from pathlib import Path

from ..errors import DataError
from ..io.files import atomic_write
from .catalogue import MNIST_SPEC, Spec
from .idx import _source

DOWNLOAD_LIMIT = 1 << 30    # bytes per download (EMNIST's archive is 536 MB)
DOWNLOAD_DEADLINE = 300.0   # seconds for one file, all mirrors together: the other ranks wait


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
        from ..errors import UsageError

        raise UsageError(f"--dataset {dataset} needs --data-dir (a folder of four IDX files, or a .npz file)")
    return Path(value).expanduser() if value else default_data_dir(dataset)




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


def https_redirects():
    """A urllib redirect handler that refuses a redirect away from HTTPS (ValueError)."""
    import urllib.request  # here, not at the top: it costs every rank ~15 ms of start-up

    class HttpsRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            _https_only(newurl)
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return HttpsRedirects()


class _Digests:
    """The MD5 of a download's bytes and the SHA-256 of their gunzipped content, as they stream:
    a mirror's recompressed .gz (Debian's) has another MD5 but the published content."""

    def __init__(self) -> None:
        self.md5, self.content = hashlib.md5(), hashlib.sha256()
        self._z, self.gzip_ok = zlib.decompressobj(31), True

    def update(self, chunk: bytes) -> None:
        self.md5.update(chunk)
        data = chunk
        while data and self.gzip_ok:
            if self._z.eof:                              # the next member of a multi-member .gz
                self._z = zlib.decompressobj(31)
            try:
                self.content.update(self._z.decompress(data))
            except zlib.error:
                self.gzip_ok = False
            data = self._z.unused_data

    def matches(self, md5: str, content_sha256: str | None) -> bool:
        if self.md5.hexdigest() == md5:
            return True
        return content_sha256 is not None and self.gzip_ok and self._z.eof \
            and self.content.hexdigest() == content_sha256


def _download(url: str, final: Path, md5: str, timeout: float, deadline: float,
              limit: int = DOWNLOAD_LIMIT, content_sha256: str | None = None) -> None:
    """Stream `url` into `final` atomically, refusing (and removing) it unless its MD5 is `md5`
    or its gunzipped content's SHA-256 is `content_sha256`; past `limit` bytes, past the
    monotonic `deadline`, or on a redirect away from HTTPS."""
    import urllib.request

    _https_only(url)
    opener = urllib.request.build_opener(https_redirects())

    def write(out):
        digests, size = _Digests(), 0
        # Some hosts answer 403 to urllib's default User-Agent.
        request = urllib.request.Request(url, headers={"User-Agent": "hpcfl"})
        with opener.open(request, timeout=timeout) as resp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                size += len(chunk)
                if size > limit:
                    raise ValueError(f"larger than {limit >> 20} MiB: not the published file")
                if time.monotonic() > deadline:
                    raise ValueError(f"not done within {DOWNLOAD_DEADLINE:.0f} s")
                digests.update(chunk)
                out.write(chunk)
        if not digests.matches(md5, content_sha256):
            also = " and its content is not the published one" if content_sha256 else ""
            raise ValueError(f"MD5 {digests.md5.hexdigest()} != expected {md5}{also}")

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
                _download(url, final, spec.md5_gz[fname], timeout, deadline,
                          content_sha256=spec.sha256.get(name))
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
    assert spec.archive is not None
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
                atomic_write(data_dir / f"{name}.gz", lambda f, blob=blob: f.write(blob))
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"{archive}: cannot extract the {spec.name} files ({e})") from e


