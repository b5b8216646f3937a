"""Runner layer: validate every spec, then train what is missing and record signals, one model at a time.

Order of work: all specs are validated and every job's dataset and architecture are checked before any
training. The store is opened only for short transactions (reading state, writing a finished model), so
`robmia-db sql`, `score` and `report` work on finished models while training goes on; a run lock keeps a
second run out. A model is written in one transaction, so a kill leaves either all of it or none of it;
training also keeps a partial checkpoint so a killed run resumes mid-training.
"""

from __future__ import annotations

import math
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import torch

from robmia_db.datasets import LoadedDataset, load_dataset
from robmia_db.errors import RobmiaError, SpecError, SpecErrors, TrainingDivergedError, UnfinishedStoreError
from robmia_db.runner.checkpoints import (
    check_finite,
    checkpoint_location,
    clean_leftovers,
    file_sha256,
    load_verified,
)
from robmia_db.runner.data import MembershipSplit, examples_table, split_membership
from robmia_db.runner.defenses import TrainProgress, build_defense
from robmia_db.runner.models import (
    build_model,
    checkpoint_bytes,
    save_checkpoint,
    write_atomically,
)
from robmia_db.runner.signals import compute_signal_columns
from robmia_db.spec import LoadedSpec, ModelJob, PerturbationJob, load_specs
from robmia_db.spec.identity import config_differences
from robmia_db.store import ingest
from robmia_db.store.connection import checkpoint_dir, resolved, run_lock, writing
from robmia_db.store.signals import signal_table
from robmia_db.store.tables import Model
from robmia_db.testhooks import fail_point, kill_point, wait_point

PARTIAL_SAVE_INTERVAL_S = 30.0


class Reporter(Protocol):
    def plan(self, jobs: list[ModelJob], actions: dict[str, str]) -> None: ...
    def model_started(self, job: ModelJob, index: int, total: int, action: str) -> None: ...
    def epoch_done(self, job: ModelJob, epoch: int, epochs: int, stats: dict[str, float]) -> None: ...
    def perturbation_started(
        self, job: ModelJob, perturbation: PerturbationJob, index: int, total: int
    ) -> None: ...
    def model_finished(self, outcome: ModelOutcome) -> None: ...

    # Optional (called only when a reporter defines them, so older reporters keep working):
    #   run_context(parallel: int, estimates: dict[model_key, seconds | None]) before the first model
    #     (parallel 0: not known yet); set_parallel(n) once an executor knows how many models run at once;
    #   training_resumed(job, epoch, epochs) when a partial checkpoint is used.


def notify(reporter: Reporter, event: str, *args: Any) -> None:
    """Call one of the reporter's optional methods if it has it."""
    method = getattr(reporter, event, None)
    if method is not None:
        method(*args)


class SilentReporter:
    def plan(self, jobs, actions):
        pass

    def model_started(self, job, index, total, action):
        pass

    def epoch_done(self, job, epoch, epochs, stats):
        pass

    def perturbation_started(self, job, perturbation, index, total):
        pass

    def model_finished(self, outcome):
        pass


@dataclass
class ModelOutcome:
    job: ModelJob
    action: str  # "train", "signals" (add perturbations), "skip", "failed"
    seconds: float = 0.0
    error: str | None = None
    accuracies: dict[str, float | None] = field(default_factory=dict)


@dataclass
class NameChange:
    """A name that now maps to a different model key than a stored model of that name (an edited spec)."""

    model_name: str
    model_key: str
    stored_key: str
    differences: list[str]

    def describe(self) -> str:
        what = "; ".join(self.differences) or "the same settings (the training code version differs)"
        return (
            f"{self.model_name} now names model {self.model_key}; the stored model {self.stored_key} keeps "
            f"that name too. Differences: {what}"
        )


@dataclass
class RunSummary:
    db_path: Path
    outcomes: list[ModelOutcome]
    name_changes: list[NameChange] = field(default_factory=list)

    @property
    def failed(self) -> list[ModelOutcome]:
        return [o for o in self.outcomes if o.action == "failed"]


def _git_provenance() -> tuple[str | None, bool | None]:
    source = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return None, None
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
        return commit.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def _package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("robmia-db", "torch", "numpy", "duckdb", "pyarrow", "scikit-learn"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def resolve_device(requested: str | None) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` (one chosen GPU); a GPU that is not there is an error, not a fallback."""
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as exc:
        raise RobmiaError(f"device {requested!r}: expected auto, cpu, cuda or cuda:N") from exc
    if device.type not in ("cpu", "cuda"):
        raise RobmiaError(f"device {requested!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RobmiaError(f"device {requested!r}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RobmiaError(
                f"device {requested!r}: only {torch.cuda.device_count()} CUDA device(s) (cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1})"
            )
    return device


class DatasetCache:
    """Each dataset is read once per run, whatever the number of models that use it."""

    def __init__(self) -> None:
        self._cache: dict[tuple, LoadedDataset] = {}
        self._checksums: dict[int, str] = {}

    def checksum(self, dataset: LoadedDataset) -> str:
        """sha256 of what was read, once per dataset per run (recorded with every model trained on it)."""
        if id(dataset) not in self._checksums:
            self._checksums[id(dataset)] = dataset.checksum()
        return self._checksums[id(dataset)]

    def get(self, job: ModelJob) -> LoadedDataset:
        options = job.identity["dataset"].get("options") or {}
        key = (job.dataset, job.data_root, tuple(sorted(options.items())))
        if key not in self._cache:
            self._cache[key] = load_dataset(job.dataset, job.data_root, **options)
        return self._cache[key]


def _located(path: Path, key: str, exc: Exception) -> SpecError:
    """A SpecError under `key`, unless the message already names its own dotted key."""
    message = str(exc)
    head = message.split(":", 1)[0]
    top = key.split(".")[0]
    # a dotted key of this section (`data.root`), not a path that merely starts with its name (`data/x.npz`)
    if (head == top or head.startswith((top + ".", top + "["))) and " " not in head:
        return SpecError(path, None, message)
    return SpecError(path, key, message)


def preflight(loaded: list[LoadedSpec], datasets: DatasetCache) -> None:
    """Check what validation of the TOML alone cannot: data present, architectures build, bounds apply."""
    errors: list[SpecError] = []
    for item in loaded:
        seen: set[tuple] = set()
        for job in item.jobs:
            try:
                dataset = datasets.get(job)
            except RobmiaError as exc:
                errors.append(SpecError(item.path, "data.dataset", str(exc)))
                break
            try:
                split_membership(dataset, job.identity)
            except RobmiaError as exc:
                errors.append(_located(item.path, "membership", exc))
                break
            arch_key = (job.arch, job.width)
            if arch_key in seen:
                continue
            seen.add(arch_key)
            try:
                with torch.device("meta"):
                    model = build_model(
                        job.arch,
                        dataset.input_shape,
                        dataset.n_classes,
                        job.width,
                        job.identity["model"]["options"],
                    )
            except RobmiaError as exc:
                errors.append(_located(item.path, "model", exc))
                continue
            except TypeError as exc:
                errors.append(_located(item.path, "model.options", exc))
                continue
            if any(p.kind == "verified" for p in job.perturbations):
                try:
                    from robmia_db.runner import bounds

                    bounds.check_supported(model)
                except RobmiaError as exc:
                    errors.append(SpecError(item.path, "signals", f"verified signals: {exc}"))
    if errors:
        raise SpecErrors(errors)


def plan_actions(jobs: list[ModelJob], existing: dict[str, dict[str, Any]]) -> dict[str, str]:
    actions = {}
    for job in jobs:
        state = existing.get(job.model_key)
        if state is None or state["status"] != "completed":
            actions[job.model_key] = "train"
        elif any(p.signal_key not in state["signal_keys"] for p in job.perturbations):
            actions[job.model_key] = "signals"
        else:
            actions[job.model_key] = "skip"
    return actions


def _make_optimizer(model: torch.nn.Module, identity: dict[str, Any]):
    config = identity["training"]["optimizer"]
    if config["name"] == "sgd":
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=config["lr"],
            momentum=config["momentum"],
            weight_decay=config["weight_decay"],
        )
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    schedule = identity["training"]["lr_schedule"]
    epochs = identity["training"]["epochs"]
    if schedule["name"] == "multistep":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, schedule["milestones"], schedule["gamma"])
    elif schedule["name"] == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    else:
        scheduler = None
    return optimizer, scheduler


def train_model(
    job: ModelJob,
    dataset: LoadedDataset,
    split: MembershipSplit,
    device: torch.device,
    reporter: Reporter,
    partial_path: Path | None = None,
) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """Train one model on its members. Resumes from `partial_path` when a killed run left one."""
    identity = job.identity
    training = identity["training"]
    torch.manual_seed(training["seed"])
    model = build_model(
        job.arch, dataset.input_shape, dataset.n_classes, job.width, identity["model"]["options"]
    )
    model = model.to(device)
    defense = build_defense(job.defense, training["params"], training["eps"])
    optimizer, scheduler = _make_optimizer(model, identity)
    x = torch.from_numpy(dataset.x[split.member_ids]).to(device)
    y = torch.from_numpy(dataset.y[split.member_ids]).to(device)
    n = len(y)
    batch_size = int(training["batch_size"])
    steps_per_epoch = (n + batch_size - 1) // batch_size
    epochs = int(training["epochs"])
    order = torch.Generator(device="cpu").manual_seed(training["seed"])
    history: list[dict[str, Any]] = []
    start_epoch = 0
    elapsed_before = 0.0  # training seconds spent before an interruption, kept across resumes
    if partial_path is not None and partial_path.exists():
        state = torch.load(partial_path, map_location=device, weights_only=True)
        if state.get("model_key") == job.model_key:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state.get("scheduler") is not None:
                scheduler.load_state_dict(state["scheduler"])
            order.set_state(state["order_rng"])
            torch.set_rng_state(state["torch_rng"])
            history = list(state["history"])
            start_epoch = int(state["epoch"]) + 1
            elapsed_before = float(state.get("elapsed_seconds", 0.0))
            notify(reporter, "training_resumed", job, start_epoch, epochs)
    last_save = time.monotonic()
    resumed_at = time.perf_counter()
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, epochs):
        model.train()
        started = time.perf_counter()
        permutation = torch.randperm(n, generator=order).to(device)
        batch_losses: list[torch.Tensor] = []  # summed once per epoch: no extra tensor ops per batch
        for start in range(0, n, batch_size):
            index = permutation[start : start + batch_size]
            progress = TrainProgress(epoch=epoch, step=step, steps_per_epoch=steps_per_epoch, epochs=epochs)
            loss = defense.loss(model, x[index], y[index], progress)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if defense.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), defense.grad_clip_norm)
            optimizer.step()
            batch_losses.append(loss.detach())
            step += 1
        if scheduler is not None:
            scheduler.step()
        sizes = torch.full((len(batch_losses),), float(batch_size), device=device)
        sizes[-1] = n - batch_size * (len(batch_losses) - 1)
        epoch_loss = float((torch.stack(batch_losses) * sizes).sum()) / n
        if not math.isfinite(epoch_loss):
            raise TrainingDivergedError(
                f"training diverged at epoch {epoch + 1}/{epochs} (loss {epoch_loss})"
            )
        now = time.perf_counter()
        stats = {
            "epoch": epoch + 1,
            "loss": epoch_loss,
            "seconds": now - started,
            "elapsed_seconds": elapsed_before + now - resumed_at,
        }
        stats.update(defense.describe_epoch(TrainProgress(epoch, step, steps_per_epoch, epochs)))
        history.append(stats)
        reporter.epoch_done(job, epoch + 1, epochs, stats)
        if (
            partial_path is not None
            and epoch + 1 < epochs
            and time.monotonic() - last_save > PARTIAL_SAVE_INTERVAL_S
        ):
            _save_partial(partial_path, job, model, optimizer, scheduler, order, epoch, history, stats)
            last_save = time.monotonic()
    return model.eval(), history


def _save_partial(path, job, model, optimizer, scheduler, order, epoch, history, stats) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(
        {
            "model_key": job.model_key,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "order_rng": order.get_state(),
            "torch_rng": torch.get_rng_state(),
            "epoch": epoch,
            "history": history,
            "elapsed_seconds": stats["elapsed_seconds"],
        },
        tmp,
    )
    os.replace(tmp, path)


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


@dataclass
class RayOptions:
    """How `--executor ray` runs models: one Ray task per model, results handed back to this driver.

    `handoff = "object"` returns rows and checkpoint through Ray's object store (works without a shared
    filesystem); `"shared"` has each task write them under the store's folders, which must then be
    reachable from every worker (measured in benchmarks/bench_executor.py).
    """

    address: str | None = None  # None: start a local Ray cluster; "auto" or host:port: join one
    cpus_per_model: float = 1.0
    gpus_per_model: float = 0.0  # fractional: 0.25 puts four models on one GPU
    max_parallel: int | None = None
    max_retries: int = 3  # retries of a task whose worker died (Ray's system-failure retries)
    handoff: str = "object"
    num_cpus: int | None = None  # of a local cluster started here (default: Ray's, all cores)


@dataclass
class ModelTask:
    """One model to produce, as the driver hands it to an executor."""

    index: int
    job: ModelJob
    action: str
    existing_signal_keys: set[str]
    eval_batch_size: int
    stored_checkpoint: Path | None = None  # where the store's record finds the checkpoint
    checkpoint_sha256: str | None = None  # what it recorded when the checkpoint was written
    retrain: bool = False


@dataclass
class RunContext:
    """What every task of a run shares."""

    db_path: Path
    datasets: DatasetCache
    device: torch.device
    provenance: tuple
    threads: int
    reporter: Reporter
    total: int


def run_local(tasks: list[ModelTask], context: RunContext) -> list[ModelOutcome]:
    """Today's executor: one model after the other in this process."""
    outcomes = []
    for task in tasks:
        job = task.job
        context.reporter.model_started(job, task.index, context.total, task.action)
        try:
            dataset = context.datasets.get(job)
            result = compute_model(
                job, task.action, task.existing_signal_keys, dataset, checkpoint_dir(context.db_path),
                context.device, context.reporter, context.provenance, task.eval_batch_size,
                dataset_checksum=context.datasets.checksum(dataset), stored_checkpoint=task.stored_checkpoint,
                checkpoint_sha256=task.checkpoint_sha256, retrain=task.retrain,
            )  # fmt: skip
            outcome = store_result(context.db_path, result)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # one model's failure must not stop the others
            outcome = store_failure(context.db_path, job, exc, context.provenance, context.device)
        context.reporter.model_finished(outcome)
        outcomes.append(outcome)
    return outcomes


def _stored_state(
    db_path: Path, jobs: list[ModelJob], write: bool = False
) -> tuple[dict[str, dict[str, Any]], list[NameChange]]:
    """What the store holds of these jobs, and stored models whose name a job now gives another key.

    `write` (under the run lock) also finishes a store whose creation was interrupted; without it such a
    store holds nothing yet."""
    if not db_path.exists():
        return {}, []
    from robmia_db.store.connection import reading

    try:
        with (writing if write else reading)(db_path) as con:
            existing = ingest.existing_models(con, [job.model_key for job in jobs])
            clashes = ingest.same_name_models(con, [(job.model_name, job.model_key) for job in jobs])
    except UnfinishedStoreError:
        return {}, []
    identities = {job.model_key: job.identity for job in jobs}
    changes = [
        NameChange(name, new, old, config_differences(config, identities[new]))
        for name, new, old, config in clashes
    ]
    return existing, changes


def _warn_name_changes(reporter: Reporter, changes: list[NameChange]) -> None:
    """Before any training: a name that now means another model is said, with what differs."""
    for change in changes:
        notify(reporter, "name_changed", change)


def training_epochs(jobs: list[ModelJob], actions: dict[str, str]) -> int:
    """The plan's cost in training epochs (each over its model's members), shown before a run starts."""
    return sum(
        int(job.identity["training"]["epochs"]) for job in jobs if actions.get(job.model_key) == "train"
    )


def _confirm_size(jobs: list[ModelJob], actions: dict[str, str], limit: int | None) -> None:
    to_train = sum(1 for action in actions.values() if action == "train")
    if limit is not None and to_train > limit:
        raise RobmiaError(
            f"{to_train:,} models to train ({training_epochs(jobs, actions):,} training epochs), more than "
            f"{limit:,}: rerun with --yes to train them all, or narrow the sweep (see `robmia-db check --expand`)"
        )


def _retrain_keys(jobs: list[ModelJob], wanted: list[str]) -> set[str]:
    keys: set[str] = set()
    for name in wanted:
        matches = {job.model_key for job in jobs if name in (job.model_key, job.model_name)}
        if not matches:
            raise RobmiaError(f"--retrain {name}: no model of the given specs has this key or name")
        keys |= matches
    return keys


def _plan(jobs, existing, retrain_keys) -> dict[str, str]:
    actions = plan_actions(jobs, existing)
    actions.update({key: "train" for key in retrain_keys})
    return actions


def _record_metadata(
    db_path: Path, loaded: list[LoadedSpec], jobs: list[ModelJob], existing: dict[str, dict[str, Any]]
) -> None:
    """Experiments' spec text and the names of stored models and perturbations (metadata: never retrains)."""
    with writing(db_path) as con:
        for item in loaded:
            ingest.upsert_experiment(
                con, item.spec.experiment.name, item.spec.experiment.description, str(item.path), item.text
            )
        for job in jobs:
            if job.model_key in existing:
                ingest.rename_model(con, job.model_key, job.model_name, job.experiment)
                for perturbation in job.perturbations:
                    if perturbation.signal_key in existing[job.model_key]["signal_keys"]:
                        ingest.rename_perturbation(
                            con, job.model_key, perturbation.signal_key, perturbation.name
                        )


def _announce(
    reporter: Reporter, db_path: Path, jobs: list[ModelJob], actions: dict[str, str], parallel: int
):
    """The plan, then (for reporters that show an ETA) estimates from similar models already stored."""
    reporter.plan(jobs, actions)
    if getattr(reporter, "run_context", None) is None:
        return
    from robmia_db.runner.progress import estimate_from_store

    try:
        estimates = estimate_from_store(db_path, jobs, actions)
    except RobmiaError:  # an estimate is a nicety: a busy or old store must not stop the run
        estimates = {}
    notify(reporter, "run_context", parallel, estimates)


# glibc's defaults hand freed heap memory back to the system (above a 128 KiB trim threshold, raised
# dynamically up to 64 MiB) and map blocks above 128 KiB-32 MiB afresh, so a training step that allocates
# some MB of activations faults every page in again on the next step (about 1 us per 4 KiB page here).
# 1 GiB for both keeps freed memory in the process instead: the resident size stays at its peak.
_MALLOC_THRESHOLD = 1 << 30
_MALLOC_ENVIRONMENT = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds to 1 GiB once for this process (True when set).

    Not done where the user set glibc's malloc tuning in the environment (it wins), nor off glibc (e.g. macOS,
    musl), nor with ROBMIA_MALLOC=default. Measured in benchmarks/bench_malloc.py (README benchmarks).
    """
    if (
        os.environ.get("ROBMIA_MALLOC", "") == "default"
        or any(name in os.environ for name in _MALLOC_ENVIRONMENT)
        or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
    ):
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # Setting either one also switches off the dynamic thresholds (glibc raises them after large frees).
    return bool(mallopt(m_trim_threshold, _MALLOC_THRESHOLD)) and bool(
        mallopt(m_mmap_threshold, _MALLOC_THRESHOLD)
    )


def run_specs(
    paths: list[str | Path],
    db_path: str | Path,
    reporter: Reporter | None = None,
    threads: int | None = None,
    device: str | None = None,
    dry_run: bool = False,
    loaded: list[LoadedSpec] | None = None,
    executor: str = "local",
    ray_options: RayOptions | None = None,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
    retrain: list[str] | None = None,
    confirm_above: int | None = None,
) -> RunSummary:
    """Run specs into a store: validate all, then train and record what the store lacks.

    Raises SpecErrors before any work if any spec is invalid or its data is missing. A model that fails
    is recorded as failed and the run goes on; callers check `summary.failed`. `retrain` names models (key
    or name) to train again from scratch, replacing their checkpoint, signals and scores. More than
    `confirm_above` models to train is refused before any work (the CLI's `--yes` lifts it).

    Args:
        executor: "local" (one model after the other here) or "ray" (one Ray task per model; see
            `RayOptions`). Either way this process alone writes the store, one transaction per model.
        progress: `callback(event, snapshot)` for notebooks (see `runner.progress.CallbackReporter`);
            used when no `reporter` is given.
    """
    if executor not in ("local", "ray"):
        raise RobmiaError(f"executor {executor!r}: expected local or ray")
    if reporter is None and progress is not None:
        from robmia_db.runner.progress import CallbackReporter

        reporter = CallbackReporter(progress)
    reporter = reporter or SilentReporter()
    db_path = Path(db_path)
    loaded = loaded if loaded is not None else load_specs(paths)
    datasets = DatasetCache()
    preflight(loaded, datasets)
    jobs: list[ModelJob] = []
    seen: dict[str, ModelJob] = {}
    for item in loaded:
        for job in item.jobs:
            if job.model_key in seen:
                known = {p.signal_key for p in seen[job.model_key].perturbations}
                seen[job.model_key].perturbations += [
                    p for p in job.perturbations if p.signal_key not in known
                ]
                continue
            seen[job.model_key] = job
            job.spec_text = item.text  # each model keeps the text of the spec that asked for it first
            jobs.append(job)
    retrain_keys = _retrain_keys(jobs, retrain or [])
    thread_count = threads or next(
        (item.spec.runtime.threads for item in loaded if item.spec.runtime.threads), None
    )
    torch.set_num_threads(thread_count or 1)
    keep_freed_memory()
    if executor == "ray":
        ray_options = ray_options or RayOptions()
        if device not in (None, "auto", "cpu"):
            raise RobmiaError(
                f"--device {device}: under --executor ray each task gets its GPU from Ray; "
                "use --gpus-per-model (e.g. 0.25 to share one GPU between four models)"
            )
        torch_device = torch.device("cpu")  # the driver's; each task resolves its own
    else:
        torch_device = resolve_device(device or loaded[0].spec.runtime.device)
    parallel = 1 if executor == "local" else (ray_options.max_parallel or 0)

    if dry_run:
        existing, changes = _stored_state(db_path, jobs)
        actions = _plan(jobs, existing, retrain_keys)
        _warn_name_changes(reporter, changes)
        _announce(reporter, db_path, jobs, actions, parallel)
        return RunSummary(db_path, [ModelOutcome(job, actions[job.model_key]) for job in jobs], changes)

    outcomes: list[ModelOutcome] = []
    existing, changes = _stored_state(db_path, jobs)
    actions = _plan(jobs, existing, retrain_keys)
    if all(action == "skip" for action in actions.values()):
        # nothing to train: no run lock, so this never meets (or waits on) another run that holds it
        _warn_name_changes(reporter, changes)
        _announce(reporter, db_path, jobs, actions, parallel)
        _record_metadata(db_path, loaded, jobs, existing)
        clean_leftovers(checkpoint_dir(db_path))  # safe without the lock: a live writer's files are kept
        for index, job in enumerate(jobs):
            reporter.model_started(job, index, len(jobs), "skip")
            outcomes.append(ModelOutcome(job, "skip"))
            reporter.model_finished(outcomes[-1])
        return RunSummary(db_path, outcomes, changes)
    with run_lock(db_path):
        # planned again under the lock: a run that finished meanwhile is seen, and a refused run prints
        # no plan
        existing, changes = _stored_state(db_path, jobs, write=True)
        actions = _plan(jobs, existing, retrain_keys)
        _warn_name_changes(reporter, changes)
        _announce(reporter, db_path, jobs, actions, parallel)
        _confirm_size(jobs, actions, confirm_above)
        clean_leftovers(checkpoint_dir(db_path))
        _record_metadata(db_path, loaded, jobs, existing)
        git_commit, git_dirty = _git_provenance()
        provenance = (git_commit, git_dirty, _package_versions())
        tasks = []
        for index, job in enumerate(jobs):
            action = actions[job.model_key]
            if action == "skip":
                reporter.model_started(job, index, len(jobs), action)
                outcome = ModelOutcome(job, "skip")
                reporter.model_finished(outcome)
                outcomes.append(outcome)
                continue
            stored = existing.get(job.model_key, {})
            eval_batch_size = int(job.runtime.get("eval_batch_size") or 512)
            tasks.append(
                ModelTask(
                    index, job, action, stored.get("signal_keys", set()), eval_batch_size,
                    stored_checkpoint=checkpoint_location(db_path, job.model_key, stored.get("checkpoint")),
                    checkpoint_sha256=stored.get("sha256"), retrain=job.model_key in retrain_keys,
                )
            )  # fmt: skip
        context = RunContext(
            db_path, datasets, torch_device, provenance, thread_count or 1, reporter, len(jobs)
        )
        if executor == "ray":
            from robmia_db.runner import ray_executor

            outcomes += ray_executor.run_ray(tasks, context, ray_options)
        else:
            outcomes += run_local(tasks, context)
        order = {job.model_key: index for index, job in enumerate(jobs)}
        outcomes.sort(key=lambda outcome: order[outcome.job.model_key])
    return RunSummary(db_path, outcomes, changes)
