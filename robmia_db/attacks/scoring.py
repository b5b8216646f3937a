"""Attacks layer: score attacks on every stored model, once per perturbation, cached by content.

A score is keyed by the attack's content key (name, normalised source, resolved params) and the signal keys
it was computed from (`inputs_key`): editing an attack re-scores it, new signals re-score what used them,
and nothing else re-runs. Attack code runs on a read-only connection with file access disabled and as
exactly one SELECT; results are written afterwards in one short transaction per attack.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import duckdb
import numpy as np
import pyarrow as pa

from robmia_db.attacks.definition import KIND_NEEDS, AttackDefinition
from robmia_db.attacks.intervals import DEFAULT_RESAMPLES, write_intervals
from robmia_db.attacks.metrics import calibrated_balanced_accuracy, compute_metrics, reference_metrics
from robmia_db.attacks.registry import load_registry
from robmia_db.errors import AttackDefinitionError, RobmiaError
from robmia_db.spec.identity import canonical_json
from robmia_db.store.connection import reading, transaction, writing

RESULT_COLUMNS = ("model_key", "example_id", "score")


@dataclass
class ScoreUnit:
    """One (attack, model, perturbation) to score, with the perturbations of other kinds it reads."""

    model_key: str
    perturbation: str
    inputs: dict[str, str]  # need kind -> perturbation name ("signal" for single-signal attacks)
    signal_keys: list[str]
    references: list[str] = field(default_factory=list)

    def inputs_key(self, reference_signal_keys: list[str]) -> str:
        payload = json.dumps(
            {"signals": sorted(self.signal_keys), "references": sorted(reference_signal_keys)}
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class AttackOutcome:
    attack: AttackDefinition
    scored: int = 0
    cached: int = 0
    skipped: list[tuple[str, str | None, str]] = field(
        default_factory=list
    )  # model_name, perturbation, reason
    seconds: float = 0.0


class ScoreReporter(Protocol):
    def attack_started(self, attack: AttackDefinition, n_units: int) -> None: ...
    def attack_finished(self, outcome: AttackOutcome) -> None: ...


class SilentScoreReporter:
    def attack_started(self, attack, n_units):
        pass

    def attack_finished(self, outcome):
        pass


@dataclass
class StoreState:
    models: dict[str, dict[str, Any]]
    perturbations: dict[str, list[dict[str, Any]]]  # model_key -> rows (name, kind, signal_key, eps)
    existing: dict[tuple[str, str, str], str]  # (attack_key, model_key, perturbation) -> inputs_key


def _read_state(con: duckdb.DuckDBPyConnection) -> StoreState:
    models = {
        row["model_key"]: row
        for row in con.sql(
            "SELECT model_key, model_name, dataset, config, status FROM v_models WHERE status = 'completed'"
        )
        .to_arrow_table()
        .to_pylist()
    }
    perturbations: dict[str, list[dict[str, Any]]] = {}
    for row in (
        con.sql(
            "SELECT model_key, perturbation, kind, signal_key, eps FROM v_perturbations ORDER BY model_key, perturbation"
        )
        .to_arrow_table()
        .to_pylist()
    ):
        perturbations.setdefault(row["model_key"], []).append(row)
    existing = {
        (r[0], r[1], r[2]): r[3]
        for r in con.execute("SELECT attack_key, model_key, perturbation, inputs_key FROM metrics").fetchall()
    }
    return StoreState(models, perturbations, existing)


def _recipe_and_membership(config_json: str | None) -> tuple[str | None, str | None]:
    """Reference models share the training recipe (all but the seed) and differ in membership."""
    if not config_json:
        return None, None
    config = json.loads(config_json)
    if config and "imported_from" in config:
        # imported outputs: same dataset and defense label, a different membership draw
        recipe = config.get("recipe")
        if not recipe or not recipe.get("dataset"):
            return None, None
        return canonical_json({"imported": recipe}), config.get("membership_sha256")
    if not config or "training" not in config:
        return None, None
    membership = config.get("membership", {})
    training = {k: v for k, v in config["training"].items() if k != "seed"}
    recipe = {
        "dataset": config.get("dataset"),
        "model": config.get("model"),
        "training": training,
        "scheme": membership.get("scheme"),
        "population": membership.get("population"),
    }
    return canonical_json(recipe), canonical_json(membership)


def reference_models(state: StoreState) -> dict[str, list[str]]:
    """For each model, the other stored models trained the same way on an independent membership draw."""
    keys = {key: _recipe_and_membership(row["config"]) for key, row in state.models.items()}
    references: dict[str, list[str]] = {}
    for key, (recipe, membership) in keys.items():
        references[key] = sorted(
            other
            for other, (other_recipe, other_membership) in keys.items()
            if other != key
            and recipe is not None
            and other_recipe == recipe
            and other_membership != membership
        )
    return references


def plan_units(
    attack: AttackDefinition, state: StoreState, references: dict[str, list[str]], model_keys: set[str] | None
) -> tuple[list[ScoreUnit], list[tuple[str, str | None, str]]]:
    units: list[ScoreUnit] = []
    skipped: list[tuple[str, str | None, str]] = []
    for model_key, model in sorted(state.models.items(), key=lambda kv: kv[1]["model_name"]):
        if model_keys is not None and model_key not in model_keys:
            continue
        rows = state.perturbations.get(model_key, [])
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_kind.setdefault(row["kind"], []).append(row)
        target_kind = attack.signal_kind
        if target_kind is None:
            candidates = rows
        else:
            missing = [k for k in attack.needs if k in KIND_NEEDS and k not in by_kind]
            if missing:
                skipped.append((model["model_name"], None, f"needs {missing[0]} signals; the model has none"))
                continue
            candidates = by_kind[target_kind]
        for row in candidates:
            inputs = {"signal": row["perturbation"]} if target_kind is None else {}
            signal_keys = [row["signal_key"]]
            for kind in attack.needs:
                if kind in KIND_NEEDS:
                    chosen = row if kind == target_kind else by_kind[kind][0]
                    inputs[kind] = chosen["perturbation"]
                    if chosen is not row:
                        signal_keys.append(chosen["signal_key"])
            unit = ScoreUnit(model_key, row["perturbation"], inputs, signal_keys)
            if attack.needs_reference:
                unit.references = [
                    ref
                    for ref in references.get(model_key, [])
                    if all(
                        any(p["perturbation"] == name for p in state.perturbations.get(ref, []))
                        for name in inputs.values()
                    )
                ]
                if not unit.references:
                    skipped.append(
                        (
                            model["model_name"],
                            row["perturbation"],
                            "needs reference models (same dataset and training recipe, independent membership, "
                            "e.g. membership.scheme = 'random_halves'); none in the store",
                        )
                    )
                    continue
            units.append(unit)
    return units, skipped


def _signal_keys_of(state: StoreState, model_key: str, names: list[str]) -> list[str]:
    return [p["signal_key"] for p in state.perturbations.get(model_key, []) if p["perturbation"] in names]


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
        _check_single_select(self._con, query, self._path)
        try:
            relation = self._con.sql(query, params=params) if params else self._con.sql(query)
            return relation.to_arrow_table()
        except duckdb.Error as exc:
            raise AttackDefinitionError(
                self._path, f"SQL failed: {str(exc).strip().splitlines()[0]}"
            ) from None


def _check_single_select(con: duckdb.DuckDBPyConnection, sql: str, path: str | None) -> None:
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


def _materialise_relations(
    store: duckdb.DuckDBPyConnection, attack: AttackDefinition, units: list[ScoreUnit]
) -> dict[str, pa.Table]:
    """Read exactly the rows an attack may see, as Arrow tables; the target relations carry no labels."""
    store.register("_units", _units_table(units))
    store.register("_references", _references_table(units))
    relations: dict[str, pa.Table] = {}
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
        relations["reference"] = store.sql(
            """SELECT r.target_model_key, s.* FROM v_signals s
               JOIN _references r ON s.model_key = r.reference_model_key AND s.perturbation = r.perturbation"""
        ).to_arrow_table()
    store.unregister("_units")
    store.unregister("_references")
    return relations


def _sandbox(relations: dict[str, pa.Table]) -> duckdb.DuckDBPyConnection:
    """An in-memory connection that holds only the attack's relations, with file access switched off.

    The attack never touches the store's connection, so it cannot read membership, write, attach or
    read files: DuckDB refuses file access and the configuration cannot be switched back.
    """
    con = duckdb.connect(":memory:")
    con.execute("SET threads = 2")
    for name, table in relations.items():
        con.register(name, table)
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


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


def _references_table(units: list[ScoreUnit]) -> pa.Table:
    rows = [(u.model_key, ref, name) for u in units for ref in u.references for name in u.inputs.values()]
    return pa.table(
        {
            "target_model_key": pa.array([r[0] for r in rows], pa.string()),
            "reference_model_key": pa.array([r[1] for r in rows], pa.string()),
            "perturbation": pa.array([r[2] for r in rows], pa.string()),
        }
    )


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


def _validate_result(table: pa.Table, attack: AttackDefinition, expected: dict[str, int]) -> pa.Table:
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
    keys = table.column("model_key").to_numpy(zero_copy_only=False)
    ids = table.column("example_id").to_numpy()
    unique_keys, counts = np.unique(keys, return_counts=True)
    got = dict(zip(unique_keys.tolist(), counts.tolist()))
    for model_key, count in expected.items():
        if got.get(model_key, 0) != count:
            raise AttackDefinitionError(
                attack.path,
                f"returned {got.get(model_key, 0)} scores for model {model_key}, which has {count} examples "
                "(one score per example)",
            )
    extra = set(got) - set(expected)
    if extra:
        raise AttackDefinitionError(
            attack.path, f"returned scores for a model it was not asked to score ({sorted(extra)[0]})"
        )
    order = np.lexsort((ids, keys))
    sorted_keys, sorted_ids = keys[order], ids[order]
    if len(ids) > 1 and np.any((sorted_keys[1:] == sorted_keys[:-1]) & (sorted_ids[1:] == sorted_ids[:-1])):
        raise AttackDefinitionError(attack.path, "returned the same (model_key, example_id) twice")
    return table


def _run_units(
    con: duckdb.DuckDBPyConnection,
    attack: AttackDefinition,
    units: list[ScoreUnit],
    counts: dict[tuple[str, str], int],
) -> pa.Table:
    """Score a batch of units sharing their inputs; returns (model_key, example_id, score, perturbation)."""
    expected = {u.model_key: counts[(u.model_key, u.perturbation)] for u in units}
    if attack.language == "sql":
        _check_single_select(con, attack.sql or "", attack.path)
        try:
            params = {k: v for k, v in attack.params.items()}
            relation = con.sql(attack.sql, params=params) if params else con.sql(attack.sql)
            table = relation.to_arrow_table()
        except duckdb.Error as exc:
            raise AttackDefinitionError(
                attack.path, f"SQL failed: {str(exc).strip().splitlines()[0]}"
            ) from None
    else:
        try:
            result = attack.function(
                AttackContext(con, units, dict(attack.params), attack.path), dict(attack.params)
            )
        except RobmiaError:
            raise
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [""])[0]
            raise AttackDefinitionError(
                attack.path, f"score() raised {type(exc).__name__}: {first_line}"
            ) from None
        table = _as_arrow(result, attack.path)
    table = _validate_result(table, attack, expected)
    return table.append_column(
        "perturbation", pa.repeat(pa.scalar(units[0].perturbation, pa.string()), table.num_rows)
    )


def _example_counts(con: duckdb.DuckDBPyConnection) -> dict[tuple[str, str], int]:
    return {
        (r[0], r[1]): int(r[2])
        for r in con.execute("SELECT model_key, perturbation, n_rows FROM v_perturbations").fetchall()
    }


def _write_results(
    db_path: Path,
    attack: AttackDefinition,
    units: list[ScoreUnit],
    inputs_keys: dict[tuple[str, str], str],
    scores: list[pa.Table],
    skipped: list[tuple[str, str | None, str]],
    model_keys_by_name: dict[str, str],
    seconds: float,
    considered: set[str],
    resamples: int = DEFAULT_RESAMPLES,
) -> None:
    attack_key = attack.attack_key
    now = datetime.now(timezone.utc)
    units_table = pa.table(
        {
            "model_key": pa.array([u.model_key for u in units], pa.string()),
            "perturbation": pa.array([u.perturbation for u in units], pa.string()),
            "inputs_key": pa.array([inputs_keys[(u.model_key, u.perturbation)] for u in units], pa.string()),
        }
    )
    all_scores = pa.concat_tables(scores) if scores else None
    with writing(db_path) as con, transaction(con):
        con.execute(
            """INSERT INTO attacks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (attack_key) DO UPDATE SET title = excluded.title, source_path = excluded.source_path""",
            [
                attack_key, attack.name, attack.title, attack.paper, attack.description, attack.language,
                attack.path, attack.source, json.dumps(attack.params), json.dumps(attack.needs), now,
            ],
        )  # fmt: skip
        con.register("_done", units_table)
        # one version of an attack per (model, perturbation): a re-scored or edited attack replaces the old rows
        same_name = "SELECT attack_key FROM attacks WHERE name = ?"
        for table in ("scores", "metrics"):
            con.execute(
                f"""DELETE FROM {table} WHERE attack_key IN ({same_name})
                    AND (model_key, perturbation) IN (SELECT model_key, perturbation FROM _done)""",
                [attack.name],
            )
        con.register("_considered", pa.table({"model_key": pa.array(sorted(considered), pa.string())}))
        con.execute(
            f"""DELETE FROM attack_skips WHERE attack_key IN ({same_name})
                AND model_key IN (SELECT model_key FROM _considered)""",
            [attack.name],
        )
        if all_scores is not None and all_scores.num_rows:
            con.register("_new_scores", all_scores)
            con.execute(
                "INSERT INTO scores SELECT ?, model_key, perturbation, example_id, score FROM _new_scores",
                [attack_key],
            )
            metrics = compute_metrics(
                con,
                """(SELECT s.model_key, s.perturbation, s.score, b.is_member FROM _new_scores s
                    JOIN membership b ON b.model_key = s.model_key AND b.example_id = s.example_id)""",
                ["model_key", "perturbation"],
            )
            con.register("_new_metrics", metrics)
            per_unit = seconds / max(1, len(units))
            con.execute(
                """INSERT INTO metrics
                   SELECT ?, m.model_key, m.perturbation, d.inputs_key, m.balanced_accuracy, m.auc, m.tpr_at_fpr_0,
                          m.tpr_at_fpr_1e3, m.tpr_at_fpr_1e2, m.advantage, m.threshold, m.n_members, m.n_nonmembers,
                          m.tp_at_best, m.fp_at_best, m.auc_numerator2, NULL, NULL, NULL, ?, ?
                   FROM _new_metrics m JOIN _done d USING (model_key, perturbation)""",
                [attack_key, per_unit, now],
            )
            # issue 10 (stats): bootstrap intervals beside the metrics, in the same transaction
            write_intervals(con, attack.name, attack_key, resamples)
        for model_name, perturbation, reason in skipped:
            con.execute(
                "INSERT INTO attack_skips VALUES (?, ?, ?, ?, ?)",
                [attack_key, model_keys_by_name[model_name], perturbation, reason, now],
            )


def calibrate_thresholds(db_path: Path, attack_keys: list[str] | None = None) -> int:
    """Fill calibrated_accuracy: the threshold that is best on reference models, applied to the target.

    The paper's threshold is an oracle tuned on the evaluated members and non-members themselves; the
    calibrated one uses only reference models, as a real attacker could. Returns the rows updated.
    """
    with reading(db_path) as con:
        state = _read_state(con)
        references = reference_models(state)
        if not any(references.values()):
            return 0
        filter_sql = ""
        if attack_keys:
            filter_sql = "WHERE s.attack_key IN (SELECT unnest($keys))"
        rows = con.sql(
            f"""SELECT s.attack_key, s.model_key, s.perturbation, s.score, b.is_member FROM scores s
                JOIN membership b ON b.model_key = s.model_key AND b.example_id = s.example_id {filter_sql}""",
            params={"keys": attack_keys} if attack_keys else None,
        ).to_arrow_table()
    if rows.num_rows == 0:
        return 0
    frame = rows.to_pandas()
    groups = {
        key: group for key, group in frame.groupby(["attack_key", "model_key", "perturbation"], sort=False)
    }
    updates = []
    for (attack_key, model_key, perturbation), group in groups.items():
        refs = [
            groups[(attack_key, ref, perturbation)]
            for ref in references.get(model_key, [])
            if (attack_key, ref, perturbation) in groups
        ]
        if not refs:
            continue
        pooled_scores = np.concatenate([r["score"].to_numpy(dtype=float) for r in refs])
        pooled_members = np.concatenate([r["is_member"].to_numpy(dtype=bool) for r in refs])
        threshold = reference_metrics(pooled_scores, pooled_members)["threshold"]
        if threshold is None:
            continue
        accuracy = calibrated_balanced_accuracy(
            float(threshold), group["score"].to_numpy(dtype=float), group["is_member"].to_numpy(dtype=bool)
        )
        updates.append((attack_key, model_key, perturbation, float(accuracy), float(threshold), len(refs)))
    if updates:
        table = pa.table(
            {
                "attack_key": [u[0] for u in updates], "model_key": [u[1] for u in updates],
                "perturbation": [u[2] for u in updates], "calibrated_accuracy": [u[3] for u in updates],
                "calibrated_threshold": [u[4] for u in updates], "n_reference_models": [u[5] for u in updates],
            }
        )  # fmt: skip
        with writing(db_path) as con, transaction(con):
            con.register("_calibrated", table)
            con.execute(
                """UPDATE metrics SET calibrated_accuracy = c.calibrated_accuracy,
                       calibrated_threshold = c.calibrated_threshold, n_reference_models = c.n_reference_models
                   FROM _calibrated c
                   WHERE metrics.attack_key = c.attack_key AND metrics.model_key = c.model_key
                     AND metrics.perturbation = c.perturbation"""
            )
    return len(updates)


def score_attacks(
    db_path: str | Path,
    attacks: list[str | Path] | None = None,
    attack_paths: list[str | Path] | None = None,
    params: dict[str, Any] | None = None,
    force: bool = False,
    models: list[str] | None = None,
    reporter: ScoreReporter | None = None,
    resamples: int = DEFAULT_RESAMPLES,
) -> list[AttackOutcome]:
    """Score attacks (names or file paths; default: every registered attack) on every stored model.

    Only (attack, model, perturbation) triples whose attack source or input signals changed are computed,
    unless `force`. `resamples` bootstrap replicates give each metric's interval (0: none).
    Attacks needing reference models are skipped, with the reason recorded, where none exist.
    """
    db_path = Path(db_path)
    reporter = reporter or SilentScoreReporter()
    registry = load_registry(list(attack_paths or []))
    selected: list[AttackDefinition] = []
    for item in attacks or []:
        path = Path(str(item))
        if str(item).endswith((".sql", ".py")) or path.exists():
            selected.extend(registry.add_path(path))
        else:
            selected.append(registry.get(str(item)))
    if not attacks:
        selected = list(registry)
    if params:
        selected = [a.with_params({k: v for k, v in params.items() if k in a.params}) for a in selected]
    outcomes: list[AttackOutcome] = []
    with reading(db_path) as con:
        state = _read_state(con)
        recorded_skips = {
            (r[0], r[1], r[2], r[3])
            for r in con.execute(
                "SELECT attack_key, model_key, perturbation, reason FROM attack_skips"
            ).fetchall()
        }
    references = reference_models(state)
    names = {row["model_name"]: key for key, row in state.models.items()}
    model_filter = {names.get(m, m) for m in models} if models else None
    for attack in selected:
        started = time.perf_counter()
        outcome = AttackOutcome(attack)
        units, skipped = plan_units(attack, state, references, model_filter)
        outcome.skipped = skipped
        inputs_keys: dict[tuple[str, str], str] = {}
        todo: list[ScoreUnit] = []
        attack_key = attack.attack_key
        for unit in units:
            ref_keys = [
                k for ref in unit.references for k in _signal_keys_of(state, ref, list(unit.inputs.values()))
            ]
            key = unit.inputs_key(ref_keys)
            inputs_keys[(unit.model_key, unit.perturbation)] = key
            if not force and state.existing.get((attack_key, unit.model_key, unit.perturbation)) == key:
                outcome.cached += 1
            else:
                todo.append(unit)
        reporter.attack_started(attack, len(todo))
        results: list[pa.Table] = []
        if todo:
            by_inputs: dict[tuple, list[ScoreUnit]] = {}
            for unit in todo:
                by_inputs.setdefault(tuple(sorted(unit.inputs.items())), []).append(unit)
            with reading(db_path) as con:
                counts = _example_counts(con)
                batches = [
                    (group, _materialise_relations(con, attack, group)) for group in by_inputs.values()
                ]
            for group, relations in batches:
                sandbox = _sandbox(relations)
                try:
                    results.append(_run_units(sandbox, attack, group, counts))
                finally:
                    sandbox.close()
        new_skips = {(attack_key, names[m], p, r) for m, p, r in skipped} - recorded_skips
        if todo or new_skips:
            _write_results(
                db_path,
                attack,
                todo,
                inputs_keys,
                results,
                skipped,
                names,
                time.perf_counter() - started,
                set(model_filter) if model_filter is not None else set(state.models),
                resamples=resamples,
            )
        outcome.scored = len(todo)
        outcome.seconds = time.perf_counter() - started
        reporter.attack_finished(outcome)
        outcomes.append(outcome)
    if any(o.scored for o in outcomes):
        calibrate_thresholds(db_path, [o.attack.attack_key for o in outcomes if o.scored])
    return outcomes
