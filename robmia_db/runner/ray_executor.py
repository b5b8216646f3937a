"""Runner layer: `--executor ray`, one Ray task per model. The only module of the project that imports ray.

Each task trains one model and computes its signals (`model_result.compute_model`) and hands the result back
to the driver, which alone writes the store, one short transaction per finished model, so `sql`, `score`
and `report` keep working during a run. Hand-offs:

- `object` (default): rows (Arrow) and checkpoint bytes come back through Ray's object store; works on
  nodes that share no filesystem with the driver. Datasets go to the workers the same way, once each
  (`ray.put`), so workers need neither the data files nor the store.
- `shared`: the task writes the checkpoint into the store's checkpoint folder and its rows as Arrow IPC
  files under `<store>.incoming/`; only paths travel. Needs that folder on every node.

Faults: a worker that dies mid-model (killed, out of memory, node lost) is retried by Ray
(`max_retries`); training is seeded, so the retried model is bit-identical to a sequential run's, and it
resumes from the partial checkpoint when the retry lands where the first attempt saved one. A model that
fails for its own reasons (an exception) is not retried: it comes back as a failure and is recorded with
its traceback while the other models go on.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import torch

from robmia_db.errors import RobmiaError
from robmia_db.runner.executor import ModelTask, RayOptions, RunContext
from robmia_db.runner.malloc import keep_freed_memory
from robmia_db.runner.model_result import (
    ModelResult,
    compute_model,
    failure_text,
    store_failure,
    store_result,
)
from robmia_db.runner.reporting import ModelOutcome, notify
from robmia_db.store.connection import checkpoint_dir

EVENT_INTERVAL_S = 0.25  # a worker sends its epoch events at most this often (all of them, batched)


@ray.remote(num_cpus=0)
class ProgressSink:
    """Collects workers' progress events until the driver drains them (costs no CPU slot)."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def push(self, events: list[tuple]) -> None:
        self.events.extend(events)

    def drain(self) -> list[tuple]:
        events, self.events = self.events, []
        return events


class _SinkReporter:
    """The worker side of progress: batches events and pushes them to the sink without waiting."""

    def __init__(self, sink: Any, model_key: str) -> None:
        self.sink = sink
        self.key = model_key
        self.buffer: list[tuple] = []
        self.last_push = 0.0

    def _add(self, event: tuple, urgent: bool = False) -> None:
        self.buffer.append(event)
        if urgent or time.monotonic() - self.last_push >= EVENT_INTERVAL_S:
            self.flush()

    def flush(self, wait: bool = False) -> None:
        """Push buffered events; `wait` (at the task's end) makes sure the sink holds them before the
        result reaches the driver, which drains the sink before storing a result and then ignores that
        model's late events."""
        if self.buffer:
            pushed = self.sink.push.remote(self.buffer)
            self.buffer = []
            if wait:
                ray.get(pushed)
        self.last_push = time.monotonic()

    def epoch_done(self, job, epoch, epochs, stats) -> None:
        self._add(("epoch", self.key, epoch, epochs, dict(stats)), urgent=epoch == epochs)

    def training_resumed(self, job, epoch, epochs) -> None:
        self._add(("resumed", self.key, epoch, epochs), urgent=True)

    def perturbation_started(self, job, perturbation, index, total) -> None:
        self._add(("signals", self.key, perturbation.name, index, total), urgent=True)

    def plan(self, jobs, actions) -> None:
        pass

    def model_started(self, job, index, total, action) -> None:
        pass

    def model_finished(self, outcome) -> None:
        pass


@dataclass
class _Failure:
    """A model that raised in its task: recorded as failed by the driver, not retried."""

    message: str
    error: str


@dataclass
class _SharedResult:
    """A result whose rows wait as Arrow IPC files in the shared folder."""

    result: ModelResult
    folder: str
    files: dict[str, str]


def _partials_folder(checkpoints: Path) -> Path:
    """The store's checkpoint folder when this node can write it, else a local one (no shared FS)."""
    try:
        checkpoints.mkdir(parents=True, exist_ok=True)
        probe = checkpoints / f".probe{os.getpid()}"
        probe.touch()
        probe.unlink()
        return checkpoints
    except OSError:
        local = Path(tempfile.gettempdir()) / "robmia-partials"
        local.mkdir(parents=True, exist_ok=True)
        return local


def _write_ipc(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)


def _read_ipc(path: str) -> pa.Table:
    with pa.memory_map(path) as source:
        return pa.ipc.open_file(source).read_all()


def _to_shared(result: ModelResult, incoming: Path) -> _SharedResult:
    folder = incoming / result.job.model_key
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    tables = {"membership": result.membership, "examples": result.examples}
    tables.update({f"signals/{p.signal_key}": p.signals for p in result.perturbations})
    for name, table in tables.items():
        if table is not None:
            path = folder / (name.replace("/", "__") + ".arrow")
            _write_ipc(table, path)
            files[name] = str(path)
    light = replace(
        result,
        membership=None,
        examples=None,
        perturbations=[replace(p, signals=None) for p in result.perturbations],
    )
    return _SharedResult(light, str(folder), files)


def _from_shared(shared: _SharedResult) -> ModelResult:
    files = shared.files
    result = shared.result
    return replace(
        result,
        membership=_read_ipc(files["membership"]) if "membership" in files else None,
        examples=_read_ipc(files["examples"]) if "examples" in files else None,
        perturbations=[
            replace(p, signals=_read_ipc(files[f"signals/{p.signal_key}"])) for p in result.perturbations
        ],
    )


_MALLOC_SET: bool | None = None  # this worker process's malloc setting, once decided


def _prepare_worker(threads: int) -> bool:
    """Torch threads, and the runner's malloc setting once per worker process, as `run` sets it for itself.

    Ray reuses a worker process for the next task, so the setting is decided at its first task and kept;
    it yields where the worker's environment tunes glibc's malloc or sets ROBMIA_MALLOC=default, exactly as
    in the driver (`malloc.keep_freed_memory`). Returns whether the setting is applied in this process.
    """
    global _MALLOC_SET
    torch.set_num_threads(threads)
    if _MALLOC_SET is None:
        _MALLOC_SET = keep_freed_memory()
    return _MALLOC_SET


def _model_task(
    task: ModelTask,
    dataset: Any,
    checkpoints: str,
    provenance: tuple,
    threads: int,
    checksum: str,
    prior_checkpoint: bytes | None,
    handoff: str,
    incoming: str,
    sink: Any,
) -> ModelResult | _SharedResult | _Failure:
    """One model, inside a Ray worker: train (or load), signals, hand back. Never touches the store."""
    _prepare_worker(threads)
    # Ray sets CUDA_VISIBLE_DEVICES to this task's GPUs, so the first visible one is ours
    device = torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")
    reporter = _SinkReporter(sink, task.job.model_key)
    reporter._add(
        ("started", task.job.model_key, socket.gethostname(), os.getpid(), str(device)), urgent=True
    )
    store_checkpoints = Path(checkpoints)
    try:
        folder = store_checkpoints if handoff == "shared" else _partials_folder(store_checkpoints)
        result = compute_model(
            task.job, task.action, task.existing_signal_keys, dataset, folder, device, reporter, provenance,
            task.eval_batch_size, dataset_checksum=checksum, prior_checkpoint=prior_checkpoint,
            checkpoint_as_bytes=handoff == "object", stored_checkpoint=task.stored_checkpoint,
            checkpoint_sha256=task.checkpoint_sha256, retrain=task.retrain,
        )  # fmt: skip
        reporter.flush(wait=True)
        if handoff == "shared":
            return _to_shared(result, Path(incoming))
        return result
    except Exception as exc:  # the model's own failure: recorded by the driver, not retried by Ray
        reporter.flush(wait=True)
        return _Failure(*failure_text(exc))


def _slots(options: RayOptions, n_tasks: int) -> int:
    """How many models can run at once on this cluster with these resources per model."""
    resources = ray.cluster_resources()
    slots = int(resources.get("CPU", 1) // options.cpus_per_model) if options.cpus_per_model > 0 else n_tasks
    if options.gpus_per_model > 0:
        gpus = resources.get("GPU", 0)
        if gpus < options.gpus_per_model:
            raise RobmiaError(
                f"--gpus-per-model {options.gpus_per_model:g}: the Ray cluster has {gpus:g} GPU(s)"
            )
        slots = min(slots, int(gpus // options.gpus_per_model))
    if options.max_parallel:
        slots = min(slots, options.max_parallel)
    return max(1, min(slots, n_tasks))


def _init(options: RayOptions) -> bool:
    """Join or start Ray; True when this call started it (and so must shut it down)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
    }
    if options.address:
        kwargs["address"] = options.address
    elif options.num_cpus:
        kwargs["num_cpus"] = options.num_cpus
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = options.address or "a local cluster"
        raise RobmiaError(f"--executor ray: cannot start or join Ray at {where}: {exc}") from exc
    return True


class _Driver:
    """Submits tasks, relays their progress to the reporter and stores each result as it arrives."""

    def __init__(self, tasks: list[ModelTask], context: RunContext, options: RayOptions) -> None:
        self.tasks = tasks
        self.context = context
        self.options = options
        self.by_key = {task.job.model_key: task for task in tasks}
        self.started: set[str] = set()
        self.finished: set[str] = set()
        self.checkpoints = checkpoint_dir(context.db_path)
        self.incoming = context.db_path.with_name(context.db_path.stem + ".incoming")

    def _mark_started(self, key: str) -> None:
        if key not in self.started:
            self.started.add(key)
            task = self.by_key[key]
            self.context.reporter.model_started(task.job, task.index, self.context.total, task.action)

    def relay(self, events: list[tuple]) -> None:
        reporter = self.context.reporter
        for event in events:
            kind, key = event[0], event[1]
            if key in self.finished or key not in self.by_key:
                continue  # a late event of a finished model, or of a retried attempt's predecessor
            self._mark_started(key)
            job = self.by_key[key].job
            if kind == "epoch":
                reporter.epoch_done(job, event[2], event[3], event[4])
            elif kind == "resumed":
                notify(reporter, "training_resumed", job, event[2], event[3])
            elif kind == "signals":
                perturbation = next((p for p in job.perturbations if p.name == event[2]), None)
                if perturbation is not None:
                    reporter.perturbation_started(job, perturbation, event[3], event[4])

    def land(self, task: ModelTask, ref: Any) -> ModelOutcome:
        """Store one finished task's result (or its failure) in one transaction."""
        context = self.context
        job = task.job
        try:
            value = ray.get(ref)
        except ray.exceptions.RayError as exc:  # the worker died more than max_retries times, or cancelled
            message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            return store_failure(context.db_path, job, (message, str(exc)[-4000:]), context.provenance, "ray")
        if isinstance(value, _Failure):
            return store_failure(
                context.db_path, job, (value.message, value.error), context.provenance, "ray"
            )
        try:
            result = _from_shared(value) if isinstance(value, _SharedResult) else value
            # the worker saw an absolute (or its own local) folder; the store records the driver's path
            result.checkpoint_path = self.checkpoints / f"{job.model_key}.pt"
            result.record.checkpoint = str(result.checkpoint_path)
            outcome = store_result(context.db_path, result)
            if isinstance(value, _SharedResult):
                shutil.rmtree(value.folder, ignore_errors=True)
            return outcome
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            return store_failure(context.db_path, job, exc, context.provenance, "ray")

    def run(self) -> list[ModelOutcome]:
        context = self.context
        options = self.options
        notify(context.reporter, "set_parallel", _slots(options, len(self.tasks)))
        sink = ProgressSink.remote()
        dataset_refs: dict[int, Any] = {}
        checksums: dict[int, str] = {}
        remote = ray.remote(_model_task).options(
            num_cpus=options.cpus_per_model,
            num_gpus=options.gpus_per_model,
            max_retries=options.max_retries,
            retry_exceptions=False,
        )
        queue = collections.deque(self.tasks)
        pending: dict[Any, ModelTask] = {}
        limit = options.max_parallel or len(self.tasks)
        outcomes: list[ModelOutcome] = []
        try:
            while queue or pending:
                while queue and len(pending) < limit:
                    task = queue.popleft()
                    dataset = context.datasets.get(task.job)
                    if id(dataset) not in dataset_refs:
                        dataset_refs[id(dataset)] = ray.put(dataset)  # once per dataset, shared by all tasks
                        checksums[id(dataset)] = context.datasets.checksum(dataset)
                    checkpoint = task.stored_checkpoint or self.checkpoints / f"{task.job.model_key}.pt"
                    # a stored checkpoint travels with the task: the worker may not see the driver's disk
                    # (it is verified there against the store's sha256 before use; a retrain ignores it)
                    prior = checkpoint.read_bytes() if checkpoint.exists() and not task.retrain else None
                    ref = remote.remote(
                        task, dataset_refs[id(dataset)], str(self.checkpoints.resolve()), context.provenance,
                        context.threads, checksums[id(dataset)], prior, options.handoff, str(self.incoming.resolve()),
                        sink,
                    )  # fmt: skip
                    pending[ref] = task
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
                rest = [ref for ref in pending if ref not in ready]
                if ready and rest:
                    ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
                self.relay(ray.get(sink.drain.remote()))
                for ref in ready:
                    task = pending.pop(ref)
                    key = task.job.model_key
                    self._mark_started(key)
                    outcome = self.land(task, ref)
                    self.finished.add(key)
                    context.reporter.model_finished(outcome)
                    outcomes.append(outcome)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            ray.kill(sink)
        return outcomes


def run_ray(tasks: list[ModelTask], context: RunContext, options: RayOptions) -> list[ModelOutcome]:
    """Run the models as Ray tasks; the driver (this process) stores each result as it arrives."""
    if not tasks:
        return []
    if options.handoff not in ("object", "shared"):
        raise RobmiaError(f"--handoff {options.handoff!r}: expected object or shared")
    started_here = _init(options)
    try:
        return _Driver(tasks, context, options).run()
    finally:
        if started_here:
            ray.shutdown()
