"""Runner layer: what a run tells its reporter (the plan, each model's progress and outcome).

`Reporter` is implemented by the CLI's live display (`cli/progress.py`), the notebook callback
(`runner/progress.py`) and the Ray workers' forwarder (`ray_executor._SinkReporter`); `SilentReporter` is the
API's default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from robmia_db.spec import ModelJob, PerturbationJob


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
