"""Attacks layer: a fleet's signals as dense [model, example] matrices, built once per group of units by the
scoring layer, and each target's references cut out of them.

The reference-model attacks read these instead of SQL relations (`AttackContext.references`). A target T
only ever receives the rows of its own reference models (the fleet minus T): T's row is removed before
anything reaches the attack, so no statistic can be computed from T's membership. What is shared across
targets is work that does not involve a target at all: reading the rows once, and one sort per example of
all models by (IN, OUT, unusable, value), from which T's references' sorted order is the same order with T
taken out (a stable sort restricted to a subset is the sort of that subset), so medians are picked by index
instead of re-sorted per target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from robmia_db.errors import AttackDefinitionError
from robmia_db.store.signals import confidence_logit_from_probs

# value columns an attack may ask for: the stored per-sample signals, plus two derived ones
DERIVED = {
    "phi": "log p_y - log(1 - p_y): confidence_logit, from the float32 probs where a store predates it",
    "p_true": "p_y = exp(-loss) in float64",
}
STORED = ("loss", "confidence", "margin", "entropy", "mentropy", "confidence_logit")


def check_column(column: str) -> str:
    if column not in DERIVED and column not in STORED:
        raise AttackDefinitionError(
            None, f"no value column {column!r} (choose one of {sorted([*STORED, *DERIVED])})"
        )
    return column


def group_rows(column: pa.ChunkedArray | pa.Array) -> dict[str, np.ndarray]:
    """Row indices per distinct string value, without turning the strings into Python objects."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    encoded = pc.dictionary_encode(array)
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(encoded.dictionary) + 1))
    return {
        str(value): order[bounds[i] : bounds[i + 1]] for i, value in enumerate(encoded.dictionary.to_pylist())
    }


def value_column(table: pa.Table, column: str) -> np.ndarray:
    """One value per row as float64 (the same numbers as the SQL the attacks used to run)."""
    check_column(column)
    if column == "p_true":
        return np.exp(-table.column("loss").to_numpy(zero_copy_only=False).astype(np.float64))
    if column != "phi":
        return table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    phi = table.column("confidence_logit").to_numpy(zero_copy_only=False).astype(np.float64)
    missing = np.isnan(phi)
    if missing.any():
        probs = table.column("probs").filter(pa.array(missing)).to_pylist()
        labels = table.column("label").to_numpy(zero_copy_only=False)[missing]
        phi[missing] = confidence_logit_from_probs(np.asarray(probs, dtype=np.float32), labels)
    return phi


def row_column(table: pa.Table, column: str) -> np.ndarray:
    """One column of rows as numpy: `probs` as a [row, class] float64 matrix, `label` and `example_id` as
    integers, anything else as `value_column`."""
    if column == "probs":
        probs = table.column("probs").combine_chunks()
        return probs.flatten().to_numpy(zero_copy_only=False).reshape(len(probs), -1).astype(np.float64)
    if column in ("label", "example_id"):
        return table.column(column).to_numpy(zero_copy_only=False)
    return value_column(table, column)


def check_row_columns(columns: list[str] | tuple[str, ...]) -> list[str]:
    for column in columns:
        if column not in ("probs", "label", "example_id"):
            check_column(column)
    return list(columns)


def target_rows(table: pa.Table, columns: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Per target model: example_id, label and each of `columns` (see `row_column`), sorted by example id."""
    columns = check_row_columns(columns)
    out = {}
    for key, rows in sorted(group_rows(table.column("model_key")).items()):
        mine = table.take(rows)
        order = np.argsort(mine.column("example_id").to_numpy(zero_copy_only=False), kind="stable")
        out[key] = {c: row_column(mine, c)[order] for c in dict.fromkeys(["example_id", "label", *columns])}
    return out


def target_arrays(table: pa.Table, column: str) -> dict[str, dict[str, np.ndarray]]:
    """Per target model: example_id, label and value sorted by example id (target relations carry no
    membership)."""
    values = value_column(table, column)
    example_id = table.column("example_id").to_numpy(zero_copy_only=False)
    label = table.column("label").to_numpy(zero_copy_only=False)
    out = {}
    for key, rows in sorted(group_rows(table.column("model_key")).items()):
        rows = rows[np.argsort(example_id[rows], kind="stable")]
        out[key] = {"example_id": example_id[rows], "label": label[rows], "value": values[rows]}
    return out


@dataclass
class FleetMatrix:
    """Every model's rows of one relation (one perturbation) as [model, example] matrices; each model's rows
    are the same whichever target it serves as a reference."""

    model_keys: list[str]  # sorted
    example_id: np.ndarray  # sorted union
    values: np.ndarray  # [M, N] float64, NaN where absent
    is_member: np.ndarray  # [M, N] bool, False where absent
    present: np.ndarray  # [M, N] bool
    label: np.ndarray  # [M, N] int64, -1 where absent
    order: np.ndarray  # [N, M]: per example, models sorted by (IN, OUT, unusable), then value, then rank


def side_order(values: np.ndarray, is_member: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Per example (rows of the [N, M] result), the models sorted by group (0: present IN, 1: present OUT,
    2: absent or NaN), then value, then model rank (stable)."""
    usable = present & ~np.isnan(values)
    group = np.where(usable, np.where(is_member, 0, 1), 2).astype(np.int8)
    return np.lexsort((values.T, group.T), axis=-1).astype(np.int32)


def build_fleet_matrix(table: pa.Table, column: str) -> FleetMatrix:
    values_long = value_column(table, column)
    example_long = table.column("example_id").to_numpy(zero_copy_only=False)
    models = group_rows(table.column("model_key"))
    names = sorted(models)
    row = np.empty(table.num_rows, dtype=np.int64)
    for rank, name in enumerate(names):
        row[models[name]] = rank
    example_id, col = np.unique(example_long, return_inverse=True)
    shape = (len(names), len(example_id))
    present = np.zeros(shape, bool)
    present[row, col] = True
    if present.sum() != table.num_rows:
        raise AttackDefinitionError(
            None, "the reference relation has differing rows for one (model, example)"
        )
    values = np.full(shape, np.nan)
    values[row, col] = values_long
    is_member = np.zeros(shape, bool)
    is_member[row, col] = table.column("is_member").to_numpy(zero_copy_only=False).astype(bool)
    label = np.full(shape, -1, dtype=np.int64)
    label[row, col] = table.column("label").to_numpy(zero_copy_only=False)
    return FleetMatrix(
        names, example_id, values, is_member, present, label, side_order(values, is_member, present)
    )


class ReferenceMatrix:
    """One target's reference values over its examples: values[r, n] (NaN where reference r lacks x), in
    reference-key order. `order` ([n, r]) sorts each example's references by (IN, OUT, unusable), then value;
    computed here when not given. `label` ([r, n], -1 where missing) may be given as a function, called on
    first use (only the per-class attacks read it)."""

    def __init__(
        self,
        example_id: np.ndarray,
        values: np.ndarray,
        is_member: np.ndarray,
        present: np.ndarray,
        order: np.ndarray | None = None,
        label: np.ndarray | Callable[[], np.ndarray] | None = None,
        *,
        members_checked: bool = False,
    ):
        self.example_id = example_id  # the target's examples, sorted
        self.values = values
        self.present = present  # [r, n] bool
        # [r, n] bool, False where missing (`members_checked`: the caller's matrix already is)
        self.is_member = is_member if members_checked else is_member & present
        self.order = side_order(values, self.is_member, present) if order is None else order
        self._label = label
        self._usable: np.ndarray | None = None
        self._all_finite: bool | None = None
        self._sides: dict[bool, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @property
    def label(self) -> np.ndarray | None:
        if callable(self._label):
            self._label = self._label()
        return self._label

    @property
    def all_finite(self) -> bool:
        """Every value finite: no absent entry (NaN), no NaN or inf signal; computed once."""
        if self._all_finite is None:
            self._all_finite = bool(np.isfinite(self.values).all())
        return self._all_finite

    @property
    def usable(self) -> np.ndarray:
        """Present and not NaN (what nanmedian / nanstd would count), computed once."""
        if self._usable is None:
            self._usable = self.present if self.all_finite else self.present & ~np.isnan(self.values)
        return self._usable

    def side(self, inside: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mask, count per example, start in `order`) of the usable IN (or OUT) entries, computed once per
        side: LiRA's two fits and their means share them."""
        if inside not in self._sides:
            usable = self.usable
            if True not in self._sides:
                member = usable & self.is_member
                n_in = member.sum(axis=0)
                self._sides[True] = (member, n_in, np.zeros_like(n_in))
            if not inside:
                member, n_in, _ = self._sides[True]
                mask = usable ^ member  # member is a subset of usable: the usable non-members
                self._sides[False] = (mask, mask.sum(axis=0), n_in)
        return self._sides[inside]

    @property
    def inside(self) -> np.ndarray:
        return np.where(self.present & self.is_member, self.values, np.nan)

    @property
    def outside(self) -> np.ndarray:
        return np.where(self.present & ~self.is_member, self.values, np.nan)

    def long(self) -> dict[str, np.ndarray]:
        """The present entries in (reference key, example id) order: Song & Mittal's threshold rule keeps
        the first of tied candidates."""
        label = self.label if self.label is not None else np.full(self.values.shape, -1)
        return {
            "value": self.values[self.present],
            "is_member": self.is_member[self.present],
            "label": label[self.present],
        }


def references_of(fleet: FleetMatrix, reference_keys: list[str], example_id: np.ndarray) -> ReferenceMatrix:
    """A target's references (`reference_keys`, never the target itself) over the target's sorted examples,
    cut out of the fleet: their rows, and the fleet's per-example order with every other model removed."""
    rank = {key: i for i, key in enumerate(fleet.model_keys)}
    rows = np.array(sorted(rank[k] for k in set(reference_keys) if k in rank), dtype=np.int64)
    if not np.array_equal(example_id, fleet.example_id):
        col = np.minimum(np.searchsorted(fleet.example_id, example_id), max(len(fleet.example_id) - 1, 0))
        known = (
            fleet.example_id[col] == example_id if len(fleet.example_id) else np.zeros(len(example_id), bool)
        )
        present = fleet.present[rows][:, col] & known[None, :]
        values = np.where(present, fleet.values[rows][:, col], np.nan)
        is_member = fleet.is_member[rows][:, col] & present
        label = np.where(present, fleet.label[rows][:, col], -1)
        return ReferenceMatrix(example_id, values, is_member, present, None, label, members_checked=True)
    n_models = len(fleet.model_keys)
    full = fleet.order
    if len(rows) == n_models - 1:
        # leave-one-out (the usual case): one copy of each matrix without the missing row, whose entry is
        # dropped from every example's order and the later ranks shifted down
        t = int(np.setdiff1d(np.arange(n_models), rows)[0])
        values, present, is_member = (
            np.delete(a, t, axis=0) for a in (fleet.values, fleet.present, fleet.is_member)
        )
        order = full[full != t].reshape(len(example_id), len(rows))
        order -= order > t
    else:
        values, present, is_member = (
            np.take(a, rows, axis=0) for a in (fleet.values, fleet.present, fleet.is_member)
        )
        keep = np.zeros(n_models, bool)
        keep[rows] = True
        position = np.full(n_models, -1, dtype=np.int32)
        position[rows] = np.arange(len(rows), dtype=np.int32)
        order = position[full[keep[full]].reshape(len(example_id), len(rows))]
    # the fleet's membership is already False where a model lacks the example
    return ReferenceMatrix(
        example_id,
        values,
        is_member,
        present,
        order,
        partial(np.take, fleet.label, rows, 0),
        members_checked=True,
    )


class FleetCache:
    """The group's `reference` rows (every reference model's rows once), as a `FleetMatrix` per (value
    column, kind), built on first use and shared by the group's targets."""

    def __init__(self, reference: pa.Table):
        self._reference = reference
        self._matrices: dict[tuple[str, str | None], FleetMatrix] = {}

    def rows(self, models: list[str], columns: list[str], kind: str | None) -> dict[str, np.ndarray]:
        """The rows of `models` (a target's references) in (model key, example id) order: model_key,
        example_id, label, is_member and each of `columns` (see `row_column`)."""
        columns = check_row_columns(columns)
        table = self._reference
        keep = pc.is_in(table["model_key"], pa.array(sorted(set(models)), pa.string()))
        if kind is not None:
            keep = pc.and_(keep, pc.equal(table["kind"], kind))
        table = table.filter(keep)
        model = table.column("model_key").combine_chunks()
        codes = pc.dictionary_encode(model)
        rank = np.argsort(np.argsort(np.array(codes.dictionary.to_pylist(), dtype=object), kind="stable"))
        order = np.lexsort(
            (
                table.column("example_id").to_numpy(zero_copy_only=False),
                rank[codes.indices.to_numpy(zero_copy_only=False)],
            )
        )
        out = {"model_key": np.asarray(model.to_numpy(zero_copy_only=False), dtype=object)[order]}
        out["is_member"] = table.column("is_member").to_numpy(zero_copy_only=False).astype(bool)[order]
        for column in dict.fromkeys(["example_id", "label", *columns]):
            out[column] = row_column(table, column)[order]
        return out

    def matrix(self, column: str, kind: str | None) -> FleetMatrix:
        key = (check_column(column), kind)
        if key not in self._matrices:
            table = self._reference
            if kind is not None:
                table = table.filter(pc.equal(table["kind"], kind))
            self._matrices[key] = build_fleet_matrix(table, column)
        return self._matrices[key]
