"""The `sql`, `models` and global options of the CLI: output formats that parse, read-only refusals,
one-line errors, the store chosen by --db / $ROBMIA_DB, and no torch import where none is needed.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import REPO, TrainedStore, clean_env

from robmia_db.cli import main

QUERY = (
    "SELECT m.model_name, m.defense, m.eps, m.test_acc, s.probs FROM v_models m JOIN v_signals s USING (model_key) "
    "WHERE s.perturbation = 'benign' AND s.example_id = (SELECT min(example_id) FROM v_signals) ORDER BY 1"
)


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def expected_rows(trained_store: TrainedStore):
    from robmia_db.store.query import run_query

    return run_query(trained_store.db, QUERY).to_pylist()


def test_sql_json_parses_to_the_rows(trained_store: TrainedStore, expected_rows):
    result = invoke("sql", QUERY, "--db", str(trained_store.db), "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["model_name"] for r in rows] == ["tiny/natural-s0", "tiny/pgd_at-eps0.1-s0"]
    assert rows == expected_rows  # floats, NULLs and the probs list survive the round trip
    assert len(rows[0]["probs"]) == 10 and sum(rows[0]["probs"]) == pytest.approx(1, abs=1e-6)


def test_sql_csv_parses_to_the_rows(trained_store: TrainedStore, expected_rows):
    result = invoke("sql", QUERY, "--db", str(trained_store.db), "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [list(r) for r in rows][0] == ["model_name", "defense", "eps", "test_acc", "probs"]
    for row, want in zip(rows, expected_rows, strict=True):
        assert row["model_name"] == want["model_name"] and row["defense"] == want["defense"]
        assert (float(row["eps"]) if row["eps"] else None) == want["eps"]
        assert float(row["test_acc"]) == want["test_acc"]
        assert json.loads(row["probs"]) == pytest.approx(want["probs"], rel=1e-7)


def test_sql_table_is_aligned_with_a_row_count(trained_store: TrainedStore, expected_rows):
    result = invoke(
        "sql", "SELECT model_name, eps, test_acc FROM v_models ORDER BY 1", "--db", str(trained_store.db)
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["model_name", "eps", "test_acc"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split()[:2] == ["tiny/natural-s0", "NULL"]
    assert lines[3].split()[:2] == ["tiny/pgd_at-eps0.1-s0", "0.1"]
    assert float(lines[2].split()[2]) == pytest.approx(expected_rows[0]["test_acc"], rel=1e-5)
    assert lines[-1] == "(2 rows)"
    widths = {len(line) for line in lines[:2]}
    assert len(widths) == 1  # header and rule line up


def test_models_command_lists_accuracies(trained_store: TrainedStore, expected_rows):
    result = invoke("models", "--db", str(trained_store.db), "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["model_name"], r["status"], r["n_perturbations"]) for r in rows] == [
        ("tiny/natural-s0", "completed", 2),
        ("tiny/pgd_at-eps0.1-s0", "completed", 2),
    ]
    assert [r["test_acc"] for r in rows] == [round(r["test_acc"], 4) for r in expected_rows]
    # an experiment the store does not hold is an error, not an empty list (issue 12 item 3)
    none = invoke("models", "--db", str(trained_store.db), "--experiment", "other", "--format", "json")
    assert none.exit_code == 1 and none.stderr.startswith("Error: --experiment other: no such experiment in ")


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM signals",
        "INSERT INTO experiments (name) VALUES ('x')",
        "CREATE TABLE t (x INT)",
        "DROP VIEW v_models",
    ],
)
def test_sql_refuses_writes(trained_store: TrainedStore, statement):
    result = invoke("sql", statement, "--db", str(trained_store.db))
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: query failed: ") and "read-only" in lines[0]
    assert result.stdout == ""
    check = invoke(
        "sql", "SELECT count(*) AS n FROM signals", "--db", str(trained_store.db), "--format", "csv"
    )
    assert check.stdout == "n\n1600\n"


def test_sql_errors_are_one_line(trained_store: TrainedStore, tmp_path):
    missing = tmp_path / "nowhere.duckdb"
    result = invoke("sql", "SELECT 1", "--db", str(missing))
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: no store at {missing} (create one with `robmia-db run SPEC` or `robmia-db import`)\n"
    )
    assert not missing.exists()
    bad = invoke("sql", "SELEC 1", "--db", str(trained_store.db))
    assert bad.exit_code == 1 and len(bad.stderr.splitlines()) == 1
    assert bad.stderr.startswith("Error: query failed: Parser Error: syntax error")


def test_store_comes_from_db_option_or_environment(trained_store: TrainedStore, tmp_path, monkeypatch):
    query = ["sql", "SELECT count(*) AS n FROM v_models", "--format", "csv"]
    assert invoke("--db", str(trained_store.db), *query).stdout == "n\n2\n"
    assert invoke(*query, "--db", str(trained_store.db)).stdout == "n\n2\n"
    monkeypatch.setenv("ROBMIA_DB", str(trained_store.db))
    assert invoke(*query).stdout == "n\n2\n"
    # an explicit --db wins over the environment
    other = invoke("--db", str(tmp_path / "x.duckdb"), *query)
    assert other.exit_code == 1 and "no store at" in other.stderr
    monkeypatch.delenv("ROBMIA_DB")
    monkeypatch.chdir(tmp_path)
    default = invoke(*query)
    assert default.exit_code == 1 and "no store at robmia.duckdb" in default.stderr


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=clean_env(), cwd=REPO
    )


def test_sql_and_help_do_not_import_torch(trained_store: TrainedStore):
    code = f"""
import sys
from click.testing import CliRunner
from robmia_db.cli import main
runner = CliRunner()
result = runner.invoke(main, ["sql", "SELECT count(*) AS n FROM v_signals", "--db", {str(trained_store.db)!r},
                              "--format", "csv"])
assert result.exit_code == 0, result.output
assert result.stdout == "n\\n1600\\n", result.stdout
assert runner.invoke(main, ["models", "--db", {str(trained_store.db)!r}]).exit_code == 0
assert runner.invoke(main, ["--help"]).exit_code == 0
assert runner.invoke(main, ["sql", "--help"]).exit_code == 0
heavy = sorted(m for m in ("torch", "sklearn", "scipy") if m in sys.modules)
print("heavy:", heavy)
"""
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "heavy: []"


def test_help_in_a_fresh_process_imports_no_torch():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "robmia_db", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    assert result.returncode == 0
    assert "Usage:" in result.stdout and "sql" in result.stdout and "run" in result.stdout
    imported = {
        line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert "click" in imported  # the import log was captured
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}


def test_version_and_command_help():
    assert invoke("--version").stdout.startswith("robmia-db, version ")
    for command in ("check", "run", "sql", "models"):
        result = invoke(command, "--help")
        assert result.exit_code == 0
        assert "Example: robmia-db" in result.stdout
