"""CLI layer: live progress (per model, epoch and perturbation) and the end-of-run summary table, with rich."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)
out = Console(width=None if Console().is_terminal else 160)


class RichReporter:
    """Draws a models bar and a per-model epochs/perturbations bar; plain lines when not a terminal."""

    def __init__(self) -> None:
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
        self.models_task = None
        self.step_task = None

    def __enter__(self) -> RichReporter:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def name_changed(self, change) -> None:
        console.print(f"[yellow]warning[/yellow]: {change.describe()}", highlight=False, soft_wrap=True)

    def plan(self, jobs, actions) -> None:
        todo = sum(1 for a in actions.values() if a != "skip")
        counts = {a: sum(1 for v in actions.values() if v == a) for a in ("train", "signals", "skip")}
        console.print(
            f"{len(jobs)} model(s): {counts['train']} to train, {counts['signals']} to add signals to, "
            f"{counts['skip']} already stored"
        )
        self.models_task = self.progress.add_task("models", total=todo or 1, status="")

    def model_started(self, job, index, total, action) -> None:
        if action == "skip":
            return
        if not self.live:
            console.print(f"[{index + 1}/{total}] {job.model_name} ({job.model_key}): {action}")
        if self.step_task is not None:
            self.progress.remove_task(self.step_task)
        total_steps = int(job.identity["training"]["epochs"]) if action == "train" else 0
        total_steps += len(job.perturbations)
        self.step_task = self.progress.add_task(f"  {job.model_name}", total=total_steps, status=action)

    def epoch_done(self, job, epoch, epochs, stats) -> None:
        extra = f" eps {stats['eps']:.3g}" if "eps" in stats else ""
        if self.step_task is not None:
            self.progress.update(
                self.step_task, advance=1, status=f"epoch {epoch}/{epochs} loss {stats['loss']:.4f}{extra}"
            )
        if not self.live and (epoch == epochs or epoch % max(1, epochs // 5) == 0):
            console.print(f"    epoch {epoch}/{epochs} loss {stats['loss']:.4f}{extra}")

    def perturbation_started(self, job, perturbation, index, total) -> None:
        if self.step_task is not None:
            if index > 0:
                self.progress.advance(self.step_task)
            self.progress.update(self.step_task, status=f"signals: {perturbation.name} ({perturbation.kind})")
        if not self.live:
            console.print(f"    signals {index + 1}/{total}: {perturbation.name} ({perturbation.kind})")

    def model_finished(self, outcome) -> None:
        if outcome.action == "skip":
            return
        if self.models_task is not None:
            self.progress.advance(self.models_task)
        if outcome.action == "failed":
            console.print(f"[red]failed[/red] {outcome.job.model_name}: {outcome.error}")


def print_summary(summary, dry_run: bool = False) -> None:
    table = Table(title="dry run: nothing trained" if dry_run else f"store: {summary.db_path}")
    for column in ("model", "key", "action", "seconds", "train acc", "test acc", "adv train", "adv test"):
        table.add_column(column, justify="right" if column not in ("model", "key", "action") else "left")
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
            f"{outcome.seconds:.1f}" if outcome.seconds else "-",
            fmt(benign, "train"), fmt(benign, "test"), fmt(adversarial, "train"), fmt(adversarial, "test"),
        )  # fmt: skip
    out.print(table)
    for change in getattr(summary, "name_changes", []):
        out.print(f"note: {change.describe()}", markup=False, highlight=False, soft_wrap=True)
    if summary.failed:
        console.print(f"[red]{len(summary.failed)} model(s) failed[/red]; their errors are in v_models.error")
    sys.stdout.flush()
