"""Store layer: the DuckDB schema, its migrations and the public views (the contract later layers read).

Tables may change behind the views; the views' names and columns are pinned by tests/test_store.py. The
metadata tables are declared in `tables.py` (SQLModel); the per-sample tables and the steps are plain SQL
below, applied in order, all in one transaction (with the views), recorded in `schema_version`.
"""

from __future__ import annotations

import contextlib
from datetime import datetime, timezone

import duckdb

from robmia_db.errors import StoreError

# FPR levels (numerator, denominator) of the TPR-at-FPR metrics that need non-members to resolve; they
# mirror robmia_db.attacks.metrics (a test checks the view's note against metrics.low_fpr_note).
LOW_FPR_LEVELS: tuple[tuple[int, int], ...] = ((1, 10000), (1, 1000), (1, 100))


def low_fpr_note_sql(n_column: str) -> str:
    """Why a TPR-at-FPR level is NULL, as SQL over a non-member count: a * N < 1 allows no false positive."""
    parts = [
        f"CASE WHEN {n_column} * {num} < {den} THEN '{100 * num / den:g}% (needs {den // num:,})' END"
        for num, den in LOW_FPR_LEVELS
    ]
    joined = f"concat_ws(', ', {', '.join(parts)})"
    return (
        f"CASE WHEN {n_column} > 0 AND {joined} <> '' THEN "
        f"format('{{:,}} non-members cannot resolve FPR ', {n_column}) || {joined} END"
    )


# Each entry upgrades the schema from version i to i + 1. The metadata tables (experiments, models,
# perturbations, attacks, metrics, attack_skips, metric_intervals) are not created or altered here: they are
# declared in `tables.py` and brought to their declaration by `tables.sync_declared` before these steps run,
# so a step that changes only a declaration is a comment and `SELECT 1` (its version makes older stores sync).
# The per-sample tables stay plain DDL: no primary key on `signals` (it would double the file and slow
# ingest; uniqueness is checked at ingest).
MIGRATIONS: list[str] = [
    # 1: the core tables (metadata: experiments, models, perturbations)
    """
    CREATE TABLE examples (
        dataset VARCHAR NOT NULL,
        example_id INTEGER NOT NULL,
        label INTEGER NOT NULL,
        origin_split VARCHAR
    );
    CREATE TABLE membership (
        model_key VARCHAR NOT NULL,
        example_id INTEGER NOT NULL,
        is_member BOOLEAN NOT NULL
    );
    CREATE TABLE signals (
        signal_key VARCHAR NOT NULL,
        model_key VARCHAR NOT NULL,
        example_id INTEGER NOT NULL,
        label INTEGER NOT NULL,
        is_member BOOLEAN NOT NULL,
        loss DOUBLE,
        confidence FLOAT,
        margin DOUBLE,
        entropy DOUBLE,
        mentropy DOUBLE,
        is_correct BOOLEAN,
        probs FLOAT[]
    );
    """,
    # 2: per-sample scores of attacks (metadata: attacks, metrics, attack_skips), written by `robmia-db score`
    """
    CREATE TABLE scores (
        attack_key VARCHAR NOT NULL,
        model_key VARCHAR NOT NULL,
        perturbation VARCHAR NOT NULL,
        example_id INTEGER NOT NULL,
        score DOUBLE
    );
    """,
    # 3: no table change; bumping the version makes older stores refresh their views (v_attacks,
    # v_models.package_versions) on the next open
    "SELECT 1;",
    # 4 (issue 10, statistics): stratified bootstrap intervals beside each metrics row, keyed like it (an
    # interval of other inputs than the metrics row's is never shown: v_metrics joins on inputs_key too);
    # declared: tables.MetricInterval
    "SELECT 1;",
    # 5 (refattacks): LiRA's logit-scaled confidence phi = log p_y - log(1 - p_y), float64, computed stably
    # from the logits (robmia_db/store/signals.py); stores written before it hold NULL there, and the
    # reference-model attacks then compute phi from the stored float32 probabilities as the reference code does
    "ALTER TABLE signals ADD COLUMN IF NOT EXISTS confidence_logit DOUBLE;",
    # 6 (reliability, issue 14 item 4): each checkpoint's sha256, checked before the file is used again, so
    # a swapped or replaced checkpoint fails its model instead of storing another model's signals.
    # `models.checkpoint` holds the path relative to the store's folder from now on (found after a rename).
    # Declared: Model.checkpoint_sha256
    "SELECT 1;",
    # 7: each model keeps the spec text that trained it (an edited spec rerun under the same experiment
    # name no longer rewrites the provenance of models trained before the edit); older rows stay NULL
    # rather than guess which version of the experiment's text trained them; declared: Model.spec_path,
    # Model.spec_text
    "SELECT 1;",
    # 8: scoring integrity (issues 9, 12, 14). Declared: Attack.base_name / origin / decision_threshold /
    # nonfinite (parameter variants, where an attack came from, its own decision rule and non-finite
    # policy), Metric.tpr_at_fpr_1e4 / decision_accuracy / decision_tpr / decision_fpr / n_nonfinite /
    # calibration_note, and the FleetMetric table (metrics pooled over the targets of a fleet). Stored metrics
    # predate the invariance contract and the new checks, so their cache key is invalidated: the next `score`
    # redoes them.
    "UPDATE metrics SET inputs_key = 'pre-v8:' || inputs_key;",
    # 9: no table change; v_configurations counts a configuration's models (n_models: its seeds, or a
    # fleet's models) beside its distinct seeds (n_seeds, seeds), and its intervals use n_models. Bumping the
    # version makes older stores refresh their views on the next open, read-only ones included.
    "SELECT 1;",
]

SCHEMA_VERSION = len(MIGRATIONS)

VIEWS_SQL = """
CREATE OR REPLACE VIEW v_perturbations AS
SELECT p.signal_key, p.model_key, m.model_name, p.name AS perturbation, p.kind, p.eps, p.settings,
       p.n_rows, p.member_acc, p.nonmember_acc, p.seconds, p.created_at
FROM perturbations p JOIN models m USING (model_key);

CREATE OR REPLACE VIEW v_models AS
WITH ranked AS (
    SELECT p.*, row_number() OVER (
        PARTITION BY p.model_key, p.kind
        ORDER BY (p.eps IS NOT DISTINCT FROM m.eps) DESC, p.eps DESC NULLS LAST, p.name
    ) AS rank_in_kind
    FROM perturbations p JOIN models m USING (model_key)
),
primary_perturbations AS (SELECT * FROM ranked WHERE rank_in_kind = 1)
SELECT m.model_key, m.model_name, m.experiment, m.dataset, m.arch, m.width, m.defense, m.eps, m.seed,
       m.model_index, m.status, m.error, m.origin, m.membership_scheme, m.n_members, m.n_nonmembers,
       m.n_classes,
       b.member_acc AS train_acc, b.nonmember_acc AS test_acc,
       a.member_acc AS adv_train_acc, a.nonmember_acc AS adv_test_acc, a.eps AS adv_eps,
       v.member_acc AS verified_train_acc, v.nonmember_acc AS verified_test_acc, v.eps AS verified_eps,
       (SELECT count(*) FROM perturbations q WHERE q.model_key = m.model_key) AS n_perturbations,
       m.train_seconds, m.started_at, m.finished_at, m.device, m.git_commit, m.git_dirty, m.host,
       m.checkpoint, m.dataset_checksum, m.config, m.package_versions, m.spec_path, m.spec_text
FROM models m
LEFT JOIN primary_perturbations b ON b.model_key = m.model_key AND b.kind = 'benign'
LEFT JOIN primary_perturbations a ON a.model_key = m.model_key AND a.kind = 'adversarial'
LEFT JOIN primary_perturbations v ON v.model_key = m.model_key AND v.kind = 'verified';

CREATE OR REPLACE VIEW v_signals AS
SELECT s.model_key, m.model_name, s.example_id, s.label, s.is_member, p.name AS perturbation, p.kind,
       p.eps, s.signal_key, s.loss, s.confidence, s.margin, s.entropy, s.mentropy, s.is_correct, s.probs,
       s.confidence_logit
FROM signals s
JOIN perturbations p USING (signal_key)
JOIN models m ON m.model_key = s.model_key;

CREATE OR REPLACE VIEW v_membership AS
SELECT b.model_key, m.model_name, b.example_id, b.is_member, e.label, e.origin_split
FROM membership b
JOIN models m USING (model_key)
LEFT JOIN examples e ON e.dataset = m.dataset AND e.example_id = b.example_id;

CREATE OR REPLACE VIEW v_scores AS
SELECT s.model_key, m.model_name, a.name AS attack, s.perturbation, s.example_id, b.is_member, s.score,
       s.attack_key
FROM scores s
JOIN attacks a USING (attack_key)
JOIN models m ON m.model_key = s.model_key
JOIN membership b ON b.model_key = s.model_key AND b.example_id = s.example_id;

CREATE OR REPLACE VIEW v_metrics AS
SELECT x.model_key, m.model_name, m.experiment, m.dataset, m.defense, m.eps, m.seed, a.name AS attack,
       a.title AS attack_title, a.language AS attack_language, x.perturbation, p.kind, p.eps AS perturbation_eps,
       x.balanced_accuracy, x.auc, x.tpr_at_fpr_0, x.tpr_at_fpr_1e4, x.tpr_at_fpr_1e3, x.tpr_at_fpr_1e2,
       LOW_FPR_NOTE(x.n_nonmembers) AS low_fpr_note, x.advantage,
       x.threshold, x.n_members, x.n_nonmembers, x.n_nonfinite, a.decision_threshold, x.decision_accuracy,
       x.decision_tpr, x.decision_fpr, x.calibrated_accuracy, x.calibrated_threshold, x.calibration_note,
       x.n_reference_models, x.tp_at_best, x.fp_at_best, x.auc_numerator2, x.attack_key, x.inputs_key,
       x.seconds, x.created_at,
       -- issue 10: bootstrap intervals (robmia_db/attacks/intervals.py)
       ci.balanced_accuracy_ci_low, ci.balanced_accuracy_ci_high, ci.auc_ci_low, ci.auc_ci_high,
       ci.tpr_at_fpr_0_ci_low, ci.tpr_at_fpr_0_ci_high, ci.tpr_at_fpr_1e3_ci_low, ci.tpr_at_fpr_1e3_ci_high,
       ci.tpr_at_fpr_1e2_ci_low, ci.tpr_at_fpr_1e2_ci_high, ci.n_resamples AS ci_resamples
FROM metrics x
JOIN attacks a USING (attack_key)
JOIN models m ON m.model_key = x.model_key
LEFT JOIN perturbations p ON p.model_key = x.model_key AND p.name = x.perturbation
LEFT JOIN metric_intervals ci ON ci.attack_key = x.attack_key AND ci.model_key = x.model_key
    AND ci.perturbation = x.perturbation AND ci.inputs_key = x.inputs_key;

CREATE OR REPLACE VIEW v_fleet_metrics AS
SELECT a.name AS attack, a.title AS attack_title, f.perturbation, p.kind, m.dataset, m.arch, m.defense, m.eps,
       m.membership_scheme, f.n_targets, f.balanced_accuracy, f.auc, f.tpr_at_fpr_0, f.tpr_at_fpr_1e4,
       f.tpr_at_fpr_1e3, f.tpr_at_fpr_1e2, LOW_FPR_NOTE(f.n_nonmembers) AS low_fpr_note, f.advantage,
       f.threshold, f.n_members, f.n_nonmembers, a.decision_threshold, f.decision_accuracy, f.decision_tpr,
       f.decision_fpr, f.recipe_key, f.attack_key, f.created_at
FROM fleet_metrics f
JOIN attacks a USING (attack_key)
JOIN models m ON m.model_key = f.model_key
LEFT JOIN perturbations p ON p.model_key = f.model_key AND p.name = f.perturbation;

CREATE OR REPLACE VIEW v_attacks AS
SELECT attack_key, name AS attack, coalesce(base_name, name) AS base_attack, title, paper, description,
       language, CASE WHEN language = 'python' THEN 'trusted code (Python, runs with your rights)'
                      ELSE 'sandboxed SQL' END AS trust,
       origin, source_path, params, needs, decision_threshold, coalesce(nonfinite, 'error') AS nonfinite,
       created_at
FROM attacks;

CREATE OR REPLACE VIEW v_attack_skips AS
SELECT k.model_key, m.model_name, a.name AS attack, k.perturbation, k.reason, k.created_at
FROM attack_skips k JOIN attacks a USING (attack_key) JOIN models m ON m.model_key = k.model_key;

CREATE OR REPLACE VIEW v_experiments AS
SELECT e.name AS experiment, e.description, e.spec_path, e.spec_text, e.updated_at,
       (SELECT count(*) FROM models m WHERE m.experiment = e.name) AS n_models
FROM experiments e;

-- issue 10: each configuration (models that differ only in their seed, or a fleet's models, which differ in
-- their member set) over its n_models models: mean, sample sd and the 95 % Student t interval of the mean
-- (t quantiles from scipy for df <= 30, the Cornish-Fisher expansion beyond, within 2e-6 of scipy); NULL sd
-- and interval with a single model. n_seeds and seeds are the distinct training seeds among them.
CREATE OR REPLACE VIEW v_configurations AS
WITH per_model AS (
    SELECT x.experiment, x.dataset, m.arch, m.width, x.defense, x.eps, x.attack, x.perturbation, x.kind,
           x.perturbation_eps, x.seed, x.balanced_accuracy, x.auc, x.tpr_at_fpr_1e2
    FROM v_metrics x JOIN models m USING (model_key)
),
t_table(df, t975) AS (
    VALUES
        (1, 12.706205), (2, 4.302653), (3, 3.182446), (4, 2.776445), (5, 2.570582), (6, 2.446912),
        (7, 2.364624), (8, 2.306004), (9, 2.262157), (10, 2.228139), (11, 2.200985), (12, 2.178813),
        (13, 2.160369), (14, 2.144787), (15, 2.131450), (16, 2.119905), (17, 2.109816), (18,
        2.100922), (19, 2.093024), (20, 2.085963), (21, 2.079614), (22, 2.073873), (23, 2.068658),
        (24, 2.063899), (25, 2.059539), (26, 2.055529), (27, 2.051831), (28, 2.048407), (29,
        2.045230), (30, 2.042272)
),
grouped AS (
    SELECT experiment, dataset, arch, width, defense, eps, attack, perturbation, kind, perturbation_eps,
           count(*) AS n_models, count(DISTINCT seed) AS n_seeds,
           coalesce(list(DISTINCT seed ORDER BY seed) FILTER (WHERE seed IS NOT NULL), []::INTEGER[]) AS seeds,
           avg(balanced_accuracy) AS balanced_accuracy_mean, stddev_samp(balanced_accuracy) AS balanced_accuracy_sd,
           avg(auc) AS auc_mean, stddev_samp(auc) AS auc_sd,
           avg(tpr_at_fpr_1e2) AS tpr_at_fpr_1e2_mean, stddev_samp(tpr_at_fpr_1e2) AS tpr_at_fpr_1e2_sd
    FROM per_model
    GROUP BY ALL
),
with_t AS (
    SELECT g.*, CASE WHEN g.n_models < 2 THEN NULL
                     WHEN g.n_models - 1 <= 30 THEN t.t975
                     ELSE 1.959963984540054
                          + (1.959963984540054 ^ 3 + 1.959963984540054) / (4 * (g.n_models - 1))
                          + (5 * 1.959963984540054 ^ 5 + 16 * 1.959963984540054 ^ 3 + 3 * 1.959963984540054)
                            / (96 * (g.n_models - 1) ^ 2)
                          + (3 * 1.959963984540054 ^ 7 + 19 * 1.959963984540054 ^ 5
                             + 17 * 1.959963984540054 ^ 3 - 15 * 1.959963984540054) / (384 * (g.n_models - 1) ^ 3)
                END AS __t
    FROM grouped g LEFT JOIN t_table t ON t.df = g.n_models - 1
)
SELECT experiment, dataset, arch, width, defense, eps, attack, perturbation, kind, perturbation_eps, n_models,
       n_seeds, seeds,
       balanced_accuracy_mean, balanced_accuracy_sd,
       balanced_accuracy_mean - __t * balanced_accuracy_sd / sqrt(n_models) AS balanced_accuracy_ci_low,
       balanced_accuracy_mean + __t * balanced_accuracy_sd / sqrt(n_models) AS balanced_accuracy_ci_high,
       auc_mean, auc_sd,
       auc_mean - __t * auc_sd / sqrt(n_models) AS auc_ci_low,
       auc_mean + __t * auc_sd / sqrt(n_models) AS auc_ci_high,
       tpr_at_fpr_1e2_mean, tpr_at_fpr_1e2_sd,
       tpr_at_fpr_1e2_mean - __t * tpr_at_fpr_1e2_sd / sqrt(n_models) AS tpr_at_fpr_1e2_ci_low,
       tpr_at_fpr_1e2_mean + __t * tpr_at_fpr_1e2_sd / sqrt(n_models) AS tpr_at_fpr_1e2_ci_high
FROM with_t;
"""

PUBLIC_VIEWS = (
    "v_models",
    "v_signals",
    "v_perturbations",
    "v_membership",
    "v_experiments",
    "v_scores",
    "v_metrics",
    "v_attack_skips",
    "v_attacks",
    "v_fleet_metrics",
    "v_configurations",
)


def _views_sql() -> str:
    views = VIEWS_SQL
    for alias in ("x", "f"):
        views = views.replace(
            f"LOW_FPR_NOTE({alias}.n_nonmembers)", low_fpr_note_sql(f"{alias}.n_nonmembers")
        )
    return views


def current_version(con: duckdb.DuckDBPyConnection) -> int:
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
    ).fetchall()[0][0]
    if not exists:
        return 0
    row = con.execute("SELECT max(version) FROM schema_version").fetchall()[0]
    return int(row[0] or 0)


def migrate(con: duckdb.DuckDBPyConnection, extra_views: list[str] | None = None) -> int:
    """Bring the schema to SCHEMA_VERSION and (re)create the views. Returns the starting version.

    Everything happens in one transaction: a new store is created and migrated at once, so a kill at any
    moment leaves either a complete store or an empty file (which the next write open finishes), never a
    store with an empty `schema_version` that every later command refuses.
    """
    from robmia_db.testhooks import kill_point

    start = current_version(con)
    if start > SCHEMA_VERSION:
        raise StoreError(
            f"the store has schema version {start}, newer than this robmia-db ({SCHEMA_VERSION}): upgrade robmia-db"
        )
    con.execute("BEGIN TRANSACTION")
    try:
        if start == 0:
            con.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at TIMESTAMPTZ)"
            )
        if start < SCHEMA_VERSION:
            # the declared tables first (created, or given the columns they lack), then the plain steps;
            # imported here: SQLModel is needed only to create or upgrade a store, not by `sql` or `report`
            from robmia_db.store.tables import sync_declared

            sync_declared(con)
        for version in range(start, SCHEMA_VERSION):
            con.execute(MIGRATIONS[version])
            con.execute("INSERT INTO schema_version VALUES (?, ?)", [version + 1, datetime.now(timezone.utc)])
        if start < SCHEMA_VERSION:
            kill_point("store-migrating")
        con.execute(_views_sql())
        for sql in extra_views or []:
            con.execute(sql)
        con.execute("COMMIT")
    except BaseException as exc:
        with contextlib.suppress(duckdb.Error):  # a failed COMMIT has already ended the transaction
            con.execute("ROLLBACK")
        if isinstance(exc, duckdb.Error):
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise StoreError(
                f"could not create or upgrade the store's schema (nothing changed): {first}"
            ) from exc
        raise
    return start
