"""CLI layer: `robmia-db data list|describe`; imports click and cli.base only, the dataset layer lazily."""

from __future__ import annotations

import click

from robmia_db.cli.base import handle_errors, main


def _parse_option(text: str) -> tuple[str, object]:
    """`key=value` with value read as int, float, true/false or text."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"expected KEY=VALUE, got {text!r}", param_hint="--option")
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return key, lowered == "true"
    for cast in (int, float):
        try:
            return key, cast(raw)
        except ValueError:
            pass
    return key, raw


@main.group("data")
def data() -> None:
    """Inspect the datasets robmia-db can load (built in, or read from local files).

    \b
    Example: robmia-db data describe fashion_mnist --root ~/data/fashion-mnist
    """


@data.command("list")
@handle_errors
def list_datasets() -> None:
    """List the registered datasets and the files each one needs.

    \b
    Example: robmia-db data list
    """
    from robmia_db.datasets.base import dataset_names, get_dataset_info

    for name in dataset_names():
        info = get_dataset_info(name)
        click.echo(f"{name}: {info.description}")
        if info.expected_files:
            click.echo(f"    files: {info.expected_files}")
        elif not info.needs_root:
            click.echo("    files: none (embedded)")


@data.command("describe")
@click.argument("name")
@click.option("--root", metavar="DIR", help="Folder or file holding the dataset (default: $ROBMIA_DATA).")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Output format.",
)
@click.option(
    "-o",
    "--option",
    "loader_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Loader option, repeatable (yale: split_seed=0; cifar10: layout=batches|images|npz).",
)
@handle_errors
def describe(name: str, root: str | None, output_format: str, loader_options: tuple[str, ...]) -> None:
    """Load dataset NAME and print its split counts, shape, classes, value range and sha256 checksum.

    \b
    Example: robmia-db data describe yale --root ~/data/extended-yale-b-cropped --format json
    """
    import json

    from robmia_db.datasets.describe import describe_dataset, format_description

    options = dict(_parse_option(text) for text in loader_options)
    summary = describe_dataset(name, root, **options)
    if output_format == "json":
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(format_description(summary))
