"""Runner layer: checkpoint files: where they are, proof that a file is its model's, and leftover cleanup.

A checkpoint is trusted only after its sha256 (recorded in `models.checkpoint_sha256` when it was written)
and its own record (model key, architecture, width, input shape, classes) match the model it is used for:
swapped files or an MLP's checkpoint under a CNN's key fail that model instead of storing wrong signals.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Any

from robmia_db.datasets import LoadedDataset
from robmia_db.errors import CheckpointError, TrainingDivergedError
from robmia_db.runner.models import load_checkpoint
from robmia_db.spec import ModelJob, PerturbationJob
from robmia_db.store.connection import checkpoint_dir, resolved
from robmia_db.store.scratch import pid_alive

LEFTOVER_AGE_S = 24 * 3600.0  # a tmp file this old is a leftover even if its PID was reused since


def clean_leftovers(folder: Path) -> list[Path]:
    """Remove `*.tmp<PID>` files that a killed or disk-full run left; called under the run lock.

    A file of a live process is kept unless it is older than a day (then its PID was reused).
    """
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for tmp in folder.glob("*.tmp*"):
        match = re.fullmatch(r".+\.tmp(\d+)", tmp.name)
        if not match:
            continue
        try:
            age = time.time() - tmp.stat().st_mtime
        except OSError:
            continue
        if pid_alive(int(match.group(1))) and age < LEFTOVER_AGE_S:
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_location(db_path: Path, model_key: str, stored: str | None) -> Path:
    """Where a model's checkpoint is: beside the store, else where the store recorded it.

    New records hold the path relative to the store's folder, so a renamed store still finds the
    checkpoints of its old name; older records hold an absolute path.
    """
    default = checkpoint_dir(db_path) / f"{model_key}.pt"
    if default.exists() or not stored:
        return default
    recorded = Path(stored)
    if not recorded.is_absolute():
        recorded = resolved(db_path).parent / recorded
    return recorded if recorded.exists() else default


def _retrain_hint(job: ModelJob) -> str:
    return f"retrain it with `robmia-db run {job.spec_path} --retrain {job.model_key}`"


def load_verified(
    source: Path | bytes, job: ModelJob, dataset: LoadedDataset, sha256: str | None, device, shown: Path
):
    """Load a stored checkpoint (a file, or its bytes read by the driver) after checking it is this model's:
    the recorded sha256 and the file's own record. `shown` is the path named in messages."""
    if isinstance(source, Path) and not source.exists():
        raise CheckpointError(
            f"the checkpoint of {job.model_name} ({job.model_key}) is missing (looked for {shown}); "
            + _retrain_hint(job)
        )
    found = hashlib.sha256(source).hexdigest() if isinstance(source, bytes) else file_sha256(source)
    if sha256 and found != sha256:
        raise CheckpointError(
            f"{shown} is not the checkpoint recorded for {job.model_name} ({job.model_key}): its sha256 "
            f"differs (swapped or replaced?); restore it, or {_retrain_hint(job)}"
        )
    expect = {
        "model_key": job.model_key, "arch": job.arch, "width": job.width,
        "input_shape": list(dataset.input_shape), "n_classes": dataset.n_classes,
    }  # fmt: skip
    try:
        model, _ = load_checkpoint(source, device, expect=expect)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{str(exc).replace('the checkpoint', str(shown), 1)}; {_retrain_hint(job)}"
        ) from None
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"{shown} cannot be loaded ({type(exc).__name__}: {first}); {_retrain_hint(job)}"
        ) from None
    return model


def check_finite(columns: dict[str, Any], job: ModelJob, perturbation: PerturbationJob) -> None:
    import numpy as np

    for name in ("loss", "confidence"):
        values = np.asarray(columns[name], dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            raise TrainingDivergedError(
                f"signals of {perturbation.name!r} are not finite ({int(bad.sum())} of {len(values)} {name} "
                f"values NaN or infinite): the model's outputs diverged"
            )
