"""Dataset layer: a summary of one loaded dataset (counts, shape, classes, range, checksum); numpy only."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from robmia_db.datasets.base import get_dataset_info, load_dataset
from robmia_db.errors import DatasetError

SPLIT_ORDER = ("train", "test")


def _check_loader_accepts(name: str, loader: Callable[..., Any], options: dict[str, Any]) -> None:
    """Turn options a loader cannot take into a DatasetError instead of a TypeError from the call."""
    if not options:
        return
    params = inspect.signature(loader).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"root"}
    unknown = sorted(set(options) - named)
    if unknown:
        raise DatasetError(
            f"dataset {name!r}: unknown option(s) {', '.join(unknown)} (allowed: {', '.join(sorted(named)) or 'none'})"
        )


def describe_dataset(name: str, root: str | Path | None = None, **options: Any) -> dict[str, Any]:
    """Load a registered dataset and summarise it.

    Args:
        name: registry name (`digits`, `fashion_mnist`, `mnist`, `cifar10`, `yale`, `npz`).
        root: where its files are (else the spec's/`$ROBMIA_DATA` rules of `load_dataset`).
        **options: passed to the loader (e.g. `split_seed` for `yale`, `layout` for `cifar10`).

    Returns:
        A JSON-ready dict: name, description, source, notes, n_examples, splits (per split: n and
        class_counts), shape [C, H, W], n_classes, classes, value_range [min, max], pixel_mean, checksum
        (sha256 of images, labels and splits) and loader_version.

    Raises:
        DatasetError: unknown name, or missing or malformed files.
    """
    info = get_dataset_info(name)
    _check_loader_accepts(name, info.loader, options)
    dataset = load_dataset(name, root, **options)
    origin = dataset.origin_split.astype(str)
    present = [s for s in SPLIT_ORDER if (origin == s).any()]
    present += sorted(set(origin.tolist()) - set(SPLIT_ORDER))
    splits = {}
    for split in present:
        labels = dataset.y[origin == split]
        counts = np.bincount(labels, minlength=dataset.n_classes)
        splits[split] = {"n": int(len(labels)), "class_counts": [int(c) for c in counts]}
    x = dataset.x
    return {
        "name": dataset.name,
        "description": info.description,
        "source": dataset.source,
        "notes": list(dataset.notes),
        "n_examples": int(len(dataset.y)),
        "splits": splits,
        "shape": list(dataset.input_shape),
        "n_classes": dataset.n_classes,
        "classes": list(dataset.classes),
        "value_range": [float(x.min()), float(x.max())] if x.size else [None, None],
        "pixel_mean": float(x.mean(dtype=np.float64)) if x.size else None,
        "checksum": dataset.checksum(),
        "loader_version": info.loader_version,
    }


def format_description(summary: dict[str, Any]) -> str:
    """Render `describe_dataset`'s dict as aligned `key  value` lines for a terminal."""
    splits = summary["splits"]
    split_text = " / ".join(f"{s} {v['n']:,}" for s, v in splits.items())
    low, high = summary["value_range"]
    classes = summary["classes"]
    class_text = ", ".join(classes[:12]) + (f", ... ({len(classes)} in all)" if len(classes) > 12 else "")
    rows = [
        ("dataset", summary["name"]),
        ("source", summary["source"]),
        ("examples", f"{summary['n_examples']:,} ({split_text})"),
        ("shape", " x ".join(str(d) for d in summary["shape"]) + " (C x H x W)"),
        ("classes", f"{summary['n_classes']}: {class_text}"),
    ]
    for split, values in splits.items():
        counts = values["class_counts"]
        rows.append((f"per class ({split})", f"min {min(counts):,}, max {max(counts):,}" if counts else "-"))
    rows += [
        ("value range", f"[{low:.4g}, {high:.4g}]" if low is not None else "-"),
        ("pixel mean", f"{summary['pixel_mean']:.4f}" if summary["pixel_mean"] is not None else "-"),
        ("sha256", summary["checksum"]),
    ]
    rows += [("note", note) for note in summary["notes"]]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)
