"""Attacks layer: running attack code. Reads exactly the rows an attack may see, runs it in an in-memory
sandbox under a time and memory limit, and checks what it returns before anything is stored.

The invariance contract: the rows an attack sees for target T never include T's membership. Target
relations carry no `is_member`; an attack that reads reference models is run on one target per sandbox,
whose `reference` relation holds T's references only (the fleet minus T), so no other target's reference
rows, which may hold T itself with its labels, are in reach.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from robmia_db.attacks.definition import KIND_NEEDS, AttackDefinition
from robmia_db.attacks.planning import ScoreUnit
from robmia_db.errors import AttackDefinitionError, RobmiaError

RESULT_COLUMNS = ("model_key", "example_id", "score")
DEFAULT_TIMEOUT_S = 3600.0
DEFAULT_MEMORY_LIMIT = "4GB"
# how long a stopped attack may take to notice before we give up on it (its thread is a daemon)
_STOP_GRACE_S = 1.0


class AttackStopped(RobmiaError):
    """An attack ran past its time limit or was interrupted (Ctrl-C); nothing of it was stored."""


class AttackContext:
    """What a Python attack sees: read-only SQL over `target` (and kind / reference relations) plus params."""

    def __init__(
        self, con: duckdb.DuckDBPyConnection, units: list[ScoreUnit], params: dict[str, Any], path: str
    ):
        self._con = con
        self._path = path
        self.units = units
        self.params = params

    def sql(self, query: str, params: dict[str, Any] | None = None) -> pa.Table:
        check_single_select(self._con, query, self._path)
        try:
            relation = self._con.sql(query, params=params) if params else self._con.sql(query)
            return relation.to_arrow_table()
        except duckdb.Error as exc:
            raise AttackDefinitionError(
                self._path, f"SQL failed: {str(exc).strip().splitlines()[0]}"
            ) from None


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


def read_relations(
    store: duckdb.DuckDBPyConnection, attack: AttackDefinition, units: list[ScoreUnit]
) -> dict[str, pa.Table]:
    """Every row a group of units (sharing their inputs) may need, read once; `batches` slices it.

    Target relations carry no labels. `reference` holds each reference model's rows once, with labels;
    it is never handed to an attack as is (see `batches`).
    """
    store.register("_units", _units_table(units))
    relations: dict[str, pa.Table] = {}
    try:
        if attack.signal_kind is None:
            relations["target"] = store.sql(
                """SELECT s.* EXCLUDE (is_member) FROM v_signals s
                   JOIN _units u ON s.model_key = u.model_key AND s.perturbation = u.perturbation"""
            ).to_arrow_table()
        else:
            for kind in (n for n in attack.needs if n in KIND_NEEDS):
                relations[kind] = store.sql(
                    f"""SELECT s.* EXCLUDE (is_member) FROM v_signals s
                        JOIN _units u ON s.model_key = u.model_key AND s.perturbation = u.{kind}_perturbation"""
                ).to_arrow_table()
            relations["target"] = relations[attack.signal_kind]
        if attack.needs_reference:
            references = sorted({ref for u in units for ref in u.references})
            names = sorted(set(units[0].inputs.values()))
            relations["reference"] = store.sql(
                "SELECT * FROM v_signals WHERE model_key IN (SELECT unnest($refs)) "
                "AND perturbation IN (SELECT unnest($names))",
                params={"refs": references, "names": names},
            ).to_arrow_table()
    finally:
        store.unregister("_units")
    return relations


def batches(
    attack: AttackDefinition, units: list[ScoreUnit], relations: dict[str, pa.Table]
) -> Iterator[tuple[list[ScoreUnit], dict[str, pa.Table]]]:
    """Units to run together with their relations: all at once, or one target per sandbox with references."""
    if not attack.needs_reference:
        yield units, relations
        return
    for unit in units:
        sliced = {
            name: table.filter(pc.equal(table["model_key"], unit.model_key))
            for name, table in relations.items()
            if name != "reference"
        }
        if "target" not in sliced:  # kind attacks alias target to their last kind
            sliced["target"] = sliced[attack.signal_kind]
        reference = relations["reference"]
        reference = reference.filter(pc.is_in(reference["model_key"], pa.array(unit.references, pa.string())))
        sliced["reference"] = reference.add_column(
            0, "target_model_key", pa.repeat(pa.scalar(unit.model_key, pa.string()), reference.num_rows)
        )
        yield [unit], sliced


def open_sandbox(relations: dict[str, pa.Table], memory_limit: str) -> duckdb.DuckDBPyConnection:
    """An in-memory connection that holds only the attack's relations, with file access switched off.

    The attack never touches the store's connection, so it cannot read membership, write, attach or
    read files: DuckDB refuses file access and the configuration (memory limit included) cannot be
    switched back.
    """
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET threads = 2")
        con.execute(f"SET memory_limit = '{_memory_limit(memory_limit)}'")
        for name, table in relations.items():
            con.register(name, table)
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def close_sandbox(con: duckdb.DuckDBPyConnection) -> None:
    """Close a sandbox; one still busy with a stopped attack's query is left to its daemon thread."""
    try:
        con.close()
    except duckdb.Error:
        pass


def _memory_limit(value: str) -> str:
    text = str(value).strip().replace(" ", "")
    number = text.rstrip("KMGTiBb")
    if not number or not number.replace(".", "", 1).isdigit() or text == number:
        raise AttackDefinitionError(None, f"--memory-limit {value!r}: give a size such as 2GB or 500MB")
    return text


def _units_table(units: list[ScoreUnit]) -> pa.Table:
    columns: dict[str, list[Any]] = {"model_key": [], "perturbation": []}
    for kind in KIND_NEEDS:
        columns[f"{kind}_perturbation"] = []
    for unit in units:
        columns["model_key"].append(unit.model_key)
        columns["perturbation"].append(unit.perturbation)
        for kind in KIND_NEEDS:
            columns[f"{kind}_perturbation"].append(unit.inputs.get(kind))
    return pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()})


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
    con = duckdb.connect(":memory:")
    try:
        con.register("r", table)
        con.register("e", target.select(["model_key", "example_id"]))
        unknown = con.sql("SELECT DISTINCT model_key FROM r WHERE model_key NOT IN (SELECT model_key FROM e)")
        unknown = [row[0] for row in unknown.fetchall()]
        if unknown:
            raise AttackDefinitionError(
                attack.path,
                f"returned scores for a model it was not asked to score ({sorted(map(str, unknown))[0]})",
            )
        duplicate = con.sql(
            "SELECT model_key, example_id FROM r GROUP BY ALL HAVING count(*) > 1 LIMIT 1"
        ).fetchall()
        if duplicate:
            raise AttackDefinitionError(
                attack.path,
                f"returned the same (model_key, example_id) twice (model {names.get(duplicate[0][0])}, "
                f"example {duplicate[0][1]})",
            )
        checks = con.sql(
            """WITH expected AS (SELECT model_key, count(*) AS n FROM e GROUP BY ALL),
                    got AS (
                        SELECT r.model_key, count(*) AS n_rows,
                               count(*) FILTER (WHERE x.example_id IS NULL) AS n_foreign,
                               min(r.example_id) FILTER (WHERE x.example_id IS NULL) AS foreign_id,
                               count(*) FILTER (WHERE r.score IS NULL OR NOT isfinite(r.score)) AS n_nonfinite
                        FROM r LEFT JOIN e x ON x.model_key = r.model_key AND x.example_id = r.example_id
                        GROUP BY ALL)
               SELECT expected.model_key, expected.n, coalesce(got.n_rows, 0), coalesce(got.n_foreign, 0),
                      got.foreign_id, coalesce(got.n_nonfinite, 0)
               FROM expected LEFT JOIN got USING (model_key) ORDER BY expected.model_key"""
        ).fetchall()
    finally:
        con.close()
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


def run_batch(
    sandbox: duckdb.DuckDBPyConnection,
    attack: AttackDefinition,
    units: list[ScoreUnit],
    names: dict[str, str],
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> tuple[pa.Table, dict[str, int]]:
    """Score a batch of units sharing their inputs; returns (model_key, example_id, score, perturbation)."""
    perturbation = units[0].perturbation
    if attack.language == "sql":
        check_single_select(sandbox, attack.sql or "", attack.path)

        def work() -> Any:
            try:
                params = dict(attack.params)
                relation = sandbox.sql(attack.sql, params=params) if params else sandbox.sql(attack.sql)
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
    target = sandbox.sql("SELECT model_key, example_id FROM target").to_arrow_table()
    table, nonfinite = validate_result(_as_arrow(result, attack.path), attack, target, names, perturbation)
    table = table.append_column(
        "perturbation", pa.repeat(pa.scalar(perturbation, pa.string()), table.num_rows)
    )
    return table, nonfinite


def guarded(
    con: duckdb.DuckDBPyConnection, work: Callable[[], Any], timeout_s: float, label: str, path: str
) -> Any:
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
        raise AttackStopped(
            f"{path}: {label} {reason} after {time.monotonic() - started:.1f} s; nothing of this attack "
            "was stored"
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
