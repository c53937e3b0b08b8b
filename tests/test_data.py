"""Tests for hypergrad_fast.data: IDX files, the embedded 5k digits, splits, caching."""

import gzip
import io
import os
import tracemalloc
import zipfile

import numpy as np
import pytest

from hypergrad_fast import data
from hypergrad_fast.data import MNIST_ENV, load_mnist, read_idx, write_idx


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    # Never read the user's full-MNIST setting or write to the real cache.
    monkeypatch.delenv(MNIST_ENV, raising=False)
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))


# ---------------------------------------------------------------- IDX files


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(17,), (5, 28, 28), (0,), (3, 2, 4)])
def test_idx_round_trip(tmp_path, suffix, shape):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
    fname = tmp_path / f"a-idx{suffix}"
    write_idx(fname, arr)
    back = read_idx(fname)
    assert back.dtype == np.uint8
    assert back.shape == shape
    np.testing.assert_array_equal(back, arr)


def test_idx_header_bytes(tmp_path):
    # The on-disk format is fixed by the MNIST spec, not just self-consistent.
    fname = tmp_path / "labels"
    write_idx(fname, np.array([3, 1, 4], dtype=np.uint8))
    assert fname.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 3, 1, 4])
    write_idx(fname, np.zeros((2, 3, 4), dtype=np.uint8))
    raw = fname.read_bytes()
    assert raw[:16] == bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4])
    assert len(raw) == 16 + 24


def test_idx_gz_is_really_gzipped(tmp_path):
    fname = tmp_path / "x.gz"
    write_idx(fname, np.arange(10, dtype=np.uint8))
    with gzip.open(fname, "rb") as f:
        assert f.read()[:4] == bytes([0, 0, 8, 1])


def test_write_idx_rejects_bad_arrays(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_idx(tmp_path / "f", np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="ndim"):
        write_idx(tmp_path / "f", np.zeros((2, 2), dtype=np.uint8))


@pytest.mark.parametrize(
    "raw, match",
    [
        (bytes([0, 0, 8, 2, 0, 0, 0, 1, 0, 0, 0, 1, 7]), "magic"),  # ndim 2
        (bytes([1, 0, 8, 1, 0, 0, 0, 1, 7]), "magic"),  # nonzero leading byte
        (bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 7, 7, 7, 7]), "dtype"),  # float32 code
        (bytes([0, 0, 8]), "short"),
        (bytes([0, 0, 8, 3, 0, 0, 0, 1]), "header"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2, 3]), "bytes"),  # truncated data
        (bytes([0, 0, 8, 1, 0, 0, 0, 2, 1, 2, 3]), "bytes"),  # trailing data
    ],
)
def test_read_idx_rejects_bad_files(tmp_path, raw, match):
    fname = tmp_path / "bad-idx"
    fname.write_bytes(raw)
    with pytest.raises(ValueError, match=match) as info:
        read_idx(fname)
    assert "bad-idx" in str(info.value)  # the message names the file


def test_read_idx_truncated_gz(tmp_path):
    fname = tmp_path / "images.gz"
    write_idx(fname, np.ones((4, 28, 28), dtype=np.uint8))
    fname.write_bytes(fname.read_bytes()[:-20])
    with pytest.raises(ValueError, match="images.gz"):
        read_idx(fname)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


# A reader that reads only what a header promises stays far below this
# (bytes, as traced by tracemalloc, which NumPy's allocations report to).
_SMALL_PEAK = 4 * 2**20
_LABELS_HEADER_5 = bytes([0, 0, 8, 1, 0, 0, 0, 5])


def _peak_of(fn, *args, **kwargs):
    """Run ``fn``; return (its result or the exception it raised, peak traced bytes)."""
    tracemalloc.start()
    try:
        outcome = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the caller checks which one
        outcome = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return outcome, peak


def test_read_idx_gz_trailing_data_is_not_read(tmp_path):
    # 50 MB of zeros compress to about 50 kB, so a small .gz can hide them.
    fname = tmp_path / "labels.gz"
    payload = _LABELS_HEADER_5 + bytes(5) + bytes(50 * 2**20)
    fname.write_bytes(gzip.compress(payload, compresslevel=1))
    exc, peak = _peak_of(read_idx, fname)
    assert isinstance(exc, ValueError) and "labels.gz" in str(exc)
    assert peak < _SMALL_PEAK


def test_read_idx_sparse_file_is_not_read(tmp_path):
    # A sparse file costs no disk but reads back as 256 MiB of zeros.
    fname = tmp_path / "labels"
    with open(fname, "wb") as f:
        f.write(_LABELS_HEADER_5 + bytes(5))
        f.truncate(256 * 2**20)
    exc, peak = _peak_of(read_idx, fname)
    assert isinstance(exc, ValueError) and "labels" in str(exc)
    assert "bytes" in str(exc)
    assert peak < _SMALL_PEAK


def test_load_mnist_sparse_idx_file_is_not_read(tmp_path):
    d = _write_fake_mnist(tmp_path / "mnist")
    with open(d / "train-images-idx3-ubyte", "r+b") as f:
        f.truncate(256 * 2**20)
    exc, peak = _peak_of(load_mnist, 10, 10, 10, path=d)
    assert isinstance(exc, ValueError) and "train-images-idx3-ubyte" in str(exc)
    assert peak < _SMALL_PEAK


def test_read_idx_refuses_absurd_header_before_reading(tmp_path):
    # The header promises 2**96 bytes; what follows must not be read at all.
    fname = tmp_path / "images.gz"
    header = bytes([0, 0, 8, 3]) + bytes([0xFF] * 12)
    fname.write_bytes(gzip.compress(header + bytes(50 * 2**20), compresslevel=1))
    exc, peak = _peak_of(read_idx, fname)
    assert isinstance(exc, ValueError) and "images.gz" in str(exc)
    assert peak < _SMALL_PEAK


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_size_limit(tmp_path, monkeypatch, suffix):
    fname = tmp_path / f"labels{suffix}"
    write_idx(fname, np.zeros(200, dtype=np.uint8))
    monkeypatch.setattr(data, "_IDX_MAX_BYTES", 100)
    with pytest.raises(ValueError, match="labels") as info:
        read_idx(fname)
    assert "200" in str(info.value)


def test_read_idx_gz_promising_more_than_deflate_can_hold(tmp_path):
    # Deflate expands at most 1032-fold, so a tiny .gz cannot hold 100 MB:
    # refused from the header, before allocating the array.
    fname = tmp_path / "labels.gz"
    fname.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + (100 * 2**20).to_bytes(4, "big")))
    exc, peak = _peak_of(read_idx, fname)
    assert isinstance(exc, ValueError) and "labels.gz" in str(exc)
    assert peak < _SMALL_PEAK


# ------------------------------------------------------- IDX directory


def _write_fake_mnist(directory, n_train=60, n_test=20, gz=False):
    """Images whose every pixel equals 10 * label + a per-image id (mod 256), so
    labels can be checked against inputs after shuffling."""
    rng = np.random.default_rng(5)
    directory.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = np.empty((n, 28, 28), dtype=np.uint8)
        images[:] = (10 * labels)[:, None, None]
        images[:, 0, 0] = np.arange(n)  # unique id per image within the file
        images[:, 0, 1] = 0 if prefix == "train" else 255  # which file it came from
        write_idx(directory / f"{prefix}-images-idx3-ubyte{sfx}", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{sfx}", labels)
    return directory


def _check_fake_split(split, n, from_test):
    assert split.inputs.shape == (n, 784)
    assert split.inputs.dtype == np.float64
    assert split.targets.shape == (n, 10)
    assert split.labels.dtype == np.int64
    pixels = np.rint(split.inputs * 255).astype(int)
    np.testing.assert_array_equal(pixels[:, 2], 10 * split.labels)
    np.testing.assert_array_equal(split.targets.argmax(1), split.labels)
    assert np.all(pixels[:, 1] == (255 if from_test else 0))


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_from_idx_dir(tmp_path, gz):
    d = _write_fake_mnist(tmp_path / "mnist", gz=gz)
    splits = load_mnist(30, 25, 15, path=d, seed=3)
    _check_fake_split(splits.train, 30, from_test=False)
    _check_fake_split(splits.valid, 25, from_test=False)
    _check_fake_split(splits.test, 15, from_test=True)
    ids = lambda s: np.rint(s.inputs[:, 0] * 255).astype(int)  # noqa: E731
    assert not set(ids(splits.train)) & set(ids(splits.valid))
    assert len(set(ids(splits.train))) == 30
    # Shuffled: not simply the first 30 images in file order.
    assert not np.array_equal(ids(splits.train), np.arange(30))


def test_load_mnist_idx_via_env_matches_path(tmp_path, monkeypatch):
    d = _write_fake_mnist(tmp_path / "mnist")
    by_path = load_mnist(20, 10, 5, path=d, seed=1)
    monkeypatch.setenv(MNIST_ENV, str(d))
    by_env = load_mnist(20, 10, 5, seed=1)
    for a, b in zip(by_path, by_env):
        np.testing.assert_array_equal(a.inputs, b.inputs)
        np.testing.assert_array_equal(a.labels, b.labels)
    _check_fake_split(by_env.test, 5, from_test=True)


def test_load_mnist_idx_sizes_checked(tmp_path):
    d = _write_fake_mnist(tmp_path / "mnist", n_train=60, n_test=20)
    load_mnist(40, 20, 20, path=d)  # exactly everything is fine
    with pytest.raises(ValueError, match="60"):
        load_mnist(41, 20, 0, path=d)
    with pytest.raises(ValueError, match="20"):
        load_mnist(1, 1, 21, path=d)


def test_load_mnist_idx_missing_file(tmp_path):
    d = _write_fake_mnist(tmp_path / "mnist")
    os.remove(d / "t10k-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_mnist(10, 10, 10, path=d)
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_mnist(10, 10, 10, path=tmp_path / "does-not-exist")


def test_load_mnist_idx_label_count_mismatch(tmp_path):
    d = _write_fake_mnist(tmp_path / "mnist")
    write_idx(d / "train-labels-idx1-ubyte", np.zeros(59, dtype=np.uint8))
    with pytest.raises(ValueError, match="59"):
        load_mnist(10, 10, 10, path=d)


# ------------------------------------------------------- embedded 5k digits


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    # Module scope runs before the autouse fixture, so isolate it here too.
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(MNIST_ENV, raising=False)
        return load_mnist(3000, 1000, 1000, seed=0, cache_dir=tmp_path_factory.mktemp("cache"))


def test_embedded_shapes_and_ranges(embedded):
    for split, n in zip(embedded, (3000, 1000, 1000)):
        assert split.inputs.shape == (n, 784) and split.inputs.dtype == np.float64
        assert split.targets.shape == (n, 10) and split.targets.dtype == np.float64
        assert split.labels.shape == (n,) and split.labels.dtype == np.int64
        assert split.inputs.min() == 0.0 and split.inputs.max() == 1.0
        np.testing.assert_array_equal(split.targets.sum(1), 1.0)
        assert set(np.unique(split.targets)) == {0.0, 1.0}
        np.testing.assert_array_equal(split.targets.argmax(1), split.labels)
        assert set(split.labels) == set(range(10))
        # Real digits: many dark pixels and some ink in every image.
        assert np.all(split.inputs.max(1) > 0.5)


def test_embedded_splits_disjoint(embedded):
    # Rows of the 5k file are distinct images, so rows identify examples.
    rows = [set(map(bytes, np.rint(s.inputs * 255).astype(np.uint8))) for s in embedded]
    assert len(rows[0]) == 3000
    assert not rows[0] & rows[1] and not rows[0] & rows[2] and not rows[1] & rows[2]


def test_embedded_uses_all_5000_and_class_balance():
    splits = load_mnist(2500, 1500, 1000)
    labels = np.concatenate([s.labels for s in splits])
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 500))


def test_embedded_deterministic_in_seed(embedded):
    again = load_mnist(3000, 1000, 1000, seed=0)
    other = load_mnist(3000, 1000, 1000, seed=1)
    for a, b in zip(embedded, again):
        np.testing.assert_array_equal(a.inputs, b.inputs)
        np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(embedded.train.labels, other.train.labels)


def test_embedded_zero_sizes():
    splits = load_mnist(0, 0, 5)
    assert splits.train.inputs.shape == (0, 784)
    assert splits.train.targets.shape == (0, 10)
    assert splits.test.inputs.shape == (5, 784)


@pytest.mark.parametrize(
    "sizes, error, match",
    [
        ((4000, 1000, 1), ValueError, "5000"),
        ((-1, 10, 10), ValueError, "n_train"),
        ((10, 2.5, 10), ValueError, "n_valid"),
        ((10, 10, True), ValueError, "n_test"),
    ],
)
def test_embedded_bad_sizes(sizes, error, match):
    with pytest.raises(error, match=match):
        load_mnist(*sizes)


# ---------------------------------------------------------------- caching


def _fail_parse(*args, **kwargs):
    raise AssertionError("parsed the CSV although a valid cache exists")


def test_cache_created_and_reused(tmp_path, monkeypatch):
    cache = tmp_path / "mycache"
    monkeypatch.setenv(data.CACHE_ENV, str(cache))
    first = load_mnist(100, 50, 50, seed=2)
    cache_file = cache / "mnist_5k.npz"
    assert cache_file.is_file()
    assert [p.name for p in cache.iterdir()] == ["mnist_5k.npz"]  # no temp files left
    with np.load(cache_file, allow_pickle=False) as npz:
        assert npz["pixels"].dtype == np.uint8 and npz["pixels"].shape == (5000, 784)
        assert npz["labels"].dtype == np.int64
    monkeypatch.setattr(data, "_parse_mnist_csv", _fail_parse)
    second = load_mnist(100, 50, 50, seed=2)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.inputs, b.inputs)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_cache_dir_argument_beats_env(tmp_path):
    load_mnist(10, 10, 10, cache_dir=tmp_path / "explicit")
    assert (tmp_path / "explicit" / "mnist_5k.npz").is_file()
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("content", [b"", b"not a zip file", b"PK\x03\x04garbage"])
def test_corrupt_cache_is_rebuilt(tmp_path, content):
    good = load_mnist(50, 0, 0, cache_dir=tmp_path / "c")
    cache_file = tmp_path / "c" / "mnist_5k.npz"
    cache_file.write_bytes(content)
    again = load_mnist(50, 0, 0, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(good.train.inputs, again.train.inputs)
    with np.load(cache_file, allow_pickle=False) as npz:  # rewritten and valid
        assert npz["pixels"].shape == (5000, 784)


def test_cache_with_wrong_contents_is_rebuilt(tmp_path):
    good = load_mnist(50, 0, 0, cache_dir=tmp_path)
    cache_file = tmp_path / "mnist_5k.npz"
    with np.load(cache_file, allow_pickle=False) as npz:
        stamp = npz["stamp"]
    # Right keys and stamp, wrong shape: must not be trusted.
    np.savez(
        cache_file, stamp=stamp, pixels=np.zeros((5, 3), np.uint8), labels=np.zeros(5, np.int64)
    )
    again = load_mnist(50, 0, 0, cache_dir=tmp_path)
    np.testing.assert_array_equal(good.train.inputs, again.train.inputs)


@pytest.fixture(scope="module")
def parsed():
    """The embedded digits straight from the CSV: (pixels, labels), never cached."""
    return data._parse_mnist_csv(data._embedded_csv_path())


def _genuine_stamp():
    return data._source_stamp(data._embedded_csv_path())


def _label_minus_one(pixels, labels):
    labels = labels.copy()
    labels[0] = -1  # would index one-hot row 9: a silent wrong class
    return pixels, labels


def _label_twelve(pixels, labels):
    labels = labels.copy()
    labels[0] = 12
    return pixels, labels


def _ten_made_up_rows(pixels, labels):
    return np.full((10, 784), 7, np.uint8), np.arange(10, dtype=np.int64)


def _one_extra_row(pixels, labels):
    return np.vstack([pixels, pixels[:1]]), np.append(labels, labels[:1])


def _one_row_missing(pixels, labels):
    return pixels[1:], labels[1:]


@pytest.mark.parametrize(
    "tamper",
    [_label_minus_one, _label_twelve, _ten_made_up_rows, _one_extra_row, _one_row_missing],
)
def test_cache_with_genuine_stamp_but_bad_arrays_is_rebuilt(tmp_path, parsed, tamper):
    cache_file = tmp_path / "mnist_5k.npz"
    bad_pixels, bad_labels = tamper(*parsed)
    np.savez(cache_file, stamp=_genuine_stamp(), pixels=bad_pixels, labels=bad_labels)
    pixels, labels = data._load_embedded(tmp_path)
    np.testing.assert_array_equal(pixels, parsed[0])
    np.testing.assert_array_equal(labels, parsed[1])
    with np.load(cache_file, allow_pickle=False) as npz:  # rewritten with the CSV's arrays
        np.testing.assert_array_equal(npz["labels"], parsed[1])


def _npy_bytes_with_header(shape, dtype, body):
    """An .npy file whose header claims ``shape`` and ``dtype`` but holds ``body``."""
    buf = io.BytesIO()
    header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + body


def _npy_bytes(array):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize(
    "member, shape, dtype",
    [("pixels", (2**30, 784), np.uint8), ("labels", (2**40,), np.int64)],
)
def test_cache_member_claiming_huge_shape_is_rebuilt(tmp_path, parsed, member, shape, dtype):
    cache_file = tmp_path / "mnist_5k.npz"
    members = {
        "stamp": _npy_bytes(_genuine_stamp()),
        "pixels": _npy_bytes(parsed[0]),
        "labels": _npy_bytes(parsed[1]),
    }
    members[member] = _npy_bytes_with_header(shape, dtype, bytes(64))
    with zipfile.ZipFile(cache_file, "w") as zf:
        for name, raw in members.items():
            zf.writestr(name + ".npy", raw)
    cached, peak = _peak_of(data._read_cache, cache_file, _genuine_stamp())
    assert cached is None
    assert peak < _SMALL_PEAK + parsed[0].nbytes  # the genuine members may be read
    pixels, labels = data._load_embedded(tmp_path)
    np.testing.assert_array_equal(pixels, parsed[0])
    np.testing.assert_array_equal(labels, parsed[1])


def test_parse_rejects_wrong_row_count(tmp_path):
    # The cache is checked against what the parser guarantees: exactly 5,000 rows.
    csv = tmp_path / "three.csv.gz"
    rows = [",".join(["0"] * 784 + [str(k)]) for k in range(3)]
    csv.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    with pytest.raises(ValueError, match="5000"):
        data._parse_mnist_csv(csv)


def test_unwritable_cache_falls_back(tmp_path):
    # A regular file where the cache directory should be makes mkdir fail
    # even for root, which ignores permission bits.
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    splits = load_mnist(20, 0, 0, cache_dir=blocker / "sub")
    assert splits.train.inputs.shape == (20, 784)


def test_parse_matches_cache_free_read():
    # The parser sees 5,000 rows sorted by class, 500 each, pixels 0..255.
    pixels, labels = data._parse_mnist_csv(data._embedded_csv_path())
    assert pixels.shape == (5000, 784) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 500))
    assert pixels.max() == 255
