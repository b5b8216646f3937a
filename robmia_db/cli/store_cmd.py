"""CLI layer: store housekeeping (rm, gc, info, export). No torch: these work on a laptop without it."""

from __future__ import annotations

import json

import click

from robmia_db.cli.base import db_option, get_state, handle_errors, main


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


@main.command("rm")
@click.argument("models", nargs=-1)
@db_option
@click.option("--experiment", "experiments", multiple=True, help="Every model of this experiment.")
@click.option("--attack", "attacks", multiple=True, help="A stored attack by name (every version of it).")
@click.option("--imported", is_flag=True, help="Every imported model.")
@click.option("--failed", is_flag=True, help="Every model recorded as failed.")
@click.option("--yes", is_flag=True, help="Remove them; without it, only list what would go.")
@handle_errors
def rm_command(models, experiments, attacks, imported: bool, failed: bool, yes: bool) -> None:
    """Remove models (by key or name) or attacks, with every row that refers to them and their checkpoints.

    Without --yes it only lists what would be removed. Refused while a `run` is writing the store.

    Example: robmia-db rm --experiment quickstart --yes
    """
    from robmia_db.store.housekeeping import human_bytes, plan_removal, remove

    db = get_state().db_path
    selection = dict(
        models=models, experiments=experiments, attacks=attacks, imported=imported, failed=failed
    )
    removal = remove(db, **selection) if yes else plan_removal(db, **selection)
    verb = "removed" if removal.done else "would remove"
    if removal.models:
        click.echo(f"{verb} {_plural(len(removal.models), 'model')}:")
        for m in removal.models:
            click.echo(
                f"  {m['model_key']}  {m['model_name']}  ({m['origin']}, {m['status']}, "
                f"experiment {m['experiment']})"
            )
    if removal.attacks:
        names = sorted({a["name"] for a in removal.attacks})
        click.echo(f"{verb} {_plural(len(names), 'attack')} ({_plural(len(removal.attacks), 'version')}):")
        for a in removal.attacks:
            click.echo(f"  {a['attack_key']}  {a['name']}  ({a['source_path'] or 'no file'})")
    if removal.experiments:
        click.echo(f"{verb} experiment(s) left without models: {', '.join(removal.experiments)}")
    rows = ", ".join(f"{table} {count:,}" for table, count in sorted(removal.rows.items()))
    click.echo(f"rows: {rows or 'none'}")
    click.echo(f"files: {_plural(len(removal.files), 'checkpoint file')}, {human_bytes(removal.file_bytes)}")
    if not removal.done:
        click.echo("nothing removed; run again with --yes to remove them")


@main.command("gc")
@db_option
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--partial", is_flag=True, help="Also remove partial checkpoints of unfinished models.")
@click.option("--no-compact", is_flag=True, help="Only CHECKPOINT; do not rewrite the store file.")
@handle_errors
def gc_command(dry_run: bool, partial: bool, no_compact: bool) -> None:
    """Remove leftover checkpoint files and give deleted rows' space back (CHECKPOINT, then a rewrite).

    Leftovers: unfinished writes of killed runs (*.tmp*), checkpoints of models not in the store, partial
    checkpoints of finished models. Partial checkpoints of unfinished models are resumable training and
    kept unless --partial. The rewrite also converts an older store to the compatible storage format.

    Example: robmia-db gc --dry-run
    """
    from robmia_db.store.housekeeping import collect_garbage, human_bytes

    garbage = collect_garbage(get_state().db_path, dry_run=dry_run, partial=partial, compact=not no_compact)
    verb = "removed" if garbage.done else "would remove"
    for path, size, reason in garbage.files:
        click.echo(f"  {path.name}  {human_bytes(size)}  {reason}")
    click.echo(f"{verb} {_plural(len(garbage.files), 'file')}, {human_bytes(garbage.file_bytes)}")
    if garbage.kept_partial:
        kept = sum(size for _, size in garbage.kept_partial)
        click.echo(
            f"kept {_plural(len(garbage.kept_partial), 'partial checkpoint')} ({human_bytes(kept)}) of "
            "unfinished models: a rerun resumes from them (--partial removes them)"
        )
    if garbage.done:
        line = f"store: {human_bytes(garbage.size_before)} -> {human_bytes(garbage.size_after or 0)}"
        if garbage.storage_after != garbage.storage_before:
            line += f" (storage {garbage.storage_before} -> {garbage.storage_after})"
        click.echo(line)
        if garbage.skipped_compaction:
            click.echo(f"not compacted: {garbage.skipped_compaction}")
    else:
        click.echo(f"store: {human_bytes(garbage.size_before)}; nothing changed (dry run)")


@main.command("info")
@db_option
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@handle_errors
def info_command(fmt: str) -> None:
    """Store size per table, checkpoint bytes, counts, schema and storage versions.

    Example: robmia-db info --format json
    """
    from robmia_db.store.housekeeping import human_bytes, store_info

    info = store_info(get_state().db_path)
    if fmt == "json":
        click.echo(json.dumps(info.to_dict(), indent=2))
        return
    c = info.counts
    click.echo(
        f"store: {info.path}  {human_bytes(info.file_bytes)}"
        + (f" (+ {human_bytes(info.wal_bytes)} write-ahead log)" if info.wal_bytes else "")
    )
    click.echo(
        f"schema version {info.schema_version}; storage {info.storage_version}; "
        f"{info.used_blocks:,} blocks used, {info.free_blocks:,} free ({human_bytes(info.block_size)} each)"
        + ("; `robmia-db gc` returns free blocks" if info.free_blocks else "")
    )
    click.echo(
        f"models: {c['models']:,} ({c['completed']:,} completed, {c['failed']:,} failed; "
        f"{c['trained']:,} trained, {c['imported']:,} imported); experiments: {c['experiments']:,}; "
        f"perturbations: {c['perturbations']:,}; attacks: {c['attacks']:,} ({_plural(c['attack_versions'], 'version')})"
    )
    width = max(len(t["table"]) for t in info.tables)
    click.echo(f"{'table'.ljust(width)}  {'rows':>12}  {'approx. size':>12}")
    for t in info.tables:
        click.echo(f"{t['table'].ljust(width)}  {t['rows']:>12,}  {human_bytes(t['bytes']):>12}")
    k = info.checkpoints
    click.echo(
        "checkpoints: "
        + "; ".join(f"{name} {v['files']:,} ({human_bytes(v['bytes'])})" for name, v in k.items())
        + (
            "; `robmia-db gc` removes orphaned and tmp files"
            if k["orphaned"]["files"] or k["tmp"]["files"]
            else ""
        )
    )


@main.command("export")
@db_option
@click.option("--to", "out_dir", required=True, type=click.Path(), help="Folder for <view>.parquet files.")
@click.option(
    "--view", "views", multiple=True, help="Only this view (repeatable; default: every public view)."
)
@handle_errors
def export_command(out_dir: str, views: tuple[str, ...]) -> None:
    """Write each public view as Parquet (v_models.parquet, v_signals.parquet, ...) for other tools.

    Example: robmia-db export --to exported/ --view v_metrics
    """
    from robmia_db.store.export import export_views
    from robmia_db.store.housekeeping import human_bytes

    for item in export_views(get_state().db_path, out_dir, views):
        click.echo(f"{item.path}  {item.rows:,} rows  {human_bytes(item.bytes)}")
