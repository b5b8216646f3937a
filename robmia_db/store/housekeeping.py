"""Store layer: housekeeping. Removing models and attacks (`rm`), collecting garbage (`gc`), sizing (`info`).

Every change takes the run lock first, so nothing is removed under a running `run` (which may be about to
reuse a checkpoint or resume a partial one), and then writes in one short transaction. Rows are found by
their keys in every table that has a `model_key` / `attack_key` column, so tables added later are covered
without a change here. Checkpoint files are deleted only after the rows' transaction has committed: a
crash in between leaves orphaned files, which `gc` finds, never rows without their checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa

from robmia_db.errors import StoreError
from robmia_db.store.connection import (
    STORAGE_VERSION,
    checkpoint_dir,
    connect,
    reading,
    run_lock,
    transaction,
    writing,
)
from robmia_db.store.scratch import stale_score_scratch

_CHECKPOINT = re.compile(r"^(?P<key>[0-9a-f]+)\.pt$")
_PARTIAL = re.compile(r"^(?P<key>[0-9a-f]+)\.partial\.pt$")
_TMP = re.compile(r"^[0-9a-f]+(\.partial)?\.pt\.tmp\d*$")


def _tables_with(con: duckdb.DuckDBPyConnection, column: str) -> list[str]:
    return [
        row[0]
        for row in con.execute(
            """
            SELECT c.table_name FROM information_schema.columns c
            JOIN information_schema.tables t USING (table_catalog, table_schema, table_name)
            WHERE c.column_name = ? AND t.table_type = 'BASE TABLE' AND c.table_schema = 'main'
            ORDER BY c.table_name
            """,
            [column],
        ).fetchall()
    ]


@dataclass
class Removal:
    """What `rm` removes (or, in a dry run, would remove)."""

    models: list[dict] = field(default_factory=list)
    attacks: list[dict] = field(default_factory=list)
    experiments: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    files: list[tuple[Path, int]] = field(default_factory=list)
    done: bool = False

    @property
    def file_bytes(self) -> int:
        return sum(size for _, size in self.files)

    @property
    def empty(self) -> bool:
        return not (self.models or self.attacks)


def _select_models(
    con: duckdb.DuckDBPyConnection,
    selectors: list[str],
    experiments: list[str],
    imported: bool,
    failed: bool,
) -> list[dict]:
    columns = "model_key, model_name, experiment, origin, status, checkpoint"
    found: dict[str, dict] = {}

    def add(rows) -> int:
        for row in rows:
            found.setdefault(row[0], dict(zip(columns.split(", "), row)))
        return len(rows)

    for selector in selectors:
        rows = con.execute(
            f"SELECT {columns} FROM models WHERE model_key = ? OR model_name = ? ORDER BY model_name, model_key",
            [selector, selector],
        ).fetchall()
        if not add(rows):
            raise StoreError(f"rm: no model with key or name {selector!r} (see `robmia-db models`)")
    for experiment in experiments:
        rows = con.execute(
            f"SELECT {columns} FROM models WHERE experiment = ? ORDER BY model_name, model_key", [experiment]
        ).fetchall()
        known = con.execute("SELECT count(*) FROM experiments WHERE name = ?", [experiment]).fetchall()[0][0]
        if not rows and not known:
            raise StoreError(f"rm: no experiment named {experiment!r}")
        add(rows)
    if imported and not add(
        con.execute(
            f"SELECT {columns} FROM models WHERE origin = 'imported' ORDER BY model_name, model_key"
        ).fetchall()
    ):
        raise StoreError("rm --imported: the store holds no imported models")
    if failed and not add(
        con.execute(
            f"SELECT {columns} FROM models WHERE status = 'failed' ORDER BY model_name, model_key"
        ).fetchall()
    ):
        raise StoreError("rm --failed: the store holds no failed models")
    return list(found.values())


def _select_attacks(con: duckdb.DuckDBPyConnection, names: list[str]) -> list[dict]:
    found = []
    for name in names:
        rows = con.execute(
            "SELECT attack_key, name, source_path FROM attacks WHERE name = ? ORDER BY created_at", [name]
        ).fetchall()
        if not rows:
            raise StoreError(
                f'rm: no stored attack named {name!r} (see `robmia-db sql "SELECT * FROM v_attacks"`)'
            )
        found += [{"attack_key": key, "name": n, "source_path": path} for key, n, path in rows]
    return found


def _checkpoint_files(db_path: Path, model_keys: list[str]) -> list[tuple[Path, int]]:
    folder = checkpoint_dir(db_path)
    if not folder.is_dir():
        return []
    wanted = set(model_keys)
    files = []
    for path in sorted(folder.iterdir()):
        key = path.name.split(".", 1)[0]
        if key in wanted and path.is_file():
            files.append((path, path.stat().st_size))
    return files


def _plan(con: duckdb.DuckDBPyConnection, db_path: Path, models: list[dict], attacks: list[dict]) -> Removal:
    removal = Removal(models=models, attacks=attacks)
    model_keys = pa.table({"model_key": pa.array([m["model_key"] for m in models], pa.string())})
    attack_keys = pa.table({"attack_key": pa.array([a["attack_key"] for a in attacks], pa.string())})
    con.register("rm_models", model_keys)
    con.register("rm_attacks", attack_keys)
    try:
        by_model = set(_tables_with(con, "model_key"))
        by_attack = set(_tables_with(con, "attack_key"))
        for table in sorted(by_model | by_attack):
            conditions = []
            if table in by_model:
                conditions.append("model_key IN (SELECT model_key FROM rm_models)")
            if table in by_attack:
                conditions.append("attack_key IN (SELECT attack_key FROM rm_attacks)")
            count = con.execute(f'SELECT count(*) FROM "{table}" WHERE {" OR ".join(conditions)}').fetchall()[
                0
            ][0]
            if count:
                removal.rows[table] = count
        # an experiment goes with its last model; the examples of a dataset with their last model
        removal.experiments = [
            row[0]
            for row in con.execute(
                """
                SELECT e.name FROM experiments e
                WHERE EXISTS (SELECT 1 FROM models m JOIN rm_models USING (model_key) WHERE m.experiment = e.name)
                  AND NOT EXISTS (SELECT 1 FROM models m WHERE m.experiment = e.name
                                  AND m.model_key NOT IN (SELECT model_key FROM rm_models))
                ORDER BY e.name
                """
            ).fetchall()
        ]
        if removal.experiments:
            removal.rows["experiments"] = len(removal.experiments)
        examples = con.execute(
            """
            SELECT count(*) FROM examples x
            WHERE x.dataset IN (SELECT m.dataset FROM models m JOIN rm_models USING (model_key))
              AND x.dataset NOT IN (SELECT m.dataset FROM models m
                                    WHERE m.model_key NOT IN (SELECT model_key FROM rm_models)
                                      AND m.dataset IS NOT NULL)
            """
        ).fetchall()[0][0]
        if examples:
            removal.rows["examples"] = examples
    finally:
        con.unregister("rm_models")
        con.unregister("rm_attacks")
    removal.files = _checkpoint_files(db_path, [m["model_key"] for m in models])
    return removal


def _require_selection(*selectors) -> None:
    if not any(selectors):
        raise StoreError("rm: name what to remove (MODEL..., --experiment, --attack, --imported or --failed)")


def plan_removal(
    db_path: str | Path,
    models: list[str] | tuple[str, ...] = (),
    experiments: list[str] | tuple[str, ...] = (),
    attacks: list[str] | tuple[str, ...] = (),
    imported: bool = False,
    failed: bool = False,
) -> Removal:
    """What `rm` would remove: the selected models and attacks, the rows that refer to them, their files.

    A selector that matches nothing is an error (a typo must not look like a successful removal).
    """
    db_path = Path(db_path)
    _require_selection(models, experiments, attacks, imported, failed)
    with reading(db_path) as con:
        chosen_models = _select_models(con, list(models), list(experiments), imported, failed)
        chosen_attacks = _select_attacks(con, list(attacks))
        return _plan(con, db_path, chosen_models, chosen_attacks)


def remove(
    db_path: str | Path,
    models: list[str] | tuple[str, ...] = (),
    experiments: list[str] | tuple[str, ...] = (),
    attacks: list[str] | tuple[str, ...] = (),
    imported: bool = False,
    failed: bool = False,
) -> Removal:
    """Remove what `plan_removal` lists: every row that refers to the models and attacks, in one transaction,
    then their checkpoint files. Refused while a `run` holds the store."""
    db_path = Path(db_path)
    _require_selection(models, experiments, attacks, imported, failed)
    if not db_path.exists():
        raise StoreError(f"no store at {db_path}")
    with run_lock(db_path, command="robmia-db rm"), writing(db_path) as con:
        # selection and deletion in one session: nothing can change between what is listed and what goes
        chosen_models = _select_models(con, list(models), list(experiments), imported, failed)
        chosen_attacks = _select_attacks(con, list(attacks))
        removal = _plan(con, db_path, chosen_models, chosen_attacks)
        model_keys = pa.table({"model_key": pa.array([m["model_key"] for m in chosen_models], pa.string())})
        attack_keys = pa.table(
            {"attack_key": pa.array([a["attack_key"] for a in chosen_attacks], pa.string())}
        )
        con.register("rm_models", model_keys)
        con.register("rm_attacks", attack_keys)
        try:
            with transaction(con):
                for name in removal.experiments:
                    con.execute("DELETE FROM experiments WHERE name = ?", [name])
                if "examples" in removal.rows:
                    con.execute(
                        """
                        DELETE FROM examples
                        WHERE dataset IN (SELECT m.dataset FROM models m JOIN rm_models USING (model_key))
                          AND dataset NOT IN (SELECT m.dataset FROM models m
                                              WHERE m.model_key NOT IN (SELECT model_key FROM rm_models)
                                                AND m.dataset IS NOT NULL)
                        """
                    )
                by_model = set(_tables_with(con, "model_key"))
                by_attack = set(_tables_with(con, "attack_key"))
                # `models` and `attacks` last: the statements above find datasets and experiments through them
                order = sorted((by_model | by_attack) - {"models", "attacks"}) + ["models", "attacks"]
                for table in order:
                    conditions = []
                    if table in by_model:
                        conditions.append("model_key IN (SELECT model_key FROM rm_models)")
                    if table in by_attack:
                        conditions.append("attack_key IN (SELECT attack_key FROM rm_attacks)")
                    if conditions:
                        con.execute(f'DELETE FROM "{table}" WHERE {" OR ".join(conditions)}')
        finally:
            con.unregister("rm_models")
            con.unregister("rm_attacks")
        for path, _ in removal.files:
            path.unlink(missing_ok=True)
    removal.done = True
    return removal


# ------------------------------------------------------------------------------------------------ gc


@dataclass
class Garbage:
    """What `gc` found and, unless a dry run, removed; file sizes before and after compaction."""

    files: list[tuple[Path, int, str]] = field(default_factory=list)
    kept_partial: list[tuple[Path, int]] = field(default_factory=list)
    size_before: int = 0
    size_after: int | None = None
    storage_before: str | None = None
    storage_after: str | None = None
    skipped_compaction: str | None = None
    done: bool = False

    @property
    def file_bytes(self) -> int:
        return sum(size for _, size, _ in self.files)


def _store_bytes(db_path: Path) -> int:
    wal = db_path.with_name(db_path.name + ".wal")
    return db_path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def storage_version(con: duckdb.DuckDBPyConnection) -> str | None:
    """The on-disk format of the open store, as DuckDB names it (`v1.0.0+` = readable by DuckDB >= 1.0)."""
    rows = con.execute(
        "SELECT tags['storage_version'] FROM duckdb_databases() WHERE database_name = current_database()"
    ).fetchall()
    return rows[0][0] if rows else None


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _find_garbage(db_path: Path, stored: dict[str, str], partial: bool) -> Garbage:
    garbage = Garbage()
    for scratch in stale_score_scratch(db_path):
        garbage.files.append((scratch, _folder_bytes(scratch), "staged scores of a killed score run"))
    folder = checkpoint_dir(db_path)
    if not folder.is_dir():
        return garbage
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        size = path.stat().st_size
        if _TMP.match(path.name):
            garbage.files.append((path, size, "unfinished write (killed run)"))
        elif match := _CHECKPOINT.match(path.name):
            if match["key"] not in stored:
                garbage.files.append((path, size, "orphaned checkpoint (no model in the store)"))
        elif match := _PARTIAL.match(path.name):
            status = stored.get(match["key"])
            if status == "completed":
                garbage.files.append((path, size, "partial checkpoint of a finished model"))
            elif partial:
                garbage.files.append((path, size, "partial checkpoint (resumable training, --partial)"))
            else:
                garbage.kept_partial.append((path, size))
    return garbage


def _compact(db_path: Path, garbage: Garbage) -> None:
    """Rewrite the store into a fresh file (deleted rows' blocks are not returned by CHECKPOINT alone).

    The copy is read through a read-only connection, which keeps every writer out until the new file has
    replaced the old one; a store with a write-ahead log (written since the checkpoint) is left as is.
    """
    tmp = db_path.with_name(db_path.name + ".compact.tmp")
    for stale in (tmp, tmp.with_name(tmp.name + ".wal")):
        stale.unlink(missing_ok=True)
    con = connect(db_path, read_only=True)
    try:
        if db_path.with_name(db_path.name + ".wal").exists():
            garbage.skipped_compaction = "the store was written meanwhile; rerun gc"
            return
        source = con.execute("SELECT current_database()").fetchall()[0][0]
        con.execute(f"ATTACH '{tmp}' AS robmia_compacted (STORAGE_VERSION '{STORAGE_VERSION}', READ_WRITE)")
        try:
            con.execute(f'COPY FROM DATABASE "{source}" TO robmia_compacted')
        finally:
            con.execute("DETACH robmia_compacted")
        os.replace(tmp, db_path)
    except duckdb.Error as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"gc: compaction failed, store unchanged: {str(exc).splitlines()[0]}") from exc
    finally:
        con.close()


def collect_garbage(
    db_path: str | Path, dry_run: bool = False, partial: bool = False, compact: bool = True
) -> Garbage:
    """Remove leftover checkpoint files and return the space of deleted rows to the file system.

    Removed: staged scores of killed `score` runs, `*.tmp*` files of killed writes, checkpoints of models not in the store, partial checkpoints
    of finished models (and, with `partial`, those of unfinished ones: their training restarts from 0).
    Then a DuckDB CHECKPOINT, and with `compact` a rewrite of the file (which also converts a store
    written by an older robmia-db to the compatible storage format).
    """
    db_path = Path(db_path)
    if not db_path.exists():
        raise StoreError(f"no store at {db_path}")

    def survey() -> tuple[Garbage, str | None]:
        with reading(db_path) as con:
            stored = dict(con.execute("SELECT model_key, status FROM models").fetchall())
            version = storage_version(con)
        return _find_garbage(db_path, stored, partial), version

    if dry_run:
        garbage, garbage.storage_before = survey()
        garbage.size_before = _store_bytes(db_path)
        return garbage
    with run_lock(db_path, command="robmia-db gc"):
        garbage, garbage.storage_before = survey()
        for path, _, _ in garbage.files:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        garbage.size_before = _store_bytes(db_path)
        with writing(db_path) as con:
            con.execute("CHECKPOINT")
        if compact:
            _compact(db_path, garbage)
        with reading(db_path) as con:
            garbage.storage_after = storage_version(con)
        garbage.size_after = _store_bytes(db_path)
    garbage.done = True
    return garbage


# ------------------------------------------------------------------------------------------------ info


@dataclass
class StoreInfo:
    path: Path
    file_bytes: int
    wal_bytes: int
    schema_version: int
    storage_version: str | None
    block_size: int
    used_blocks: int
    free_blocks: int
    tables: list[dict]
    counts: dict[str, int]
    checkpoints: dict[str, dict[str, int]]

    def to_dict(self) -> dict:
        data = dict(self.__dict__)
        data["path"] = str(self.path)
        return data


def store_info(db_path: str | Path) -> StoreInfo:
    """Sizes and counts of a store: per-table rows and approximate bytes, checkpoints, versions."""
    db_path = Path(db_path)
    with reading(db_path) as con:
        size = con.execute(
            "SELECT block_size, used_blocks, free_blocks FROM pragma_database_size()"
        ).fetchall()[0]
        block_size = int(size[0])
        names = [
            row[0]
            for row in con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() ORDER BY table_name"
            ).fetchall()
        ]
        tables = []
        for name in names:
            rows = con.execute(f'SELECT count(*) FROM "{name}"').fetchall()[0][0]
            # blocks the table's segments live in; small segments can share a block, so this is approximate
            blocks = con.execute(
                f"SELECT count(DISTINCT block_id) FROM pragma_storage_info('{name}') WHERE block_id >= 0"
            ).fetchall()[0][0]
            tables.append({"table": name, "rows": int(rows), "bytes": int(blocks) * block_size})
        counts = dict(
            zip(
                (
                    "models", "completed", "failed", "trained", "imported", "experiments", "perturbations",
                    "attacks", "attack_versions",
                ),
                con.execute(
                    """
                    SELECT count(*), count(*) FILTER (status = 'completed'), count(*) FILTER (status = 'failed'),
                           count(*) FILTER (origin = 'trained'), count(*) FILTER (origin = 'imported'),
                           (SELECT count(*) FROM experiments), (SELECT count(*) FROM perturbations),
                           (SELECT count(DISTINCT name) FROM attacks), (SELECT count(*) FROM attacks)
                    FROM models
                    """
                ).fetchall()[0],
            )
        )  # fmt: skip
        stored = dict(con.execute("SELECT model_key, status FROM models").fetchall())
        version = storage_version(con)
        schema = con.execute("SELECT max(version) FROM schema_version").fetchall()[0][0]
        used, free = int(size[1]), int(size[2])
    checkpoints = {k: {"files": 0, "bytes": 0} for k in ("checkpoints", "partial", "tmp", "orphaned")}
    folder = checkpoint_dir(db_path)
    if folder.is_dir():
        for path in folder.iterdir():
            if not path.is_file():
                continue
            if _TMP.match(path.name):
                kind = "tmp"
            elif match := _CHECKPOINT.match(path.name):
                kind = "checkpoints" if match["key"] in stored else "orphaned"
            elif _PARTIAL.match(path.name):
                kind = "partial"
            else:
                continue
            checkpoints[kind]["files"] += 1
            checkpoints[kind]["bytes"] += path.stat().st_size
    wal = db_path.with_name(db_path.name + ".wal")
    return StoreInfo(
        path=db_path, file_bytes=db_path.stat().st_size, wal_bytes=wal.stat().st_size if wal.exists() else 0,
        schema_version=int(schema or 0), storage_version=version, block_size=block_size, used_blocks=used,
        free_blocks=free, tables=tables, counts={k: int(v) for k, v in counts.items()}, checkpoints=checkpoints,
    )  # fmt: skip


def human_bytes(n: int | float) -> str:
    """Binary units, as DuckDB reports block sizes (a block is 256 KiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


__all__ = [
    "Garbage",
    "Removal",
    "StoreInfo",
    "collect_garbage",
    "human_bytes",
    "plan_removal",
    "remove",
    "store_info",
]
