"""CLI layer: `robmia-db report` (imports the report layer lazily; never loads torch)."""

from __future__ import annotations

from pathlib import Path

import click

from robmia_db.cli.base import db_option, get_state, handle_errors, main


@main.command("report")
@db_option
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    help="HTML file to write (default reports/<store name>.html); with --tables, the folder for the tables.",
)
@click.option("--experiment", metavar="NAME", help="Only the models of this experiment.")
@click.option(
    "--static",
    type=click.Choice(["png", "svg"]),
    help="Also write every chart as PNG or SVG into <page>-charts/ beside the page.",
)
@click.option(
    "--tables",
    type=click.Choice(["latex", "csv"]),
    help="Instead of the page, write the paper table and the leaderboard with 95% intervals "
    "(booktabs LaTeX or CSV) into the folder -o (default reports/tables).",
)
@click.option("--attack", "attacks", multiple=True, metavar="NAME", help="Only this attack (repeatable).")
@click.option(
    "--exclude-attack",
    "exclude_attacks",
    multiple=True,
    metavar="NAME",
    help="Leave this attack out (repeatable).",
)
@handle_errors
def report_command(
    output: str | None,
    experiment: str | None,
    static: str | None,
    tables: str | None,
    attacks: tuple[str, ...],
    exclude_attacks: tuple[str, ...],
) -> None:
    """Write a self-contained HTML report (works offline) and print its path.

    Sections: overview, the paper's table per dataset, attack leaderboard, ROC curves, confidence/loss
    histograms, robustness generalization gap, sweeps and provenance.

    Example: robmia-db report -o reports/yale.html --experiment yale-paper --static png
    """
    if tables:
        from robmia_db.report.exports import export_tables

        written = export_tables(
            get_state().db_path, tables, output or "reports/tables", experiment,
            attacks=list(attacks) or None, exclude_attacks=list(exclude_attacks) or None,
        )  # fmt: skip
        for path in written:
            click.echo(str(path))
        return
    from robmia_db.errors import RobmiaError
    from robmia_db.report import build_report
    from robmia_db.store.query import check_experiment

    if experiment is not None:
        check_experiment(get_state().db_path, experiment)
    if output and Path(output).is_dir():
        raise RobmiaError(f"-o {output} is a folder; the page needs a file name (or use --tables)")

    path = build_report(
        get_state().db_path,
        output=output,
        experiment=experiment,
        static=static,
        attacks=list(attacks) or None,
        exclude_attacks=list(exclude_attacks) or None,
    )
    click.echo(str(path))
