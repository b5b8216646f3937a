"""Attacks layer: running attack code. Runs an attack on one batch's relations (`relations` reads and cuts
them) in an in-memory sandbox under a time and memory limit, and checks what it returns before anything is
stored.

The invariance contract: the rows an attack sees for target T never include T's membership. Target
relations carry no `is_member`; an attack that reads reference models is run on one target per sandbox,
whose `reference` relation holds T's references only (the fleet minus T), so no other target's reference
rows, which may hold T itself with its labels, are in reach.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from robmia_db.attacks.definition import AttackDefinition
from robmia_db.attacks.fleet import ReferenceMatrix, target_arrays, target_rows
from robmia_db.attacks.planning import ScoreUnit
from robmia_db.attacks.relations import Relations
from robmia_db.errors import AttackDefinitionError, RobmiaError

RESULT_COLUMNS = ("model_key", "example_id", "score")
DEFAULT_TIMEOUT_S = 3600.0
DEFAULT_MEMORY_LIMIT = "4GB"
# how long a stopped attack may take to notice before we give up on it (its thread is a daemon)
_STOP_GRACE_S = 1.0


class AttackStopped(RobmiaError):
    """An attack ran past its time limit or was interrupted (Ctrl-C); nothing of it was stored."""


class AttackContext:
    """What a Python attack sees: read-only SQL over `target` (and kind / reference relations) plus params,
    and the same rows as arrays (`targets`, `references`) without a SQL round trip."""

    def __init__(self, sandbox: Sandbox, units: list[ScoreUnit], params: dict[str, Any], path: str):
        self._sandbox = sandbox
        self._path = path
        self.units = units
        self.params = params

    @property
    def _con(self) -> duckdb.DuckDBPyConnection:
        """The sandbox's own connection (opened on first use): it holds the batch's relations only."""
        return self._sandbox.connection()

    def sql(self, query: str, params: dict[str, Any] | None = None) -> pa.Table:
        con = self._sandbox.connection()
        check_single_select(con, query, self._path)
        try:
            relation = con.sql(query, params=params) if params else con.sql(query)
            return relation.to_arrow_table()
        except duckdb.Error as exc:
            raise AttackDefinitionError(
                self._path, f"SQL failed: {str(exc).strip().splitlines()[0]}"
            ) from None

    def targets(self, column: str, kind: str | None = None) -> dict[str, dict[str, np.ndarray]]:
        """Per target model of this batch: example_id, label and `column` (see `fleet.DERIVED` / `STORED`)
        sorted by example id, from `target` or from the relation of `kind`."""
        name = kind or "target"
        if name not in self._sandbox.relations:
            raise AttackDefinitionError(self._path, f"has no {name} relation (declare it in needs)")
        return target_arrays(self._sandbox.relations[name], column)

    def references(
        self, model_key: str, column: str, kind: str | None = None, example_id: np.ndarray | None = None
    ) -> ReferenceMatrix:
        """The reference models of target `model_key` (the fleet minus the target) as a [reference, example]
        matrix over `example_id` (default: every example the references have), with their membership."""
        return self._sandbox.relations.references(model_key, column, kind, example_id, self._path)

    def target_rows(self, columns: list[str], kind: str | None = None) -> dict[str, dict[str, np.ndarray]]:
        """`targets` for several columns at once, `probs` included (a [row, class] float64 matrix)."""
        name = kind or "target"
        if name not in self._sandbox.relations:
            raise AttackDefinitionError(self._path, f"has no {name} relation (declare it in needs)")
        return target_rows(self._sandbox.relations[name], list(columns))

    def reference_rows(
        self, model_key: str, columns: list[str], kind: str | None = None
    ) -> dict[str, np.ndarray]:
        """The rows of target `model_key`'s reference models (never the target's own), one per (reference,
        example) in (model key, example id) order: model_key, example_id, label, is_member and `columns`."""
        return self._sandbox.relations.reference_rows(model_key, list(columns), kind, self._path)


def check_single_select(con: duckdb.DuckDBPyConnection, sql: str, path: str | None) -> None:
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise AttackDefinitionError(path, f"SQL does not parse: {str(exc).splitlines()[0]}") from None
    if len(statements) != 1:
        raise AttackDefinitionError(path, f"must be exactly one SELECT statement (found {len(statements)})")
    if statements[0].type != duckdb.StatementType.SELECT:
        raise AttackDefinitionError(
            path, f"must be a SELECT; a {statements[0].type.name} statement is refused (attacks cannot write)"
        )


class Sandbox:
    """An in-memory DuckDB connection that holds only the batch's relations, with file access switched off,
    opened on the first SQL query (an attack reading arrays only never pays for it).

    The attack never touches the store's connection, so it cannot read membership, write, attach or
    read files: DuckDB refuses file access and the configuration (memory limit included) cannot be
    switched back.
    """

    def __init__(self, relations: Mapping[str, pa.Table], memory_limit: str):
        self.relations = relations if isinstance(relations, Relations) else Relations(dict(relations))
        self._memory_limit = _memory_limit(memory_limit)
        self._con: duckdb.DuckDBPyConnection | None = None
        self._lock = threading.Lock()
        # set when a stopped attack's query outlived the grace period: closing its connection would wait for it
        self.abandoned = False

    def connection(self) -> duckdb.DuckDBPyConnection:
        with self._lock:
            if self._con is None:
                con = duckdb.connect(":memory:")
                try:
                    con.execute("SET threads = 2")
                    con.execute(f"SET memory_limit = '{self._memory_limit}'")
                    for name in self.relations:
                        con.register(name, self.relations[name])
                    con.execute("SET enable_external_access = false")
                    con.execute("SET lock_configuration = true")
                except BaseException:
                    con.close()
                    raise
                self._con = con
            return self._con

    def interrupt(self) -> None:
        if self._con is not None:
            self._con.interrupt()

    def close(self) -> None:
        """Close; a connection still busy with a stopped attack's query is left to its daemon thread."""
        if self._con is not None and not self.abandoned:
            try:
                self._con.close()
            except duckdb.Error:
                pass


def open_sandbox(relations: Mapping[str, pa.Table], memory_limit: str) -> Sandbox:
    return Sandbox(relations, memory_limit)


def close_sandbox(sandbox: Sandbox) -> None:
    sandbox.close()


def _memory_limit(value: str) -> str:
    text = str(value).strip().replace(" ", "")
    number = text.rstrip("KMGTiBb")
    if not number or not number.replace(".", "", 1).isdigit() or text == number:
        raise AttackDefinitionError(None, f"--memory-limit {value!r}: give a size such as 2GB or 500MB")
    return text


def _as_arrow(result: Any, path: str) -> pa.Table:
    if isinstance(result, pa.Table):
        return result
    try:
        import pandas as pd

        if isinstance(result, pd.DataFrame):
            return pa.Table.from_pandas(result, preserve_index=False)
    except ImportError:
        pass
    if isinstance(result, dict):
        return pa.table(result)
    raise AttackDefinitionError(
        path, f"score() returned {type(result).__name__}; return an Arrow table or DataFrame"
    )


def validate_result(
    table: pa.Table, attack: AttackDefinition, target: pa.Table, names: dict[str, str], perturbation: str
) -> tuple[pa.Table, dict[str, int]]:
    """Exactly one score per target example, no other ids, non-finite scores as the attack declared.

    Returns the table (NULL/NaN mapped to -inf under nonfinite = "lowest") and per model the number of
    non-finite scores. Any violation refuses the whole attack run: nothing is stored.
    """
    if sorted(table.column_names) != sorted(RESULT_COLUMNS) or table.num_columns != 3:
        raise AttackDefinitionError(
            attack.path,
            f"must return exactly (model_key, example_id, score); got ({', '.join(table.column_names)})",
        )
    table = table.select(list(RESULT_COLUMNS))
    try:
        table = table.cast(
            pa.schema([("model_key", pa.string()), ("example_id", pa.int32()), ("score", pa.float64())])
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise AttackDefinitionError(attack.path, f"result columns have wrong types: {exc}") from None
    checks = _result_checks(table, target, attack.path, names)
    nonfinite: dict[str, int] = {}
    for model_key, n_expected, n_rows, n_foreign, foreign_id, n_nonfinite in checks:
        model = f"model {names.get(model_key, model_key)}"
        if n_foreign:
            raise AttackDefinitionError(
                attack.path,
                f"returned {n_foreign} of {n_rows} scores for example ids that {model} does not have "
                f"(e.g. {foreign_id}; perturbation {perturbation}); nothing was stored",
            )
        if n_rows != n_expected:
            raise AttackDefinitionError(
                attack.path,
                f"returned {n_rows} scores for {model}, which has {n_expected} examples (perturbation "
                f"{perturbation}; one score per example)",
            )
        if n_nonfinite and attack.nonfinite == "error":
            raise AttackDefinitionError(
                attack.path,
                f"{n_nonfinite} of {n_rows} scores for {model} (perturbation {perturbation}) are NULL, NaN or "
                'infinite; fix the attack, or declare nonfinite = "lowest" in its header to rank them last',
            )
        nonfinite[model_key] = int(n_nonfinite)
    if any(nonfinite.values()):
        scores = table["score"]
        missing = pc.or_kleene(pc.is_null(scores), pc.is_nan(scores))
        fixed = pc.if_else(pc.fill_null(missing, True), pa.scalar(float("-inf")), scores)
        table = table.set_column(2, "score", fixed)
    return table, nonfinite


def _result_checks(
    table: pa.Table, target: pa.Table, path: str, names: dict[str, str]
) -> list[tuple[str, int, int, int, int | None, int]]:
    """Per target model (sorted by key): expected rows, returned rows, rows with a foreign example id, the
    smallest such id, non-finite scores. Refuses scores for other models and repeated (model, example)."""
    value_set = pa.array(sorted(pc.unique(target["model_key"]).to_pylist()), pa.string())
    code = pc.index_in(table["model_key"], value_set=value_set)
    if code.null_count:
        unknown = pc.unique(table["model_key"].filter(pc.is_null(code))).to_pylist()
        raise AttackDefinitionError(
            path, f"returned scores for a model it was not asked to score ({sorted(map(str, unknown))[0]})"
        )
    code = code.to_numpy(zero_copy_only=False).astype(np.int64)
    expected_code = pc.index_in(target["model_key"], value_set=value_set).to_numpy(zero_copy_only=False)
    # one int64 per (model, example id); a NULL example id matches nothing
    ids = table["example_id"]
    has_id = pc.is_valid(ids).to_numpy(zero_copy_only=False)
    offset = np.int64(2**31)
    ids = pc.fill_null(ids, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    pair = (code << 32) | (ids + offset)
    expected = (expected_code.astype(np.int64) << 32) | (
        target["example_id"].to_numpy(zero_copy_only=False).astype(np.int64) + offset
    )
    ordered = np.sort(pair[has_id])
    repeated = np.flatnonzero(ordered[1:] == ordered[:-1])
    if len(repeated):
        twice = int(ordered[repeated[0]])
        model_key = str(value_set[twice >> 32])
        raise AttackDefinitionError(
            path,
            f"returned the same (model_key, example_id) twice (model {names.get(model_key)}, "
            f"example {(twice & 0xFFFFFFFF) - int(offset)})",
        )
    foreign = ~np.isin(pair, expected) | ~has_id
    scores = table["score"]
    bad = pc.fill_null(pc.invert(pc.is_finite(scores)), True).to_numpy(zero_copy_only=False)
    n = len(value_set)
    n_expected = np.bincount(expected_code, minlength=n)
    n_rows = np.bincount(code, minlength=n)
    n_foreign = np.bincount(code[foreign], minlength=n)
    n_bad = np.bincount(code[bad], minlength=n)
    checks = []
    for i in range(n):
        mine = foreign & has_id & (code == i) if n_foreign[i] else None
        foreign_id = int(ids[mine].min()) if mine is not None and mine.any() else None
        checks.append(
            (
                str(value_set[i]),
                int(n_expected[i]),
                int(n_rows[i]),
                int(n_foreign[i]),
                foreign_id,
                int(n_bad[i]),
            )
        )
    return checks


def run_batch(
    sandbox: Sandbox,
    attack: AttackDefinition,
    units: list[ScoreUnit],
    names: dict[str, str],
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> tuple[pa.Table, dict[str, int]]:
    """Score a batch of units sharing their inputs; returns (model_key, example_id, score, perturbation)."""
    perturbation = units[0].perturbation
    if attack.language == "sql":
        con = sandbox.connection()
        check_single_select(con, attack.sql or "", attack.path)

        def work() -> Any:
            try:
                params = dict(attack.params)
                relation = con.sql(attack.sql, params=params) if params else con.sql(attack.sql)
                return relation.to_arrow_table()
            except duckdb.Error as exc:
                raise AttackDefinitionError(
                    attack.path, f"SQL failed: {str(exc).strip().splitlines()[0]}"
                ) from None
    else:
        function = attack.load_function()

        def work() -> Any:
            try:
                return function(
                    AttackContext(sandbox, units, dict(attack.params), attack.path), dict(attack.params)
                )
            except RobmiaError:
                raise
            except Exception as exc:
                first_line = (str(exc).strip().splitlines() or [""])[0]
                raise AttackDefinitionError(
                    attack.path, f"score() raised {type(exc).__name__}: {first_line}"
                ) from None

    label = names.get(units[0].model_key, units[0].model_key) if len(units) == 1 else f"{len(units)} models"
    result = guarded(sandbox, work, timeout_s, f"{attack.name} on {label} ({perturbation})", attack.path)
    target = sandbox.relations["target"].select(["model_key", "example_id"])
    table, nonfinite = validate_result(_as_arrow(result, attack.path), attack, target, names, perturbation)
    table = table.append_column(
        "perturbation", pa.repeat(pa.scalar(perturbation, pa.string()), table.num_rows)
    )
    return table, nonfinite


def guarded(con: Sandbox, work: Callable[[], Any], timeout_s: float, label: str, path: str) -> Any:
    """Run `work` in a worker thread; on timeout or Ctrl-C interrupt its DuckDB query and give up within ~1 s.

    DuckDB runs a query in C without returning to Python, so a signal handler in the querying thread would
    wait for the query to end; the main thread stays free to notice the signal and call `con.interrupt()`.
    A Python attack busy outside DuckDB cannot be interrupted: its (daemon) thread is left behind.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="robmia-attack")
    started = time.monotonic()
    thread.start()
    reason = None
    try:
        while thread.is_alive():
            left = timeout_s - (time.monotonic() - started)
            if left <= 0:
                reason = f"ran past the time limit of {timeout_s:g} s (score --time-limit)"
                break
            thread.join(min(0.1, left))
    except KeyboardInterrupt:
        reason = "interrupted (Ctrl-C)"
    if reason is not None:
        # an interrupt that lands between two pipelines of a query can be missed: repeat it
        grace_end = time.monotonic() + _STOP_GRACE_S
        while thread.is_alive() and time.monotonic() < grace_end:
            con.interrupt()
            thread.join(0.05)
        con.abandoned = thread.is_alive()
        stopped = AttackStopped(
            f"{path}: {label} {reason} after {time.monotonic() - started:.1f} s; nothing of this attack "
            "was stored"
        )
        stopped.abandoned_thread = con.abandoned
        raise stopped
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
