"""Attacks layer: a reference-attack fleet too large for memory, scored model by model from disk.

The in-memory path (`relations.read_relations`) reads a group's whole fleet as one Arrow table (every column
of every row, about 100-200 bytes a row) and keeps it, with dense [model, example] matrices cut from it,
while every target is scored. Here nothing of the fleet is held whole: each [model, example] matrix an
attack asks for is written, by streaming Arrow batches of only the columns it needs out of DuckDB, to
np.memmap files in a score scratch folder beside the store (`.<store>.score-tmp<PID>-*`, removed when the
part ends, on success, error or Ctrl-C; one a killed run left is removed by the next `score` or `gc`), and
each target's own rows are read when it is scored. The attacks receive the same objects as in memory
(`FleetMatrix`, `ReferenceMatrix`, Arrow tables), filled with the same float64 numbers by the same
functions (`fleet.value_column`, `fleet.side_order` per example), so every score is bit-identical: what
changes is what is resident, not what is computed. A target's working set, its leave-one-out copy of the
matrices and the attack's own arrays, stays O(references x examples); that is what the budget must hold.

When it applies: `score --fleet-memory SIZE` (or ROBMIA_FLEET_MEMORY; default half the memory available
when `score` starts) is compared with the estimated peak of the in-memory path; above it, this path runs,
and if even one target's working set would not fit, `score` stops with an error before reading anything.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from robmia_db.attacks.fleet import FleetCache, FleetMatrix, check_column, side_order, value_column
from robmia_db.attacks.planning import ScoreUnit
from robmia_db.errors import AttackDefinitionError, RobmiaError
from robmia_db.store.connection import connect
from robmia_db.store.scratch import score_scratch_prefix, stale_score_scratch

FLEET_MEMORY_ENV = "ROBMIA_FLEET_MEMORY"
# bytes per (reference, example) cell that one target's scoring holds at once: the leave-one-out copy
# (values 8, present 1, is_member 1, order 4) and the attack's arrays (LiRA: a centred float64 matrix, side
# masks, a gather of the sorted values); bench_fleet_memory.py at 64 x 10,000: 0.09 GB estimated, 0.11 GB
# measured above the interpreter's 0.3 GB
BOUNDED_BYTES_PER_CELL = 64
# the in-memory path's peak is about five times the fleet's Arrow table (DuckDB's result, the combined
# chunks, the target relations' filtered copies, the per-kind filters) beside its dense matrices (22 bytes
# per cell): 0.62 GB above the interpreter's 0.3 GB at 64 x 10,000 (bench_fleet_memory.py)
IN_MEMORY_TABLE_COPIES = 5
DENSE_BYTES_PER_CELL = 22
# examples per chunk when the per-example order is computed, and rows per Arrow batch read from DuckDB
ORDER_CELLS_PER_CHUNK = 4_000_000
ROWS_PER_BATCH = 1 << 18
# DuckDB memory limit of the fleet's read connection (its block cache and the streamed query); on top of
# the budget, which is about the fleet's arrays
READ_MEMORY_LIMIT = "256MB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int, what: str = "--fleet-memory") -> int:
    """'2GB', '500MB', '1.5GiB' or a number of bytes."""
    if isinstance(text, int):
        return text
    raw = str(text).strip().replace(" ", "").upper()
    number = raw.rstrip("KMGTIB")
    unit = raw[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or not value > 0:
        raise RobmiaError(f"{what} {text!r}: give a size such as 2GB or 500MB")
    return int(value * _UNITS[unit])


def available_memory() -> int:
    """MemAvailable (Linux), else the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fleet_budget(value: str | int | None) -> int:
    """The memory a fleet may take: the option, else ROBMIA_FLEET_MEMORY, else half the available memory."""
    if value is not None:
        return parse_size(value)
    if os.environ.get(FLEET_MEMORY_ENV):
        return parse_size(os.environ[FLEET_MEMORY_ENV], FLEET_MEMORY_ENV)
    return available_memory() // 2


def format_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


@dataclass
class FleetEstimate:
    rows: int  # signal rows of the group (targets and references, every input perturbation)
    row_bytes: float  # Arrow bytes per row, from a sample
    n_models: int
    n_examples: int  # the largest model's examples
    n_kinds: int  # perturbations the attack reads per target

    @property
    def in_memory(self) -> int:
        table = IN_MEMORY_TABLE_COPIES * self.rows * self.row_bytes
        return int(table + (DENSE_BYTES_PER_CELL + BOUNDED_BYTES_PER_CELL) * self.cells)

    @property
    def bounded(self) -> int:
        # one target's working set, plus its own rows and one Arrow batch of the stream
        target_rows = self.n_kinds * self.n_examples * self.row_bytes
        batch = min(ROWS_PER_BATCH, self.rows) * self.row_bytes
        return int(BOUNDED_BYTES_PER_CELL * self.cells + 2 * target_rows + batch)

    @property
    def cells(self) -> int:
        return self.n_kinds * max(self.n_models - 1, 1) * self.n_examples


def _models(units: list[ScoreUnit]) -> list[str]:
    return sorted({u.model_key for u in units} | {r for u in units for r in u.references})


def _names(units: list[ScoreUnit]) -> list[str]:
    return sorted(set(units[0].inputs.values()))  # a group's units share their inputs


def estimate(con: duckdb.DuckDBPyConnection, units: list[ScoreUnit]) -> FleetEstimate:
    """Size of a group's fleet from the perturbations table and a sample of its rows (no full scan)."""
    params = {"models": _models(units), "names": _names(units)}
    [(rows, n_examples)] = con.execute(
        "SELECT coalesce(sum(n_rows), 0), coalesce(max(n_rows), 0) FROM perturbations "
        "WHERE model_key IN (SELECT unnest($models)) AND name IN (SELECT unnest($names))",
        params,
    ).fetchall()
    sample = con.sql(
        "SELECT * FROM v_signals WHERE model_key = $model AND perturbation IN (SELECT unnest($names)) LIMIT 4096",
        params={"model": params["models"][0], "names": params["names"]},
    ).to_arrow_table()
    row_bytes = sample.nbytes / max(sample.num_rows, 1)
    return FleetEstimate(int(rows), row_bytes, len(params["models"]), int(n_examples), len(params["names"]))


def choose(con: duckdb.DuckDBPyConnection, attack_name: str, units: list[ScoreUnit], budget: int) -> bool:
    """True: score this group from disk; False: in memory. Refuses a fleet that fits neither way."""
    found = estimate(con, units)
    if found.in_memory <= budget:
        return False
    if found.bounded > budget:
        raise RobmiaError(
            f"score: {attack_name}'s fleet of {found.n_models} models x {found.n_examples:,} examples x "
            f"{found.n_kinds} perturbation(s) needs about {format_bytes(found.bounded)} even scored model "
            f"by model (in memory: {format_bytes(found.in_memory)}), more than --fleet-memory "
            f"{format_bytes(budget)}; raise --fleet-memory (or {FLEET_MEMORY_ENV}) or score fewer models"
        )
    return True


class DiskFleet:
    """A group's fleet on disk: the reference matrices as memmaps, every other read from the store when
    asked. Offers `FleetCache`'s interface (`matrix`, `rows`) and the per-model tables `batches` slices."""

    def __init__(self, db_path: str | Path, units: list[ScoreUnit]):
        self.db_path = Path(db_path)
        self.units = units
        self.models = _models(units)
        self.names = _names(units)
        self._matrices: dict[tuple[str, str | None], FleetMatrix] = {}
        # one read-only connection while the part is scored (an open costs ~0.1 s, and a target with K
        # calibration references reads K + 1 models' rows); a cursor per read, as the attack's thread reads too
        # DuckDB's buffer pool keeps the store blocks it read until the connection closes: capped, or a part
        # would end up caching most of the fleet's rows
        self._con: duckdb.DuckDBPyConnection | None = connect(
            self.db_path, read_only=True, memory_limit=READ_MEMORY_LIMIT
        )
        self.folder: Path | None = None
        try:
            real = self.db_path.resolve()
            for stale in stale_score_scratch(real):
                shutil.rmtree(stale, ignore_errors=True)
            self.folder = Path(tempfile.mkdtemp(prefix=score_scratch_prefix(real), dir=real.parent))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> DiskFleet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the memmaps (an attack thread abandoned on Ctrl-C keeps its mapping until it ends)."""
        self._matrices.clear()
        if self._con is not None:
            con, self._con = self._con, None
            try:
                con.interrupt()
                con.close()
            except duckdb.Error:
                pass
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        if self._con is None:
            raise RobmiaError("the fleet on disk was closed (score was stopped)")
        cursor = self._con.cursor()
        try:
            yield cursor
        finally:
            cursor.close()

    def _where(self, kind: str | None) -> str:
        where = "model_key IN (SELECT unnest($models)) AND perturbation IN (SELECT unnest($names))"
        return where + (" AND kind = $kind" if kind is not None else "")

    def _params(self, models: list[str], kind: str | None) -> dict:
        params: dict = {"models": sorted(set(models)), "names": self.names}
        if kind is not None:
            params["kind"] = kind
        return params

    def table(self, models: list[str], kind: str | None = None) -> pa.Table:
        """Every column of `models`' rows, in the in-memory path's order (model, perturbation, example)."""
        with self._cursor() as con:
            return (
                con.sql(
                    f"SELECT * FROM v_signals WHERE {self._where(kind)} "
                    "ORDER BY model_key, perturbation, example_id",
                    params=self._params(models, kind),
                )
                .to_arrow_table()
                .combine_chunks()
            )

    def rows(self, models: list[str], columns: list[str], kind: str | None) -> dict[str, np.ndarray]:
        """`FleetCache.rows` over the rows of `models` only (read for this call, not kept)."""
        return FleetCache(self.table(models, kind)).rows(models, columns, kind)

    def matrix(self, column: str, kind: str | None) -> FleetMatrix:
        key = (check_column(column), kind)
        if key not in self._matrices:
            self._matrices[key] = self._build(column, kind)
        return self._matrices[key]

    def _memmap(self, name: str, dtype, shape: tuple[int, ...], fill) -> np.ndarray:
        assert self.folder is not None, "the fleet's scratch folder was removed"
        array = np.lib.format.open_memmap(self.folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        if fill:
            step = max(1, ORDER_CELLS_PER_CHUNK // max(shape[-1], 1))
            for start in range(0, shape[0], step):
                array[start : start + step] = fill
        return np.asarray(array)  # a plain ndarray over the mapping: attacks see no np.memmap subclass

    def _build(self, column: str, kind: str | None) -> FleetMatrix:
        """`fleet.build_fleet_matrix` of the reference rows, written batch by batch into memmaps."""
        references = sorted({r for u in self.units for r in u.references})
        params = self._params(references, kind)
        where = self._where(kind)
        if column == "phi":  # probs only where the stored logit is missing (stores that predate it)
            wanted = "confidence_logit, CASE WHEN isnan(coalesce(confidence_logit, 'nan'::DOUBLE)) THEN probs END AS probs"
        elif column == "p_true":
            wanted = "loss"
        else:
            wanted = column
        with self._cursor() as con:
            names = sorted(
                r[0]
                for r in con.execute(
                    f"SELECT DISTINCT model_key FROM v_signals WHERE {where}", params
                ).fetchall()
            )
            example_id = (
                con.sql(f"SELECT DISTINCT example_id FROM v_signals WHERE {where} ORDER BY 1", params=params)
                .to_arrow_table()
                .column(0)
                .to_numpy()
            )
            shape = (len(names), len(example_id))
            tag = f"{column}-{kind or 'target'}"
            values = self._memmap(f"{tag}-values", np.float64, shape, np.nan)
            is_member = self._memmap(f"{tag}-is_member", bool, shape, None)
            present = self._memmap(f"{tag}-present", bool, shape, None)
            label = self._memmap(f"{tag}-label", np.int64, shape, -1)
            n_rows = 0
            reader = con.sql(
                f"SELECT model_key, example_id, label, is_member, {wanted} FROM v_signals WHERE {where}",
                params=params,
            ).to_arrow_reader(ROWS_PER_BATCH)
            for batch in reader:
                part = pa.Table.from_batches([batch])
                encoded = pc.dictionary_encode(part.column("model_key").combine_chunks())
                rank = np.searchsorted(names, np.array(encoded.dictionary.to_pylist(), dtype=object))
                row = rank[encoded.indices.to_numpy(zero_copy_only=False)]
                col = np.searchsorted(example_id, part.column("example_id").to_numpy(zero_copy_only=False))
                present[row, col] = True
                values[row, col] = value_column(part, column)
                is_member[row, col] = part.column("is_member").to_numpy(zero_copy_only=False).astype(bool)
                label[row, col] = part.column("label").to_numpy(zero_copy_only=False)
                n_rows += part.num_rows
        if _count(present) != n_rows:
            raise AttackDefinitionError(
                None, "the reference relation has differing rows for one (model, example)"
            )
        order = self._memmap(f"{tag}-order", np.int32, (shape[1], shape[0]), None)
        step = max(1, ORDER_CELLS_PER_CHUNK // max(shape[0], 1))
        for start in range(0, shape[1], step):
            cut = slice(start, start + step)
            order[cut] = side_order(values[:, cut], is_member[:, cut], present[:, cut])
        return FleetMatrix(names, example_id, values, is_member, present, label, order)


def _count(mask: np.ndarray) -> int:
    step = max(1, ORDER_CELLS_PER_CHUNK // max(mask.shape[1], 1))
    return sum(int(mask[start : start + step].sum()) for start in range(0, mask.shape[0], step))
