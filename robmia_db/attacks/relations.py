"""Attacks layer: the rows an attack may see. Reads a group of units' relations from the store once (or
hands a fleet too large for memory to `fleet_disk`), and cuts them into batches: all units at once, or one
target per sandbox for attacks that read reference models.

The invariance contract: target relations carry no `is_member`; a reference-reading attack's batch holds
one target T, whose `reference` relation and reference matrices hold T's references only (the fleet minus
T), so no other target's reference rows, which may hold T itself with its labels, are in reach.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from robmia_db.attacks.definition import KIND_NEEDS, AttackDefinition
from robmia_db.attacks.fleet import FleetCache, ReferenceMatrix, group_rows, references_of
from robmia_db.attacks.fleet_disk import DiskFleet, choose
from robmia_db.attacks.nested_calibration import calibration_units
from robmia_db.attacks.planning import ScoreUnit
from robmia_db.errors import AttackDefinitionError
from robmia_db.store.connection import reading


def read_relations(
    store: duckdb.DuckDBPyConnection, attack: AttackDefinition, units: list[ScoreUnit]
) -> dict[str, pa.Table]:
    """Every row a group of units (sharing their inputs) may need, read once; `batches` slices it.

    Target relations carry no labels. `reference` holds each reference model's rows once, with labels;
    it is never handed to an attack as is (see `batches`).
    """
    if attack.needs_reference:
        return _read_fleet_relations(store, attack, units)
    store.register("_units", _unit_inputs_table(units))
    # the units' signal keys as constants: DuckDB pushes them into the scan of `signals` (whose row groups
    # follow the inserts, one perturbation at a time) and skips the rest of the store; joined to `_units`
    # alone it planned a hash join that held GBs of a 1e8-row store to read 2 M rows
    keys = ", ".join(sorted({"'" + k.replace("'", "''") + "'" for u in units for k in u.signal_keys}))
    relations: dict[str, pa.Table] = {}
    try:
        if attack.signal_kind is None:
            relations["target"] = store.sql(
                f"""SELECT s.* EXCLUDE (is_member) FROM v_signals s
                   JOIN _units u ON s.model_key = u.model_key AND s.perturbation = u.perturbation
                   WHERE s.signal_key IN ({keys})"""
            ).to_arrow_table()
        else:
            for kind in (n for n in attack.needs if n in KIND_NEEDS):
                relations[kind] = store.sql(
                    f"""SELECT s.* EXCLUDE (is_member) FROM v_signals s
                        JOIN _units u ON s.model_key = u.model_key AND s.perturbation = u.{kind}_perturbation
                        WHERE s.signal_key IN ({keys})"""
                ).to_arrow_table()
            relations["target"] = relations[attack.signal_kind]
    finally:
        store.unregister("_units")
    return relations


def open_relations(
    db_path: str | Path, attack: AttackDefinition, units: list[ScoreUnit], fleet_memory: int | None = None
) -> dict[str, pa.Table] | DiskFleet:
    """`read_relations` from the store at `db_path`, or, for a reference attack whose fleet would take more
    than `fleet_memory` bytes in memory, a `DiskFleet` that `batches` reads model by model (`fleet_disk`).
    Release it with `close_relations`."""
    with reading(db_path) as con:
        if not (
            attack.needs_reference
            and fleet_memory is not None
            and choose(con, attack.name, units, fleet_memory)
        ):
            return read_relations(con, attack, units)
    return DiskFleet(db_path, units)


def close_relations(relations: dict[str, pa.Table] | DiskFleet) -> None:
    """Remove a `DiskFleet`'s scratch files (the in-memory relations are freed with their last reference)."""
    if isinstance(relations, DiskFleet):
        relations.close()


def _read_fleet_relations(
    store: duckdb.DuckDBPyConnection, attack: AttackDefinition, units: list[ScoreUnit]
) -> dict[str, pa.Table]:
    """A fleet's targets are each other's references: their rows are read once, sorted by model (so that a
    target's rows are one slice), and the target relations are those rows without `is_member`."""
    targets = sorted({u.model_key for u in units})
    references = sorted({ref for u in units for ref in u.references})
    names = sorted(set(units[0].inputs.values()))  # a group's units share their inputs
    rows = _in_key_order(
        store.sql(
            "SELECT * FROM v_signals WHERE model_key IN (SELECT unnest($models)) "
            "AND perturbation IN (SELECT unnest($names))",
            params={"models": sorted(set(targets) | set(references)), "names": names},
        ).to_arrow_table()
    )
    models = pa.array(sorted(set(targets) | set(references)), pa.string())

    def only(keys: list[str]) -> pa.Array | None:  # None: every row (no copy)
        return None if len(keys) == len(models) else pc.is_in(rows["model_key"], pa.array(keys, pa.string()))

    is_reference = only(references)
    relations = {"reference": rows if is_reference is None else rows.filter(is_reference)}
    unlabelled = rows.drop_columns(["is_member"])
    is_target = only(targets)
    if attack.signal_kind is None:
        relations["target"] = unlabelled if is_target is None else unlabelled.filter(is_target)
    else:
        for kind in (n for n in attack.needs if n in KIND_NEEDS):
            same = pc.equal(rows["perturbation"], units[0].inputs[kind])
            relations[kind] = unlabelled.filter(same if is_target is None else pc.and_(is_target, same))
        relations["target"] = relations[attack.signal_kind]
    return relations


def _in_key_order(table: pa.Table) -> pa.Table:
    """The rows in (model_key, perturbation, example_id) order, the order an ORDER BY gave them, sorted here:
    DuckDB's sort carried every column, the probability lists too, and took longer than the read itself.
    The rows come in long runs already in that order (a model's rows as stored): those are sliced, not
    gathered row by row."""
    key = np.zeros(table.num_rows, dtype=np.int64)
    for name in ("model_key", "perturbation"):
        encoded = pc.dictionary_encode(table.column(name).combine_chunks())
        rank = np.asarray(pc.rank(encoded.dictionary, tiebreaker="dense"), dtype=np.int64) - 1
        key = key * len(rank) + rank[encoded.indices.to_numpy(zero_copy_only=False)]
    # (model, perturbation) rank, then the INTEGER example id made non-negative, in one int64
    key = (key << 32) + (table.column("example_id").to_numpy().astype(np.int64) + (1 << 31))
    order = np.argsort(key, kind="stable")  # a merge of the sorted runs
    breaks = np.flatnonzero(np.diff(order) != 1) + 1
    if len(breaks) > len(order) // 64:
        return table.take(order).combine_chunks()
    starts, ends = np.r_[0, breaks], np.r_[breaks, len(order)]
    runs = [table.slice(order[a], b - a) for a, b in zip(starts.tolist(), ends.tolist())]
    return pa.concat_tables(runs).combine_chunks() if runs else table.combine_chunks()


class Relations(Mapping[str, pa.Table]):
    """The relations of one batch. Tables given as functions are built only when read (the per-target
    `reference` relation is needed by SQL, not by attacks that read `references`); `fleet` holds the
    group's reference rows as dense matrices, of which a target gets its own references only."""

    def __init__(
        self,
        tables: dict[str, pa.Table | Callable[[], pa.Table]],
        fleet: FleetCache | DiskFleet | None = None,
        units: list[ScoreUnit] | None = None,
        membership: Callable[[], pa.Table] | None = None,
    ):
        self._tables = dict(tables)
        self._fleet = fleet
        self._units = {unit.model_key: unit for unit in units or []}
        self._membership = membership

    def membership(self) -> pa.Table:
        """Rows (model_key, perturbation, example_id, is_member, ...) holding the labels of this batch's
        target when it is a calibration reference (`nested_calibration`); never handed to the attack."""
        if self._membership is None:
            raise AssertionError("membership of a batch without reference models")
        return self._membership()

    def __getitem__(self, name: str) -> pa.Table:
        table = self._tables[name]
        if callable(table):
            table = self._tables[name] = table()
        return table

    def __iter__(self) -> Iterator[str]:
        return iter(self._tables)

    def __len__(self) -> int:
        return len(self._tables)

    def references(
        self, model_key: str, column: str, kind: str | None, example_id: np.ndarray | None, path: str
    ) -> ReferenceMatrix:
        if self._fleet is None:
            raise AttackDefinitionError(path, 'reads references but does not declare "reference_models"')
        if model_key not in self._units:
            raise AttackDefinitionError(
                path, f"asked for the references of model {model_key}, not a target of this sandbox"
            )
        fleet = self._fleet.matrix(column, kind)
        ids = fleet.example_id if example_id is None else np.asarray(example_id)
        return references_of(fleet, self._units[model_key].references, ids)

    def _unit(self, model_key: str, path: str) -> ScoreUnit:
        if self._fleet is None:
            raise AttackDefinitionError(path, 'reads references but does not declare "reference_models"')
        if model_key not in self._units:
            raise AttackDefinitionError(
                path, f"asked for the references of model {model_key}, not a target of this sandbox"
            )
        return self._units[model_key]

    def reference_rows(
        self, model_key: str, columns: list[str], kind: str | None, path: str
    ) -> dict[str, np.ndarray]:
        unit = self._unit(model_key, path)
        assert self._fleet is not None
        return self._fleet.rows(unit.references, columns, kind)


def batches(
    attack: AttackDefinition,
    units: list[ScoreUnit],
    relations: dict[str, pa.Table] | DiskFleet,
    calibration_models: int = 0,
) -> Iterator[tuple[list[ScoreUnit], Relations]]:
    """Units to run together with their relations: all at once, or one target per sandbox with references.

    With `calibration_models`, each target's batch is followed by those of its calibration references (see
    `nested_calibration`), each scored as a target with the fleet minus itself and minus that target; their
    units carry `calibrates` and their scores are never stored.
    """
    if isinstance(relations, DiskFleet):
        yield from _disk_batches(attack, units, relations, calibration_models)
        return
    if not attack.needs_reference:
        yield units, Relations(relations)
        return
    fleet = FleetCache(relations["reference"])
    membership = partial(relations.__getitem__, "reference")
    rows = {
        name: group_rows(table.column("model_key"))
        for name, table in relations.items()
        if name != "reference"
    }
    reference_rows: dict[str, np.ndarray] | None = None
    for unit in units:
        sliced: dict[str, pa.Table | Callable[[], pa.Table]] = {
            name: _rows_of(table, rows[name].get(unit.model_key))
            for name, table in relations.items()
            if name != "reference"
        }
        if "target" not in sliced:  # kind attacks alias target to their last kind
            sliced["target"] = sliced[attack.signal_kind]
        sliced["reference"] = partial(_reference_relation, relations["reference"], unit)
        yield [unit], Relations(sliced, fleet, [unit], membership)
        for nested in calibration_units(unit, calibration_models):
            if reference_rows is None:
                reference_rows = group_rows(relations["reference"].column("model_key"))
            yield (
                [nested],
                Relations(
                    _as_target(attack, relations["reference"], reference_rows[nested.model_key], nested)
                    | {"reference": partial(_reference_relation, relations["reference"], nested)},
                    fleet,
                    [nested],
                    membership,
                ),
            )


def _disk_batches(
    attack: AttackDefinition, units: list[ScoreUnit], fleet: DiskFleet, calibration_models: int
) -> Iterator[tuple[list[ScoreUnit], Relations]]:
    """`batches` over a fleet on disk: the same relations, each target's own rows read when it is scored,
    the `reference` relation only if the attack asks for it by SQL, the matrices from `fleet`'s memmaps."""
    for unit in units:
        own = fleet.table([unit.model_key]).drop_columns(["is_member"])
        sliced: dict[str, pa.Table | Callable[[], pa.Table]] = {}
        if attack.signal_kind is None:
            sliced["target"] = own
        else:
            for kind in (n for n in attack.needs if n in KIND_NEEDS):
                sliced[kind] = own.filter(pc.equal(own["perturbation"], unit.inputs[kind]))
            sliced["target"] = sliced[attack.signal_kind]
        sliced["reference"] = partial(_disk_reference_relation, fleet, unit)
        yield [unit], Relations(sliced, fleet, [unit])
        for nested in calibration_units(unit, calibration_models):
            mine = fleet.table([nested.model_key])
            yield (
                [nested],
                Relations(
                    _as_target(attack, mine, np.arange(mine.num_rows), nested)
                    | {"reference": partial(_disk_reference_relation, fleet, nested)},
                    fleet,
                    [nested],
                    partial(lambda table: table, mine),
                ),
            )


def _disk_reference_relation(fleet: DiskFleet, unit: ScoreUnit) -> pa.Table:
    """The SQL `reference` relation of `unit`, read from the store: (M - 1) x N rows, for SQL attacks only."""
    return _reference_relation(fleet.table(unit.references), unit)


def _as_target(
    attack: AttackDefinition, reference: pa.Table, rows: np.ndarray, unit: ScoreUnit
) -> dict[str, pa.Table | Callable[[], pa.Table]]:
    """A reference model's rows as the target relations of `unit` (its membership dropped, as a target's)."""
    mine = _rows_of(reference, rows).drop_columns(["is_member"])
    if attack.signal_kind is None:
        return {"target": mine.filter(pc.equal(mine["perturbation"], unit.perturbation))}
    sliced: dict[str, pa.Table | Callable[[], pa.Table]] = {
        kind: mine.filter(pc.equal(mine["perturbation"], unit.inputs[kind]))
        for kind in (n for n in attack.needs if n in KIND_NEEDS)
    }
    sliced["target"] = sliced[attack.signal_kind]
    return sliced


def _rows_of(table: pa.Table, rows: np.ndarray | None) -> pa.Table:
    """The given rows: a zero-copy slice where they are contiguous (the fleet's rows are sorted by model)."""
    if rows is None or not len(rows):
        return table.slice(0, 0)
    if rows[-1] - rows[0] + 1 == len(rows) and np.all(np.diff(rows) == 1):
        return table.slice(int(rows[0]), len(rows))
    return table.combine_chunks().take(rows)


def _reference_relation(reference: pa.Table, unit: ScoreUnit) -> pa.Table:
    reference = reference.filter(pc.is_in(reference["model_key"], pa.array(unit.references, pa.string())))
    return reference.add_column(
        0, "target_model_key", pa.repeat(pa.scalar(unit.model_key, pa.string()), reference.num_rows)
    )


def _unit_inputs_table(units: list[ScoreUnit]) -> pa.Table:
    """Per unit its model and perturbation and the perturbation each kind it needs reads (NULL if none)."""
    columns: dict[str, list[Any]] = {"model_key": [], "perturbation": []}
    for kind in KIND_NEEDS:
        columns[f"{kind}_perturbation"] = []
    for unit in units:
        columns["model_key"].append(unit.model_key)
        columns["perturbation"].append(unit.perturbation)
        for kind in KIND_NEEDS:
            columns[f"{kind}_perturbation"].append(unit.inputs.get(kind))
    return pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()})
