"""CLI layer: `robmia-db compare` (paired statistics over stored scores; never loads torch)."""

from __future__ import annotations

import click

from robmia_db.cli.base import db_option, get_state, handle_errors, main


@main.command("compare")
@click.option("--a", "a", required=True, metavar="DEFENSE", help="The defense claimed to leak more.")
@click.option("--b", "b", required=True, metavar="DEFENSE", help="The defense it is compared with.")
@click.option("--attack", default="confidence", show_default=True, help="Attack whose scores are compared.")
@click.option(
    "--kind", type=click.Choice(["benign", "adversarial", "verified"]), help="Only this perturbation kind."
)
@click.option(
    "--metric",
    type=click.Choice(["balanced_accuracy", "auc", "tpr_at_fpr_0", "tpr_at_fpr_1e3", "tpr_at_fpr_1e2"]),
    default="balanced_accuracy",
    show_default=True,
)
@click.option(
    "--resamples", type=click.IntRange(min=1), default=1000, show_default=True, help="Bootstrap replicates."
)
@click.option(
    "--permutations", type=click.IntRange(min=1), default=1000, show_default=True, help="Permutations for p."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the resampling.")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True
)
@db_option
@handle_errors
def compare_command(a, b, attack, kind, metric, resamples, permutations, seed, fmt) -> None:
    """Paired comparison of two defenses: difference A - B with a 95% interval and a p-value.

    Models are matched on dataset, architecture, width and seed, scores on perturbation kind and eps, and
    each pair must share its examples and membership. The interval is a paired bootstrap over examples
    (and seeds); the p-value a paired permutation test; p_holm is Holm-corrected over the printed rows.

    Example: robmia-db compare --a pgd_at --b natural --attack confidence --kind adversarial
    """
    import pyarrow as pa

    from robmia_db.analysis.compare import compare_defenses
    from robmia_db.store.query import format_result

    rows = compare_defenses(get_state().db_path, a, b, attack, kind, metric, resamples, permutations, seed)
    for row in rows:
        row["seeds"] = ",".join("-" if s is None else str(s) for s in row["seeds"])
    click.echo(format_result(pa.Table.from_pylist(rows), fmt), nl=False)
