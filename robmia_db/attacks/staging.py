"""Attacks layer: staging one attack run's scores until `results.write_results` stores them in one
transaction, and joining staged scores with their membership labels for the metrics."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from robmia_db.attacks.planning import ScoreUnit
from robmia_db.store.scratch import score_scratch_prefix, stale_score_scratch
from robmia_db.testhooks import fail_point, kill_point, stage_rows_in_memory

# crash point while the scores are staged, before the store is opened for writing (robmia_db.testhooks)
STAGING_SCORES = "score-staging"
# score rows of one run staged in memory (about 45 bytes each); past that, in Parquet files on disk
STAGE_ROWS_IN_MEMORY = 2_000_000


class ScoreStage:
    """One attack run's scores: in memory up to `STAGE_ROWS_IN_MEMORY` rows, else one Parquet file per scored
    batch, in a scratch folder beside the store.

    Past that size memory holds one batch's scores, not the run's; `write_results` inserts every file in its
    one transaction (a single streamed INSERT, which DuckDB writes to the store as it goes) and computes the
    metrics part by part (`parts`), so that the write too holds one part, whatever the size of the store.
    Below it, writing and re-reading the files cost more than the attacks' own scoring (zstd, then a Parquet
    scan for the INSERT and again for the labels); the batches are kept as Arrow tables, inserted as one.
    The folder is removed when the run ends; one that a killed run left (`.<store>.score-tmp<PID>-*/`) is
    removed by the next `score` or by `gc` (`store.scratch`).
    """

    def __init__(self, db_path: str | Path, rows_in_memory: int | None = None):
        self.real = Path(db_path).resolve()
        self.rows_in_memory = (
            stage_rows_in_memory(STAGE_ROWS_IN_MEMORY) if rows_in_memory is None else rows_in_memory
        )
        self.folder: Path | None = None
        self.memory: list[tuple[pa.Table, int, list[ScoreUnit]]] = []  # (batch, rows, the units it scores)
        self.files: list[tuple[Path, int, list[ScoreUnit]]] = []  # (file, rows, the units it scores)
        self.num_rows = 0
        self._schema: pa.Schema | None = None

    def __enter__(self) -> ScoreStage:
        return self

    def __exit__(self, exc_type, *rest) -> None:
        self.memory = []
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def add(self, table: pa.Table, units: list[ScoreUnit]) -> None:
        """Stages the scores of `units` (every row of those units: a unit is never split between batches)."""
        table = table.replace_schema_metadata(None)  # parts must share one schema (a DataFrame adds its own)
        if self._schema is None:
            for stale in stale_score_scratch(self.real):
                shutil.rmtree(stale, ignore_errors=True)
            self._schema = table.schema
        else:
            table = table.cast(self._schema)
        fail_point(STAGING_SCORES)
        if self.folder is None and self.num_rows + table.num_rows <= self.rows_in_memory:
            kill_point(STAGING_SCORES)
            self.memory.append((table, table.num_rows, list(units)))
        else:
            if self.folder is None:  # too large for memory: what was kept goes to disk first
                self.folder = Path(
                    tempfile.mkdtemp(prefix=score_scratch_prefix(self.real), dir=self.real.parent)
                )
                kept, self.memory = self.memory, []
                for batch, _, batch_units in kept:
                    self._write(batch, batch_units)
            kill_point(STAGING_SCORES)
            self._write(table, units)
        self.num_rows += table.num_rows

    def _write(self, table: pa.Table, units: list[ScoreUnit]) -> None:
        assert self.folder is not None
        path = self.folder / f"scores-{len(self.files):06d}.parquet"
        pq.write_table(table, path, compression="zstd", row_group_size=1 << 20)
        self.files.append((path, table.num_rows, list(units)))

    def relation(self, files: list[Path] | None = None) -> str:
        """SQL that reads staged files (model_key, example_id, score, perturbation): all, or `files`."""
        paths = [str(f).replace("'", "''") for f in (files or [f for f, _, _ in self.files])]
        return "read_parquet([{}])".format(", ".join(f"'{p}'" for p in paths))

    def table(self) -> pa.Table | None:
        """Every staged row as one Arrow table, when they are in memory (else None: use `relation`)."""
        if self.folder is not None:
            return None
        return pa.concat_tables([t for t, _, _ in self.memory]) if self.memory else None

    def parts(self, max_rows: int) -> Iterator[tuple[str | pa.Table, list[ScoreUnit]]]:
        """(SQL relation of files, or Arrow table of batches in memory, units) of consecutive batches of at
        most `max_rows` rows together (one batch at least)."""
        items = self.files if self.folder is not None else self.memory
        chunk: list = []
        for item in items:
            if chunk and sum(rows for _, rows, _ in chunk) + item[1] > max_rows:
                yield self._source(chunk), [u for _, _, us in chunk for u in us]
                chunk = []
            chunk.append(item)
        if chunk:
            yield self._source(chunk), [u for _, _, us in chunk for u in us]

    def _source(self, chunk: list) -> str | pa.Table:
        if self.folder is not None:
            return self.relation([f for f, _, _ in chunk])
        return pa.concat_tables([t for t, _, _ in chunk])


def labelled_scores(con: duckdb.DuckDBPyConnection, source: str | pa.Table, models: list[str]) -> pa.Table:
    """(model_key, perturbation, example_id, score, is_member) of staged scores, joined with `membership`.

    Staged files are joined in SQL; batches in memory by a sorted lookup of each row's (model, example)
    among the models' membership rows (numpy: the SQL join of a registered table took 3-4x as long).
    """
    # the models as constants: pushed into the scan of `membership`, which then skips other models
    constants = ", ".join("'" + m.replace("'", "''") + "'" for m in sorted(set(models)))
    if isinstance(source, pa.Table):
        membership = con.sql(
            f"SELECT model_key, example_id, is_member FROM membership WHERE model_key IN ({constants})"
        ).to_arrow_table()
        found = _lookup(membership, source, sorted(set(models)))
        if found is not None:
            return found
        con.register("_staged_part", source)
        relation = "_staged_part"
    else:
        relation = source
    try:
        return con.sql(
            f"""SELECT s.model_key, s.perturbation, s.example_id, s.score, b.is_member FROM {relation} s
                JOIN membership b ON b.model_key = s.model_key AND b.example_id = s.example_id
                WHERE b.model_key IN ({constants})"""
        ).to_arrow_table()
    finally:
        if relation == "_staged_part":
            con.unregister("_staged_part")


def _lookup(membership: pa.Table, scores: pa.Table, models: list[str]) -> pa.Table | None:
    """The inner join of `scores` with `membership` on (model_key, example_id), or None where a pair is in
    `membership` twice (the SQL join then repeats the score row: left to it)."""
    value_set = pa.array(models, pa.string())

    def keys(table: pa.Table) -> np.ndarray:
        model = pc.index_in(table.column("model_key"), value_set=value_set).fill_null(-1)
        code = model.to_numpy(zero_copy_only=False).astype(np.int64)  # -1: another model, never found
        return (code << 32) + (table.column("example_id").to_numpy().astype(np.int64) + (1 << 31))

    known = keys(membership)
    order = np.argsort(known, kind="stable")
    known = known[order]
    if len(known) > 1 and bool((known[1:] == known[:-1]).any()):
        return None
    wanted = keys(scores)
    at = np.minimum(np.searchsorted(known, wanted), max(len(known) - 1, 0))
    hit = known[at] == wanted if len(known) else np.zeros(len(wanted), dtype=bool)
    is_member = membership.column("is_member").to_numpy(zero_copy_only=False)[order][at]
    labelled = scores.select(["model_key", "perturbation", "example_id", "score"]).append_column(
        "is_member", pa.array(is_member if len(known) else np.zeros(len(wanted), dtype=bool), pa.bool_())
    )
    return labelled if hit.all() else labelled.filter(pa.array(hit))
