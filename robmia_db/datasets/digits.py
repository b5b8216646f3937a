"""The embedded default: scikit-learn's 1,797 8x8 digits, scaled from 0..16 to [0, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from robmia_db.datasets.base import DatasetInfo, LoadedDataset, register_dataset


def load_digits_dataset(root: Path | None = None) -> LoadedDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    y = bunch.target.astype(np.int64)
    # digits has no official split: the membership scheme draws members from the whole pool.
    origin = np.full(len(y), "train", dtype=object)
    return LoadedDataset(
        name="digits",
        x=np.ascontiguousarray(x),
        y=y,
        origin_split=origin.astype(str),
        classes=[str(c) for c in range(10)],
        source="scikit-learn load_digits (embedded, 1,797 images)",
    )


register_dataset(
    DatasetInfo(
        name="digits",
        loader=load_digits_dataset,
        needs_root=False,
        description="scikit-learn's 1,797 8x8 grayscale digits, 10 classes (embedded, no download)",
    )
)
