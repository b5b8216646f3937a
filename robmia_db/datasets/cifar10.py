"""CIFAR-10 from the python batches, an image-folder tree (PNG or a lossy JPEG copy), or an npz subset.

The batches are pickles read with an unpickler that only rebuilds numpy arrays. Pillow is imported lazily,
only for image trees.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robmia_db.datasets.base import DatasetInfo, LoadedDataset, register_dataset
from robmia_db.datasets.npz import count_npz_arrays, read_npz
from robmia_db.datasets.reading import (
    check_options,
    is_tar_name,
    list_tree,
    natural_key,
    one_line,
    peek_tar_names,
    read_tree,
    require_dir,
    scale_uint8_into,
    tars_in,
)
from robmia_db.errors import DatasetError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_TRAIN_SIZE, CIFAR10_TEST_SIZE = 50_000, 10_000
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm")
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
        raise DatasetError(f"{where}: not a CIFAR-10 python batch ({one_line(exc)})") from exc
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
        scale_uint8_into(x[start : start + len(data)], data.reshape(-1, 3, 32, 32))
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
        raise DatasetError(f"{where}: cannot decode image ({one_line(exc)})") from exc


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
    members = read_tree(path, lambda name: bool(_IMAGE_TREE.match(name)) and _is_image_name(name))
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
            names = sorted(grouped[(split, cls)], key=natural_key)
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
        scale_uint8_into(x[pos], chw)
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
    arrays = read_npz(path, "auto")
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
    names = peek_tar_names(path)
    if any(re.search(r"(^|/)(data_batch_\d|test_batch|batches\.meta)$", n) for n in names):
        return "batches"
    if any(re.search(r"(^|/)(train|test)(/|$)", n) for n in names):
        return "images"
    return "unknown"


_CIFAR_LAYOUTS = ("auto", "batches", "images", "npz")


def _cifar_source(root: Path | None, layout: str, options: dict[str, Any]) -> tuple[str, Path, Path | None]:
    """Which CIFAR-10 form to read: ("batches" | "images" | "npz", its path, an npz lying beside a tree)."""
    check_options("cifar10", options, ())
    if layout not in _CIFAR_LAYOUTS:
        raise DatasetError(
            f"dataset 'cifar10': layout must be one of {', '.join(_CIFAR_LAYOUTS)} (got {layout!r})"
        )
    if root is None:
        raise DatasetError(f"dataset 'cifar10' needs its files: {_CIFAR_EXPECTED}")
    require_dir(root, "cifar10", _CIFAR_EXPECTED)

    def wants(kind: str) -> bool:
        return layout in ("auto", kind)

    if root.is_file():
        if root.suffix == ".npz" and wants("npz"):
            return "npz", root, None
        if is_tar_name(root):
            kind = _tar_kind(root)
            if kind in ("batches", "images") and wants(kind):
                return kind, root, None
        forced = "" if layout == "auto" else f" (layout {layout!r})"
        raise DatasetError(f"{root}: not a CIFAR-10 file{forced}; expected {_CIFAR_EXPECTED}")
    npzs = sorted(root.glob("*.npz"))
    npz_beside = npzs[0] if len(npzs) == 1 else None
    batch_dir = _cifar_batch_dir(root)
    if batch_dir is not None and wants("batches"):
        return "batches", batch_dir, None
    tree_dir = _image_tree_dir(root)
    if tree_dir is not None and wants("images"):
        return "images", tree_dir, npz_beside
    for tar in tars_in(root):
        kind = _tar_kind(tar)
        if kind in ("batches", "images") and wants(kind):
            return kind, tar, npz_beside if kind == "images" else None
    if npzs and wants("npz"):
        if len(npzs) > 1:
            raise DatasetError(f"{root}: {len(npzs)} .npz files; keep one CIFAR-10 npz in the folder")
        return "npz", npzs[0], None
    raise DatasetError(
        f"{root}: no CIFAR-10 files{'' if layout == 'auto' else f' of layout {layout!r}'}; expected {_CIFAR_EXPECTED}"
    )


def load_cifar10(root: Path | None = None, layout: str = "auto", **options: Any) -> LoadedDataset:
    """CIFAR-10 from the python batches, an image-folder tree, or an npz (subset) file.

    Args:
        root: a folder (holding `cifar-10-batches-py/`, the batches themselves, a `train/`+`test/` image tree,
            tar archives of either, or an .npz), or one such archive or .npz file.
        layout: "auto" takes the first found of batches, image tree (folder, then tar) and npz; or force one.
        **options: none other are accepted.

    The source and notes say when the images came from a lossy JPEG copy or cover only a subset.
    """
    kind, path, npz_beside = _cifar_source(root, layout, options)
    if kind == "batches":
        return _load_batches_from(path)
    if kind == "images":
        return _cifar_from_image_tree(path, npz_beside)
    return _cifar_from_npz(path)


def count_cifar10(root: Path | None = None, layout: str = "auto", **options: Any) -> dict[str, int]:
    """Examples per split as `load_cifar10` gives them: image trees and npz files are counted without
    decoding an image; the python batches are read (they hold the counts only inside their pickles)."""
    kind, path, _ = _cifar_source(root, layout, options)
    if kind == "batches":
        return _load_batches_from(path).split_counts()
    if kind == "npz":
        return count_npz_arrays(path)
    matches = [m for m in map(_IMAGE_TREE.match, list_tree(path)) if m and _is_image_name(m.group("file"))]
    prefixes = {m.group("prefix") or "" for m in matches}
    if len(prefixes) > 1:
        raise DatasetError(
            f"{path}: several image trees found ({', '.join(sorted(prefixes))}); point root at one"
        )
    counts = {"train": 0, "test": 0}
    for m in matches:
        counts[m.group("split")] += 1
    return counts


def _load_batches_from(path: Path) -> LoadedDataset:
    wanted = set(_CIFAR_BATCHES) | {"batches.meta"}
    members = read_tree(path, lambda name: name.rsplit("/", 1)[-1] in wanted)
    return _cifar_from_batches(members.files, str(path))


register_dataset(
    DatasetInfo(
        name="cifar10",
        loader=load_cifar10,
        counter=count_cifar10,
        folder_names=("cifar-10", "CIFAR10", "cifar-10-batches-py"),
        needs_root=True,
        description="CIFAR-10, 10 classes, 32x32 RGB, 50,000 train / 10,000 test",
        expected_files=_CIFAR_EXPECTED,
    )
)
