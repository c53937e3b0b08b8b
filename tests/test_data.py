"""Tests for hypergrad_fast.data: IDX files, the embedded 5k digits, splits, caching."""

import gzip
import os

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
