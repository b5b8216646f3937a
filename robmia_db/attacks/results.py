"""Attacks layer: storing one attack run. Scores, metrics, the attack's own decision rule, the reference-
calibrated threshold and the metrics pooled over each fleet are written in ONE transaction, so a crash
leaves either everything or nothing (a rerun then finds nothing cached and redoes it).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from robmia_db.attacks.definition import AttackDefinition
from robmia_db.attacks.intervals import DEFAULT_RESAMPLES, write_intervals
from robmia_db.attacks.metrics import (
    calibrated_balanced_accuracy,
    compute_metrics,
    compute_metrics_table,
    decision_counts_table,
    reference_metrics,
)
from robmia_db.attacks.nested_calibration import OFF_NOTE, NestedCalibration
from robmia_db.attacks.planning import ScoreUnit
from robmia_db.attacks.staging import STAGING_SCORES as STAGING_SCORES  # re-exported: the run's crash points
from robmia_db.attacks.staging import ScoreStage, labelled_scores
from robmia_db.store.connection import transaction, writing
from robmia_db.testhooks import fail_point, kill_point

# memory DuckDB may use for the one write transaction (metrics, joins); larger intermediates spill to disk
WRITE_MEMORY_LIMIT = "1GB"
# labelled score rows whose metrics and intervals are computed at once inside the write transaction
METRICS_ROWS_PER_PART = 2_000_000
# labelled score rows of a run kept in memory (about 21 bytes each) for the metrics pooled over its fleets;
# beyond that (with the fleets' other stored rows) those metrics run in SQL over the store, which spills
FLEET_ROWS_IN_MEMORY = 10_000_000
# crash point between the metrics and the calibration, inside the transaction (robmia_db.testhooks)
BEFORE_CALIBRATION = "score-before-calibration"
NO_REFERENCE_NOTE = "no reference models with this attack's scores on this perturbation"


_DECISION_SQL = """
SELECT {groups},
       count(*) FILTER (WHERE is_member) AS d_p,
       count(*) FILTER (WHERE NOT is_member) AS d_n,
       count(*) FILTER (WHERE is_member AND score >= $threshold) AS d_tp,
       count(*) FILTER (WHERE NOT is_member AND score >= $threshold) AS d_fp
FROM {source} GROUP BY ALL
"""


def _decision_columns(prefix: str = "d.") -> str:
    """Balanced accuracy, TPR and FPR of `member iff score >= decision_threshold` (NULL without P or N)."""
    tpr = f"CAST({prefix}d_tp AS DOUBLE) / nullif({prefix}d_p, 0)"
    fpr = f"CAST({prefix}d_fp AS DOUBLE) / nullif({prefix}d_n, 0)"
    return f"0.5 * ({tpr} + 1 - {fpr}) AS decision_accuracy, {tpr} AS decision_tpr, {fpr} AS decision_fpr"


def _no_decision(groups: list[str]) -> pa.Table:
    fields = [pa.field(g, pa.string()) for g in groups]
    fields += [pa.field(c, pa.int64()) for c in ("d_p", "d_n", "d_tp", "d_fp")]
    return pa.schema(fields).empty_table()


def _decision_rows(
    con: duckdb.DuckDBPyConnection, attack: AttackDefinition, source: str, groups: list[str]
) -> pa.Table:
    """Per group, the counts `_decision_columns` reads (no rows for an attack without a decision rule)."""
    if attack.decision_threshold is None:
        return _no_decision(groups)
    sql = _DECISION_SQL.format(groups=", ".join(groups), source=source)
    return con.sql(sql, params={"threshold": attack.decision_threshold}).to_arrow_table()


def _decision_table(attack: AttackDefinition, table: pa.Table, groups: list[str]) -> pa.Table:
    """`_decision_rows` of an Arrow table in memory, counted in numpy (the same counts)."""
    if attack.decision_threshold is None:
        return _no_decision(groups)
    return decision_counts_table(table, groups, attack.decision_threshold)


class FleetRows:
    """The labelled scores of one run, compact (dictionary-coded keys), for `_fleet_metrics`: the pooled
    metrics then need no second read of the scores just inserted. Gives up (`table` None) past `limit` rows."""

    def __init__(self, recipes: dict[str, str], limit: int):
        self.recipes, self.limit = recipes, limit
        self.parts: list[pa.Table] | None = []
        self.num_rows = 0

    def add(self, labelled: pa.Table) -> None:
        self.num_rows += labelled.num_rows
        if self.parts is None or self.num_rows > self.limit:
            self.parts = None
            return
        model = pc.dictionary_encode(labelled.column("model_key").combine_chunks())
        recipe = pa.array([self.recipes.get(k) for k in model.dictionary.to_pylist()], pa.string())
        fleet = pa.DictionaryArray.from_arrays(model.indices, recipe)
        keep = fleet.is_valid()  # models without a recipe belong to no fleet
        part = pa.table(
            {
                "recipe_key": fleet,
                "perturbation": pc.dictionary_encode(labelled.column("perturbation").combine_chunks()),
                "model_key": model,
                "score": labelled.column("score"),
                "is_member": labelled.column("is_member"),
            }
        )
        self.parts.append(part if keep.false_count == 0 else part.filter(keep))

    def table(self) -> pa.Table | None:
        """Every row added (all of the run's units, so of its fleets only), or None when over the limit."""
        if self.parts is None or not self.parts:
            return None
        table = pa.concat_tables(self.parts).unify_dictionaries()
        self.parts = None
        return table


def write_results(
    db_path: Path,
    attack: AttackDefinition,
    units: list[ScoreUnit],
    inputs_keys: dict[tuple[str, str], str],
    scores: ScoreStage,
    nonfinite: dict[tuple[str, str], int],
    skipped: list[tuple[str, str | None, str]],
    model_keys_by_name: dict[str, str],
    seconds: float,
    considered: set[str],
    references: dict[str, list[str]],
    recipes: dict[str, str],
    resamples: int = DEFAULT_RESAMPLES,
    nested: NestedCalibration | None = None,
) -> None:
    attack_key = attack.attack_key
    now = datetime.now(timezone.utc)
    units_table = _units_table(units, inputs_keys, nonfinite)
    with writing(db_path, memory_limit=WRITE_MEMORY_LIMIT) as con, transaction(con):
        con.execute(
            """INSERT INTO attacks (attack_key, name, title, paper, description, language, source_path, source,
                                    params, needs, created_at, base_name, origin, decision_threshold, nonfinite)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (attack_key) DO UPDATE SET title = excluded.title, source_path = excluded.source_path""",
            [
                attack_key, attack.name, attack.title, attack.paper, attack.description, attack.language,
                attack.path, attack.source, json.dumps(attack.params), json.dumps(attack.needs), now,
                attack.base_name, attack.origin, attack.decision_threshold, attack.nonfinite,
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
        if scores.num_rows:
            staged = scores.table()
            if staged is not None:
                con.register("_staged", staged)
            con.execute(
                "INSERT INTO scores SELECT ?, model_key, perturbation, example_id, score FROM "
                + ("_staged" if staged is not None else scores.relation()),
                [attack_key],
            )
            if staged is not None:
                con.unregister("_staged")
                del staged
            pooled = FleetRows(recipes, FLEET_ROWS_IN_MEMORY)
            # metrics part by part: what DuckDB and numpy hold is one part's labelled scores, not the run's
            for source, part_units in scores.parts(METRICS_ROWS_PER_PART):
                con.register("_part", _units_table(part_units, inputs_keys, nonfinite))
                labelled = labelled_scores(con, source, [u.model_key for u in part_units])
                del source
                _insert_metrics(con, attack, labelled, len(units), seconds, now)
                # issue 10 (stats): bootstrap intervals beside the metrics, in the same transaction
                write_intervals(con, attack.name, attack_key, resamples, units="_part", labelled=labelled)
                con.unregister("_part")
                pooled.add(labelled)
                del labelled
            fail_point(BEFORE_CALIBRATION)
            kill_point(BEFORE_CALIBRATION)
            _calibrate(con, attack, references, nested)
            _fleet_metrics(con, attack, {u.model_key for u in units}, recipes, now, pooled.table())
        for model_name, perturbation, reason in skipped:
            con.execute(
                "INSERT INTO attack_skips VALUES (?, ?, ?, ?, ?)",
                [attack_key, model_keys_by_name[model_name], perturbation, reason, now],
            )


def _units_table(
    units: list[ScoreUnit], inputs_keys: dict[tuple[str, str], str], nonfinite: dict[tuple[str, str], int]
) -> pa.Table:
    return pa.table(
        {
            "model_key": pa.array([u.model_key for u in units], pa.string()),
            "perturbation": pa.array([u.perturbation for u in units], pa.string()),
            "inputs_key": pa.array([inputs_keys[(u.model_key, u.perturbation)] for u in units], pa.string()),
            "n_nonfinite": pa.array(
                [nonfinite.get((u.model_key, u.perturbation), 0) for u in units], pa.int32()
            ),
        }
    )


def _insert_metrics(
    con: duckdb.DuckDBPyConnection,
    attack: AttackDefinition,
    labelled: pa.Table,
    n_units: int,
    seconds: float,
    now,
) -> None:
    """Metrics of the units in the registered table `_part`, from `labelled` (their scores with is_member),
    computed in numpy: only the per-unit results are registered on the transaction's connection (an Arrow
    table registered there stays alive until COMMIT, so registering each part's rows would hold them all)."""
    new_metrics = compute_metrics_table(labelled, ["model_key", "perturbation"])
    decision = _decision_table(attack, labelled, ["model_key", "perturbation"])
    con.register("_new_metrics", new_metrics)
    con.register("_decision", decision)
    con.execute(
        f"""INSERT INTO metrics (attack_key, model_key, perturbation, inputs_key, balanced_accuracy, auc,
                                 tpr_at_fpr_0, tpr_at_fpr_1e4, tpr_at_fpr_1e3, tpr_at_fpr_1e2, advantage, threshold,
                                 n_members, n_nonmembers, tp_at_best, fp_at_best, auc_numerator2, n_nonfinite,
                                 decision_accuracy, decision_tpr, decision_fpr, seconds, created_at)
           SELECT ?, m.model_key, m.perturbation, u.inputs_key, m.balanced_accuracy, m.auc, m.tpr_at_fpr_0,
                  m.tpr_at_fpr_1e4, m.tpr_at_fpr_1e3, m.tpr_at_fpr_1e2, m.advantage, m.threshold, m.n_members,
                  m.n_nonmembers, m.tp_at_best, m.fp_at_best, m.auc_numerator2, u.n_nonfinite,
                  {_decision_columns()}, ?, ?
           FROM _new_metrics m JOIN _part u USING (model_key, perturbation)
           LEFT JOIN _decision d USING (model_key, perturbation)""",
        [attack.attack_key, seconds / max(1, n_units), now],
    )
    con.unregister("_new_metrics")
    con.unregister("_decision")


def _calibrate(
    con: duckdb.DuckDBPyConnection,
    attack: AttackDefinition,
    references: dict[str, list[str]],
    nested: NestedCalibration | None = None,
) -> None:
    """calibrated_accuracy: the threshold best on the pooled reference models' scores, applied to the target.

    For an attack that itself reads reference models, the references' stored scores were computed with the
    target among their references: the threshold comes from their nested leave-one-out scores instead
    (`nested_calibration`), for the units scored in this run.
    """
    attack_key = attack.attack_key
    updates: dict[str, list[Any]] = {
        k: [] for k in ("model_key", "perturbation", "accuracy", "threshold", "n", "note")
    }
    if attack.needs_reference:
        _calibrate_nested(con, attack_key, nested, updates)
        _write_calibration(con, attack_key, updates)
        return
    scored = con.execute(
        "SELECT perturbation, list(model_key ORDER BY model_key) FROM metrics WHERE attack_key = ? GROUP BY ALL "
        "ORDER BY ALL",
        [attack_key],
    ).fetchall()
    for perturbation, model_keys in scored:
        # one perturbation at a time, and only the scores a calibration reads: the targets that have
        # reference models scored here, and those references (memory: one perturbation's fleets)
        present = set(model_keys)
        refs_of = {m: [r for r in references.get(m, []) if r in present] for m in model_keys}
        needed = sorted(
            {m for m, refs in refs_of.items() if refs} | {r for refs in refs_of.values() for r in refs}
        )
        groups = _scores_by_model(con, attack_key, perturbation, needed) if needed else {}
        for model_key in model_keys:
            refs = [groups[r] for r in refs_of[model_key] if r in groups]
            accuracy = threshold = None
            note = NO_REFERENCE_NOTE
            if refs:
                pooled_scores = np.concatenate([r[0] for r in refs])
                pooled_members = np.concatenate([r[1] for r in refs])
                found = reference_metrics(pooled_scores, pooled_members)["threshold"]
                if found is None:
                    note = "no threshold beats chance on the reference models"
                else:
                    threshold = float(found)
                    accuracy = calibrated_balanced_accuracy(
                        threshold, *groups[model_key]
                    )  # a target with refs is in needed
                    note = None
            for column, value in zip(
                updates, (model_key, perturbation, accuracy, threshold, len(refs) if refs else None, note)
            ):
                updates[column].append(value)
    _write_calibration(con, attack_key, updates)


def _calibrate_nested(
    con: duckdb.DuckDBPyConnection,
    attack_key: str,
    nested: NestedCalibration | None,
    updates: dict[str, list[Any]],
) -> None:
    """Apply each target's nested leave-one-out threshold to its own stored scores."""
    scored = con.execute(
        "SELECT m.model_key, m.perturbation FROM metrics m JOIN _done d USING (model_key, perturbation) "
        "WHERE m.attack_key = ? ORDER BY ALL",
        [attack_key],
    ).fetchall()
    by_perturbation: dict[str, list[str]] = {}
    for model_key, perturbation in scored:
        by_perturbation.setdefault(perturbation, []).append(model_key)
    for perturbation, model_keys in by_perturbation.items():
        found = {
            m: (nested.thresholds.get((m, perturbation)) if nested and nested.k else None) for m in model_keys
        }
        groups = _scores_by_model(
            con, attack_key, perturbation, [m for m, f in found.items() if f and f[0] is not None]
        )
        for model_key in model_keys:
            accuracy = threshold = n = None
            note = OFF_NOTE if not (nested and nested.k) else NO_REFERENCE_NOTE
            if found[model_key] is not None:
                threshold, n, note = found[model_key]
                if threshold is not None:
                    accuracy = calibrated_balanced_accuracy(threshold, *groups[model_key])
            for column, value in zip(updates, (model_key, perturbation, accuracy, threshold, n, note)):
                updates[column].append(value)


def _write_calibration(
    con: duckdb.DuckDBPyConnection, attack_key: str, updates: dict[str, list[Any]]
) -> None:
    if not updates["model_key"]:
        return
    table = pa.table(
        {
            "model_key": pa.array(updates["model_key"], pa.string()),
            "perturbation": pa.array(updates["perturbation"], pa.string()),
            "accuracy": pa.array(updates["accuracy"], pa.float64()),
            "threshold": pa.array(updates["threshold"], pa.float64()),
            "n": pa.array(updates["n"], pa.int32()),
            "note": pa.array(updates["note"], pa.string()),
        }
    )
    con.register("_calibrated", table)
    con.execute(
        """UPDATE metrics SET calibrated_accuracy = c.accuracy, calibrated_threshold = c.threshold,
               n_reference_models = c.n, calibration_note = c.note
           FROM _calibrated c
           WHERE metrics.attack_key = ? AND metrics.model_key = c.model_key AND metrics.perturbation = c.perturbation""",
        [attack_key],
    )


def _scores_by_model(
    con: duckdb.DuckDBPyConnection, attack_key: str, perturbation: str, model_keys: list[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """model_key -> (scores, is_member) of one attack and perturbation, for the given models."""
    table = con.sql(
        """SELECT s.model_key, s.score, b.is_member FROM scores s
           JOIN membership b ON b.model_key = s.model_key AND b.example_id = s.example_id
           WHERE s.attack_key = $key AND s.perturbation = $perturbation
             AND s.model_key IN (SELECT unnest($models)) AND b.model_key IN (SELECT unnest($models))
           ORDER BY s.model_key""",
        params={"key": attack_key, "perturbation": perturbation, "models": model_keys},
    ).to_arrow_table()
    # model keys as dictionary codes: an object array of one Python string per row would cost ~10x the scores
    coded = table.column("model_key").combine_chunks().dictionary_encode()
    names = coded.dictionary.to_pylist()
    keys = coded.indices.to_numpy(zero_copy_only=False)
    scores = table.column("score").to_numpy(zero_copy_only=False).astype(float)
    members = table.column("is_member").to_numpy(zero_copy_only=False).astype(bool)
    del table, coded
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.array([], int)
    ends = np.r_[starts[1:], len(keys)]
    return {names[keys[a]]: (scores[a:b], members[a:b]) for a, b in zip(starts.tolist(), ends.tolist())}


def _fleet_metrics(
    con: duckdb.DuckDBPyConnection,
    attack: AttackDefinition,
    touched: set[str],
    recipes: dict[str, str],
    now,
    fresh: pa.Table | None = None,
) -> None:
    """Metrics over the concatenated scores of the targets that share a training recipe (one ROC per fleet,
    as LiRA reports), for the fleets whose targets were just scored.

    `fresh` (`FleetRows`) holds this run's labelled rows: with the fleets' other stored rows read beside
    them, the metrics are computed in numpy; without it, or past FLEET_ROWS_IN_MEMORY rows, in SQL over the
    store (the same numbers: `compute_metrics_table`)."""
    fleets = sorted({recipes[k] for k in touched if k in recipes})
    if not fleets:
        return
    attack_key = attack.attack_key
    con.register(
        "_recipes",
        pa.table(
            {
                "model_key": pa.array(list(recipes), pa.string()),
                "recipe_key": pa.array(list(recipes.values()), pa.string()),
            }
        ),
    )
    con.register("_fleets", pa.table({"recipe_key": pa.array(fleets, pa.string())}))
    groups = ["recipe_key", "perturbation"]
    rows = _fleet_rows_in_memory(con, attack_key, fresh) if fresh is not None else None
    in_memory = rows is not None
    if rows is not None:
        con.register("_fleet_metrics", compute_metrics_table(rows, groups))
        con.register("_decision", _decision_table(attack, rows, groups))
        con.register("_targets", _targets_of(rows))
        rows = None
    else:
        con.execute(
            """CREATE OR REPLACE TEMP VIEW _fleet_scores AS
               SELECT r.recipe_key, s.perturbation, s.model_key, s.score, b.is_member FROM scores s
               JOIN _recipes r ON r.model_key = s.model_key
               JOIN membership b ON b.model_key = s.model_key AND b.example_id = s.example_id
               WHERE s.attack_key = '{key}' AND r.recipe_key IN (SELECT recipe_key FROM _fleets)""".format(
                key=attack_key.replace("'", "''")
            )
        )
        con.register("_fleet_metrics", compute_metrics(con, "_fleet_scores", groups))
        con.register("_decision", _decision_rows(con, attack, "_fleet_scores", groups))
        con.execute(
            """CREATE OR REPLACE TEMP VIEW _targets AS
               SELECT recipe_key, perturbation, min(model_key) AS model_key, count(DISTINCT model_key) AS n_targets
               FROM _fleet_scores GROUP BY ALL"""
        )
    con.execute(
        "DELETE FROM fleet_metrics WHERE attack_key IN (SELECT attack_key FROM attacks WHERE name = ?) "
        "AND recipe_key IN (SELECT recipe_key FROM _fleets)",
        [attack.name],
    )
    con.execute(
        f"""INSERT INTO fleet_metrics
            SELECT ?, m.perturbation, m.recipe_key, t.model_key, t.n_targets, m.balanced_accuracy, m.auc,
                   m.tpr_at_fpr_0, m.tpr_at_fpr_1e4, m.tpr_at_fpr_1e3, m.tpr_at_fpr_1e2, m.advantage, m.threshold,
                   m.n_members, m.n_nonmembers, {_decision_columns()}, ?
            FROM _fleet_metrics m
            JOIN _targets t USING (recipe_key, perturbation)
            LEFT JOIN _decision d USING (recipe_key, perturbation)""",
        [attack_key, now],
    )
    if not in_memory:
        con.execute("DROP VIEW _targets")
        con.execute("DROP VIEW _fleet_scores")
    for name in ("_fleet_metrics", "_decision", *(("_targets",) if in_memory else ())):
        con.unregister(name)


def _targets_of(rows: pa.Table) -> pa.Table:
    """Per (recipe_key, perturbation): the smallest model key and the number of targets (as the SQL's)."""
    keys = ["recipe_key", "perturbation", "model_key"]
    coded = {k: rows.column(k).combine_chunks() for k in keys}
    distinct = pa.table({k: a.indices for k, a in coded.items()}).group_by(keys).aggregate([])
    decoded = pa.table({k: pc.take(coded[k].dictionary, distinct.column(k)) for k in keys})
    targets = decoded.group_by(keys[:2]).aggregate([("model_key", "min"), ("model_key", "count_distinct")])
    return targets.rename_columns(["recipe_key", "perturbation", "model_key", "n_targets"])


def _fleet_rows_in_memory(
    con: duckdb.DuckDBPyConnection, attack_key: str, fresh: pa.Table
) -> pa.Table | None:
    """This run's rows of the fleets plus their other targets' stored rows (their units not scored in this
    run), or None when they would pass FLEET_ROWS_IN_MEMORY."""
    others = con.execute(
        """SELECT m.model_key, m.perturbation, m.n_members + m.n_nonmembers FROM metrics m
           JOIN _recipes r USING (model_key)
           WHERE m.attack_key = ? AND r.recipe_key IN (SELECT recipe_key FROM _fleets)
             AND (m.model_key, m.perturbation) NOT IN (SELECT model_key, perturbation FROM _done)""",
        [attack_key],
    ).fetchall()
    if fresh.num_rows + sum(n or 0 for _, _, n in others) > FLEET_ROWS_IN_MEMORY:
        return None
    if not others:
        return fresh
    con.register(
        "_others",
        pa.table({"model_key": [o[0] for o in others], "perturbation": [o[1] for o in others]}),
    )
    stored = con.sql(
        """SELECT r.recipe_key, s.perturbation, s.model_key, s.score, b.is_member FROM scores s
           JOIN _others o ON o.model_key = s.model_key AND o.perturbation = s.perturbation
           JOIN _recipes r ON r.model_key = s.model_key
           JOIN membership b ON b.model_key = s.model_key AND b.example_id = s.example_id
           WHERE s.attack_key = $key""",
        params={"key": attack_key},
    ).to_arrow_table()
    con.unregister("_others")
    stored = pa.table(
        {
            name: pc.dictionary_encode(stored.column(name).combine_chunks())
            if name in fresh.column_names[:3]
            else stored.column(name)
            for name in stored.column_names
        }
    ).cast(fresh.schema)
    return pa.concat_tables([fresh, stored]).unify_dictionaries()
