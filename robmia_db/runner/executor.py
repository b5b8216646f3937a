"""Runner layer: validate every spec, then train what is missing and record signals, one model at a time.

Order of work: all specs are validated and every job's dataset and architecture are checked before any
training. The store is opened only for short transactions (reading state, writing a finished model), so
`robmia-db sql`, `score` and `report` work on finished models while training goes on; a run lock keeps a
second run out. A model is written in one transaction, so a kill leaves either all of it or none of it;
training also keeps a partial checkpoint so a killed run resumes mid-training.

Here: the run itself (`run_specs`) and the local executor; `planning.py` decides what each model needs,
`model_result.py` does one model's work and its one write, `training.py` holds the training loop,
`reporting.py` what a run tells its reporter, `malloc.py` the memory setting, `ray_executor.py` the Ray
executor.
"""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from robmia_db.errors import RobmiaError
from robmia_db.runner.checkpoints import checkpoint_location, clean_leftovers
from robmia_db.runner.malloc import keep_freed_memory
from robmia_db.runner.model_result import compute_model, store_failure, store_result
from robmia_db.runner.planning import (
    DatasetCache,
    NameChange,
    confirm_size,
    plan_run,
    preflight,
    retrain_keys,
    stored_state,
)
from robmia_db.runner.reporting import ModelOutcome, Reporter, SilentReporter, notify
from robmia_db.spec import LoadedSpec, ModelJob, load_specs
from robmia_db.store import ingest
from robmia_db.store.connection import checkpoint_dir, run_lock, writing


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


def _warn_name_changes(reporter: Reporter, changes: list[NameChange]) -> None:
    """Before any training: a name that now means another model is said, with what differs."""
    for change in changes:
        notify(reporter, "name_changed", change)


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
    to_retrain = retrain_keys(jobs, retrain or [])
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
        existing, changes = stored_state(db_path, jobs)
        actions = plan_run(jobs, existing, to_retrain)
        _warn_name_changes(reporter, changes)
        _announce(reporter, db_path, jobs, actions, parallel)
        return RunSummary(db_path, [ModelOutcome(job, actions[job.model_key]) for job in jobs], changes)

    outcomes: list[ModelOutcome] = []
    existing, changes = stored_state(db_path, jobs)
    actions = plan_run(jobs, existing, to_retrain)
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
        existing, changes = stored_state(db_path, jobs, write=True)
        actions = plan_run(jobs, existing, to_retrain)
        _warn_name_changes(reporter, changes)
        _announce(reporter, db_path, jobs, actions, parallel)
        confirm_size(jobs, actions, confirm_above)
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
                    checkpoint_sha256=stored.get("sha256"), retrain=job.model_key in to_retrain,
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
