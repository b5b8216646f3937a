"""Dataset layer: loaders for dataset files on disk (IDX, CIFAR-10, cropped Yale B, npz); numpy + stdlib, Pillow lazily.

Every loader takes `(root, **options)` and returns a `LoadedDataset`. Anything wrong with the files raises
`DatasetError` with one line naming the path and what was expected there. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import io
import lzma
import pickle
import re
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robmia_db.datasets.base import DatasetInfo, LoadedDataset, register_dataset
from robmia_db.errors import DatasetError

_UINT8_SCALE = np.float32(255.0)
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm")


# ---------------------------------------------------------------------------------------------------------
# Shared helpers


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _check_options(dataset: str, options: dict[str, Any], allowed: Iterable[str]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        allowed_text = ", ".join(sorted(allowed)) or "none"
        raise DatasetError(
            f"dataset {dataset!r}: unknown option(s) {', '.join(unknown)} (allowed: {allowed_text})"
        )


def _natural_key(text: str) -> list[Any]:
    """Sort key that orders `img2` before `img10`, so numbered files keep their numeric order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _is_tar_name(path: Path) -> bool:
    return path.name.lower().endswith(_TAR_SUFFIXES)


def _scale_uint8_into(dst: np.ndarray, src: np.ndarray) -> None:
    """Write src/255 into the float32 array dst without an intermediate float copy of src."""
    np.divide(src, _UINT8_SCALE, out=dst, casting="unsafe")


def _require_dir(path: Path, dataset: str, expected: str) -> None:
    if not path.exists():
        raise DatasetError(f"{path}: does not exist; dataset {dataset!r} expects {expected}")


def _read_file_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({_one_line(exc)})") from exc


@dataclass
class _Members:
    """Files (name -> bytes) and folder names read from a folder tree or a tar archive, names '/'-separated."""

    files: dict[str, bytes]
    dirs: set[str]


def _read_tree(path: Path, wanted: Callable[[str], bool]) -> _Members:
    """Read every file whose relative name satisfies `wanted`, from a folder or (in one pass) a tar archive.

    Tar members are read in archive order because compressed archives cannot seek backwards cheaply.
    """
    files: dict[str, bytes] = {}
    dirs: set[str] = set()
    if path.is_dir():
        for item in sorted(path.rglob("*")):
            rel = item.relative_to(path).as_posix()
            if item.is_dir():
                dirs.add(rel)
            elif wanted(rel):
                files[rel] = _read_file_bytes(item)
        return _Members(files, dirs)
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                name = member.name.removeprefix("./")
                if member.isdir():
                    dirs.add(name.rstrip("/"))
                    continue
                parent = name.rsplit("/", 1)[0] if "/" in name else ""
                while parent:
                    dirs.add(parent)
                    parent = parent.rsplit("/", 1)[0] if "/" in parent else ""
                if member.isfile() and wanted(name):
                    handle = archive.extractfile(member)
                    if handle is None:
                        raise DatasetError(f"{path}: cannot read tar member {name}")
                    files[name] = handle.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise DatasetError(
            f"{path}: cannot read tar archive ({_one_line(exc)}); expected a .tar, .tar.gz or .tar.xz file"
        ) from exc
    return _Members(files, dirs)


def _peek_tar_names(path: Path, limit: int = 64) -> list[str]:
    """The first member names of a tar archive, read without decompressing the rest."""
    names: list[str] = []
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                names.append(member.name)
                if len(names) >= limit:
                    break
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise DatasetError(
            f"{path}: cannot read tar archive ({_one_line(exc)}); expected a .tar, .tar.gz or .tar.xz file"
        ) from exc
    return names


def _tars_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _is_tar_name(p))


# ---------------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_maybe_gzip(path: Path) -> bytes:
    raw = _read_file_bytes(path)
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: corrupt or truncated gzip data ({_one_line(exc)})") from exc


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
    expected_bytes = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
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


def _load_idx_dataset(
    name: str, classes: list[str], root: Path | None, options: dict[str, Any]
) -> LoadedDataset:
    _check_options(name, options, ())
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
    _scale_uint8_into(x[:n_train, 0], train_images)
    _scale_uint8_into(x[n_train:, 0], test_images)
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


# ---------------------------------------------------------------------------------------------------------
# npz arrays (generic, and the CIFAR-10 subset form)

_NPZ_EXPECTED = (
    "an .npz file with `x` (N,H,W), (N,H,W,C) or (N,C,H,W) as uint8 or float in [0,1], `y` integer labels, "
    "optional `split` (train/test or 0/1) and `classes`; or with x_train, y_train, x_test, y_test"
)


def _to_nchw(x: np.ndarray, path: Path, key: str, layout: str) -> np.ndarray:
    """A view of x as N x C x H x W (no copy), resolving the channel position from the shape or `layout`."""
    if x.ndim == 3:
        return x[:, None, :, :]
    if x.ndim != 4:
        raise DatasetError(f"{path}: `{key}` has shape {x.shape}; expected (N,H,W), (N,H,W,C) or (N,C,H,W)")
    if layout == "nchw":
        return x
    if layout == "nhwc":
        return x.transpose(0, 3, 1, 2)
    channel_sizes = (1, 2, 3, 4)
    first, last = x.shape[1] in channel_sizes, x.shape[3] in channel_sizes
    if last and not first:
        return x.transpose(0, 3, 1, 2)
    if first and not last:
        return x
    raise DatasetError(
        f"{path}: cannot tell where the channels are in `{key}` of shape {x.shape}; pass layout='nchw' or 'nhwc'"
    )


def _check_pixels(x: np.ndarray, path: Path, key: str) -> None:
    if x.dtype == np.uint8:
        return
    if not np.issubdtype(x.dtype, np.floating):
        raise DatasetError(f"{path}: `{key}` has dtype {x.dtype}; expected uint8 (0..255) or float in [0, 1]")
    if x.size and (not np.isfinite(x).all() or float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise DatasetError(f"{path}: `{key}` float values must be finite and in [0, 1]")


def _fill_pixels(dst: np.ndarray, src: np.ndarray) -> None:
    if src.dtype == np.uint8:
        _scale_uint8_into(dst, src)
    else:
        dst[...] = src


def _check_labels(y: np.ndarray, n: int, path: Path, key: str) -> np.ndarray:
    if y.ndim != 1 or len(y) != n:
        raise DatasetError(f"{path}: `{key}` has shape {y.shape}; expected ({n},) to match the images")
    if not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{path}: `{key}` has dtype {y.dtype}; expected integer class labels")
    if len(y) and int(y.min()) < 0:
        raise DatasetError(f"{path}: `{key}` has negative labels")
    return y.astype(np.int64)


def _parse_split(split: np.ndarray, n: int, path: Path) -> np.ndarray:
    if split.ndim != 1 or len(split) != n:
        raise DatasetError(f"{path}: `split` has shape {split.shape}; expected ({n},)")
    if split.dtype.kind in "US":
        text = split.astype(str)
        bad = sorted(set(text.tolist()) - {"train", "test"})
        if bad:
            raise DatasetError(f"{path}: `split` values must be 'train' or 'test' (found {bad[0]!r})")
        return text
    if split.dtype.kind in "biu":
        values = split.astype(np.int64)
        if len(values) and (values.min() < 0 or values.max() > 1):
            raise DatasetError(f"{path}: integer `split` values must be 0 (train) or 1 (test)")
        return np.where(values == 1, "test", "train")
    raise DatasetError(f"{path}: `split` has dtype {split.dtype}; expected strings train/test or 0/1")


def _find_npz(root: Path, dataset: str, file: str | None) -> Path:
    if root.is_file():
        return root
    _require_dir(root, dataset, _NPZ_EXPECTED)
    if file is not None:
        path = root / file
        if not path.is_file():
            raise DatasetError(f"{path}: does not exist; dataset {dataset!r} expects {_NPZ_EXPECTED}")
        return path
    found = sorted(root.glob("*.npz"))
    if len(found) != 1:
        what = "no .npz file" if not found else f"{len(found)} .npz files (pass file=NAME)"
        raise DatasetError(f"{root}: {what}; dataset {dataset!r} expects {_NPZ_EXPECTED}")
    return found[0]


@dataclass
class _NpzArrays:
    x: np.ndarray
    y: np.ndarray
    origin: np.ndarray
    classes: list[str] | None


def _read_npz(path: Path, layout: str) -> _NpzArrays:
    """Read images, labels and origin splits from an npz in either the (x, y, split) or the x_train/x_test form."""
    if layout not in ("auto", "nchw", "nhwc"):
        raise DatasetError(f"layout must be 'auto', 'nchw' or 'nhwc' (got {layout!r})")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{path}: cannot read npz ({_one_line(exc)}); expected {_NPZ_EXPECTED}") from exc
    with archive:
        keys = set(archive.files)
        try:
            if {"x", "y"} <= keys:
                parts = [("x", "y", None)]
            elif {"x_train", "y_train", "x_test", "y_test"} <= keys:
                parts = [("x_train", "y_train", "train"), ("x_test", "y_test", "test")]
            else:
                raise DatasetError(f"{path}: keys {sorted(keys)}; expected {_NPZ_EXPECTED}")
            raw = [(xk, archive[xk], archive[yk], yk, split) for xk, yk, split in parts]
            split_raw = archive["split"] if "split" in keys and parts[0][2] is None else None
            classes_raw = archive["classes"] if "classes" in keys else None
        except ValueError as exc:
            raise DatasetError(
                f"{path}: {_one_line(exc)} (object arrays are not read; store strings as unicode)"
            ) from exc
    views = []
    for xk, x, y, yk, split in raw:
        _check_pixels(x, path, xk)
        view = _to_nchw(x, path, xk, layout)
        views.append((view, _check_labels(y, len(x), path, yk), split))
    shapes = {v.shape[1:] for v, _, _ in views}
    if len(shapes) > 1:
        raise DatasetError(f"{path}: train and test images differ in shape {sorted(shapes)}")
    n = sum(len(v) for v, _, _ in views)
    x_all = np.empty((n, *views[0][0].shape[1:]), dtype=np.float32)
    start = 0
    for view, _, _ in views:
        _fill_pixels(x_all[start : start + len(view)], view)
        start += len(view)
    del raw
    y_all = np.concatenate([y for _, y, _ in views])
    if views[0][2] is None:
        origin = _parse_split(split_raw, n, path) if split_raw is not None else np.full(n, "train")
    else:
        origin = np.concatenate([np.full(len(v), s) for v, _, s in views])
    classes = [str(c) for c in classes_raw.tolist()] if classes_raw is not None else None
    if classes is not None and len(y_all) and int(y_all.max()) >= len(classes):
        raise DatasetError(
            f"{path}: label {int(y_all.max())} but only {len(classes)} classes listed in `classes`"
        )
    return _NpzArrays(x_all, y_all, origin.astype(str), classes)


def load_npz(
    root: Path | None = None, file: str | None = None, layout: str = "auto", **options: Any
) -> LoadedDataset:
    """Images and labels from an .npz file.

    Args:
        root: the .npz file, or a folder holding exactly one (or name it with `file`).
        file: the file name inside `root` when the folder holds several.
        layout: "auto" (guess channels from the shape), "nchw" or "nhwc".
        **options: none other are accepted.

    The file holds `x` ((N,H,W), (N,H,W,C) or (N,C,H,W); uint8 is divided by 255, floats must be in [0, 1]),
    `y` (integer labels), optional `split` ("train"/"test" strings or 0/1; all "train" when absent) and
    optional `classes`; or the Keras-style `x_train`, `y_train`, `x_test`, `y_test`.
    """
    _check_options("npz", options, ())
    if root is None:
        raise DatasetError(f"dataset 'npz' needs a path: set data.root to {_NPZ_EXPECTED}")
    path = _find_npz(root, "npz", file)
    arrays = _read_npz(path, layout)
    n_classes = int(arrays.y.max()) + 1 if len(arrays.y) else 0
    classes = arrays.classes if arrays.classes is not None else [str(c) for c in range(n_classes)]
    return LoadedDataset(
        name="npz",
        x=arrays.x,
        y=arrays.y,
        origin_split=arrays.origin,
        classes=classes,
        source=f"{path} (npz)",
    )


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_TRAIN_SIZE, CIFAR10_TEST_SIZE = 50_000, 10_000
_CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
_CIFAR_EXPECTED = (
    "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta) or its .tar.gz, or an image tree "
    "train/<class>/*.png|jpg + test/<class>/... (folder or tar), or an .npz with x_train, y_train, x_test, y_test"
)

# The CIFAR batches are pickles; only numpy's array reconstruction is allowed to run while reading them.
_SAFE_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle_batch(data: bytes, where: str) -> dict[bytes, Any]:
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:
        raise DatasetError(f"{where}: not a CIFAR-10 python batch ({_one_line(exc)})") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: not a CIFAR-10 python batch (a {type(obj).__name__}, expected a dict)")
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def _batch_arrays(batch: dict[bytes, Any], where: str) -> tuple[np.ndarray, np.ndarray]:
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise DatasetError(f"{where}: CIFAR-10 batch lacks b'data' (ndarray) or b'labels'")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{where}: b'data' is {data.dtype} {data.shape}; expected uint8 (N, 3072)")
    labels_array = np.asarray(labels)
    if (
        labels_array.ndim != 1
        or len(labels_array) != len(data)
        or not np.issubdtype(labels_array.dtype, np.integer)
    ):
        raise DatasetError(f"{where}: {len(labels_array)} labels for {len(data)} images")
    if len(labels_array) and (labels_array.min() < 0 or labels_array.max() >= 10):
        raise DatasetError(f"{where}: labels outside 0..9")
    return data, labels_array.astype(np.int64)


def _cifar_from_batches(members: dict[str, bytes], label: str) -> LoadedDataset:
    """CIFAR-10 from the six python batches (names relative to `label`, the folder or archive read)."""
    by_base = {name.rsplit("/", 1)[-1]: name for name in members}
    missing = [b for b in _CIFAR_BATCHES if b not in by_base]
    if missing:
        raise DatasetError(
            f"{label}: missing CIFAR-10 batch file(s) {', '.join(missing)}; expected {_CIFAR_EXPECTED}"
        )
    parts = []
    for base in _CIFAR_BATCHES:
        where = f"{label}/{by_base[base]}"
        parts.append(_batch_arrays(_unpickle_batch(members.pop(by_base[base]), where), where))
    classes = list(CIFAR10_CLASSES)
    notes: list[str] = []
    if "batches.meta" in by_base:
        meta = _unpickle_batch(members[by_base["batches.meta"]], f"{label}/{by_base['batches.meta']}")
        names = meta.get(b"label_names")
        if isinstance(names, list) and len(names) == 10:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    else:
        notes.append("batches.meta missing: used the standard CIFAR-10 class names")
    n_train = sum(len(d) for d, _ in parts[:5])
    n_test = len(parts[5][0])
    x = np.empty((n_train + n_test, 3, 32, 32), dtype=np.float32)
    start = 0
    for data, _ in parts:
        _scale_uint8_into(x[start : start + len(data)], data.reshape(-1, 3, 32, 32))
        start += len(data)
    y = np.concatenate([labels for _, labels in parts])
    origin = np.array(["train"] * n_train + ["test"] * n_test)
    notes.extend(_subset_notes(n_train, n_test))
    return LoadedDataset("cifar10", x, y, origin, classes, f"{label} (CIFAR-10 python batches)", notes)


def _subset_notes(n_train: int, n_test: int) -> list[str]:
    if (n_train, n_test) == (CIFAR10_TRAIN_SIZE, CIFAR10_TEST_SIZE):
        return []
    return [
        f"subset: {n_train:,} of {CIFAR10_TRAIN_SIZE:,} training and {n_test:,} of {CIFAR10_TEST_SIZE:,} test images"
    ]


def _import_pillow() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:
        raise DatasetError(
            "reading image files needs Pillow: pip install pillow (the project lists it as a dependency)"
        ) from exc
    return Image


_IMAGE_TREE = re.compile(r"^(?:(?P<prefix>.*)/)?(?P<split>train|test)/(?P<cls>[^/]+)/(?P<file>[^/]+)$")


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(_IMAGE_SUFFIXES)


def _decode_image(data: bytes, where: str, image_module: Any, mode: str) -> np.ndarray:
    try:
        with image_module.open(io.BytesIO(data)) as img:
            img.load()
            return np.asarray(img.convert(mode), dtype=np.uint8)
    except Exception as exc:
        raise DatasetError(f"{where}: cannot decode image ({_one_line(exc)})") from exc


@dataclass
class ImageTree:
    """Images of a `train/<class>/...`, `test/<class>/...` tree, in class order then natural file order."""

    x: np.ndarray
    y: np.ndarray
    origin: np.ndarray
    classes: list[str]
    file_names: list[str]
    formats: set[str]
    reordered: bool = False


ImageOrder = Callable[[list[tuple[str, int, str]], list[str]], "list[int] | None"]


def read_image_tree(path: Path, mode: str = "RGB", order: ImageOrder | None = None) -> ImageTree:
    """Decode an image-folder tree (a folder or a tar archive) into float32 N x C x H x W in [0, 1].

    Args:
        path: the folder holding `train/` and `test/` (possibly one level down), or a tar of it.
        mode: Pillow mode every image is converted to ("RGB" or "L").
        order: optional function from the (split, label, file name) items in tree order and the class names
            to the final position of each item, or None to keep tree order.

    Raises:
        DatasetError: no tree, an empty class folder, different classes in train and test, an undecodable
            image, or images of different sizes.
    """
    image_module = _import_pillow()
    label = str(path)
    members = _read_tree(path, lambda name: bool(_IMAGE_TREE.match(name)) and _is_image_name(name))
    prefixes = {m.group("prefix") or "" for m in map(_IMAGE_TREE.match, members.files) if m}
    if not members.files:
        raise DatasetError(f"{label}: no train/<class>/ image files found; expected {_CIFAR_EXPECTED}")
    if len(prefixes) > 1:
        raise DatasetError(
            f"{label}: several image trees found ({', '.join(sorted(prefixes))}); point root at one"
        )
    prefix = prefixes.pop()
    base = f"{prefix}/" if prefix else ""
    split_classes: dict[str, list[str]] = {}
    for split in ("train", "test"):
        folder = f"{base}{split}"
        class_dirs = {d.rsplit("/", 1)[1] for d in members.dirs if "/" in d and d.rsplit("/", 1)[0] == folder}
        class_dirs |= {
            m.group("cls") for m in map(_IMAGE_TREE.match, members.files) if m and m.group("split") == split
        }
        if not class_dirs:
            raise DatasetError(
                f"{label}: no {folder}/<class>/ folders with images; expected {_CIFAR_EXPECTED}"
            )
        split_classes[split] = sorted(class_dirs)
    if split_classes["train"] != split_classes["test"]:
        raise DatasetError(
            f"{label}: train classes {split_classes['train']} differ from test classes {split_classes['test']}"
        )
    classes = split_classes["train"]
    grouped: dict[tuple[str, str], list[str]] = {(s, c): [] for s in ("train", "test") for c in classes}
    for name in members.files:
        m = _IMAGE_TREE.match(name)
        if m:
            grouped[(m.group("split"), m.group("cls"))].append(name)
    items: list[tuple[str, int, str]] = []
    for split in ("train", "test"):
        for label_index, cls in enumerate(classes):
            names = sorted(grouped[(split, cls)], key=_natural_key)
            if not names:
                raise DatasetError(f"{label}: class folder {base}{split}/{cls}/ has no images")
            items.extend((split, label_index, n) for n in names)
    positions = order(items, classes) if order is not None else None
    reordered = positions is not None
    if positions is None:
        positions = list(range(len(items)))
    first = _decode_image(members.files[items[0][2]], f"{label}/{items[0][2]}", image_module, mode)
    channels = 1 if first.ndim == 2 else first.shape[2]
    x = np.empty((len(items), channels, *first.shape[:2]), dtype=np.float32)
    y = np.empty(len(items), dtype=np.int64)
    origin = np.empty(len(items), dtype="<U5")
    file_names: list[str] = [""] * len(items)
    formats: set[str] = set()
    for (split, label_index, name), pos in zip(items, positions, strict=True):
        pixels = _decode_image(members.files.pop(name), f"{label}/{name}", image_module, mode)
        if pixels.shape != first.shape:
            raise DatasetError(
                f"{label}/{name}: image is {pixels.shape}, expected {first.shape} like the others"
            )
        chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        _scale_uint8_into(x[pos], chw)
        y[pos] = label_index
        origin[pos] = split
        file_names[pos] = name
        formats.add(name.rsplit(".", 1)[-1].lower().replace("jpeg", "jpg"))
    return ImageTree(x, y, origin, classes, file_names, formats, reordered)


def _train_order_from_labels(labels_in_order: np.ndarray) -> ImageOrder:
    """Map class-major, rank-named CIFAR-10 training files back to the original order of a label list.

    Training file k of class c (its name is the number k) goes where the k-th label c sits in the list.
    The returned function gives None (keep tree order) when the tree does not fit that rule.
    """

    def order(items: list[tuple[str, int, str]], classes: list[str]) -> list[int] | None:
        train = [(lab, name) for split, lab, name in items if split == "train"]
        if classes != CIFAR10_CLASSES or len(train) != len(labels_in_order):
            return None
        slots = {c: np.flatnonzero(labels_in_order == c) for c in np.unique(labels_in_order)}
        seen: dict[int, int] = {}
        positions = []
        for lab, name in train:
            stem = name.rsplit("/", 1)[-1].split(".", 1)[0]
            rank = seen.get(lab, 0)
            seen[lab] = rank + 1
            if not stem.isdigit() or int(stem) != rank or lab not in slots or rank >= len(slots[lab]):
                return None
            positions.append(int(slots[lab][rank]))
        n_train = len(train)
        return positions + list(range(n_train, len(items)))

    return order


def _cifar_from_image_tree(path: Path, npz_beside: Path | None) -> LoadedDataset:
    order = None
    order_note = "training images in class-folder order (the original CIFAR-10 order is unknown)"
    if npz_beside is not None:
        try:
            with np.load(npz_beside, allow_pickle=False) as archive:
                if "y_train_all" in archive.files:
                    order = _train_order_from_labels(np.asarray(archive["y_train_all"]).astype(np.int64))
        except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile):
            order = None
    tree = read_image_tree(path, "RGB", order)
    if tree.reordered:
        order_note = (
            f"training images put back in the original CIFAR-10 order using y_train_all from {npz_beside}"
        )
    if tree.x.shape[1:] != (3, 32, 32) or len(tree.classes) != 10:
        raise DatasetError(
            f"{path}: images are {tree.x.shape[1:]} in {len(tree.classes)} classes; CIFAR-10 expects 3x32x32, 10 classes"
        )
    n_train = int((tree.origin == "train").sum())
    n_test = len(tree.y) - n_train
    notes = [order_note, "test images in class-folder order"]
    kind = "image folders"
    if "jpg" in tree.formats:
        kind = "JPEG copy"
        notes.insert(
            0,
            "decoded from JPEG files: a lossy copy, pixels differ from the original CIFAR-10 by a few levels",
        )
    notes.extend(_subset_notes(n_train, n_test))
    return LoadedDataset(
        "cifar10", tree.x, tree.y, tree.origin, tree.classes, f"{path} (CIFAR-10 {kind})", notes
    )


def _cifar_from_npz(path: Path) -> LoadedDataset:
    arrays = _read_npz(path, "auto")
    if arrays.x.shape[1:] != (3, 32, 32):
        raise DatasetError(f"{path}: images are {arrays.x.shape[1:]}; CIFAR-10 expects 32x32 RGB")
    if len(arrays.y) and int(arrays.y.max()) >= 10:
        raise DatasetError(f"{path}: labels outside 0..9")
    n_train = int((arrays.origin == "train").sum())
    notes = _subset_notes(n_train, len(arrays.y) - n_train)
    return LoadedDataset(
        "cifar10",
        arrays.x,
        arrays.y,
        arrays.origin,
        arrays.classes or list(CIFAR10_CLASSES),
        f"{path} (npz)",
        notes,
    )


def _cifar_batch_dir(folder: Path) -> Path | None:
    for candidate in (folder / "cifar-10-batches-py", folder):
        if (candidate / "data_batch_1").is_file() or (candidate / "test_batch").is_file():
            return candidate
    return None


def _image_tree_dir(folder: Path) -> Path | None:
    for candidate in (folder, *sorted(p for p in folder.iterdir() if p.is_dir())):
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    return None


def _tar_kind(path: Path) -> str:
    names = _peek_tar_names(path)
    if any(re.search(r"(^|/)(data_batch_\d|test_batch|batches\.meta)$", n) for n in names):
        return "batches"
    if any(re.search(r"(^|/)(train|test)(/|$)", n) for n in names):
        return "images"
    return "unknown"


_CIFAR_LAYOUTS = ("auto", "batches", "images", "npz")


def load_cifar10(root: Path | None = None, layout: str = "auto", **options: Any) -> LoadedDataset:
    """CIFAR-10 from the python batches, an image-folder tree, or an npz (subset) file.

    Args:
        root: a folder (holding `cifar-10-batches-py/`, the batches themselves, a `train/`+`test/` image tree,
            tar archives of either, or an .npz), or one such archive or .npz file.
        layout: "auto" takes the first found of batches, image tree (folder, then tar) and npz; or force one.
        **options: none other are accepted.

    The source and notes say when the images came from a lossy JPEG copy or cover only a subset.
    """
    _check_options("cifar10", options, ())
    if layout not in _CIFAR_LAYOUTS:
        raise DatasetError(
            f"dataset 'cifar10': layout must be one of {', '.join(_CIFAR_LAYOUTS)} (got {layout!r})"
        )
    if root is None:
        raise DatasetError(f"dataset 'cifar10' needs its files: {_CIFAR_EXPECTED}")
    _require_dir(root, "cifar10", _CIFAR_EXPECTED)

    def wants(kind: str) -> bool:
        return layout in ("auto", kind)

    if root.is_file():
        if root.suffix == ".npz" and wants("npz"):
            return _cifar_from_npz(root)
        if _is_tar_name(root):
            kind = _tar_kind(root)
            if kind == "batches" and wants("batches"):
                return _load_batches_from(root)
            if kind == "images" and wants("images"):
                return _cifar_from_image_tree(root, None)
        forced = "" if layout == "auto" else f" (layout {layout!r})"
        raise DatasetError(f"{root}: not a CIFAR-10 file{forced}; expected {_CIFAR_EXPECTED}")
    npzs = sorted(root.glob("*.npz"))
    npz_beside = npzs[0] if len(npzs) == 1 else None
    batch_dir = _cifar_batch_dir(root)
    if batch_dir is not None and wants("batches"):
        return _load_batches_from(batch_dir)
    tree_dir = _image_tree_dir(root)
    if tree_dir is not None and wants("images"):
        return _cifar_from_image_tree(tree_dir, npz_beside)
    for tar in _tars_in(root):
        kind = _tar_kind(tar)
        if kind == "batches" and wants("batches"):
            return _load_batches_from(tar)
        if kind == "images" and wants("images"):
            return _cifar_from_image_tree(tar, npz_beside)
    if npzs and wants("npz"):
        if len(npzs) > 1:
            raise DatasetError(f"{root}: {len(npzs)} .npz files; keep one CIFAR-10 npz in the folder")
        return _cifar_from_npz(npzs[0])
    raise DatasetError(
        f"{root}: no CIFAR-10 files{'' if layout == 'auto' else f' of layout {layout!r}'}; expected {_CIFAR_EXPECTED}"
    )


def _load_batches_from(path: Path) -> LoadedDataset:
    wanted = set(_CIFAR_BATCHES) | {"batches.meta"}
    members = _read_tree(path, lambda name: name.rsplit("/", 1)[-1] in wanted)
    return _cifar_from_batches(members.files, str(path))


# ---------------------------------------------------------------------------------------------------------
# Extended Yale B, cropped

_YALE_IMAGE = re.compile(r"(?:^|/)yaleB(?P<subject>\d+)/yaleB(?P=subject)_P00A[+-]\d+E[+-]\d+\.pgm$")
_YALE_AMBIENT = re.compile(r"(?:^|/)yaleB\d+/yaleB\d+_P00_Ambient\.pgm$")
_YALE_EXPECTED = (
    "CroppedYale/yaleBNN/yaleBNN_P00A+AAAE+EE.pgm files (38 subjects, 2,414 images of 192x168), "
    "as a folder or a .tar/.tar.gz/.tar.xz archive"
)
YALE_TRAIN_PER_CLASS = 50


def read_pgm(data: bytes, where: str) -> np.ndarray:
    """Decode a binary (P5) PGM into a uint8 H x W array (16-bit files are scaled to 0..255).

    Raises:
        DatasetError: not P5, a bad header, or a pixel byte count that does not match the header.
    """
    match = re.match(rb"P5(?:\s+|#[^\n]*\n)+?(\d+)(?:\s+|#[^\n]*\n)+(\d+)(?:\s+|#[^\n]*\n)+(\d+)\s", data)
    if match is None:
        raise DatasetError(f"{where}: not a binary PGM (P5) file")
    width, height, maxval = (int(g) for g in match.groups())
    if not 0 < maxval < 65536 or width <= 0 or height <= 0:
        raise DatasetError(f"{where}: bad PGM header {width}x{height} maxval {maxval}")
    itemsize = 1 if maxval < 256 else 2
    expected = width * height * itemsize
    pixels = data[match.end() :]
    if len(pixels) < expected:
        raise DatasetError(f"{where}: truncated PGM ({len(pixels)} pixel bytes, header says {expected})")
    image = np.frombuffer(pixels, dtype=np.uint8 if itemsize == 1 else ">u2", count=width * height)
    image = image.reshape(height, width)
    if itemsize == 1 and maxval == 255:
        return image
    return np.round(image.astype(np.float64) * (255.0 / maxval)).astype(np.uint8)


def _yale_source(root: Path) -> Path:
    if root.is_file():
        return root
    _require_dir(root, "yale", _YALE_EXPECTED)
    for candidate in (root / "CroppedYale", root):
        if candidate.is_dir() and any(p.is_dir() and p.name.startswith("yaleB") for p in candidate.iterdir()):
            return candidate
    tars = _tars_in(root)
    if len(tars) == 1:
        return tars[0]
    if len(tars) > 1:
        raise DatasetError(f"{root}: {len(tars)} tar archives; keep one, expected {_YALE_EXPECTED}")
    raise DatasetError(f"{root}: no CroppedYale folder or archive; expected {_YALE_EXPECTED}")


def yale_split(
    subjects: np.ndarray, seed: int = 0, train_per_class: int = YALE_TRAIN_PER_CLASS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The authors' Yale split (`utils.py::YALE_split`), with the same RNG stream as `np.random.seed(seed)`.

    For each subject in ascending order: permute its indices, the first `train_per_class` go to train and the
    rest to test, and the subject becomes label 0, 1, ... in that order. Then the train set, then the test set,
    is permuted with the same stream.

    Args:
        subjects: one subject id per image, in the order the images were read.
        seed: the seed given to the legacy numpy generator.
        train_per_class: images per subject that go to train.

    Returns:
        (train_indices, train_labels, test_indices, test_labels): indices into `subjects`, labels 0..K-1.

    Raises:
        DatasetError: a subject has fewer than `train_per_class` images.
    """
    rng = np.random.RandomState(seed)
    train_idx, train_lab, test_idx, test_lab = [], [], [], []
    for label, subject in enumerate(sorted(set(subjects.tolist()))):
        members = np.argwhere(subjects == subject).flatten()
        if len(members) < train_per_class:
            raise DatasetError(
                f"subject {subject} has {len(members)} images, fewer than train_per_class={train_per_class}"
            )
        permuted = rng.permutation(members)
        train_idx.append(permuted[:train_per_class])
        train_lab.append(np.repeat(label, train_per_class))
        test_idx.append(permuted[train_per_class:])
        test_lab.append(np.repeat(label, len(members) - train_per_class))
    train_i, train_l = np.concatenate(train_idx), np.concatenate(train_lab)
    test_i, test_l = np.concatenate(test_idx), np.concatenate(test_lab)
    train_perm = rng.permutation(len(train_l))
    test_perm = rng.permutation(len(test_l))
    return (
        train_i[train_perm].astype(np.int64),
        train_l[train_perm].astype(np.int64),
        test_i[test_perm].astype(np.int64),
        test_l[test_perm].astype(np.int64),
    )


def load_yale(
    root: Path | None = None, split_seed: int = 0, train_per_class: int = YALE_TRAIN_PER_CLASS, **options: Any
) -> LoadedDataset:
    """Cropped Extended Yale B (38 subjects, 2,414 images, 192 x 168 grayscale), split as the authors did.

    Args:
        root: a `CroppedYale/` folder (or its parent), a folder holding one tar archive of it, or the archive.
        split_seed: seed of the per-subject split (the authors used 0).
        train_per_class: training images per subject (the authors used 50, giving 1,900 / 514).
        **options: none other are accepted.

    `*_P00_Ambient.pgm` images, `*.pgm.bad` files and anything else not named like `yaleBNN_P00A...pgm` are
    skipped. Files are read in sorted path order; the split then follows `yale_split`.
    """
    _check_options("yale", options, ())
    if root is None:
        raise DatasetError(f"dataset 'yale' needs its files: {_YALE_EXPECTED}")
    if not isinstance(train_per_class, int) or train_per_class < 1:
        raise DatasetError(
            f"dataset 'yale': train_per_class must be a positive integer (got {train_per_class!r})"
        )
    if not isinstance(split_seed, int) or split_seed < 0:
        raise DatasetError(f"dataset 'yale': split_seed must be a non-negative integer (got {split_seed!r})")
    source = _yale_source(root)
    ambient: list[str] = []

    def wanted(name: str) -> bool:
        if _YALE_AMBIENT.search(name):
            ambient.append(name)
            return False
        return bool(_YALE_IMAGE.search(name))

    members = _read_tree(source, wanted)
    names = sorted(members.files)
    if not names:
        raise DatasetError(f"{source}: no yaleBNN/yaleBNN_P00A...pgm images found; expected {_YALE_EXPECTED}")
    images: list[np.ndarray] = []
    subjects = np.empty(len(names), dtype=np.int64)
    for i, name in enumerate(names):
        image = read_pgm(members.files.pop(name), f"{source}/{name}")
        images.append(image)
        subjects[i] = int(_YALE_IMAGE.search(name).group("subject"))  # type: ignore[union-attr]
    shape = images[0].shape
    for name, image in zip(names, images, strict=True):
        if image.shape != shape:
            raise DatasetError(
                f"{source}/{name}: image is {image.shape[0]}x{image.shape[1]}, others are {shape[0]}x{shape[1]}"
            )
    subject_ids, counts = np.unique(subjects, return_counts=True)
    for subject, count in zip(subject_ids.tolist(), counts.tolist(), strict=True):
        if count < train_per_class:
            raise DatasetError(
                f"{source}: yaleB{subject:02d} has {count} images, fewer than train_per_class={train_per_class}"
            )
    train_i, train_l, test_i, test_l = yale_split(subjects, split_seed, train_per_class)
    order = np.concatenate([train_i, test_i])
    x = np.empty((len(order), 1, *shape), dtype=np.float32)
    for pos, index in enumerate(order):
        _scale_uint8_into(x[pos, 0], images[index])
    del images
    notes = [
        f"split: seed {split_seed}, {train_per_class} per subject to train (authors' YALE_split)",
        "image order = sorted file paths; the authors' YALEBXF.mat order is unknown, so members differ from theirs",
    ]
    if ambient:
        notes.append(f"skipped {len(ambient)} *_Ambient.pgm images (not part of the 2,414-image set)")
    if len(names) != 2414:
        notes.append(f"{len(names)} images, not the standard 2,414")
    return LoadedDataset(
        name="yale",
        x=x,
        y=np.concatenate([train_l, test_l]),
        origin_split=np.array(["train"] * len(train_l) + ["test"] * len(test_l)),
        classes=[f"yaleB{s:02d}" for s in subject_ids.tolist()],
        source=f"{source} (CroppedYale PGM{' archive' if source.is_file() else ' files'})",
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------------------
# Registry entries

register_dataset(
    DatasetInfo(
        name="fashion_mnist",
        loader=load_fashion_mnist,
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
        needs_root=True,
        description="MNIST, 10 digit classes, 28x28 grayscale, 60,000 train / 10,000 test (IDX files)",
        expected_files=_IDX_EXPECTED,
    )
)
register_dataset(
    DatasetInfo(
        name="cifar10",
        loader=load_cifar10,
        needs_root=True,
        description="CIFAR-10, 10 classes, 32x32 RGB, 50,000 train / 10,000 test",
        expected_files=_CIFAR_EXPECTED,
    )
)
register_dataset(
    DatasetInfo(
        name="yale",
        loader=load_yale,
        needs_root=True,
        description="Extended Yale B cropped faces, 38 subjects, 192x168 grayscale, split 1,900 / 514 as the paper",
        expected_files=_YALE_EXPECTED,
    )
)
register_dataset(
    DatasetInfo(
        name="npz",
        loader=load_npz,
        needs_root=True,
        description="Any images + labels in an .npz file (x, y, optional split and classes)",
        expected_files=_NPZ_EXPECTED,
    )
)
