"""CLI layer: attacks, score and import (no torch: these work on a laptop without it)."""

from __future__ import annotations

import click

from robmia_db.cli.base import db_option, get_state, handle_errors, main


@main.command("attacks")
@click.option(
    "--attacks", "attack_paths", multiple=True, type=click.Path(), help="Extra attack files or folders."
)
@click.option(
    "--verbose", "-v", is_flag=True, help="Show each attack's needs, params, paper and description."
)
@handle_errors
def attacks_command(attack_paths: tuple[str, ...], verbose: bool) -> None:
    """List built-in and user attacks with their titles.

    Example: robmia-db attacks --attacks my_attacks/
    """
    from robmia_db.attacks.registry import load_registry

    registry = load_registry(list(attack_paths))
    width = max(len(a.name) for a in registry)
    for attack in registry:
        origin = "" if attack.origin == "builtin" else f"  [{attack.origin}: {attack.path}]"
        click.echo(f"{attack.name.ljust(width)}  {attack.title}{origin}")
        if verbose:
            click.echo(f"{'':{width}}  needs: {', '.join(attack.needs)}; params: {attack.params or '-'}")
            click.echo(f"{'':{width}}  paper: {attack.paper}")
            if attack.description:
                click.echo(f"{'':{width}}  {attack.description}")
    for name in registry.overridden:
        click.echo(f"note: a user attack replaces the built-in {name!r}", err=True)


@main.command("score")
@click.option(
    "--attack", "attack_names", multiple=True, metavar="NAME|PATH", help="Attack to score (repeatable)."
)
@click.option(
    "--attacks", "attack_paths", multiple=True, type=click.Path(), help="Register extra attack files/folders."
)
@click.option(
    "--spec",
    "spec_paths",
    multiple=True,
    type=click.Path(),
    help="Take attack names and paths from these specs' [attacks] sections.",
)
@click.option("--model", "model_names", multiple=True, help="Only these models (name or key; repeatable).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Override an attack parameter.")
@click.option("--force", is_flag=True, help="Recompute even where cached scores are current.")
@click.option(
    "--resamples",
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    help="Stratified bootstrap replicates for the metrics' 95% intervals (0: no intervals).",
)
@db_option
@handle_errors
def score_command(attack_names, attack_paths, spec_paths, model_names, params, force, resamples) -> None:
    """Score attacks on every stored model, once per perturbation; only missing or stale pairs run.

    Example: robmia-db score --attack confidence --attack my_attacks/gap.sql
    """
    import json

    from robmia_db.attacks.scoring import score_attacks

    overrides = {}
    for item in params:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--param")
        key, value = item.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value

    class Echo:
        def attack_started(self, attack, n_units):
            pass

        def attack_finished(self, outcome):
            parts = [f"{outcome.scored} scored", f"{outcome.cached} cached"]
            if outcome.skipped:
                parts.append(f"{len(outcome.skipped)} skipped")
            click.echo(f"{outcome.attack.name}: {', '.join(parts)} ({outcome.seconds:.2f} s)")
            reasons = sorted({reason for _, _, reason in outcome.skipped})
            for reason in reasons:
                click.echo(f"  skipped: {reason}")

    attack_names, attack_paths = list(attack_names), list(attack_paths)
    if spec_paths:
        from robmia_db.spec import load_specs

        for item in load_specs(list(spec_paths)):
            attack_paths += [str((item.path.parent / p).resolve()) for p in item.spec.attacks.paths]
            if not attack_names:
                attack_names += [n for n in item.spec.attacks.names if n not in attack_names]
    outcomes = score_attacks(
        get_state().db_path, attack_names or None, attack_paths, overrides, force,
        list(model_names) or None, Echo(), resamples=resamples,
    )  # fmt: skip
    click.echo(
        f"{sum(o.scored for o in outcomes)} (attack, model, perturbation) scored; "
        'see v_metrics: robmia-db sql "SELECT model_name, attack, perturbation, balanced_accuracy, auc FROM v_metrics"'
    )


@main.command("import")
@click.argument("path", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["ccs2019", "npz"]), required=True, help="Input layout.")
@click.option("--name", help="Model name (default: the file's stem).")
@click.option(
    "--experiment", default="imported", show_default=True, help="Experiment to file the model under."
)
@click.option(
    "--dataset", help="Dataset name (models of one dataset can be reference models for each other)."
)
@click.option("--defense", help="Defense label for reports (e.g. pgd_at).")
@db_option
@handle_errors
def import_command(path, fmt, name, experiment, dataset, defense) -> None:
    """Import per-sample outputs made elsewhere as a model with perturbations, then score it like any other.

    ccs2019: the paper authors' npz (output_{train,test}_{benign,adversarial} softmax, {train,test}_label).
    npz: labels, is_member, probs__NAME or logits__NAME per perturbation, optional kind__NAME / eps__NAME /
    example_id. Bad input imports nothing.

    Example: robmia-db import outputs/model_robust.npz --format ccs2019 --name yale_pgd_at
    """
    from robmia_db.attacks.importers import import_outputs
    from robmia_db.cli.base import safe

    result = import_outputs(get_state().db_path, path, fmt, name, experiment, dataset, defense)
    click.echo(safe(result.describe()))
