"""Images and labels from an .npz file: the generic `npz` dataset, and the reader the CIFAR-10 subset form uses."""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robmia_db.datasets.base import DatasetInfo, LoadedDataset, register_dataset
from robmia_db.datasets.reading import check_options, one_line, require_dir, scale_uint8_into
from robmia_db.errors import DatasetError

_NPZ_EXPECTED = (
    "an .npz file with `x` (N,H,W), (N,H,W,C) or (N,C,H,W) as uint8 or float in [0,1], `y` integer labels, "
    "optional `split` (train/test or 0/1) and `classes`; or with x_train, y_train, x_test, y_test"
)


MAX_CLASSES = 100_000


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
        scale_uint8_into(dst, src)
    else:
        dst[...] = src


def _check_labels(y: np.ndarray, n: int, path: Path, key: str) -> np.ndarray:
    if y.ndim != 1 or len(y) != n:
        raise DatasetError(f"{path}: `{key}` has shape {y.shape}; expected ({n},) to match the images")
    if not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{path}: `{key}` has dtype {y.dtype}; expected integer class labels")
    if len(y) and int(y.min()) < 0:
        raise DatasetError(f"{path}: `{key}` has negative labels")
    if len(y) and int(y.max()) >= MAX_CLASSES:  # the class count is max + 1: 1e9 would build a 1e9-way layer
        raise DatasetError(
            f"{path}: `{key}` has label {int(y.max())}; labels must be class indices below {MAX_CLASSES}"
        )
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
    require_dir(root, dataset, _NPZ_EXPECTED)
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
class NpzArrays:
    x: np.ndarray
    y: np.ndarray
    origin: np.ndarray
    classes: list[str] | None


def _open_npz(path: Path) -> Any:
    """The npz archive (a context manager), or a one-line DatasetError saying what was expected."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{path}: cannot read npz ({one_line(exc)}); expected {_NPZ_EXPECTED}") from exc


def read_npz(path: Path, layout: str) -> NpzArrays:
    """Read images, labels and origin splits from an npz in either the (x, y, split) or the x_train/x_test form."""
    if layout not in ("auto", "nchw", "nhwc"):
        raise DatasetError(f"layout must be 'auto', 'nchw' or 'nhwc' (got {layout!r})")
    archive = _open_npz(path)
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
                f"{path}: {one_line(exc)} (object arrays are not read; store strings as unicode)"
            ) from exc
        except MemoryError as exc:  # a header may claim any shape (1e12 rows): refuse, do not crash
            raise DatasetError(
                f"{path}: an array's header claims more than memory holds ({one_line(exc)})"
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
    return NpzArrays(x_all, y_all, origin.astype(str), classes)


def count_npz_arrays(path: Path) -> dict[str, int]:
    """Examples per origin split of an npz, from its labels and `split` alone (the images are not read)."""
    archive = _open_npz(path)
    with archive:
        keys = set(archive.files)
        try:
            if {"x", "y"} <= keys:
                n = len(archive["y"])
                if "split" not in keys:
                    return {"train": n}
                origin = _parse_split(archive["split"], n, path)
                values, counts = np.unique(origin, return_counts=True)
                return {str(v): int(c) for v, c in zip(values, counts, strict=True)}
            if {"x_train", "y_train", "x_test", "y_test"} <= keys:
                return {"train": len(archive["y_train"]), "test": len(archive["y_test"])}
        except ValueError as exc:
            raise DatasetError(
                f"{path}: {one_line(exc)} (object arrays are not read; store strings as unicode)"
            ) from exc
    raise DatasetError(f"{path}: keys {sorted(keys)}; expected {_NPZ_EXPECTED}")


def _count_npz(
    root: Path | None = None, file: str | None = None, layout: str = "auto", **options: Any
) -> dict[str, int]:
    check_options("npz", options, ())
    if layout not in ("auto", "nchw", "nhwc"):
        raise DatasetError(f"layout must be 'auto', 'nchw' or 'nhwc' (got {layout!r})")
    if root is None:
        raise DatasetError(f"dataset 'npz' needs a path: set data.root to {_NPZ_EXPECTED}")
    return count_npz_arrays(_find_npz(root, "npz", file))


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
    check_options("npz", options, ())
    if root is None:
        raise DatasetError(f"dataset 'npz' needs a path: set data.root to {_NPZ_EXPECTED}")
    path = _find_npz(root, "npz", file)
    arrays = read_npz(path, layout)
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


register_dataset(
    DatasetInfo(
        name="npz",
        loader=load_npz,
        counter=_count_npz,
        needs_root=True,
        description="Any images + labels in an .npz file (x, y, optional split and classes)",
        expected_files=_NPZ_EXPECTED,
    )
)
