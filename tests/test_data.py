"""Tests of hpcfl.data: IDX validation on small synthetic files, the cache on the real MNIST."""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from hpcfl import data
from hpcfl.errors import DataError

REAL_DIR = Path(os.environ.get("HPCFL_DATA_DIR")
                or Path(__file__).resolve().parents[2] / "shared/data/mnist")
needs_real = pytest.mark.skipif(
    data.missing_files(REAL_DIR) != [],
    reason=f"real MNIST not found in {REAL_DIR} (set HPCFL_DATA_DIR to a folder with the 4 files)")

TRAIN_IMG, TRAIN_LBL = data.SPLITS["train"]
TEST_IMG, TEST_LBL = data.SPLITS["test"]


def idx_bytes(array: np.ndarray, code: int = 0x08, magic: bytes = b"\x00\x00") -> bytes:
    header = magic + bytes([code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write(path: Path, payload: bytes, gz: bool = True) -> Path:
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def images(n: int, h: int = 28, w: int = 28) -> np.ndarray:
    return np.arange(n * h * w, dtype=np.uint32).reshape(n, h, w).astype(np.uint8)


def labels(n: int) -> np.ndarray:
    return (np.arange(n) % 10).astype(np.uint8)


@pytest.fixture
def fake_dir(tmp_path: Path) -> Path:
    """A structurally valid tiny MNIST (it fails only the SHA-256 check)."""
    d = tmp_path / "fake"
    d.mkdir()
    for (img, lbl), n in ((data.SPLITS["train"], 12), (data.SPLITS["test"], 5)):
        write(d / f"{img}.gz", idx_bytes(images(n)))
        write(d / f"{lbl}.gz", idx_bytes(labels(n)))
    return d


def raises(match_words: list[str], fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    for word in match_words:
        assert word in msg, f"{word!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------- read_idx

@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip_gz_and_raw(tmp_path, gz):
    arr = images(3)
    path = write(tmp_path / "some-name.bin", idx_bytes(arr), gz=gz)  # name says nothing
    out = data.read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (3, 28, 28)
    np.testing.assert_array_equal(out, arr)
    np.testing.assert_array_equal(data.read_idx(write(tmp_path / "l", idx_bytes(labels(7)), gz)),
                                  labels(7))


def test_read_idx_wrong_magic(tmp_path):
    path = write(tmp_path / "bad-magic.gz", idx_bytes(labels(4), magic=b"\x12\x34"))
    raises(["bad-magic.gz", "magic", "12 34"], data.read_idx, path)


def test_read_idx_wrong_dtype_code(tmp_path):
    path = write(tmp_path / "float.gz", idx_bytes(labels(4), code=0x0D))
    raises(["float.gz", "type code 0x0d"], data.read_idx, path)


def test_read_idx_wrong_ndim(tmp_path):
    path = write(tmp_path / "two-d", idx_bytes(np.zeros((2, 3), np.uint8)), gz=False)
    raises(["two-d", "dimensions 2"], data.read_idx, path)


def test_read_idx_zero_dimension(tmp_path):
    path = write(tmp_path / "empty", idx_bytes(np.zeros((0, 28, 28), np.uint8)), gz=False)
    raises(["empty", "positive"], data.read_idx, path)


def test_read_idx_truncated_raw(tmp_path):
    payload = idx_bytes(images(2))
    path = write(tmp_path / "short-raw", payload[:-100], gz=False)
    raises(["short-raw", f"truncated: expected {2 * 784} bytes of data, found {2 * 784 - 100}"],
           data.read_idx, path)


def test_read_idx_truncated_header(tmp_path):
    path = write(tmp_path / "tiny", b"\x00\x00\x08\x03\x00\x00", gz=False)
    raises(["tiny", "truncated header"], data.read_idx, path)


def test_read_idx_trailing_bytes(tmp_path):
    path = write(tmp_path / "long.gz", idx_bytes(labels(5)) + b"\x00" * 3)
    raises(["long.gz", "3 trailing bytes"], data.read_idx, path)


def test_read_idx_truncated_gzip(tmp_path):
    blob = gzip.compress(idx_bytes(images(20)))
    path = tmp_path / "cut.gz"
    path.write_bytes(blob[: len(blob) // 2])
    raises(["cut.gz", "gzip"], data.read_idx, path)


def test_read_idx_missing_file(tmp_path):
    raises(["nope.gz", "cannot read"], data.read_idx, tmp_path / "nope.gz")


# ---------------------------------------------------------------- prepare_cache validation

def test_missing_files_and_prepare_names_them(tmp_path, fake_dir):
    assert data.missing_files(tmp_path / "none") == data.FILES
    assert data.missing_files(fake_dir) == []
    (fake_dir / f"{TEST_LBL}.gz").unlink()
    write(fake_dir / TEST_LBL, idx_bytes(labels(5)), gz=False)  # raw counts as present
    assert data.missing_files(fake_dir) == []
    (fake_dir / TEST_LBL).unlink()
    (fake_dir / f"{TRAIN_IMG}.gz").unlink()
    assert data.missing_files(fake_dir) == [TRAIN_IMG, TEST_LBL]
    raises(["missing", TRAIN_IMG, TEST_LBL, "HPCFL_DATA_DIR"],
           data.prepare_cache, fake_dir, cache_root=tmp_path / "c")


def test_prepare_count_mismatch(tmp_path, fake_dir):
    write(fake_dir / f"{TEST_LBL}.gz", idx_bytes(labels(4)))
    raises([TEST_IMG, TEST_LBL, "5 images but 4 labels"],
           data.prepare_cache, fake_dir, cache_root=tmp_path / "c")


def test_prepare_label_out_of_range(tmp_path, fake_dir):
    lbl = labels(12)
    lbl[7] = 12
    write(fake_dir / f"{TRAIN_LBL}.gz", idx_bytes(lbl))
    raises([TRAIN_LBL, "label 12 at index 7 outside 0..9"],
           data.prepare_cache, fake_dir, cache_root=tmp_path / "c")


def test_prepare_wrong_image_size(tmp_path, fake_dir):
    write(fake_dir / f"{TEST_IMG}.gz", idx_bytes(images(5, 32, 30)))
    raises([TEST_IMG, "wrong image size: 28x28 expected, found 32x30"],
           data.prepare_cache, fake_dir, cache_root=tmp_path / "c")


def test_prepare_labels_file_given_images(tmp_path, fake_dir):
    write(fake_dir / f"{TEST_LBL}.gz", idx_bytes(images(5)))
    raises([TEST_LBL, "expected labels (N,)"],
           data.prepare_cache, fake_dir, cache_root=tmp_path / "c")


def test_prepare_structurally_valid_but_not_mnist(tmp_path, fake_dir):
    cache_root = tmp_path / "c"
    raises([TRAIN_IMG, "does not match the published MNIST SHA-256"],
           data.prepare_cache, fake_dir, cache_root=cache_root)
    assert list(cache_root.iterdir()) == []  # the temp dir was cleaned up


def test_cache_key_follows_source_stat(tmp_path, fake_dir):
    root = tmp_path / "c"
    first, _ = data.cache._cache_dir_for(fake_dir, root)
    assert data.cache._cache_dir_for(fake_dir, root)[0] == first
    src = fake_dir / f"{TEST_LBL}.gz"
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert data.cache._cache_dir_for(fake_dir, root)[0] != first


def test_publish_keeps_the_first_complete_cache(tmp_path):
    final, mine = tmp_path / "final", tmp_path / "mine"
    final.mkdir()
    (final / "manifest.json").write_text('{"complete": true}')
    mine.mkdir()
    (mine / "manifest.json").write_text('{"complete": true, "mine": true}')
    assert data.cache._publish(mine, final) == final
    assert not mine.exists() and "mine" not in (final / "manifest.json").read_text()
    # an incomplete leftover under the final name is replaced
    (final / "manifest.json").unlink()
    mine.mkdir()
    (mine / "manifest.json").write_text('{"complete": true, "mine": true}')
    assert data.cache._publish(mine, final) == final
    assert "mine" in (final / "manifest.json").read_text()


def test_open_cache_rejects_incomplete(tmp_path):
    raises([str(tmp_path), "manifest.json"], data.open_cache, tmp_path)


# ---------------------------------------------------------------- real data

def test_constants_match_the_shared_checksums():
    sums = REAL_DIR / "SHA256SUMS.uncompressed"
    if not sums.is_file():
        pytest.skip(f"{sums} not found")
    listed = dict(line.split()[::-1] for line in sums.read_text().splitlines() if line.strip())
    assert listed == data.MNIST_SPEC.sha256
    assert set(data.MNIST_SPEC.md5_gz) == {f"{n}.gz" for n in data.FILES}


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory) -> Path:
    if data.missing_files(REAL_DIR):
        pytest.skip(f"real MNIST not found in {REAL_DIR}")
    return data.prepare_cache(REAL_DIR, cache_root=tmp_path_factory.mktemp("cache"))


@needs_real
def test_real_cache(real_cache):
    ds = data.open_cache(real_cache)
    assert (ds.n_train, ds.n_test) == (60000, 10000)
    assert ds.train_x.shape == (60000, 784) and ds.test_x.shape == (10000, 784)
    assert ds.train_y.shape == (60000,) and ds.test_y.shape == (10000,)
    for arr in (ds.train_x, ds.train_y, ds.test_x, ds.test_y):
        assert arr.dtype == np.uint8
    assert isinstance(ds.train_x, np.memmap) and isinstance(ds.test_x, np.memmap)
    assert not isinstance(ds.train_y, np.memmap)
    # pixel statistics from a histogram: no float copy of the 47 MB set
    counts = np.bincount(np.asarray(ds.train_x).ravel(), minlength=256).astype(np.float64)
    v = np.arange(256) / 255.0
    mean = (counts * v).sum() / counts.sum()
    std = np.sqrt((counts * (v - mean) ** 2).sum() / counts.sum())
    assert abs(mean - data.MEAN) < 1e-4 and abs(std - data.STD) < 1e-4
    assert np.array_equal(np.bincount(ds.train_y, minlength=10) > 5000, [True] * 10)


@needs_real
def test_real_cache_is_reused_without_rewriting(real_cache, monkeypatch):
    manifest = real_cache / "manifest.json"
    before = manifest.stat().st_mtime_ns

    def no_reading(path):
        raise AssertionError(f"an up-to-date cache must be found by stat() alone, read {path}")

    monkeypatch.setattr(data.idx, "_read_bytes", no_reading)
    again = data.prepare_cache(REAL_DIR, cache_root=real_cache.parent)
    assert again == real_cache and manifest.stat().st_mtime_ns == before
    assert [p.name for p in real_cache.parent.iterdir()] == [real_cache.name]  # no temp left


@needs_real
def test_real_md5s_of_byte_identical_downloads():
    # train-images was recompressed in the shared folder; the other three are the downloads
    for name in (TRAIN_LBL, TEST_IMG, TEST_LBL):
        digest = hashlib.md5((REAL_DIR / f"{name}.gz").read_bytes()).hexdigest()
        assert digest == data.MNIST_SPEC.md5_gz[f"{name}.gz"]


@needs_real
def test_real_sha256_mismatch_on_a_flipped_label(tmp_path):
    d = tmp_path / "tampered"
    d.mkdir()
    for name in (TRAIN_IMG, TRAIN_LBL, TEST_IMG):
        os.symlink(REAL_DIR / f"{name}.gz", d / f"{name}.gz")
    raw = bytearray(gzip.decompress((REAL_DIR / f"{TEST_LBL}.gz").read_bytes()))
    raw[8 + 100] = (raw[8 + 100] + 1) % 10  # still a valid label: only the hash can tell
    write(d / TEST_LBL, bytes(raw), gz=False)
    raises([TEST_LBL, "does not match the published MNIST SHA-256"],
           data.prepare_cache, d, cache_root=tmp_path / "c")


# ---------------------------------------------------------------- fetch

@pytest.fixture
def server(tmp_path, monkeypatch) -> Path:
    """A folder of small .gz files served as file:// URLs, with MD5_GZ set to match them."""
    srv = tmp_path / "srv"
    srv.mkdir()
    md5 = {}
    for i, name in enumerate(data.FILES):
        blob = gzip.compress(idx_bytes(labels(10 + i)))
        (srv / f"{name}.gz").write_bytes(blob)
        md5[f"{name}.gz"] = hashlib.md5(blob).hexdigest()
    for name, digest in md5.items():
        monkeypatch.setitem(data.MNIST_SPEC.md5_gz, name, digest)
    return srv


def test_fetch_downloads_falls_through_and_skips(tmp_path, server):
    dest = tmp_path / "deep" / "dest"
    urls = [(tmp_path / "no-such-mirror").as_uri() + "/", server.as_uri()]  # second has no "/"
    data.fetch(dest, urls=urls, timeout=5)
    for name in data.FILES:
        assert (dest / f"{name}.gz").read_bytes() == (server / f"{name}.gz").read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"{n}.gz" for n in data.FILES)
    assert data.missing_files(dest) == []
    shutil.rmtree(server)  # present with the right MD5: nothing is downloaded again
    data.fetch(dest, urls=urls, timeout=5)


def test_fetch_bad_md5_leaves_no_file(tmp_path, server, monkeypatch):
    monkeypatch.setitem(data.MNIST_SPEC.md5_gz, f"{TEST_IMG}.gz", "0" * 32)
    dest = tmp_path / "dest"
    raises([f"{TEST_IMG}.gz", "MD5", "HPCFL_DATA_DIR", "--data-dir"],
           data.fetch, dest, urls=[server.as_uri() + "/"], timeout=5)
    assert not (dest / f"{TEST_IMG}.gz").exists()
    assert not any(p.name.startswith(".") for p in dest.iterdir())  # no temp left behind


def test_fetch_accepts_a_recompressed_mirror_on_its_content_and_nothing_else(tmp_path, server, monkeypatch):
    # a mirror's .gz (Debian's) recompressed: another MD5, the published content's SHA-256
    for i, name in enumerate(data.FILES):
        content = idx_bytes(labels(10 + i))
        monkeypatch.setitem(data.MNIST_SPEC.sha256, name, hashlib.sha256(content).hexdigest())
        half = len(content) // 2                    # two gzip members, as some tools write
        (server / f"{name}.gz").write_bytes(gzip.compress(content[:half], 1) + gzip.compress(content[half:], 9))
    data.fetch(tmp_path / "dest", urls=[server.as_uri() + "/"], timeout=5)
    assert data.missing_files(tmp_path / "dest") == []
    blob = gzip.compress(idx_bytes(labels(99)))     # other content: refused, no file left
    (server / f"{TEST_LBL}.gz").write_bytes(blob)
    raises([f"{TEST_LBL}.gz", "MD5", "its content is not the published one"],
           data.fetch, tmp_path / "other", urls=[server.as_uri() + "/"], timeout=5)
    assert not (tmp_path / "other" / f"{TEST_LBL}.gz").exists()


def test_fetch_no_network(tmp_path, server):
    raises([f"{TRAIN_IMG}.gz", "download failed"],
           data.fetch, tmp_path / "dest", urls=[(tmp_path / "void").as_uri() + "/"], timeout=5)
    assert not (tmp_path / "dest").exists()     # a failed offline run leaves no empty folder behind


# ---------------------------------------------------------------- sharding, shuffling

def test_shard_range_covers_exactly_once():
    for n in range(51):
        for size in range(1, 10):
            ranges = [data.shard_range(n, r, size) for r in range(size)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            lengths = [stop - start for start, stop in ranges]
            assert min(lengths) >= 0 and max(lengths) - min(lengths) <= 1
            assert lengths == sorted(lengths, reverse=True)  # the extras go to the first ranks
    with pytest.raises(ValueError):
        data.shard_range(10, 3, 3)


def test_epoch_permutation():
    p = data.epoch_permutation(1000, seed=7, epoch=3)
    assert p.dtype == np.int64
    np.testing.assert_array_equal(np.sort(p), np.arange(1000))
    np.testing.assert_array_equal(p, data.epoch_permutation(1000, seed=7, epoch=3))
    assert not np.array_equal(p, data.epoch_permutation(1000, seed=7, epoch=4))
    assert not np.array_equal(p, data.epoch_permutation(1000, seed=8, epoch=3))


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("HPCFL_DATA_DIR", raising=False)
    assert data.default_data_dir() == tmp_path / "xdg" / "hpcfl" / "mnist"
    assert data.resolve_data_dir(None) == data.default_data_dir()
    monkeypatch.setenv("HPCFL_DATA_DIR", str(tmp_path / "env"))
    assert data.resolve_data_dir(None) == tmp_path / "env"
    assert data.resolve_data_dir(str(tmp_path / "cli")) == tmp_path / "cli"
