"""The README stays true: every command is documented, every help ends with an example, the views table
lists each public view's real columns, and the two front-door commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import click
import duckdb
import pytest

from robmia_db.cli import main
from robmia_db.store import schema

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands(group: click.Group, prefix: str = "robmia-db") -> list[tuple[str, click.Command]]:
    found = []
    for name, command in sorted(group.commands.items()):
        found.append((f"{prefix} {name}", command))
        if isinstance(command, click.Group):
            found.extend(_commands(command, f"{prefix} {name}"))
    return found


COMMANDS = _commands(main)


@pytest.mark.parametrize(("name", "command"), COMMANDS, ids=[n for n, _ in COMMANDS])
def test_every_command_is_in_the_readme(name: str, command: click.Command):
    assert f"`{name}" in README, f"{name} is not documented in README.md"


@pytest.mark.parametrize(("name", "command"), COMMANDS, ids=[n for n, _ in COMMANDS])
def test_every_command_help_ends_with_an_example(name: str, command: click.Command):
    if isinstance(command, click.Group) and not command.callback:
        return
    text = (command.help or "").strip()
    assert "Example: robmia-db" in text.splitlines()[-1] or "example" in text.lower(), name


def test_views_table_lists_every_column_of_every_public_view(tmp_path: Path):
    con = duckdb.connect(str(tmp_path / "docs.duckdb"))
    schema.migrate(con)
    rows = dict(re.findall(r"^\| `(v_\w+)` \| [^|]+ \| ([^|]+) \|$", README, flags=re.M))
    for view in schema.PUBLIC_VIEWS:
        assert view in rows, f"{view} is missing from the README's views table"
        documented = [c.split(" (")[0].strip() for c in rows[view].split(", ")]
        actual = con.sql(f"SELECT * FROM {view} LIMIT 0").columns
        assert documented == actual, f"{view}: README lists {documented}, the view has {actual}"
    con.close()


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest'
    assert command in README
    assert command in ci


def test_readme_main_job_uses_an_embedded_spec():
    match = re.search(r"pip install torch==2\.13\.0 && pip install -e \. && (robmia-db run (\S+).*)", README)
    assert match, "the README's main-job command is missing"
    assert (ROOT / match.group(2)).exists()


def test_explain_documents_every_spec_key_and_defense():
    from robmia_db.spec.defenses import DEFENSE_PARAMS
    from robmia_db.spec.explain import explain

    text = explain()
    for key in ("experiment.name", "training.eps", "membership.scheme", "signals[].steps", "runtime.threads"):
        assert f"\n{key}  (" in text or text.startswith(f"{key}  ("), key
    for name in DEFENSE_PARAMS:
        assert f"# [defense.{name}]" in text
