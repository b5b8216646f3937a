"""Cropped Extended Yale B (PGM files, a folder or a tar archive), split per subject as the paper's authors did."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from robmia_db.datasets.base import DatasetInfo, LoadedDataset, register_dataset
from robmia_db.datasets.reading import (
    check_options,
    list_tree,
    read_tree,
    require_dir,
    scale_uint8_into,
    tars_in,
)
from robmia_db.errors import DatasetError

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
    require_dir(root, "yale", _YALE_EXPECTED)
    for candidate in (root / "CroppedYale", root):
        if candidate.is_dir() and any(p.is_dir() and p.name.startswith("yaleB") for p in candidate.iterdir()):
            return candidate
    tars = tars_in(root)
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


def count_yale(
    root: Path | None = None, split_seed: int = 0, train_per_class: int = YALE_TRAIN_PER_CLASS, **options: Any
) -> dict[str, int]:
    """Examples per split as `load_yale` gives them, from the file names alone (no image is decoded)."""
    source = _checked_source(root, split_seed, train_per_class, options)
    subjects = [int(m.group("subject")) for m in map(_YALE_IMAGE.search, list_tree(source)) if m]
    if not subjects:
        raise DatasetError(f"{source}: no yaleBNN/yaleBNN_P00A...pgm images found; expected {_YALE_EXPECTED}")
    subject_ids, counts = np.unique(np.array(subjects), return_counts=True)
    _check_subject_counts(source, subject_ids, counts, train_per_class)
    n_train = len(subject_ids) * train_per_class
    return {"train": n_train, "test": len(subjects) - n_train}


def _checked_source(
    root: Path | None, split_seed: Any, train_per_class: Any, options: dict[str, Any]
) -> Path:
    check_options("yale", options, ())
    if root is None:
        raise DatasetError(f"dataset 'yale' needs its files: {_YALE_EXPECTED}")
    if not isinstance(train_per_class, int) or train_per_class < 1:
        raise DatasetError(
            f"dataset 'yale': train_per_class must be a positive integer (got {train_per_class!r})"
        )
    if not isinstance(split_seed, int) or split_seed < 0:
        raise DatasetError(f"dataset 'yale': split_seed must be a non-negative integer (got {split_seed!r})")
    return _yale_source(root)


def _check_subject_counts(
    source: Path, subject_ids: np.ndarray, counts: np.ndarray, train_per_class: int
) -> None:
    for subject, count in zip(subject_ids.tolist(), counts.tolist(), strict=True):
        if count < train_per_class:
            raise DatasetError(
                f"{source}: yaleB{subject:02d} has {count} images, fewer than train_per_class={train_per_class}"
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
    source = _checked_source(root, split_seed, train_per_class, options)
    ambient: list[str] = []

    def wanted(name: str) -> bool:
        if _YALE_AMBIENT.search(name):
            ambient.append(name)
            return False
        return bool(_YALE_IMAGE.search(name))

    members = read_tree(source, wanted)
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
    _check_subject_counts(source, subject_ids, counts, train_per_class)
    train_i, train_l, test_i, test_l = yale_split(subjects, split_seed, train_per_class)
    order = np.concatenate([train_i, test_i])
    x = np.empty((len(order), 1, *shape), dtype=np.float32)
    for pos, index in enumerate(order):
        scale_uint8_into(x[pos, 0], images[index])
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


register_dataset(
    DatasetInfo(
        name="yale",
        loader=load_yale,
        counter=count_yale,
        folder_names=("extended-yale-b-cropped", "CroppedYale", "extended_yale_b"),
        needs_root=True,
        description="Extended Yale B cropped faces, 38 subjects, 192x168 grayscale, split 1,900 / 514 as the paper",
        expected_files=_YALE_EXPECTED,
    )
)
