"""IDX files: MNIST and Fashion-MNIST (numpy only).

Anything wrong with the files raises `DatasetError` with one line naming the path and what was expected.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from robmia_db.datasets.base import DatasetInfo, LoadedDataset, register_dataset
from robmia_db.datasets.reading import check_options, one_line, read_file_bytes, scale_uint8_into
from robmia_db.errors import DatasetError

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_maybe_gzip(path: Path) -> bytes:
    raw = read_file_bytes(path)
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: corrupt or truncated gzip data ({one_line(exc)})") from exc


def read_idx(path: Path, expected_ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a numpy array, checking its magic number and length.

    Args:
        path: the file.
        expected_ndim: if given, the number of dimensions the header must declare (3 for images, 1 for labels).

    Returns:
        A read-only array viewing the file's bytes, with the shape the header declares.

    Raises:
        DatasetError: bad magic number, unexpected dimensions, or a byte count that does not match the header.
    """
    raw = _read_maybe_gzip(path)
    want = f"0x{0x800 + expected_ndim:08x}" if expected_ndim is not None else "0x000008NN"
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path}: not an IDX file (magic 0x{raw[:4].hex()}, expected {want})")
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    if expected_ndim is not None and (ndim != expected_ndim or dtype != np.uint8):
        raise DatasetError(
            f"{path}: IDX magic 0x{raw[:4].hex()} but expected {want} (uint8, {expected_ndim}-D)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    # Python ints: a forged header's sizes (up to 2^32 each) would overflow an int64 product
    expected_bytes = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected_bytes:
        what = "truncated" if len(raw) < expected_bytes else "too long"
        raise DatasetError(
            f"{path}: IDX file {what}: header says {'x'.join(map(str, dims))} ({expected_bytes} bytes), "
            f"file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


_IDX_STEMS = {
    "train_images": ("train-images", "idx3"),
    "train_labels": ("train-labels", "idx1"),
    "test_images": ("t10k-images", "idx3"),
    "test_labels": ("t10k-labels", "idx1"),
}

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MNIST_CLASSES = [str(d) for d in range(10)]

# Debian's `dataset-fashion-mnist` package installs the four .gz files here.
DEFAULT_IDX_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion_mnist": (Path("/usr/share/datasets/fashion-mnist"),),
    "mnist": (Path("/usr/share/datasets/mnist"),),
}
_IDX_SUBDIRS = {
    "fashion_mnist": ("raw", "FashionMNIST/raw", "fashion-mnist", "fashion_mnist"),
    "mnist": ("raw", "MNIST/raw", "mnist"),
}
_IDX_EXPECTED = (
    "the four IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte (each optionally .gz) in one folder"
)


def _idx_file(folder: Path, key: str) -> Path | None:
    stem, kind = _IDX_STEMS[key]
    for name in (f"{stem}-{kind}-ubyte", f"{stem}.{kind}-ubyte"):
        for suffix in ("", ".gz"):
            candidate = folder / (name + suffix)
            if candidate.is_file():
                return candidate
    return None


def _find_idx_folder(name: str, root: Path | None) -> tuple[Path, dict[str, Path]]:
    if root is not None:
        if not root.exists():
            raise DatasetError(f"{root}: does not exist; dataset {name!r} expects {_IDX_EXPECTED}")
        folders = [root, *(root / sub for sub in _IDX_SUBDIRS[name])]
    else:
        folders = list(DEFAULT_IDX_DIRS[name])
    partial: tuple[Path, list[str]] | None = None
    for folder in folders:
        if not folder.is_dir():
            continue
        found = {key: _idx_file(folder, key) for key in _IDX_STEMS}
        if all(found.values()):
            return folder, {k: v for k, v in found.items() if v is not None}
        if any(found.values()) and partial is None:
            partial = (
                folder,
                [f"{_IDX_STEMS[k][0]}-{_IDX_STEMS[k][1]}-ubyte[.gz]" for k, v in found.items() if not v],
            )
    if partial is not None:
        raise DatasetError(
            f"{partial[0]}: missing {', '.join(partial[1])}; dataset {name!r} expects {_IDX_EXPECTED}"
        )
    where = str(root) if root is not None else " or ".join(str(f) for f in folders) or "(no default folder)"
    raise DatasetError(f"{where}: no IDX files found; dataset {name!r} expects {_IDX_EXPECTED}")


def idx_length(path: Path) -> int:
    """The first dimension an IDX file's header declares (gzipped or not), reading only the header."""
    try:
        with path.open("rb") as handle:
            gzipped = handle.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if gzipped else path.open("rb") as handle:
            head = handle.read(8)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: cannot read IDX header ({one_line(exc)})") from exc
    if len(head) < 8 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES or head[3] == 0:
        raise DatasetError(f"{path}: not an IDX file (magic 0x{head[:4].hex()})")
    return int(struct.unpack(">I", head[4:8])[0])


def _count_idx(name: str, root: Path | None, options: dict[str, Any]) -> dict[str, int]:
    check_options(name, options, ())
    _, paths = _find_idx_folder(name, root)
    counts = {}
    for split in ("train", "test"):
        n_images, n_labels = (idx_length(paths[f"{split}_{part}"]) for part in ("images", "labels"))
        if n_images != n_labels:
            raise DatasetError(
                f"{paths[f'{split}_labels']}: {n_labels} labels but {paths[f'{split}_images'].name} "
                f"has {n_images} images"
            )
        counts[split] = n_images
    return counts


def _load_idx_dataset(
    name: str, classes: list[str], root: Path | None, options: dict[str, Any]
) -> LoadedDataset:
    check_options(name, options, ())
    folder, paths = _find_idx_folder(name, root)
    arrays = {}
    for key, path in paths.items():
        arrays[key] = read_idx(path, expected_ndim=3 if key.endswith("images") else 1)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise DatasetError(
                f"{paths[f'{split}_labels']}: {len(labels)} labels but {paths[f'{split}_images'].name} "
                f"has {len(images)} images"
            )
        if len(labels) and int(labels.max()) >= len(classes):
            raise DatasetError(
                f"{paths[f'{split}_labels']}: label {int(labels.max())} outside 0..{len(classes) - 1}"
            )
    train_images, test_images = arrays["train_images"], arrays["test_images"]
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DatasetError(
            f"{paths['test_images']}: images are {test_images.shape[1:]} but training images are "
            f"{train_images.shape[1:]}"
        )
    n_train, n_test = len(train_images), len(test_images)
    x = np.empty((n_train + n_test, 1, *train_images.shape[1:]), dtype=np.float32)
    scale_uint8_into(x[:n_train, 0], train_images)
    scale_uint8_into(x[n_train:, 0], test_images)
    y = np.concatenate([arrays["train_labels"], arrays["test_labels"]]).astype(np.int64)
    origin = np.array(["train"] * n_train + ["test"] * n_test)
    gz = ", gzipped" if any(p.suffix == ".gz" for p in paths.values()) else ""
    return LoadedDataset(
        name=name,
        x=x,
        y=y,
        origin_split=origin,
        classes=list(classes),
        source=f"{folder} (IDX files{gz})",
    )


def load_fashion_mnist(root: Path | None = None, **options: Any) -> LoadedDataset:
    """Fashion-MNIST from its four IDX files (60,000 train + 10,000 test, 28x28 grayscale).

    Args:
        root: the folder holding the files (also looked for in `raw/`, `FashionMNIST/raw/`, `fashion-mnist/`);
            None searches Debian's `dataset-fashion-mnist` location /usr/share/datasets/fashion-mnist.
        **options: none are accepted.
    """
    return _load_idx_dataset("fashion_mnist", FASHION_MNIST_CLASSES, root, options)


def load_mnist(root: Path | None = None, **options: Any) -> LoadedDataset:
    """MNIST from its four IDX files (60,000 train + 10,000 test, 28x28 grayscale).

    Args:
        root: the folder holding the files (also looked for in `raw/`, `MNIST/raw/`, `mnist/`);
            None searches /usr/share/datasets/mnist.
        **options: none are accepted.
    """
    return _load_idx_dataset("mnist", MNIST_CLASSES, root, options)


register_dataset(
    DatasetInfo(
        name="fashion_mnist",
        loader=load_fashion_mnist,
        counter=lambda root, **options: _count_idx("fashion_mnist", root, options),
        folder_names=("fashion-mnist", "FashionMNIST"),
        needs_root=False,
        description="Fashion-MNIST, 10 classes, 28x28 grayscale, 60,000 train / 10,000 test (IDX files)",
        expected_files=_IDX_EXPECTED + " (also found in /usr/share/datasets/fashion-mnist from Debian's "
        "dataset-fashion-mnist package)",
    )
)
register_dataset(
    DatasetInfo(
        name="mnist",
        loader=load_mnist,
        counter=lambda root, **options: _count_idx("mnist", root, options),
        folder_names=("MNIST",),
        needs_root=True,
        description="MNIST, 10 digit classes, 28x28 grayscale, 60,000 train / 10,000 test (IDX files)",
        expected_files=_IDX_EXPECTED,
    )
)
