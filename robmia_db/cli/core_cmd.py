"""CLI layer: check, run, sql and models (no torch at import time; `sql` and `models` never load it)."""

from __future__ import annotations

import sys

import click

from robmia_db.cli.base import db_option, get_state, handle_errors, main

CONFIRM_ABOVE = 500  # models to train in one run before `run` asks for --yes


@main.command("check")
@click.argument("specs", nargs=-1, type=click.Path())
@click.option("--expand", is_flag=True, help="List the models and perturbations each spec expands into.")
@click.option("--explain", is_flag=True, help="Print every spec key with its default and meaning.")
@click.option(
    "--no-data",
    is_flag=True,
    help="Skip counting each dataset's examples (then member counts are not checked against the data).",
)
@handle_errors
def check_command(specs: tuple[str, ...], expand: bool, explain: bool, no_data: bool) -> None:
    """Validate spec files; print every error of every file as `file: key: message`.

    Also counts each dataset's examples (from file headers and names; no image is decoded) and applies
    every model's membership rule to them, so `n_members` larger than the data fails here, not in `run`.

    Example: robmia-db check specs/quickstart.toml --expand
    """
    if explain:
        from robmia_db.spec.explain import explain as explain_keys

        click.echo(explain_keys(), nl=False)
        if not specs:
            return
    if not specs:
        raise click.UsageError("give at least one spec file (or --explain)")
    from robmia_db.spec import load_specs

    loaded = load_specs(list(specs))
    lines: dict[str, list[str]] = {}
    if not no_data:
        from robmia_db.errors import SpecErrors
        from robmia_db.runner.data import check_data

        checks = check_data(loaded)
        errors = [error for check in checks for error in check.errors]
        if errors:
            raise SpecErrors(errors)
        lines = {str(check.path): check.lines for check in checks}
    for item in loaded:
        click.echo(f"{item.path}: ok ({len(item.jobs)} model{'s' if len(item.jobs) != 1 else ''})")
        for line in lines.get(str(item.path), ["data: not checked (--no-data)"]):
            click.echo(f"  {line}")
        if expand:
            epochs = sum(int(job.identity["training"]["epochs"]) for job in item.jobs)
            perturbations = sum(len(job.perturbations) for job in item.jobs)
            click.echo(
                f"  planned: {len(item.jobs)} models, {epochs:,} training epochs, "
                f"{perturbations} perturbations to record"
                + (
                    f" (run asks for --yes above {CONFIRM_ABOVE} models)"
                    if len(item.jobs) > CONFIRM_ABOVE
                    else ""
                )
            )
            for job in item.jobs:
                click.echo(f"  {job.model_key}  {job.model_name}")
                for p in job.perturbations:
                    eps = f" eps={p.eps:g}" if p.eps is not None else ""
                    click.echo(f"      {p.signal_key}  {p.name} ({p.kind}{eps})")


@main.command("run")
@click.argument("specs", nargs=-1, required=True, type=click.Path())
@db_option
@click.option(
    "--dry-run", is_flag=True, help="Validate and show what would be trained, with a time estimate."
)
@click.option(
    "--threads", type=click.IntRange(1, 256), help="torch threads per model (default: the spec's, else 1)."
)
@click.option(
    "--device", help="auto, cpu, cuda or cuda:N (one chosen GPU); overrides the spec's runtime.device."
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: one model after the other here; ray: one Ray task per model (pip install 'robmia-db[ray]').",
)
@click.option("--address", help="Ray: join this cluster ('auto' or host:port) instead of starting one here.")
@click.option("--cpus-per-model", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
              help="Ray: CPUs reserved per model.")  # fmt: skip
@click.option("--gpus-per-model", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Ray: GPUs per model; fractional shares a GPU (0.25 = four models per GPU).")  # fmt: skip
@click.option("--max-parallel", type=click.IntRange(1), help="Ray: at most this many models at once.")
@click.option("--max-retries", type=click.IntRange(0), default=3, show_default=True,
              help="Ray: retries of a model whose worker died (a model that raises is not retried).")  # fmt: skip
@click.option("--handoff", type=click.Choice(["object", "shared"]), default="object", show_default=True,
              help="Ray: results back through the object store, or via files next to the store (shared FS).")  # fmt: skip
@click.option("--yes", is_flag=True, help=f"Train even when more than {CONFIRM_ABOVE} models are planned.")
@click.option(
    "--retrain",
    multiple=True,
    metavar="MODEL",
    help="Train this model (key or name) again from scratch, replacing its checkpoint, signals and scores.",
)
@handle_errors
def run_command(
    specs: tuple[str, ...],
    dry_run: bool,
    threads: int | None,
    device: str | None,
    executor: str,
    address: str | None,
    cpus_per_model: float,
    gpus_per_model: float,
    max_parallel: int | None,
    max_retries: int,
    handoff: str,
    retrain: tuple[str, ...],
    yes: bool,
) -> None:
    """Train what the store lacks and record per-sample signals; skip what exists.

    Models that fail are recorded as failed (why: v_models.error) and the run goes on; the exit code is 1
    if any failed. A model whose checkpoint is lost or was replaced fails with that reason; `--retrain`
    trains it again. More than 500 models to train need `--yes`.
    With --executor ray each model is one Ray task; this process alone writes the store, one transaction
    per finished model, so sql/score/report work during the run.

    Example: robmia-db run specs/quickstart.toml --executor ray --max-parallel 2
    """
    from robmia_db.spec import load_specs

    ray_flags = {
        "--address": address, "--max-parallel": max_parallel,
        "--cpus-per-model": cpus_per_model != 1.0, "--gpus-per-model": gpus_per_model != 0.0,
        "--max-retries": max_retries != 3, "--handoff": handoff != "object",
    }  # fmt: skip
    if executor != "ray":
        given = [flag for flag, value in ray_flags.items() if value]
        if given:
            raise click.UsageError(f"{given[0]} applies to --executor ray only")
    loaded = load_specs(list(specs))  # report spec errors before paying for the torch import

    from robmia_db.cli.progress import RichReporter, print_summary
    from robmia_db.runner.executor import RayOptions, run_specs

    ray_options = None
    if executor == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:  # found, not imported: only the Ray executor imports it
            raise click.UsageError("--executor ray needs Ray: pip install 'robmia-db[ray]'")
        ray_options = RayOptions(
            address=address, cpus_per_model=cpus_per_model, gpus_per_model=gpus_per_model,
            max_parallel=max_parallel, max_retries=max_retries, handoff=handoff,
        )  # fmt: skip
    state = get_state()
    reporter = RichReporter()
    with reporter:
        summary = run_specs(
            list(specs),
            state.db_path,
            reporter=reporter,
            threads=threads,
            device=device,
            dry_run=dry_run,
            loaded=loaded,
            executor=executor,
            ray_options=ray_options,
            retrain=list(retrain),
            confirm_above=None if yes else CONFIRM_ABOVE,
        )
    print_summary(summary, dry_run=dry_run, estimates=reporter.estimates if dry_run else None)
    if summary.failed:
        sys.exit(1)


@main.command("sql")
@click.argument("query")
@db_option
@click.option(
    "--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True
)
@click.option("--max-rows", type=int, default=200, show_default=True, help="Rows shown by --format table.")
@handle_errors
def sql_command(query: str, fmt: str, max_rows: int) -> None:
    """Run read-only SQL on the store (views: v_models, v_signals, v_perturbations, ...).

    Example: robmia-db sql "SELECT model_name, kind, is_member, avg(confidence) FROM v_signals GROUP BY ALL"
    """
    from robmia_db.store.query import format_result, run_query

    table = run_query(get_state().db_path, query)
    click.echo(format_result(table, fmt, max_rows=max_rows), nl=False)


@main.command("models")
@db_option
@click.option("--experiment", help="Only models of this experiment.")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True
)
@handle_errors
def models_command(experiment: str | None, fmt: str) -> None:
    """List stored models with their accuracies (benign, adversarial, verified).

    Example: robmia-db models --experiment quickstart
    """
    from robmia_db.store.query import check_experiment, format_result, run_query

    if experiment is not None:
        check_experiment(get_state().db_path, experiment)
    where = "WHERE experiment = $experiment" if experiment else ""
    table = run_query(
        get_state().db_path,
        f"""SELECT model_key, model_name, defense, eps, seed, status,
                   round(train_acc, 4) AS train_acc, round(test_acc, 4) AS test_acc,
                   round(adv_train_acc, 4) AS adv_train_acc, round(adv_test_acc, 4) AS adv_test_acc,
                   round(verified_train_acc, 4) AS ver_train_acc, round(verified_test_acc, 4) AS ver_test_acc,
                   n_perturbations
            FROM v_models {where} ORDER BY experiment, model_name""",
        params={"experiment": experiment} if experiment else None,
    )
    click.echo(format_result(table, fmt, max_rows=10_000), nl=False)
    for line in _shared_name_notes(get_state().db_path, experiment):
        click.echo(f"note: {line}", err=fmt != "table")


def _shared_name_notes(db_path, experiment: str | None) -> list[str]:
    """One line per name that several stored models carry (a spec edited and rerun under the same name)."""
    import json

    from robmia_db.spec.identity import config_differences
    from robmia_db.store.query import run_query

    where = "AND experiment = $experiment" if experiment else ""
    rows = run_query(
        db_path,
        f"""SELECT model_name, model_key, config FROM v_models
            WHERE model_name IN (SELECT model_name FROM v_models GROUP BY 1 HAVING count(*) > 1) {where}
            ORDER BY model_name, finished_at NULLS FIRST, model_key""",
        params={"experiment": experiment} if experiment else None,
    ).to_pylist()
    notes = []
    for previous, current in zip(rows, rows[1:]):
        if previous["model_name"] != current["model_name"]:
            continue
        differences = config_differences(
            json.loads(previous["config"] or "{}"), json.loads(current["config"] or "{}")
        )
        notes.append(
            f"{current['model_name']} names {previous['model_key']} and {current['model_key']}: "
            + ("; ".join(differences) or "same settings, another training code version")
        )
    return notes
