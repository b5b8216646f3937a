"""Dataset registry and the common in-memory form every loader returns (numpy only)."""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robmia_db.errors import DatasetError

DATA_ROOT_ENV = "ROBMIA_DATA"


@dataclass
class LoadedDataset:
    """A dataset in memory.

    Attributes:
        name: registry name (`digits`, `fashion_mnist`, ...).
        x: float32 images, N x C x H x W, scaled to [0, 1].
        y: int64 labels in [0, n_classes).
        origin_split: per-example origin, "train" or "test" (numpy array of str).
        classes: class names, index = label.
        source: what was read, for humans (path, format, "JPEG copy", "subset of ...").
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    origin_split: np.ndarray
    classes: list[str]
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x.shape[1:])  # type: ignore[return-value]

    def checksum(self) -> str:
        """sha256 over images, labels and origin splits: identical data gives an identical digest."""
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.x, dtype=np.float32))
        digest.update(np.ascontiguousarray(self.y, dtype=np.int64))
        digest.update("\n".join(self.origin_split.astype(str).tolist()).encode())
        return digest.hexdigest()

    def split_counts(self) -> dict[str, int]:
        values, counts = np.unique(self.origin_split.astype(str), return_counts=True)
        return {str(v): int(c) for v, c in zip(values, counts)}


@dataclass(frozen=True)
class DatasetInfo:
    """A registry entry: how to load one dataset and what to tell a user who lacks its files."""

    name: str
    loader: Callable[..., LoadedDataset]
    needs_root: bool
    description: str
    expected_files: str = ""
    loader_version: int = 1
    # split sizes from file headers or names alone, so `check` can test membership sizes without decoding
    # images; None loads the dataset instead (cheap for the embedded one)
    counter: Callable[..., dict[str, int]] | None = None
    # folder names looked for under $ROBMIA_DATA besides `name` (the names the data is distributed under)
    folder_names: tuple[str, ...] = ()


DATASETS: dict[str, DatasetInfo] = {}
_BUILTIN_MODULES = (
    "robmia_db.datasets.digits",
    "robmia_db.datasets.idx",
    "robmia_db.datasets.npz",
    "robmia_db.datasets.cifar10",
    "robmia_db.datasets.yale",
)
_loaded_builtins = False


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    DATASETS[info.name] = info
    return info


def _ensure_builtins() -> None:
    global _loaded_builtins
    if _loaded_builtins:
        return
    _loaded_builtins = True
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def dataset_names() -> list[str]:
    _ensure_builtins()
    return sorted(DATASETS)


def get_dataset_info(name: str) -> DatasetInfo:
    _ensure_builtins()
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r} (known: {', '.join(sorted(DATASETS))})")
    return DATASETS[name]


def resolve_root(name: str, root: str | Path | None) -> Path | None:
    """The folder to read `name` from: the spec's `data.root`, else $ROBMIA_DATA/<name> (or one of the
    dataset's usual folder names, e.g. `extended-yale-b-cropped`), else $ROBMIA_DATA."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(DATA_ROOT_ENV)
    if not env:
        return None
    base = Path(env).expanduser()
    folders = (name, *get_dataset_info(name).folder_names) if name in DATASETS else (name,)
    for folder in folders:
        if (base / folder).exists():
            return base / folder
    return base


def _resolved(name: str, root: str | Path | None) -> tuple[DatasetInfo, Path | None]:
    info = get_dataset_info(name)
    resolved = resolve_root(name, root)
    if info.needs_root and resolved is None:
        raise DatasetError(
            f"dataset {name!r} needs its files: set data.root in the spec or {DATA_ROOT_ENV}"
            + (f" ({info.expected_files})" if info.expected_files else "")
        )
    return info, resolved


def _call(name: str, function: Callable[..., Any], root: Path | None, options: dict[str, Any]) -> Any:
    try:
        return function(root, **options)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        raise DatasetError(
            f"dataset {name!r} takes no option {str(exc).split('argument')[-1].strip()}"
        ) from None


def load_dataset(name: str, root: str | Path | None = None, **options) -> LoadedDataset:
    """Load a registered dataset; raises DatasetError with a one-line, actionable message."""
    info, resolved = _resolved(name, root)
    dataset = _call(name, info.loader, resolved, options)
    _check_loaded(dataset)
    return dataset


def count_dataset(name: str, root: str | Path | None = None, **options) -> dict[str, int]:
    """Examples per origin split ({"train": n, "test": m}) as `load_dataset` would give them, read from
    file headers or file names where the format allows (no image is decoded), else by loading.

    Raises:
        DatasetError: as `load_dataset` would for missing files, unknown options or inconsistent counts.
    """
    info, resolved = _resolved(name, root)
    if info.counter is None:
        return _call(name, info.loader, resolved, options).split_counts()
    return _call(name, info.counter, resolved, options)


def _check_loaded(ds: LoadedDataset) -> None:
    n = len(ds.y)
    if ds.x.ndim != 4 or ds.x.shape[0] != n or len(ds.origin_split) != n:
        raise DatasetError(f"dataset {ds.name!r}: loader returned inconsistent shapes {ds.x.shape}, {n}")
    if ds.x.dtype != np.float32:
        raise DatasetError(f"dataset {ds.name!r}: images must be float32, got {ds.x.dtype}")
