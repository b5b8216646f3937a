"""Store management through the real CLI on real stores: rm, gc, info, export, and DuckDB 1.x compatibility.

References are independent of the code under test: row counts come from direct SQL over every table that
has the key column, file sizes from `os.stat`, the 1.x check from the DuckDB 1.5.6 CLI binary (`duckdb-cli`
wheel), the export from pyarrow reading the Parquet files back.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from conftest import TrainedStore, robmia

from robmia_db.store.connection import checkpoint_dir, run_lock
from robmia_db.store.schema import PUBLIC_VIEWS, migrate


def duckdb1(db: Path, sql: str) -> subprocess.CompletedProcess:
    """The DuckDB 1.x CLI from the `duckdb-cli` wheel (a test dependency), read-only, JSON rows."""
    return subprocess.run(
        [sys.executable, "-m", "duckdb_cli", "-readonly", "-json", str(db), "-c", sql],
        capture_output=True,
        text=True,
        timeout=60,
    )


def counts_by_key(db: Path, column: str, key: str) -> dict[str, int]:
    """Rows per table that carry `column = key`, over every base table that has the column."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        tables = [
            r[0]
            for r in con.execute(
                "SELECT table_name FROM information_schema.columns c JOIN information_schema.tables t "
                "USING (table_catalog, table_schema, table_name) "
                "WHERE column_name = ? AND table_type = 'BASE TABLE'",
                [column],
            ).fetchall()
        ]
        return {
            t: con.execute(f"SELECT count(*) FROM {t} WHERE {column} = ?", [key]).fetchall()[0][0]
            for t in tables
        }
    finally:
        con.close()


def table_counts(db: Path) -> dict[str, int]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        names = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()]
        return {n: con.execute(f"SELECT count(*) FROM {n}").fetchall()[0][0] for n in names}
    finally:
        con.close()


def sql(db: Path, query: str, params=None) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(query, params or []).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def scored_master(trained_store: TrainedStore, tmp_path_factory: pytest.TempPathFactory) -> TrainedStore:
    """The session store with `loss` and `confidence` scored on it (and `attack_model` skipped: no
    reference models), so that every view has rows; scored once, copied by each test."""
    db = trained_store.copy_to(tmp_path_factory.mktemp("scored"))
    attacks = ("--attack", "loss", "--attack", "confidence", "--attack", "attack_model")
    result = robmia("score", "--db", str(db), *attacks)
    assert result.returncode == 0, result.stderr
    return TrainedStore(db, trained_store.spec_path, trained_store.spec, trained_store.actions)


@pytest.fixture
def scored_store(scored_master: TrainedStore, tmp_path: Path) -> Path:
    return scored_master.copy_to(tmp_path / "store")


# ---------------------------------------------------------------------------------------- compatibility


def test_a_new_store_opens_in_duckdb_1x_and_every_view_reads(scored_store: Path):
    version = duckdb1(scored_store, "SELECT version() AS v")
    assert version.returncode == 0, version.stderr
    assert json.loads(version.stdout)[0]["v"].startswith("v1."), version.stdout
    assert sql(
        scored_store, "SELECT tags['storage_version'] FROM duckdb_databases() WHERE database_name = 'store'"
    ) == [("v1.0.0+",)]
    for view in PUBLIC_VIEWS:
        result = duckdb1(scored_store, f"SELECT * FROM {view}")
        assert result.returncode == 0, (view, result.stderr)
        rows = json.loads(result.stdout) if result.stdout.strip() else []
        expected = sql(scored_store, f"SELECT count(*) FROM {view}")[0][0]
        assert len(rows) == expected, view
        assert expected > 0, view
    # numbers survive the trip: the metrics as DuckDB 1.x computes from the same file
    old = json.loads(
        duckdb1(scored_store, "SELECT sum(balanced_accuracy) AS s, sum(auc) AS a FROM v_metrics").stdout
    )
    new = sql(scored_store, "SELECT sum(balanced_accuracy), sum(auc) FROM v_metrics")[0]
    assert old[0]["s"] == pytest.approx(new[0], abs=1e-12) and old[0]["a"] == pytest.approx(new[1], abs=1e-12)


def test_a_duckdb2_format_store_is_refused_by_1x_until_gc_converts_it(tmp_path: Path):
    db = tmp_path / "old.duckdb"
    con = duckdb.connect(str(db))  # DuckDB 2's default format, as an earlier robmia-db wrote
    migrate(con)
    con.execute("INSERT INTO experiments VALUES ('e', 'd', NULL, NULL, now())")
    con.close()
    refused = duckdb1(db, "SELECT * FROM v_experiments")
    assert refused.returncode != 0 and "newer" in (refused.stderr + refused.stdout).lower()
    result = robmia("gc", "--db", str(db))
    assert result.returncode == 0, result.stderr
    assert "storage v2.0.0+ -> v1.0.0+" in result.stdout
    rows = json.loads(duckdb1(db, "SELECT experiment, description FROM v_experiments").stdout)
    assert rows == [{"experiment": "e", "description": "d"}]


# ---------------------------------------------------------------------------------------- rm


def test_rm_lists_by_default_and_removes_every_row_and_the_checkpoint_with_yes(scored_store: Path):
    models = dict(sql(scored_store, "SELECT model_name, model_key FROM models"))
    gone, kept = models["tiny/natural-s0"], models["tiny/pgd_at-eps0.1-s0"]
    before_gone = counts_by_key(scored_store, "model_key", gone)
    before_kept = counts_by_key(scored_store, "model_key", kept)
    assert before_gone["signals"] > 0 and before_gone["scores"] > 0 and before_gone["metrics"] > 0
    tables_before = table_counts(scored_store)

    dry = robmia("rm", "--db", str(scored_store), "tiny/natural-s0")
    assert dry.returncode == 0, dry.stderr
    assert f"would remove 1 model:\n  {gone}  tiny/natural-s0" in dry.stdout
    for table in ("signals", "scores", "metrics", "membership", "perturbations"):
        assert f"{table} {before_gone[table]:,}" in dry.stdout, table
    assert "nothing removed" in dry.stdout
    assert table_counts(scored_store) == tables_before
    assert (checkpoint_dir(scored_store) / f"{gone}.pt").exists()

    done = robmia("rm", "--db", str(scored_store), gone, "--yes")
    assert done.returncode == 0, done.stderr
    assert "removed 1 model" in done.stdout
    assert all(n == 0 for n in counts_by_key(scored_store, "model_key", gone).values())
    assert counts_by_key(scored_store, "model_key", kept) == before_kept
    assert not (checkpoint_dir(scored_store) / f"{gone}.pt").exists()
    assert (checkpoint_dir(scored_store) / f"{kept}.pt").exists()
    # the experiment and its dataset's examples still have a model: they stay
    assert sql(scored_store, "SELECT count(*) FROM experiments")[0][0] == 1
    assert sql(scored_store, "SELECT count(*) FROM examples")[0][0] == tables_before["examples"]
    assert sql(scored_store, "SELECT count(*) FROM v_scores WHERE model_key = ?", [gone])[0][0] == 0


def test_rm_attack_and_experiment(scored_store: Path):
    loss_keys = [r[0] for r in sql(scored_store, "SELECT attack_key FROM attacks WHERE name = 'loss'")]
    confidence_rows = sql(scored_store, "SELECT count(*) FROM v_scores WHERE attack = 'confidence'")[0][0]
    assert loss_keys and confidence_rows > 0
    result = robmia("rm", "--db", str(scored_store), "--attack", "loss", "--yes")
    assert result.returncode == 0, result.stderr
    for key in loss_keys:
        assert all(n == 0 for n in counts_by_key(scored_store, "attack_key", key).values())
    assert (
        sql(scored_store, "SELECT count(*) FROM v_scores WHERE attack = 'confidence'")[0][0]
        == confidence_rows
    )
    assert sql(scored_store, "SELECT count(*) FROM models")[0][0] == 2

    result = robmia("rm", "--db", str(scored_store), "--experiment", "tiny", "--yes")
    assert result.returncode == 0, result.stderr
    assert "experiment(s) left without models: tiny" in result.stdout
    remaining = table_counts(scored_store)
    assert {t: n for t, n in remaining.items() if n and t not in ("schema_version", "attacks")} == {}
    assert not list(checkpoint_dir(scored_store).glob("*.pt"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuchmodel"], "rm: no model with key or name 'nosuchmodel'"),
        (["--experiment", "nope"], "rm: no experiment named 'nope'"),
        (["--attack", "nope"], "rm: no stored attack named 'nope'"),
        (["--imported"], "rm --imported: the store holds no imported models"),
        ([], "rm: name what to remove"),
    ],
)
def test_rm_selectors_that_match_nothing_are_errors(scored_store: Path, args: list[str], message: str):
    before = table_counts(scored_store)
    result = robmia("rm", "--db", str(scored_store), *args, "--yes")
    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: {message}") and "Traceback" not in result.stderr
    assert table_counts(scored_store) == before


def test_rm_and_gc_are_refused_while_a_run_holds_the_store(scored_store: Path):
    before = table_counts(scored_store)
    with run_lock(scored_store, command="robmia-db run tiny.toml"):
        for args in (["rm", "tiny/natural-s0", "--yes"], ["gc"]):
            result = robmia(*args, "--db", str(scored_store))
            assert result.returncode == 1, args
            assert (
                "is being written by a run by process" in result.stderr and "Traceback" not in result.stderr
            )
    assert table_counts(scored_store) == before


# ---------------------------------------------------------------------------------------- gc and info


def test_gc_removes_leftovers_keeps_resumable_partials_and_shrinks_the_file(scored_store: Path):
    folder = checkpoint_dir(scored_store)
    keys = [r[0] for r in sql(scored_store, "SELECT model_key FROM models ORDER BY model_key")]
    leftovers = {
        f"{keys[0]}.pt.tmp4242": b"x" * 100,  # a killed atomic write
        "00000000deadbeef.pt": b"y" * 200,  # a checkpoint whose model is not in the store
        f"{keys[1]}.partial.pt": b"z" * 300,  # a finished model's stale partial
    }
    resumable = folder / "00000000cafef00d.partial.pt"  # training of a model the store lacks yet
    for name, data in leftovers.items():
        (folder / name).write_bytes(data)
    resumable.write_bytes(b"w" * 400)
    other = folder / "notes.txt"
    other.write_text("not ours")

    info = json.loads(robmia("info", "--db", str(scored_store), "--format", "json").stdout)
    assert info["checkpoints"]["tmp"] == {"files": 1, "bytes": 100}
    assert info["checkpoints"]["orphaned"] == {"files": 1, "bytes": 200}
    assert info["checkpoints"]["partial"] == {"files": 2, "bytes": 700}
    assert info["checkpoints"]["checkpoints"]["bytes"] == sum(
        (folder / f"{k}.pt").stat().st_size for k in keys
    )

    dry = robmia("gc", "--db", str(scored_store), "--dry-run")
    assert dry.returncode == 0 and "would remove 3 files" in dry.stdout
    assert all((folder / name).exists() for name in leftovers)

    robmia("rm", "--db", str(scored_store), keys[0], "--yes")  # deleted rows leave free blocks
    tables = table_counts(scored_store)
    size_before = scored_store.stat().st_size
    result = robmia("gc", "--db", str(scored_store))
    assert result.returncode == 0, result.stderr
    assert not any((folder / name).exists() for name in leftovers)
    assert resumable.exists() and other.exists() and (folder / f"{keys[1]}.pt").exists()
    assert "kept 1 partial checkpoint" in result.stdout
    size_after = scored_store.stat().st_size
    assert size_after < size_before
    assert table_counts(scored_store) == tables
    assert sql(scored_store, "SELECT count(*) FROM v_signals")[0][0] == tables["signals"]

    result = robmia("gc", "--db", str(scored_store), "--partial", "--no-compact")
    assert result.returncode == 0 and not resumable.exists()


def test_info_counts_equal_the_tables(scored_store: Path):
    result = robmia("info", "--db", str(scored_store), "--format", "json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert {t["table"]: t["rows"] for t in info["tables"]} == table_counts(scored_store)
    assert info["file_bytes"] == scored_store.stat().st_size
    assert info["schema_version"] == sql(scored_store, "SELECT max(version) FROM schema_version")[0][0]
    assert info["storage_version"] == "v1.0.0+"
    models, completed, imported = sql(
        scored_store,
        "SELECT count(*), count(*) FILTER (status = 'completed'), count(*) FILTER (origin = 'imported') FROM models",
    )[0]
    assert (info["counts"]["models"], info["counts"]["completed"], info["counts"]["imported"]) == (
        models, completed, imported,
    )  # fmt: skip
    assert info["counts"]["attacks"] == 3
    text = robmia("info", "--db", str(scored_store))
    assert text.returncode == 0 and "schema version" in text.stdout and "signals" in text.stdout


# ---------------------------------------------------------------------------------------- export


def test_export_writes_every_view_as_parquet_with_exact_values(scored_store: Path, tmp_path: Path):
    out = tmp_path / "exported"
    result = robmia("export", "--db", str(scored_store), "--to", str(out))
    assert result.returncode == 0, result.stderr
    for view in PUBLIC_VIEWS:
        table = pq.read_table(out / f"{view}.parquet")
        assert table.num_rows == sql(scored_store, f"SELECT count(*) FROM {view}")[0][0], view
    assert not list(out.glob(".*tmp*"))
    metrics = pq.read_table(out / "v_metrics.parquet").to_pylist()
    stored = {
        (r[0], r[1], r[2]): (r[3], r[4])
        for r in sql(
            scored_store, "SELECT model_key, attack, perturbation, auc_numerator2, auc FROM v_metrics"
        )
    }
    for row in metrics:
        numerator, auc = stored[(row["model_key"], row["attack"], row["perturbation"])]
        assert int(row["auc_numerator2"]) == numerator and row["auc"] == auc
    signals = pq.read_table(
        out / "v_signals.parquet", columns=["signal_key", "example_id", "probs"]
    ).to_pylist()
    reference = {
        (r[0], r[1]): r[2] for r in sql(scored_store, "SELECT signal_key, example_id, probs FROM v_signals")
    }
    assert all(reference[(r["signal_key"], r["example_id"])] == r["probs"] for r in signals)

    one = robmia("export", "--db", str(scored_store), "--to", str(tmp_path / "one"), "--view", "v_nope")
    assert one.returncode == 1 and one.stderr.startswith("Error: export: unknown view(s) v_nope")
