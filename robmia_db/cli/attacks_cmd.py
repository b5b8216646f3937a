"""CLI layer: attacks, score and import (no torch: these work on a laptop without it)."""

from __future__ import annotations

import sys
import time

import click

from robmia_db.cli.base import db_option, get_state, handle_errors, main


@main.command("attacks")
@click.option(
    "--attacks", "attack_paths", multiple=True, type=click.Path(), help="Extra attack files or folders."
)
@click.option(
    "--verbose", "-v", is_flag=True, help="Show each attack's needs, params, paper and description."
)
@click.option("--replace", is_flag=True, help="Let a user attack take the name of a built-in one.")
@handle_errors
def attacks_command(attack_paths: tuple[str, ...], verbose: bool, replace: bool) -> None:
    """List built-in and user attacks with their titles, without running any of them.

    Trust boundary: SQL attacks run sandboxed (one read-only SELECT over the relations they need, no file
    access). Python attacks are trusted code that runs with your rights, like a plugin: they are marked
    [python: trusted code]; listing reads their ATTACK header statically and never executes the file, but
    `score` does.

    Example: robmia-db attacks --attacks my_attacks/
    """
    from robmia_db.attacks.registry import load_registry

    registry = load_registry(list(attack_paths), replace=replace)
    width = max(len(a.name) for a in registry)
    for attack in registry:
        marks = []
        if attack.language == "python":
            marks.append("[python: trusted code]")
        if attack.origin != "builtin":
            marks.append(f"[{attack.origin}: {attack.path}]")
        click.echo(f"{attack.name.ljust(width)}  {attack.title}" + "".join(f"  {m}" for m in marks))
        if verbose:
            click.echo(f"{'':{width}}  needs: {', '.join(attack.needs)}; params: {attack.params or '-'}")
            if attack.decision_threshold is not None:
                click.echo(f"{'':{width}}  decision rule: member iff score >= {attack.decision_threshold:g}")
            click.echo(f"{'':{width}}  paper: {attack.paper}")
            if attack.description:
                click.echo(f"{'':{width}}  {attack.description}")
    for name in registry.overridden:
        click.echo(f"note: a user attack replaces the built-in {name!r} (--replace)", err=True)


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
    "--replace", is_flag=True, help="Let a user attack take the name of a built-in or of a stored attack."
)
@click.option(
    "--time-limit",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=3600.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds one attack run (one model, or one batch of models) may take before it is stopped "
    "(--timeout is the store lock's wait).",
)
@click.option(
    "--memory-limit", default="4GB", show_default=True, help="DuckDB memory limit of the attack sandbox."
)
@click.option(
    "--resamples",
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    help="Stratified bootstrap replicates for the metrics' 95% intervals (0: no intervals).",
)
@click.option(
    "--calibration-models",
    type=click.IntRange(min=0),
    default=8,
    show_default=True,
    metavar="K",
    help="Reference attacks (LiRA, RMIA, ...): rescore K of each target's references without the target "
    "(nested leave-one-out) to calibrate its threshold; costs K extra runs per target (0: no "
    "calibrated_accuracy for them).",
)
@click.option(
    "--fleet-memory",
    metavar="SIZE",
    default=None,
    help="Memory a reference attack's fleet may take (e.g. 8GB; default $ROBMIA_FLEET_MEMORY, else half the "
    "available memory): a larger fleet is scored model by model from memmaps in a scratch folder, with "
    "the same scores.",
)
@db_option
@handle_errors
def score_command(
    attack_names,
    attack_paths,
    spec_paths,
    model_names,
    params,
    force,
    replace,
    timeout_s,
    memory_limit,
    resamples,
    calibration_models,
    fleet_memory,
) -> None:
    """Score attacks on every stored model, once per perturbation; only missing or stale pairs run.

    Without --attack: every built-in attack, every registered one, and every attack stored earlier (a file
    once passed with --attack, a --param variant) on models that lack it. A --param value other than the
    default makes a variant stored beside the default, named e.g. confidence[temperature=2].
    Ctrl-C stops a running attack within about a second; nothing of that attack is stored.

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
        """One line per attack on stdout; on a terminal, a live `attack: done/total scored` line on stderr
        meanwhile (an attack with nested calibration can run for many minutes), erased when it ends."""

        live = sys.stderr.isatty()
        shown = False

        def attack_started(self, attack, n_units):
            self.started = time.monotonic()

        def units_scored(self, attack, done, total):
            if self.live:
                self.shown = True
                elapsed = time.monotonic() - self.started
                sys.stderr.write(f"\r{attack.name}: {done}/{total} scored ({elapsed:.0f} s)\x1b[K")
                sys.stderr.flush()

        def erase(self):
            if self.shown:
                sys.stderr.write("\r\x1b[K")
                sys.stderr.flush()
                self.shown = False

        def attack_finished(self, outcome):
            self.erase()
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
    echo = Echo()
    try:
        outcomes = score_attacks(
            get_state().db_path, attack_names or None, attack_paths, overrides, force,
            list(model_names) or None, echo, replace=replace, timeout_s=timeout_s, memory_limit=memory_limit,
            resamples=resamples, calibration_models=calibration_models, fleet_memory=fleet_memory,
        )  # fmt: skip
    finally:
        echo.erase()  # an error or Ctrl-C prints its one line on a clean terminal line
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
