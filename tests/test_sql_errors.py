"""`robmia-db sql` errors: one line that keeps DuckDB's own hints, on a real (empty) store."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from robmia_db.cli import main
from robmia_db.store.connection import writing


@pytest.fixture
def store(tmp_path: Path) -> Path:
    db = tmp_path / "s.duckdb"
    with writing(db):
        pass  # a new store: schema and views, no rows
    return db


def duckdb_message(db: Path, sql: str) -> str:
    con = duckdb.connect(str(db), read_only=True)
    try:
        con.sql(sql)
    except duckdb.Error as exc:
        return str(exc)
    finally:
        con.close()
    raise AssertionError(f"{sql!r} did not fail")


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        (
            "SELECT * FROM v_signal",
            'Catalog Error: Table with name v_signal does not exist! Did you mean "v_signals"?',
        ),
        (
            "SELECT modelkey FROM v_models",
            'Binder Error: Referenced column "modelkey" not found in FROM clause! Candidate bindings: '
            '"model_key"',
        ),
        (
            "SELECT 1,\n  2 FRM v_models",
            'Parser Error: syntax error at or near "v_models" (line 2, column 9)',
        ),
    ],
)
def test_sql_errors_keep_duckdbs_hints_on_one_line(store: Path, sql: str, expected: str):
    raw = duckdb_message(store, sql)
    assert "\n" in raw  # DuckDB puts its hint on a line of its own
    result = CliRunner().invoke(main, ["sql", sql, "--db", str(store)])
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"Error: query failed: {expected}")
    # every hint line DuckDB gave survives, in order
    hints = [
        h.strip() for h in raw.splitlines()[1:] if h.strip() and not h.startswith("LINE") and "^" not in h
    ]
    for hint in hints:
        assert hint in line


def test_long_line_errors_name_the_line_only(store: Path):
    sql = "SELECT " + ", ".join(f"{i} AS c{i}" for i in range(60)) + " FRM v_models"
    assert "LINE 1: ..." in duckdb_message(store, sql)  # DuckDB shows a window, so no column is derivable
    result = CliRunner().invoke(main, ["sql", sql, "--db", str(store)])
    assert result.exit_code == 1
    assert (
        result.stderr.strip() == 'Error: query failed: Parser Error: syntax error at or near "FRM" (line 1)'
    )
