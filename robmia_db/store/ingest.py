"""Store layer: the writes. One finished model (row, membership, perturbations, signals) per transaction.

Metadata rows are the SQLModel classes of `tables.py` (one declaration of their columns); per-sample rows go
in through Arrow (`con.register` + INSERT ... SELECT), never the ORM or executemany:
those are 560x and 5,300x slower for this shape of data (conventions section 4).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from robmia_db.errors import StoreError
from robmia_db.store.connection import transaction
from robmia_db.store.tables import Model, Perturbation, insert_sql, row_values


@dataclass
class PerturbationRecord:
    """One perturbation's metadata row and its per-sample signal table."""

    signal_key: str
    model_key: str
    name: str
    kind: str
    eps: float | None
    settings: dict[str, Any]
    signals: pa.Table
    seconds: float | None = None


# named columns, from the declaration: a column added later never shifts the values of a positional INSERT
INSERT_MODEL = insert_sql(Model)
INSERT_PERTURBATION = insert_sql(Perturbation)


def existing_models(con: duckdb.DuckDBPyConnection, model_keys: list[str]) -> dict[str, dict[str, Any]]:
    """Status and stored signal keys of the given models (absent keys are not in the store)."""
    if not model_keys:
        return {}
    keys = pa.table({"model_key": pa.array(model_keys, pa.string())})
    con.register("wanted_keys", keys)
    try:
        rows = con.execute(
            """
            SELECT m.model_key, m.status, m.checkpoint, m.checkpoint_sha256,
                   list(p.signal_key) FILTER (WHERE p.signal_key IS NOT NULL)
            FROM models m JOIN wanted_keys USING (model_key)
            LEFT JOIN perturbations p USING (model_key)
            GROUP BY ALL
            """
        ).fetchall()
    finally:
        con.unregister("wanted_keys")
    return {
        key: {
            "status": status,
            "checkpoint": checkpoint,
            "sha256": sha256,
            "signal_keys": set(signal_keys or []),
        }
        for key, status, checkpoint, sha256, signal_keys in rows
    }


def same_name_models(
    con: duckdb.DuckDBPyConnection, wanted: list[tuple[str, str]]
) -> list[tuple[str, str, str, dict[str, Any]]]:
    """Stored models that carry one of the given names under another key.

    `wanted` holds (model_name, model_key) pairs; returns (model_name, new key, stored key, stored config)
    for each stored model whose name is wanted with a different key: an edited spec rerun under its old
    name trains a second model with that name, and the caller says so.
    """
    if not wanted:
        return []
    table = pa.table(
        {
            "model_name": pa.array([name for name, _ in wanted], pa.string()),
            "model_key": pa.array([key for _, key in wanted], pa.string()),
        }
    )
    con.register("wanted_names", table)
    try:
        rows = con.execute(
            """
            SELECT w.model_name, w.model_key, m.model_key, m.config
            FROM wanted_names w JOIN models m ON m.model_name = w.model_name AND m.model_key != w.model_key
            WHERE m.model_key NOT IN (SELECT model_key FROM wanted_names)
            ORDER BY w.model_name, m.finished_at NULLS FIRST, m.model_key
            """
        ).fetchall()
    finally:
        con.unregister("wanted_names")
    return [(name, new, old, json.loads(config) if config else {}) for name, new, old, config in rows]


def upsert_experiment(
    con: duckdb.DuckDBPyConnection, name: str, description: str, spec_path: str | None, spec_text: str | None
) -> None:
    con.execute(
        """
        INSERT INTO experiments VALUES (?, ?, ?, ?, ?)
        ON CONFLICT (name) DO UPDATE SET description = excluded.description, spec_path = excluded.spec_path,
            spec_text = excluded.spec_text, updated_at = excluded.updated_at
        """,
        [name, description, spec_path, spec_text, datetime.now(timezone.utc)],
    )


def rename_model(
    con: duckdb.DuckDBPyConnection, model_key: str, model_name: str, experiment: str | None
) -> None:
    """Names are metadata: a renamed experiment updates them in place and never retrains."""
    con.execute(
        "UPDATE models SET model_name = ?, experiment = ? WHERE model_key = ? AND (model_name != ? OR experiment IS DISTINCT FROM ?)",
        [model_name, experiment, model_key, model_name, experiment],
    )


def _drop_perturbation_results(con: duckdb.DuckDBPyConnection, model_key: str, name: str) -> None:
    for table in ("scores", "metrics", "attack_skips"):
        con.execute(f"DELETE FROM {table} WHERE model_key = ? AND perturbation = ?", [model_key, name])


def rename_perturbation(con: duckdb.DuckDBPyConnection, model_key: str, signal_key: str, name: str) -> None:
    """Perturbation names are metadata too: renaming one in a spec renames it, and its scores, in place."""
    rows = con.execute("SELECT name FROM perturbations WHERE signal_key = ?", [signal_key]).fetchall()
    if not rows or rows[0][0] == name:
        return
    old = rows[0][0]
    taken = con.execute(
        "SELECT count(*) FROM perturbations WHERE model_key = ? AND name = ? AND signal_key != ?",
        [model_key, name, signal_key],
    ).fetchall()[0][0]
    if taken:
        return  # another setting already holds the name; the spec's rerun replaces it when recomputed
    con.execute("UPDATE perturbations SET name = ? WHERE signal_key = ?", [name, signal_key])
    for table in ("scores", "metrics", "attack_skips"):
        con.execute(
            f"UPDATE {table} SET perturbation = ? WHERE model_key = ? AND perturbation = ?",
            [name, model_key, old],
        )


def _insert_examples(con: duckdb.DuckDBPyConnection, dataset: str, examples: pa.Table) -> None:
    con.register("incoming_examples", examples)
    try:
        con.execute(
            """
            INSERT INTO examples
            SELECT ?, i.example_id, i.label, i.origin_split FROM incoming_examples i
            WHERE NOT EXISTS (SELECT 1 FROM examples e WHERE e.dataset = ? AND e.example_id = i.example_id)
            """,
            [dataset, dataset],
        )
    finally:
        con.unregister("incoming_examples")


def _check_unique_examples(record: PerturbationRecord) -> None:
    ids = np.sort(
        record.signals.column("example_id").to_numpy()
    )  # sort + neighbours: 20x faster than np.unique
    if len(ids) > 1 and bool((ids[1:] == ids[:-1]).any()):
        raise StoreError(f"perturbation {record.name!r} of model {record.model_key} repeats example ids")


def perturbation_accuracies(table: pa.Table) -> tuple[float | None, float | None]:
    correct = table.column("is_correct").to_numpy(zero_copy_only=False)
    member = table.column("is_member").to_numpy(zero_copy_only=False)
    member_acc = float(correct[member].mean()) if member.any() else None
    nonmember_acc = float(correct[~member].mean()) if (~member).any() else None
    return member_acc, nonmember_acc


def _insert_perturbation(con: duckdb.DuckDBPyConnection, record: PerturbationRecord) -> None:
    """Insert one perturbation. `record.signals` is one table, or an iterator of row chunks (a streamed
    import, whose caller has checked the ids are distinct): memory then holds one chunk, not the whole."""
    chunked = not isinstance(record.signals, pa.Table)
    if not chunked:
        _check_unique_examples(record)
        member_acc, nonmember_acc = perturbation_accuracies(record.signals)
    # replacing is idempotent: a rerun that recomputes a perturbation never duplicates its rows
    # the signals table has no index: scan it only when the perturbation is really there
    if con.execute("SELECT count(*) FROM perturbations WHERE signal_key = ?", [record.signal_key]).fetchall()[
        0
    ][0]:
        con.execute("DELETE FROM signals WHERE signal_key = ?", [record.signal_key])
        con.execute("DELETE FROM perturbations WHERE signal_key = ?", [record.signal_key])
    # a name means one setting per model: new settings under an old name replace the old signals,
    # and scores computed from them go with them
    stale = [
        row[0]
        for row in con.execute(
            "SELECT signal_key FROM perturbations WHERE model_key = ? AND name = ?",
            [record.model_key, record.name],
        ).fetchall()
    ]
    if stale:
        _drop_perturbation_results(con, record.model_key, record.name)
        for key in stale:
            con.execute("DELETE FROM signals WHERE signal_key = ?", [key])
            con.execute("DELETE FROM perturbations WHERE signal_key = ?", [key])
    counts = np.zeros(4, dtype=np.int64)  # correct members, members, correct non-members, non-members
    n_rows = 0
    failure: list[BaseException] = []

    def counted(chunks):
        nonlocal n_rows
        try:
            for chunk in chunks:
                correct = chunk.column("is_correct").to_numpy(zero_copy_only=False)
                member = chunk.column("is_member").to_numpy(zero_copy_only=False)
                counts[:] += [
                    int(correct[member].sum()),
                    int(member.sum()),
                    int(correct[~member].sum()),
                    int((~member).sum()),
                ]
                n_rows += chunk.num_rows
                yield from chunk.to_batches()
        except BaseException as exc:  # DuckDB reports it as its own error: the original is raised below
            failure.append(exc)
            raise

    if not chunked:
        n_rows = record.signals.num_rows
        incoming = record.signals
    else:
        # ONE INSERT that pulls the chunks through an Arrow stream: a streamed INSERT inside a transaction is
        # written to the file as it goes (optimistic writes) and holds about `memory_limit`; one INSERT per
        # chunk held ~180 bytes a row outside DuckDB's accounting until COMMIT (benchmarks/bench_memory.py)
        chunks = iter(record.signals)
        first = next(chunks, None)
        incoming = (
            None
            if first is None
            else pa.RecordBatchReader.from_batches(first.schema, counted(itertools.chain([first], chunks)))
        )
    if incoming is not None:
        con.register("incoming_signals", incoming)
        try:
            con.execute("INSERT INTO signals BY NAME SELECT * FROM incoming_signals")
        except duckdb.Error:
            if failure:
                raise failure[0] from None
            raise
        finally:
            con.unregister("incoming_signals")
    if chunked:
        member_acc = float(counts[0] / counts[1]) if counts[1] else None
        nonmember_acc = float(counts[2] / counts[3]) if counts[3] else None
    row = Perturbation(
        signal_key=record.signal_key, model_key=record.model_key, name=record.name, kind=record.kind,
        eps=record.eps, settings=record.settings, n_rows=n_rows, member_acc=member_acc,
        nonmember_acc=nonmember_acc, seconds=record.seconds, created_at=datetime.now(timezone.utc),
    )  # fmt: skip
    con.execute(INSERT_PERTURBATION, row_values(row))


def write_model(
    con: duckdb.DuckDBPyConnection,
    model: Model,
    membership: pa.Table | None,
    examples: pa.Table | None,
    perturbations: list[PerturbationRecord],
) -> None:
    """Write a finished model and its signals atomically (a kill at any moment leaves none of it).

    `membership` is None when the model is already stored (only new perturbations are added).
    """
    with transaction(con):
        if membership is not None:
            _drop_model_results(con, model.model_key)
            con.execute("DELETE FROM membership WHERE model_key = ?", [model.model_key])
            con.execute("DELETE FROM models WHERE model_key = ?", [model.model_key])
            con.execute(INSERT_MODEL, row_values(model))
            con.register("incoming_membership", membership)
            try:
                con.execute(
                    "INSERT INTO membership SELECT ?, example_id, is_member FROM incoming_membership",
                    [model.model_key],
                )
            finally:
                con.unregister("incoming_membership")
        else:
            # new perturbations from a checkpoint that verified: an earlier error of this model is over
            con.execute("UPDATE models SET error = NULL WHERE model_key = ?", [model.model_key])
        if examples is not None and model.dataset:
            _insert_examples(con, model.dataset, examples)
        for record in perturbations:
            _insert_perturbation(con, record)


def _drop_model_results(con: duckdb.DuckDBPyConnection, model_key: str) -> None:
    """A (re)trained model replaces everything derived from its old weights (`run --retrain`)."""
    keys = [
        row[0]
        for row in con.execute(
            "SELECT signal_key FROM perturbations WHERE model_key = ?", [model_key]
        ).fetchall()
    ]
    if not keys:
        return  # no scan of the index-free signals table for a model that never had signals
    for table in ("scores", "metrics", "attack_skips", "signals", "perturbations"):
        con.execute(f"DELETE FROM {table} WHERE model_key = ?", [model_key])


def write_failed_model(con: duckdb.DuckDBPyConnection, model: Model) -> None:
    """Record a model whose training or signals failed, with its error; a rerun retries it."""
    with transaction(con):
        rows = con.execute("SELECT status FROM models WHERE model_key = ?", [model.model_key]).fetchall()
        if rows and rows[0][0] == "completed":
            # a completed model that only failed to add a perturbation keeps its status and its signals,
            # and shows why in v_models.error (the run's summary points there)
            con.execute("UPDATE models SET error = ? WHERE model_key = ?", [model.error, model.model_key])
            return
        con.execute("DELETE FROM models WHERE model_key = ?", [model.model_key])
        model.status = "failed"
        con.execute(INSERT_MODEL, row_values(model))
