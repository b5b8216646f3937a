"""Dataset layer: numpy-only loaders behind one registry (no torch, so `data describe` starts fast).

Imports nothing of ours but `errors`. Every loader returns a `LoadedDataset` with images as float32
N x C x H x W in [0, 1], int64 labels and each example's origin split ("train" / "test").
"""

from __future__ import annotations

from robmia_db.datasets.base import (
    DATASETS,
    DatasetInfo,
    LoadedDataset,
    count_dataset,
    dataset_names,
    load_dataset,
    register_dataset,
)

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "LoadedDataset",
    "count_dataset",
    "dataset_names",
    "load_dataset",
    "register_dataset",
]
