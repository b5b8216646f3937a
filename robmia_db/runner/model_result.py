"""Runner layer: one model's work (train it or load its checkpoint, then its signals) and its one write.

A worker (this process, or a Ray task elsewhere) builds a `ModelResult` and writes nothing; the driver
alone stores it, checkpoint first, then every row in one transaction, or records the model as failed.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from robmia_db.datasets import LoadedDataset
from robmia_db.errors import RobmiaError
from robmia_db.runner.checkpoints import check_finite, file_sha256, load_verified
from robmia_db.runner.data import examples_table, split_membership
from robmia_db.runner.models import checkpoint_bytes, save_checkpoint, write_atomically
from robmia_db.runner.reporting import ModelOutcome, Reporter
from robmia_db.runner.signals import compute_signal_columns
from robmia_db.runner.training import train_model
from robmia_db.spec import ModelJob
from robmia_db.store import ingest
from robmia_db.store.connection import resolved, writing
from robmia_db.store.signals import signal_table
from robmia_db.store.tables import Model
from robmia_db.testhooks import fail_point, kill_point, wait_point


def _model_record(job, dataset, split, checkpoint, provenance, started_at, train_seconds, history, device):
    return Model(
        model_key=job.model_key, model_name=job.model_name, experiment=job.experiment, origin="trained",
        dataset=job.dataset, arch=job.arch, width=job.width, defense=job.defense, eps=job.eps, seed=job.seed,
        model_index=job.model_index, membership_scheme=job.identity["membership"]["scheme"],
        n_members=len(split.member_ids) if split else None, n_nonmembers=len(split.nonmember_ids) if split else None,
        n_classes=dataset.n_classes if dataset else None,
        input_shape=list(dataset.input_shape) if dataset else None, config=job.identity,
        checkpoint=str(checkpoint) if checkpoint else None,
        dataset_checksum=None, git_commit=provenance[0], git_dirty=provenance[1],
        package_versions=provenance[2], host=socket.gethostname(), device=str(device), started_at=started_at,
        finished_at=datetime.now(timezone.utc), train_seconds=train_seconds, train_history=history,
        spec_path=job.spec_path, spec_text=job.spec_text,
    )  # fmt: skip


@dataclass
class ModelResult:
    """Everything one model produced, ready for the driver's single write transaction.

    A worker (this process, or a Ray task on another machine) builds it; only the driver writes the store.
    `checkpoint_bytes` is set when the worker hands the checkpoint over instead of writing
    `checkpoint_path` itself (a worker without the driver's filesystem).
    """

    job: ModelJob
    action: str
    record: Model
    membership: pa.Table | None
    examples: pa.Table | None
    perturbations: list[ingest.PerturbationRecord]
    accuracies: dict[str, float | None]
    checkpoint_path: Path
    checkpoint_bytes: bytes | None = None
    seconds: float = 0.0


def compute_model(
    job: ModelJob,
    action: str,
    existing_signal_keys: set[str],
    dataset: LoadedDataset,
    checkpoints: Path,
    device: torch.device,
    reporter: Reporter,
    provenance: tuple,
    eval_batch_size: int,
    *,
    dataset_checksum: str | None = None,
    prior_checkpoint: bytes | None = None,
    checkpoint_as_bytes: bool = False,
    stored_checkpoint: Path | None = None,
    checkpoint_sha256: str | None = None,
    retrain: bool = False,
) -> ModelResult:
    """Train one model (or load its checkpoint) and compute its signals; writes nothing to the store.

    `prior_checkpoint` is a finished checkpoint the driver already holds (models that only need new
    perturbations, or a checkpoint stored before a kill); without it the checkpoint folder is looked at.
    With `checkpoint_as_bytes` the new checkpoint is returned, not written, and the partial checkpoint is
    left for the driver to remove once the final one is safely on its disk. A reused checkpoint must match
    `checkpoint_sha256` (what the store recorded) and its own model key and architecture; `stored_checkpoint`
    is where the store found it (a renamed store keeps finding its old folder). `retrain` ignores it.
    """
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc)
    split = split_membership(dataset, job.identity)
    checkpoint = checkpoints / f"{job.model_key}.pt"
    train_seconds = None
    history: list[dict[str, Any]] = []
    content = None
    if action == "train" and (retrain or (prior_checkpoint is None and not checkpoint.exists())):
        partial = checkpoints / f"{job.model_key}.partial.pt"
        if retrain:
            partial.unlink(missing_ok=True)
        t0 = time.perf_counter()
        model, history = train_model(job, dataset, split, device, reporter, partial)
        # the time before an interruption counts: a resumed model reports its whole training time
        train_seconds = max(time.perf_counter() - t0, history[-1]["elapsed_seconds"] if history else 0.0)
        meta = {
            "arch": job.arch, "input_shape": list(dataset.input_shape), "n_classes": dataset.n_classes,
            "width": job.width, "options": job.identity["model"]["options"], "model_key": job.model_key,
        }  # fmt: skip
        if checkpoint_as_bytes:
            content = checkpoint_bytes(model, meta)
        else:
            save_checkpoint(checkpoint, model, meta)
            partial.unlink(missing_ok=True)
    else:
        # a finished checkpoint without its store rows (killed between the two) is reused, not retrained
        # either way the file must prove to be this model's before signals are stored under its key
        shown = stored_checkpoint or checkpoint
        source = prior_checkpoint if prior_checkpoint is not None else shown
        model = load_verified(source, job, dataset, checkpoint_sha256, device, shown)
    wanted = [p for p in job.perturbations if action == "train" or p.signal_key not in existing_signal_keys]
    ids = split.evaluated_ids
    is_member = split.is_member
    x_eval = torch.from_numpy(dataset.x[ids]).to(device)
    y_eval = torch.from_numpy(dataset.y[ids]).to(device)
    records = []
    accuracies: dict[str, float | None] = {}
    for index, perturbation in enumerate(wanted):
        reporter.perturbation_started(job, perturbation, index, len(wanted))
        t0 = time.perf_counter()
        columns = compute_signal_columns(model, x_eval, y_eval, perturbation.settings, eval_batch_size)
        check_finite(columns, job, perturbation)
        table = signal_table(perturbation.signal_key, job.model_key, ids, dataset.y[ids], is_member, columns)
        record = ingest.PerturbationRecord(
            perturbation.signal_key, job.model_key, perturbation.name, perturbation.kind, perturbation.eps,
            perturbation.settings, table, time.perf_counter() - t0,
        )  # fmt: skip
        records.append(record)
        member_acc, nonmember_acc = ingest.perturbation_accuracies(table)
        accuracies[f"{perturbation.name}_train_acc"] = member_acc
        accuracies[f"{perturbation.name}_test_acc"] = nonmember_acc
    model_record = _model_record(
        job, dataset, split, checkpoint, provenance, started_at, train_seconds, history, device
    )
    model_record.dataset_checksum = dataset_checksum
    return ModelResult(
        job=job,
        action=action,
        record=model_record,
        membership=split.table() if action == "train" else None,
        examples=examples_table(dataset, ids) if action == "train" else None,
        perturbations=records,
        accuracies=accuracies,
        checkpoint_path=checkpoint,
        checkpoint_bytes=content,
        seconds=time.perf_counter() - started,
    )


def store_result(db_path: Path, result: ModelResult) -> ModelOutcome:
    """The driver's part: the checkpoint onto its disk first, then the model's rows in one transaction.

    In that order a kill between the two leaves a checkpoint without rows, which the rerun reuses.
    """
    started = time.perf_counter()
    if result.checkpoint_bytes is not None:
        write_atomically(result.checkpoint_path, result.checkpoint_bytes)
        result.checkpoint_path.with_name(f"{result.job.model_key}.partial.pt").unlink(missing_ok=True)
    if result.membership is not None:  # a new checkpoint: record where (relative to the store) and its hash
        result.record.checkpoint = os.path.relpath(result.checkpoint_path, resolved(db_path).parent)
        result.record.checkpoint_sha256 = file_sha256(result.checkpoint_path)
    wait_point("model-ready")
    fail_point("model-write")
    # a finished model is never dropped because a reader holds the store: wait for it, saying whom for
    with writing(db_path, wait_forever=True, on_wait=_waiting) as con:
        ingest.write_model(con, result.record, result.membership, result.examples, result.perturbations)
    kill_point("model-written")
    seconds = result.seconds + time.perf_counter() - started
    return ModelOutcome(result.job, result.action, seconds, accuracies=result.accuracies)


def _waiting(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def failure_text(exc: BaseException) -> tuple[str, str]:
    """The one-line message and what v_models.error records: our own errors as their message (the epoch a
    model diverged at, a checkpoint that is not its own), anything else with its traceback's tail."""
    if isinstance(exc, RobmiaError):
        return str(exc).splitlines()[0], str(exc)
    detail = "".join(traceback.format_exception(exc))[-4000:]
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else ""), detail
    return f"{type(exc).__name__}: {exc}".splitlines()[0], detail


def store_failure(
    db_path: Path,
    job: ModelJob,
    exc: BaseException | tuple[str, str],
    provenance: tuple,
    device: torch.device | str,
) -> ModelOutcome:
    """Record a model that failed for its own reasons, with its traceback; the run goes on.

    `exc` is the exception, or (message, traceback text) when it was raised in another process.
    """
    message, error = exc if isinstance(exc, tuple) else failure_text(exc)
    record = _model_record(job, None, None, None, provenance, None, None, [], device)
    record.error = error
    outcome = ModelOutcome(job, "failed", error=message)
    try:
        # waits for a reader like a finished model does; if it still fails the outcome says so, so the
        # summary never points at an error column that stays empty
        with writing(db_path, wait_forever=True, on_wait=_waiting) as con:
            ingest.write_failed_model(con, record)
    except (RobmiaError, OSError) as write_error:
        outcome.error = f"{message} (and the failure could not be recorded: {write_error})"
    return outcome
