"""Reliability through the real CLI on real stores (issue 14): crash windows, foreign files, locks.

Kill points are injected with the test-only `ROBMIA_TEST_KILL_AT` hook (robmia_db/testhooks.py) where a
timer-based kill would land in a 50 ms window only by luck.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from attack_fixtures import synthetic_outputs
from conftest import clean_env

from robmia_db.store.schema import SCHEMA_VERSION


def cli(*args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "robmia_db", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(**env),
    )


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 1 with exactly one `Error:` line and no traceback; returns the line."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture
def outputs_npz(tmp_path: Path) -> Path:
    return synthetic_outputs(3, n=80, n_classes=4).save(tmp_path / "outputs.npz")


def tables(db: Path) -> set[str]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    finally:
        con.close()


# ---- item 1: store creation is atomic; a half-created store is finished by a write command


def test_a_kill_while_the_store_is_created_leaves_a_store_the_next_write_finishes(tmp_path, outputs_npz):
    db = tmp_path / "s.duckdb"
    killed = cli(
        "import", str(outputs_npz), "--format", "npz", "--db", str(db), ROBMIA_TEST_KILL_AT="store-migrating"
    )
    assert killed.returncode == -signal.SIGKILL
    assert db.exists() and tables(db) == set()  # the migration rolled back as a whole
    one_line_error(cli("sql", "SELECT 1", "--db", str(db)), "not a robmia-db store yet", "robmia-db import")
    done = cli("import", str(outputs_npz), "--format", "npz", "--db", str(db))
    assert done.returncode == 0, done.stderr
    rows = cli(
        "sql", "SELECT count(DISTINCT example_id) AS n FROM v_signals", "--db", str(db), "--format", "csv"
    )
    assert rows.stdout.splitlines() == ["n", "80"]


def test_a_store_left_with_an_empty_schema_version_is_finished_not_refused(tmp_path, outputs_npz):
    """The state the old per-migration transactions left after a kill: only an empty schema_version."""
    db = tmp_path / "old-half.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TIMESTAMPTZ)")
    con.close()
    one_line_error(cli("sql", "SELECT 1", "--db", str(db)), "robmia-db run SPEC")
    assert cli("import", str(outputs_npz), "--format", "npz", "--db", str(db)).returncode == 0
    version = cli("sql", "SELECT max(version) AS v FROM schema_version", "--db", str(db), "--format", "csv")
    assert version.stdout.splitlines() == ["v", str(SCHEMA_VERSION)]


def test_import_refuses_a_foreign_duckdb_file_and_leaves_it_untouched(tmp_path, outputs_npz):
    db = tmp_path / "foreign.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE accounts AS SELECT 42 AS balance")
    con.close()
    one_line_error(
        cli("import", str(outputs_npz), "--format", "npz", "--db", str(db)), "is not a robmia-db store"
    )
    assert tables(db) == {"accounts"}


def test_dropped_views_are_an_error_on_read_and_recreated_by_a_write(tmp_path, outputs_npz):
    db = tmp_path / "s.duckdb"
    assert cli("import", str(outputs_npz), "--format", "npz", "--db", str(db)).returncode == 0
    con = duckdb.connect(str(db))
    con.execute("DROP VIEW v_models")
    con.close()
    one_line_error(cli("models", "--db", str(db)), "v_models", "recreates the views")
    assert (
        cli("import", str(outputs_npz), "--format", "npz", "--db", str(db), "--name", "again").returncode == 0
    )
    assert cli("models", "--db", str(db)).returncode == 0


# ---- item 9: a symlink and its target share one run lock


def test_a_symlinked_store_shares_the_run_lock_of_its_target(tmp_path, write_spec):
    from robmia_db.store.connection import run_lock

    db = tmp_path / "s.duckdb"
    link = tmp_path / "link.duckdb"
    link.symlink_to(db)
    spec = write_spec({"training": {"defenses": ["natural"], "epochs": 1}})
    with run_lock(db, command="the test's own run"):
        result = cli("run", str(spec), "--db", str(link))
    one_line_error(result, "is being written by", f"process {os.getpid()}", "the test's own run")
    assert not db.exists()
