"""CLI layer: live progress (per model, epoch and perturbation) and the end-of-run summary table, with rich."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from robmia_db.errors import safe_text
from robmia_db.runner.progress import format_seconds

console = Console(stderr=True)
out = Console(width=None if Console().is_terminal else 160)


class RichReporter:
    """One view for one or many concurrent models: a models bar (done / running / queued, ETA) and one
    bar per running model counting its epochs then its perturbations; plain lines when not a terminal."""

    def __init__(self) -> None:
        from robmia_db.runner.progress import RunProgress

        self.live = console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not self.live,
        )
        self.state = RunProgress()
        self.models_task = None
        self.model_tasks: dict[str, int] = {}
        self.estimates: dict[str, float | None] = {}
        self.total = 0

    def __enter__(self) -> RichReporter:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def _counts_line(self) -> str:
        counts = self.state.counts()
        failed = f", {counts['failed']} failed" if counts["failed"] else ""
        return (
            f"{counts['done']} done, {counts['running']} running, {counts['queued']} queued{failed}, "
            f"ETA {format_seconds(self.state.eta_seconds())}"
        )

    def _refresh(self) -> None:
        if self.models_task is not None:
            self.progress.update(self.models_task, status=self._counts_line())

    def name_changed(self, change) -> None:
        console.print(f"[yellow]warning[/yellow]: {change.describe()}", highlight=False, soft_wrap=True)

    def plan(self, jobs, actions) -> None:
        todo = sum(1 for a in actions.values() if a != "skip")
        counts = {a: sum(1 for v in actions.values() if v == a) for a in ("train", "signals", "skip")}
        epochs = sum(
            int(j.identity["training"]["epochs"]) for j in jobs if actions.get(j.model_key) == "train"
        )
        console.print(
            f"{len(jobs)} model(s): {counts['train']} to train ({epochs:,} training epochs in all), "
            f"{counts['signals']} to add signals to, {counts['skip']} already stored"
        )
        self.state.plan(jobs, actions)
        self.total = len(jobs)
        self.models_task = self.progress.add_task("models", total=todo or 1, status="")

    def run_context(self, parallel, estimates) -> None:
        self.estimates = estimates
        self.state.set_estimates(estimates)
        if parallel:
            self.state.parallel = parallel
        todo = [key for key in self.state.models]
        known = [estimates.get(key) for key in todo if estimates.get(key) is not None]
        if todo and known:
            missing = len(todo) - len(known)
            note = f"; {missing} model(s) have no similar stored model" if missing else ""
            slots = f" over {parallel} at a time" if parallel > 1 else ""
            console.print(
                f"estimate from stored timings of similar models: {format_seconds(sum(known) / max(1, parallel))}"
                f"{slots}{note}"
            )
        self._refresh()

    def set_parallel(self, parallel) -> None:
        self.state.parallel = max(1, parallel)
        if not self.live:
            console.print(f"running up to {self.state.parallel} model(s) at once")

    def model_started(self, job, index, total, action) -> None:
        if action == "skip":
            return
        model = self.state.started(job)
        if not self.live:
            console.print(f"[{index + 1}/{total}] {job.model_name} ({job.model_key}): {action}")
        steps = model.steps_total if model is not None else len(job.perturbations)
        self.model_tasks[job.model_key] = self.progress.add_task(
            f"  {job.model_name}", total=steps or 1, status=action
        )
        self._refresh()

    def training_resumed(self, job, epoch, epochs) -> None:
        self.state.resumed(job, epoch)
        task = self.model_tasks.get(job.model_key)
        if task is not None:
            self.progress.update(task, completed=epoch, status=f"resuming from epoch {epoch}/{epochs}")
        console.print(f"    {job.model_name}: resuming from epoch {epoch}/{epochs} (partial checkpoint)")

    def epoch_done(self, job, epoch, epochs, stats) -> None:
        self.state.epoch_done(job, epoch, stats)
        extra = f" eps {stats['eps']:.3g}" if "eps" in stats else ""
        task = self.model_tasks.get(job.model_key)
        if task is not None:
            self.progress.update(
                task, completed=epoch, status=f"epoch {epoch}/{epochs} loss {stats['loss']:.4f}{extra}"
            )
        self._refresh()
        if not self.live and (epoch == epochs or epoch % max(1, epochs // 5) == 0):
            name = f" {job.model_name}" if self.state.parallel > 1 else ""
            console.print(f"   {name} epoch {epoch}/{epochs} loss {stats['loss']:.4f}{extra}")

    def perturbation_started(self, job, perturbation, index, total) -> None:
        self.state.perturbation_started(job, index, total)
        model = self.state.models.get(job.model_key)
        task = self.model_tasks.get(job.model_key)
        if task is not None and model is not None:
            self.progress.update(
                task,
                completed=model.steps_done,
                status=f"signals {index + 1}/{total}: {perturbation.name} ({perturbation.kind})",
            )
        if not self.live:
            name = f" {job.model_name}" if self.state.parallel > 1 else ""
            console.print(f"   {name} signals {index + 1}/{total}: {perturbation.name} ({perturbation.kind})")

    def model_finished(self, outcome) -> None:
        if outcome.action == "skip":
            return
        self.state.finished(outcome.job.model_key, outcome.action == "failed")
        task = self.model_tasks.pop(outcome.job.model_key, None)
        if task is not None:
            self.progress.remove_task(task)
        if self.models_task is not None:
            self.progress.advance(self.models_task)
        self._refresh()
        if outcome.action == "failed":
            console.print(f"[red]failed[/red] {outcome.job.model_name}: {escape(safe_text(outcome.error))}")
        elif not self.live and self.state.parallel > 1:
            console.print(
                f"    {outcome.job.model_name}: {outcome.action} in {outcome.seconds:.1f}s; {self._counts_line()}"
            )


def print_summary(summary, dry_run: bool = False, estimates: dict | None = None) -> None:
    table = Table(title="dry run: nothing trained" if dry_run else f"store: {summary.db_path}")
    for column in ("model", "key", "action", "seconds", "train acc", "test acc", "adv train", "adv test"):
        table.add_column(column, justify="right" if column not in ("model", "key", "action") else "left")
    if dry_run:
        table.columns[3].header = "est. seconds"
    for outcome in summary.outcomes:
        job = outcome.job
        accs = outcome.accuracies
        benign = next((p.name for p in job.perturbations if p.kind == "benign"), None)
        adversarial = next((p.name for p in job.perturbations if p.kind == "adversarial"), None)

        def fmt(name, side, accs=accs):
            value = accs.get(f"{name}_{side}_acc") if name else None
            return f"{value:.3f}" if value is not None else "-"

        table.add_row(
            job.model_name, job.model_key, outcome.action if not outcome.error else "failed",
            _seconds(outcome, estimates),
            fmt(benign, "train"), fmt(benign, "test"), fmt(adversarial, "train"), fmt(adversarial, "test"),
        )  # fmt: skip
    out.print(table)
    for change in getattr(summary, "name_changes", []):
        out.print(f"note: {change.describe()}", markup=False, highlight=False, soft_wrap=True)
    if summary.failed:
        console.print(f"[red]{len(summary.failed)} model(s) failed[/red] (full errors: v_models.error):")
        for outcome in summary.failed:
            console.print(
                f"  {outcome.job.model_name}: {safe_text(outcome.error)}", markup=False, highlight=False
            )
    sys.stdout.flush()


def _seconds(outcome, estimates: dict | None) -> str:
    if estimates is not None:
        value = estimates.get(outcome.job.model_key)
        return "-" if value is None or outcome.action == "skip" else f"~{value:.0f}"
    return f"{outcome.seconds:.1f}" if outcome.seconds else "-"
