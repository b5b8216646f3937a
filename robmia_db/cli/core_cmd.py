"""CLI layer: check, run, sql and models (no torch at import time; `sql` and `models` never load it)."""

from __future__ import annotations

import sys

import click

from robmia_db.cli.base import db_option, get_state, handle_errors, main


@main.command("check")
@click.argument("specs", nargs=-1, type=click.Path())
@click.option("--expand", is_flag=True, help="List the models and perturbations each spec expands into.")
@click.option("--explain", is_flag=True, help="Print every spec key with its default and meaning.")
@handle_errors
def check_command(specs: tuple[str, ...], expand: bool, explain: bool) -> None:
    """Validate spec files; print every error of every file as `file: key: message`.

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
    for item in loaded:
        click.echo(f"{item.path}: ok ({len(item.jobs)} model{'s' if len(item.jobs) != 1 else ''})")
        if expand:
            for job in item.jobs:
                click.echo(f"  {job.model_key}  {job.model_name}")
                for p in job.perturbations:
                    eps = f" eps={p.eps:g}" if p.eps is not None else ""
                    click.echo(f"      {p.signal_key}  {p.name} ({p.kind}{eps})")


@main.command("run")
@click.argument("specs", nargs=-1, required=True, type=click.Path())
@db_option
@click.option("--dry-run", is_flag=True, help="Validate and show what would be trained, without training.")
@click.option("--threads", type=click.IntRange(1, 256), help="torch threads (default: the spec's, else 1).")
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Override the spec's runtime.device."
)
@handle_errors
def run_command(specs: tuple[str, ...], dry_run: bool, threads: int | None, device: str | None) -> None:
    """Train what the store lacks and record per-sample signals; skip what exists.

    Models that fail are recorded as failed and the run goes on; the exit code is 1 if any failed.

    Example: robmia-db run specs/quickstart.toml --db robmia.duckdb
    """
    from robmia_db.spec import load_specs

    loaded = load_specs(list(specs))  # report spec errors before paying for the torch import

    from robmia_db.cli.progress import RichReporter, print_summary
    from robmia_db.runner.executor import run_specs

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
        )
    print_summary(summary, dry_run=dry_run)
    if summary.failed:
        sys.exit(1)


@main.command("sql")
@click.argument("query")
@db_option
@click.option(
    "--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True
)
@click.option("--max-rows", type=int, default=200, show_default=True, help="Rows shown by --format table.")
@click.option(
    "--timeout", type=float, default=15.0, show_default=True, help="Seconds to wait for a busy store."
)
@handle_errors
def sql_command(query: str, fmt: str, max_rows: int, timeout: float) -> None:
    """Run read-only SQL on the store (views: v_models, v_signals, v_perturbations, ...).

    Example: robmia-db sql "SELECT model_name, kind, is_member, avg(confidence) FROM v_signals GROUP BY ALL"
    """
    from robmia_db.store.query import format_result, run_query

    table = run_query(get_state().db_path, query, timeout_s=timeout)
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
