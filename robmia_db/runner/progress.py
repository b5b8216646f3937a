"""Runner layer: the state of a run for progress views (done / running / queued, epochs, ETA). No torch.

Every reporter (the CLI's live view, plain log lines, a notebook callback) reads the same `RunProgress`,
so the numbers they show agree. The ETA comes from measured rates: seconds per epoch of the model itself
while it trains, else of models of the same recipe in this run, else of similar models already in the
store (what `--dry-run` shows), divided over the models that run at once.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def recipe(job: Any) -> tuple:
    """What a model's cost per epoch depends on, in the order of how much it matters."""
    training = job.identity["training"]
    return (job.dataset, job.arch, job.width, job.defense, training.get("batch_size"))


@dataclass
class ModelState:
    name: str
    key: str
    action: str
    epochs: int  # epochs to train (0 when only signals are added)
    n_perturbations: int
    phase: str = "queued"  # queued, training, signals, done, failed
    epoch: int = 0
    first_epoch: int = 0  # > 0 when resumed from a partial checkpoint
    epoch_seconds: list[float] = field(default_factory=list)
    signal_index: int = 0
    signals_started: float | None = None
    signal_seconds: float | None = None  # measured seconds per perturbation
    loss: float | None = None
    estimate: float | None = None  # seconds, from the store or from this run

    @property
    def steps_total(self) -> int:
        """The per-model bar counts epochs, then one step per perturbation."""
        return self.epochs + self.n_perturbations

    @property
    def steps_done(self) -> int:
        if self.phase in ("done", "failed"):
            return self.steps_total
        return self.epoch + (self.signal_index if self.phase == "signals" else 0)


class RunProgress:
    """What a run has done, is doing and has left; fed by the executor's reporter calls."""

    def __init__(self, parallel: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        self.parallel = max(1, int(parallel))
        self.clock = clock
        self.models: dict[str, ModelState] = {}
        self.recipes: dict[str, tuple] = {}
        self.started_at = clock()

    # --- events
    def plan(
        self, jobs: list[Any], actions: dict[str, str], estimates: dict[str, float | None] | None = None
    ):
        for job in jobs:
            action = actions[job.model_key]
            if action == "skip":
                continue
            epochs = int(job.identity["training"]["epochs"]) if action == "train" else 0
            self.models[job.model_key] = ModelState(
                job.model_name, job.model_key, action, epochs, len(job.perturbations),
                estimate=(estimates or {}).get(job.model_key),
            )  # fmt: skip
            self.recipes[job.model_key] = recipe(job)

    def set_estimates(self, estimates: dict[str, float | None]) -> None:
        for key, value in estimates.items():
            if key in self.models:
                self.models[key].estimate = value

    def started(self, job: Any) -> ModelState | None:
        state = self.models.get(job.model_key)
        if state is not None and state.phase == "queued":
            state.phase = "training" if state.epochs else "signals"
        return state

    def resumed(self, job: Any, epoch: int) -> None:
        state = self.models.get(job.model_key)
        if state is not None:
            state.first_epoch = state.epoch = epoch

    def epoch_done(self, job: Any, epoch: int, stats: dict[str, float]) -> None:
        state = self.models.get(job.model_key)
        if state is None:
            return
        state.phase = "training"
        state.epoch = epoch
        state.loss = stats.get("loss")
        if stats.get("seconds") is not None:
            state.epoch_seconds.append(float(stats["seconds"]))

    def perturbation_started(self, job: Any, index: int, total: int) -> None:
        state = self.models.get(job.model_key)
        if state is None:
            return
        now = self.clock()
        if state.phase != "signals" or state.signals_started is None:
            state.signals_started = now
        state.phase = "signals"
        state.epoch = state.epochs
        state.signal_index = index
        state.n_perturbations = total
        if index > 0:
            state.signal_seconds = (now - state.signals_started) / index

    def finished(self, key: str, failed: bool) -> None:
        state = self.models.get(key)
        if state is None:
            return
        if state.phase == "signals" and state.signals_started is not None and state.n_perturbations:
            state.signal_seconds = (self.clock() - state.signals_started) / state.n_perturbations
        state.phase = "failed" if failed else "done"

    # --- views
    def counts(self) -> dict[str, int]:
        counts = {"done": 0, "failed": 0, "running": 0, "queued": 0}
        for state in self.models.values():
            if state.phase in ("done", "failed"):
                counts[state.phase] += 1
            elif state.phase == "queued":
                counts["queued"] += 1
            else:
                counts["running"] += 1
        return counts

    def _epoch_rate(self, key: str) -> float | None:
        own = self.models[key].epoch_seconds
        if own:
            return statistics.fmean(own[-10:])
        same = [
            s
            for k, s in self.models.items()
            if self.recipes.get(k) == self.recipes.get(key) and s.epoch_seconds
        ]
        if same:
            return statistics.fmean(statistics.fmean(s.epoch_seconds[-10:]) for s in same)
        return None

    def _signal_rate(self) -> float | None:
        measured = [s.signal_seconds for s in self.models.values() if s.signal_seconds is not None]
        return statistics.fmean(measured) if measured else None

    def remaining_seconds(self, key: str) -> float | None:
        """Seconds this model still needs: measured rates first, the stored estimate when nothing ran yet.

        Signals not yet measured in this run count as 0 rather than making the whole ETA unknown.
        """
        state = self.models[key]
        if state.phase in ("done", "failed"):
            return 0.0
        left_epochs = max(0, state.epochs - state.epoch)
        left_signals = max(0, state.n_perturbations - (state.signal_index if state.phase == "signals" else 0))
        rate = self._epoch_rate(key) if left_epochs else 0.0
        if rate is None:
            return state.estimate  # None when the store knows nothing similar either
        return left_epochs * rate + left_signals * (self._signal_rate() or 0.0)

    def eta_seconds(self) -> float | None:
        """Seconds until every model is done, or None while nothing has been measured for some model."""
        remaining = []
        for key, state in self.models.items():
            if state.phase in ("done", "failed"):
                continue
            value = self.remaining_seconds(key)
            if value is None:
                return None
            remaining.append(value)
        if not remaining:
            return 0.0
        # models run `parallel` at a time: the total divided over the slots, never less than the longest
        return max(sum(remaining) / self.parallel, max(remaining))

    def snapshot(self) -> dict[str, Any]:
        """Plain data for callbacks (notebooks, logs)."""
        eta = self.eta_seconds()
        return {
            **self.counts(),
            "total": len(self.models),
            "elapsed_s": self.clock() - self.started_at,
            "eta_s": eta,
            "models": [
                {
                    "model_name": s.name,
                    "model_key": s.key,
                    "phase": s.phase,
                    "epoch": s.epoch,
                    "epochs": s.epochs,
                    "resumed_from_epoch": s.first_epoch or None,
                    "signals_done": s.signal_index
                    if s.phase == "signals"
                    else (s.n_perturbations if s.phase == "done" else 0),
                    "signals_total": s.n_perturbations,
                    "loss": s.loss,
                }  # fmt: skip
                for s in self.models.values()
            ],
        }


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class CallbackReporter:
    """A reporter for the Python API: calls `callback(event, snapshot)` on every change.

    `event` is one of plan, started, resumed, epoch, signals, finished; `snapshot` is
    `RunProgress.snapshot()` with `model_name` of the model concerned (None for plan).
    """

    def __init__(self, callback: Callable[[str, dict[str, Any]], None]) -> None:
        self.callback = callback
        self.progress = RunProgress()

    def _emit(self, event: str, job: Any = None, **extra: Any) -> None:
        snapshot = self.progress.snapshot()
        snapshot["model_name"] = job.model_name if job is not None else None
        snapshot.update(extra)
        self.callback(event, snapshot)

    def run_context(self, parallel: int, estimates: dict[str, float | None]) -> None:
        self.set_parallel(parallel)
        self.progress.set_estimates(estimates)

    def set_parallel(self, parallel: int) -> None:
        self.progress.parallel = max(1, parallel)

    def plan(self, jobs, actions) -> None:
        self.progress.plan(jobs, actions)
        self._emit("plan")

    def model_started(self, job, index, total, action) -> None:
        if action == "skip":
            return
        self.progress.started(job)
        self._emit("started", job, action=action)

    def training_resumed(self, job, epoch, epochs) -> None:
        self.progress.resumed(job, epoch)
        self._emit("resumed", job, epoch=epoch)

    def epoch_done(self, job, epoch, epochs, stats) -> None:
        self.progress.epoch_done(job, epoch, stats)
        self._emit("epoch", job, epoch=epoch)

    def perturbation_started(self, job, perturbation, index, total) -> None:
        self.progress.perturbation_started(job, index, total)
        self._emit("signals", job, perturbation=perturbation.name)

    def model_finished(self, outcome) -> None:
        if outcome.action == "skip":
            return
        self.progress.finished(outcome.job.model_key, outcome.action == "failed")
        self._emit("finished", outcome.job, action=outcome.action, error=outcome.error)


def estimate_from_store(db_path: Path, jobs: list[Any], actions: dict[str, str]) -> dict[str, float | None]:
    """Seconds each model to do should take, from stored timings of similar completed models.

    Similar = same dataset, architecture, width, defense and batch size (seconds per epoch scale with
    epochs; members count is close enough for an estimate), else same dataset, architecture and defense.
    Signals: the stored seconds per perturbation of the same kind on similar models. None when the store
    has nothing similar.
    """
    if not Path(db_path).exists():
        return {job.model_key: None for job in jobs}
    from robmia_db.store.connection import reading

    with reading(db_path) as con:
        rows = con.execute(
            """SELECT m.model_key, m.dataset, m.arch, m.width, m.defense, m.config, m.train_seconds
               FROM models m WHERE m.status = 'completed' AND m.origin = 'trained' AND m.train_seconds > 0"""
        ).fetchall()
        perturbation_rows = con.execute(
            "SELECT p.model_key, p.kind, p.seconds FROM perturbations p WHERE p.seconds IS NOT NULL"
        ).fetchall()
    exact: dict[tuple, list[float]] = {}
    loose: dict[tuple, list[float]] = {}
    model_recipe: dict[str, tuple] = {}
    for key, dataset, arch, width, defense, config, seconds in rows:
        training = json.loads(config).get("training", {}) if config else {}
        epochs = training.get("epochs")
        if not epochs:
            continue
        rate = float(seconds) / int(epochs)
        exact.setdefault((dataset, arch, width, defense, training.get("batch_size")), []).append(rate)
        loose.setdefault((dataset, arch, defense), []).append(rate)
        model_recipe[key] = (dataset, arch, defense)
    signal_exact: dict[tuple, list[float]] = {}
    signal_kind: dict[str, list[float]] = {}
    for key, kind, seconds in perturbation_rows:
        if key in model_recipe:
            signal_exact.setdefault((*model_recipe[key], kind), []).append(float(seconds))
        signal_kind.setdefault(kind, []).append(float(seconds))

    estimates: dict[str, float | None] = {}
    for job in jobs:
        action = actions.get(job.model_key, "train")
        if action == "skip":
            estimates[job.model_key] = 0.0
            continue
        total = 0.0
        if action == "train":
            rates = exact.get(recipe(job)) or loose.get((job.dataset, job.arch, job.defense))
            if not rates:
                estimates[job.model_key] = None
                continue
            total += statistics.median(rates) * int(job.identity["training"]["epochs"])
        for perturbation in job.perturbations:
            seconds = signal_exact.get(
                (job.dataset, job.arch, job.defense, perturbation.kind)
            ) or signal_kind.get(perturbation.kind)
            if seconds:
                total += statistics.median(seconds)
        estimates[job.model_key] = total
    return estimates
