"""Report queries: everything the page shows, read from the store's public views in one read-only session.

Only the public views (v_models, v_perturbations, v_metrics, v_scores, v_signals, v_experiments,
v_attack_skips, and v_attacks where a store has it) are read. Everything bulky is aggregated in SQL before it
reaches Python: ROC curves are cumulated per distinct score and thinned to log-spaced FPR buckets, histograms
are binned, so the page never embeds per-sample rows and its size does not grow with the number of samples.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from robmia_db.errors import StoreError
from robmia_db.store.connection import reading

PAPER_ATTACK = (
    "confidence"  # the paper's I_B / I_A / I_V are this attack on benign / adversarial / verified signals
)
KINDS = ("benign", "adversarial", "verified")
DEFENSE_ORDER = ["natural", "pgd_at", "distributional", "wrm", "trades", "duality", "convex", "diffai", "ibp"]
MAX_MODEL_CHARTS = 24  # ROC and histogram charts are per model; more than this stops being readable
ROC_CURVES_PER_MODEL = 3
MAX_ATTACK_ROC_CHARTS = 24  # one chart per (dataset, attack): every defense on shared axes
ROC_FPR_BUCKETS = 200  # log-spaced FPR buckets per curve: at most ~200 points per curve
HISTOGRAM_BINS = 25


@dataclass
class ReportData:
    """Everything the template shows, already aggregated; built by `collect_report_data`."""

    db_path: Path
    experiment: str | None
    generated_at: str
    experiments: list[dict[str, Any]] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)
    primary: dict[tuple[str, str], str] = field(default_factory=dict)
    perturbations: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    attacks: list[dict[str, Any]] = field(default_factory=list)
    skips: list[dict[str, Any]] = field(default_factory=list)
    roc_points: list[dict[str, Any]] = field(default_factory=list)
    attack_roc_points: list[dict[str, Any]] = field(default_factory=list)
    histogram_bins: list[dict[str, Any]] = field(default_factory=list)
    chart_models: list[str] = field(default_factory=list)
    package_versions: list[dict[str, Any]] = field(default_factory=list)
    attacks_left_out: list[str] = field(default_factory=list)  # scored, but filtered out by the caller
    query_seconds: float = 0.0


def _rows(
    con: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    return con.sql(sql, params=params).to_arrow_table().to_pylist()


def _view_columns(con: duckdb.DuckDBPyConnection, view: str) -> set[str]:
    rows = con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [view]
    ).fetchall()
    return {row[0] for row in rows}


def defense_rank(defense: str | None) -> tuple[int, str]:
    name = defense or ""
    return (DEFENSE_ORDER.index(name) if name in DEFENSE_ORDER else len(DEFENSE_ORDER), name)


def _epochs(config: Any) -> Any:
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            return None
    if isinstance(config, dict):
        return (config.get("training") or {}).get("epochs")
    return None


def configuration(model: dict[str, Any], without: str | None = None) -> tuple:
    """Everything that defines a trained configuration except the seed (and optionally one parameter)."""
    values = {
        "dataset": model["dataset"],
        "defense": model["defense"],
        "arch": model["arch"],
        "width": model["width"],
        "eps": model["eps"],
        "epochs": model["epochs"],
        "membership_scheme": model["membership_scheme"],
        "n_members": model["n_members"],
        "origin": model["origin"],
    }
    if without:
        values.pop(without)
    return tuple(sorted(values.items(), key=lambda item: item[0]))


def model_sort_key(model: dict[str, Any]) -> tuple:
    def num(value: Any) -> float:
        return float(value) if isinstance(value, (int, float)) else -1.0

    return (
        model["dataset"] or "",
        defense_rank(model["defense"]),
        model["arch"] or "",
        num(model["width"]),
        num(model["eps"]),
        num(model["epochs"]),
        num(model["seed"]),
        model["model_name"],
    )


def _representatives(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lowest-seed model of each configuration, in table order, at most MAX_MODEL_CHARTS."""
    seen: set[tuple] = set()
    chosen = []
    for model in sorted(models, key=model_sort_key):
        key = configuration(model)
        if model["status"] != "completed" or key in seen:
            continue
        seen.add(key)
        chosen.append(model)
    return chosen[:MAX_MODEL_CHARTS]


def _roc_sql() -> str:
    # Counts per distinct score first (ties stay together), then cumulative counts in score order;
    # within each log-spaced FPR bucket the last vertex (highest FPR and TPR) is kept.
    return """
    WITH counts AS (
        SELECT s.model_key, s.attack, s.perturbation, s.score,
               count(*) FILTER (WHERE s.is_member) AS d_tp,
               count(*) FILTER (WHERE NOT s.is_member) AS d_fp
        FROM v_scores s
        JOIN __report_roc_selection USING (model_key, attack_key, perturbation)
        WHERE s.score IS NOT NULL AND NOT isnan(s.score) AND s.is_member IS NOT NULL
        GROUP BY ALL
    ),
    cumulative AS (
        SELECT model_key, attack, perturbation,
               sum(d_tp) OVER upto AS tp, sum(d_fp) OVER upto AS fp,
               sum(d_tp) OVER whole AS n_pos, sum(d_fp) OVER whole AS n_neg
        FROM counts
        WINDOW whole AS (PARTITION BY model_key, attack, perturbation),
               upto AS (PARTITION BY model_key, attack, perturbation ORDER BY score DESC
                        ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
    ),
    points AS (
        SELECT model_key, attack, perturbation, n_neg,
               CAST(fp AS DOUBLE) / n_neg AS fpr, CAST(tp AS DOUBLE) / n_pos AS tpr,
               CASE WHEN n_neg <= 1 THEN 0
                    ELSE CAST(floor((ln(CAST(fp AS DOUBLE) / n_neg) + ln(n_neg)) / ln(n_neg) * $buckets) AS INTEGER)
               END AS bucket
        FROM cumulative
        WHERE fp > 0 AND tp > 0
    )
    SELECT model_key, attack, perturbation, bucket, max(fpr) AS fpr, max(tpr) AS tpr, any_value(n_neg) AS n_neg
    FROM points
    GROUP BY ALL
    ORDER BY model_key, attack, perturbation, fpr
    """


def _histogram_sql() -> str:
    # Confidence bins span [0, 1]; loss bins span [min, 99th percentile] of each (model, kind): adversarial
    # losses reach hundreds where benign ones stay near 0, and shared bins flattened the benign histogram
    # into one bar. The last bin also takes the larger losses.
    return """
    WITH base AS (
        SELECT s.model_key, s.kind, s.is_member, CAST(s.confidence AS DOUBLE) AS confidence, s.loss
        FROM v_signals s
        JOIN __report_hist_selection h ON h.model_key = s.model_key AND h.perturbation = s.perturbation
        WHERE s.is_member IS NOT NULL
    ),
    loss_range AS (
        SELECT model_key, kind, min(loss) AS lo, quantile_cont(loss, 0.99) AS hi
        FROM base WHERE loss IS NOT NULL AND isfinite(loss) GROUP BY model_key, kind
    ),
    loss_span AS (
        SELECT model_key, kind, lo, CASE WHEN hi > lo THEN hi - lo ELSE 1.0 END AS width FROM loss_range
    ),
    binned AS (
        SELECT model_key, kind, is_member, 'confidence' AS signal,
               CAST(least(greatest(floor(confidence * $bins), 0), $bins - 1) AS INTEGER) AS bin,
               0.0 AS lo, 1.0 AS width
        FROM base WHERE confidence IS NOT NULL AND NOT isnan(confidence)
        UNION ALL
        SELECT b.model_key, b.kind, b.is_member, 'loss' AS signal,
               CAST(least(greatest(floor((b.loss - r.lo) / r.width * $bins), 0), $bins - 1) AS INTEGER) AS bin,
               r.lo, r.width
        FROM base b JOIN loss_span r USING (model_key, kind)
        WHERE b.loss IS NOT NULL AND isfinite(b.loss)
    )
    SELECT model_key, kind, is_member, signal, bin, any_value(lo) AS lo, any_value(width) AS width,
           count(*) AS n
    FROM binned
    GROUP BY ALL
    ORDER BY model_key, signal, kind, is_member, bin
    """


def _primary_sql() -> str:
    # The same ranking v_models uses to pick the perturbation behind adv_train_acc etc., so that I_A is
    # measured on exactly the inputs the accuracy columns describe.
    return """
    SELECT model_key, perturbation, kind FROM (
        SELECT p.model_key, p.perturbation, p.kind, row_number() OVER (
            PARTITION BY p.model_key, p.kind
            ORDER BY (p.eps IS NOT DISTINCT FROM m.eps) DESC, p.eps DESC NULLS LAST, p.perturbation
        ) AS rank_in_kind
        FROM v_perturbations p
        JOIN v_models m ON m.model_key = p.model_key
        JOIN __report_models r ON r.model_key = p.model_key
    ) WHERE rank_in_kind = 1
    """


def _attack_roc_sql() -> str:
    # One ROC per (dataset, attack, defense, eps, perturbation), pooled over that defense's models (as LiRA
    # reports a fleet), thinned like the per-model curves. Thinned before the model counts are joined, and
    # the models read from `models`, not `v_models` (bench_report's 6 M scores: 4.5 -> 3.0 s; what is left
    # is the running sum over every distinct score).
    return """
    WITH counts AS (
        SELECT m.dataset, s.attack, coalesce(m.defense, 'unknown') AS defense,
               coalesce(m.eps, 0.0) AS eps, s.perturbation, s.score,
               count(*) FILTER (WHERE s.is_member) AS d_tp,
               count(*) FILTER (WHERE NOT s.is_member) AS d_fp
        FROM v_scores s
        JOIN __report_models USING (model_key)
        JOIN models m USING (model_key)
        WHERE s.score IS NOT NULL AND NOT isnan(s.score) AND s.is_member IS NOT NULL
        GROUP BY ALL
    ),
    n_models AS (
        SELECT m.dataset, s.attack, coalesce(m.defense, 'unknown') AS defense,
               coalesce(m.eps, 0.0) AS eps, s.perturbation,
               count(DISTINCT s.model_key) AS n_models
        FROM v_scores s JOIN __report_models USING (model_key) JOIN models m USING (model_key)
        GROUP BY ALL
    ),
    cumulative AS (
        SELECT dataset, attack, defense, eps, perturbation,
               sum(d_tp) OVER upto AS tp, sum(d_fp) OVER upto AS fp,
               sum(d_tp) OVER whole AS n_pos, sum(d_fp) OVER whole AS n_neg
        FROM counts
        WINDOW whole AS (PARTITION BY dataset, attack, defense, eps, perturbation),
               upto AS (PARTITION BY dataset, attack, defense, eps, perturbation ORDER BY score DESC
                        ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
    ),
    points AS (
        SELECT dataset, attack, defense, eps, perturbation, n_neg,
               CAST(fp AS DOUBLE) / n_neg AS fpr, CAST(tp AS DOUBLE) / n_pos AS tpr,
               CASE WHEN n_neg <= 1 THEN 0
                    ELSE CAST(floor((ln(CAST(fp AS DOUBLE) / n_neg) + ln(n_neg)) / ln(n_neg) * $buckets) AS INTEGER)
               END AS bucket
        FROM cumulative
        WHERE fp > 0 AND tp > 0
    ),
    thinned AS (
        SELECT dataset, attack, defense, eps, perturbation, bucket, max(fpr) AS fpr, max(tpr) AS tpr,
               any_value(n_neg) AS n_neg
        FROM points
        GROUP BY ALL
    )
    SELECT t.dataset, t.attack, t.defense, t.eps, t.perturbation, t.bucket, t.fpr, t.tpr, t.n_neg, n.n_models
    FROM thinned t JOIN n_models n USING (dataset, attack, defense, eps, perturbation)
    ORDER BY t.dataset, t.attack, t.defense, t.eps, t.perturbation, t.fpr
    """


def collect_report_data(
    db_path: str | Path,
    experiment: str | None = None,
    attacks: Sequence[str] | None = None,
    exclude_attacks: Sequence[str] | None = None,
) -> ReportData:
    """Run every query the report needs, in one short read-only session.

    Args:
        db_path: The store file.
        experiment: Only models (and specs) of this experiment; None for the whole store.
        attacks: Only these attacks (leaderboards, ROC curves, attack overview, skips); None for all.
        exclude_attacks: Leave these attacks out. A name that matches no scored attack of the selected
            models is an error, never an empty section.

    Returns:
        The aggregated data the template renders.

    Raises:
        StoreError: if the store is missing or unusable, or has no experiment of that name.
    """
    started = time.perf_counter()
    db_path = Path(db_path)
    data = ReportData(
        db_path=db_path,
        experiment=experiment,
        generated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    with reading(db_path) as con:
        experiments = _rows(
            con,
            "SELECT experiment, description, spec_path, spec_text, updated_at, n_models FROM v_experiments "
            "ORDER BY experiment",
        )
        if experiment is not None:
            known = [row["experiment"] for row in experiments]
            model_experiments = [
                row[0] for row in con.execute("SELECT DISTINCT experiment FROM v_models").fetchall() if row[0]
            ]
            if experiment not in known and experiment not in model_experiments:
                names = ", ".join(sorted(set(known) | set(model_experiments))) or "none"
                raise StoreError(f"no experiment {experiment!r} in {db_path} (experiments: {names})")
            experiments = [row for row in experiments if row["experiment"] == experiment]
        data.experiments = experiments

        model_columns = _view_columns(con, "v_models")
        extra = ", package_versions" if "package_versions" in model_columns else ""
        models = _rows(
            con,
            f"""SELECT model_key, model_name, experiment, dataset, arch, width, defense, eps, seed, status, error,
                       origin, membership_scheme, n_members, n_nonmembers, n_classes, train_acc, test_acc,
                       adv_train_acc, adv_test_acc, adv_eps, verified_train_acc, verified_test_acc, verified_eps,
                       n_perturbations, train_seconds, started_at, finished_at, device, git_commit, git_dirty,
                       host, config{extra}
                FROM v_models WHERE $experiment IS NULL OR experiment = $experiment""",
            {"experiment": experiment},
        )
        for model in models:
            model["epochs"] = _epochs(model.pop("config"))
        models.sort(key=model_sort_key)
        data.models = models
        con.register(
            "__report_models",
            pa.table({"model_key": pa.array([m["model_key"] for m in models], pa.string())}),
        )

        if extra:
            versions: dict[str, int] = defaultdict(int)
            for model in models:
                if model.get("package_versions"):
                    versions[str(model["package_versions"])] += 1
            for text, count in sorted(versions.items()):
                try:
                    parsed = json.loads(text)
                except ValueError:
                    parsed = {"raw": text}
                data.package_versions.append({"versions": parsed, "n_models": count})

        data.primary = {
            (row["model_key"], row["kind"]): row["perturbation"] for row in _rows(con, _primary_sql())
        }
        data.perturbations = _rows(
            con,
            """SELECT p.model_key, p.perturbation, p.kind, p.eps, p.n_rows, p.member_acc, p.nonmember_acc,
                      p.seconds
               FROM v_perturbations p JOIN __report_models USING (model_key)""",
        )
        data.metrics = _rows(
            con,
            """SELECT x.model_key, x.model_name, x.dataset, x.attack, x.attack_title, x.perturbation, x.kind,
                      x.perturbation_eps, x.balanced_accuracy, x.auc, x.tpr_at_fpr_1e3, x.tpr_at_fpr_1e2,
                      x.advantage, x.calibrated_accuracy, x.n_members, x.n_nonmembers, x.seconds, x.created_at,
                      x.attack_key,
                      -- issue 10: bootstrap intervals (NULL where scored with --resamples 0)
                      x.balanced_accuracy_ci_low, x.balanced_accuracy_ci_high, x.auc_ci_low, x.auc_ci_high,
                      x.tpr_at_fpr_1e3_ci_low, x.tpr_at_fpr_1e3_ci_high, x.tpr_at_fpr_1e2_ci_low,
                      x.tpr_at_fpr_1e2_ci_high
               FROM v_metrics x JOIN __report_models USING (model_key)
               -- a re-scored attack (edited source) leaves one row per version: show the newest
               QUALIFY row_number() OVER (
                   PARTITION BY x.model_key, x.attack, x.perturbation ORDER BY x.created_at DESC NULLS LAST
               ) = 1
               ORDER BY x.model_key, x.balanced_accuracy DESC NULLS LAST, x.attack, x.perturbation""",
        )
        scored = {row["attack"] for row in data.metrics}
        data.metrics = _select_attacks(data.metrics, attacks, exclude_attacks, db_path)
        chosen = {row["attack"] for row in data.metrics}
        data.attacks_left_out = sorted(scored - chosen)
        data.attacks = _attack_overview(con, data.metrics)
        data.skips = _rows(
            con,
            """SELECT k.attack, k.reason, count(*) AS n, count(DISTINCT k.model_key) AS n_models
               FROM v_attack_skips k JOIN __report_models USING (model_key)
               GROUP BY ALL ORDER BY k.attack, k.reason""",
        )
        if attacks is not None or exclude_attacks is not None:
            data.skips = [row for row in data.skips if row["attack"] in chosen]

        representatives = _representatives(models)
        data.chart_models = [m["model_key"] for m in representatives]
        data.roc_points = _roc_points(con, data.metrics, data.chart_models)
        data.attack_roc_points = [
            row
            for row in _rows(con, _attack_roc_sql(), {"buckets": ROC_FPR_BUCKETS})
            if row["attack"] in chosen
        ]
        data.histogram_bins = _histogram_bins(con, data.primary, data.chart_models)
    data.query_seconds = time.perf_counter() - started
    return data


def _select_attacks(
    metrics: list[dict[str, Any]],
    attacks: Sequence[str] | None,
    exclude_attacks: Sequence[str] | None,
    db_path: Path,
) -> list[dict[str, Any]]:
    if attacks is None and exclude_attacks is None:
        return metrics
    scored = sorted({row["attack"] for row in metrics})
    for option, names in (("--attack", attacks), ("--exclude-attack", exclude_attacks)):
        unknown = sorted(set(names or ()) - set(scored))
        if unknown:
            raise StoreError(
                f"{option} {', '.join(unknown)}: not scored on these models in {db_path} "
                f"(scored attacks: {', '.join(scored) or 'none'})"
            )
    keep = set(attacks) if attacks is not None else set(scored)
    keep -= set(exclude_attacks or ())
    if not keep:
        raise StoreError("--attack / --exclude-attack leave no attack to report")
    return [row for row in metrics if row["attack"] in keep]


def _attack_overview(con: duckdb.DuckDBPyConnection, metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    counts: dict[str, dict[str, Any]] = {}
    for row in metrics:
        entry = counts.setdefault(
            row["attack"],
            {"attack": row["attack"], "title": row["attack_title"], "models": set(), "perturbations": set()},
        )
        entry["models"].add(row["model_key"])
        entry["perturbations"].add(row["perturbation"])
    described: dict[str, dict[str, Any]] = {}
    columns = _view_columns(con, "v_attacks")
    name_column = "attack" if "attack" in columns else "name" if "name" in columns else None
    if name_column and "description" in columns:
        paper = ", paper" if "paper" in columns else ", NULL AS paper"
        title = ", title" if "title" in columns else ", NULL AS title"
        language = ", language" if "language" in columns else ", NULL AS language"
        query = f"SELECT {name_column} AS attack, description{paper}{title}{language} FROM v_attacks"
        for row in _rows(con, query):
            described[row["attack"]] = row
    result = []
    for name in sorted(counts):
        entry = counts[name]
        info = described.get(name, {})
        result.append(
            {
                "attack": name,
                "title": entry["title"] or info.get("title"),
                "description": (info.get("description") or "").strip() or None,
                "paper": info.get("paper"),
                # Python attacks run with the user's rights (README: trust boundary); the page says so
                "trusted_code": info.get("language") == "python",
                "n_models": len(entry["models"]),
                "perturbations": sorted(entry["perturbations"]),
            }
        )
    return result


def strongest(metrics: list[dict[str, Any]], model_keys: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Per model, its ROC_CURVES_PER_MODEL strongest attack x perturbation rows (balanced accuracy, then AUC)."""
    wanted = set(model_keys)
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in metrics:
        if row["model_key"] in wanted and row["balanced_accuracy"] is not None:
            by_model[row["model_key"]].append(row)
    for rows in by_model.values():
        rows.sort(
            key=lambda r: (
                -(r["balanced_accuracy"] or 0.0),
                -(r["auc"] or 0.0),
                r["attack"],
                r["perturbation"],
            )
        )
        del rows[ROC_CURVES_PER_MODEL:]
    return by_model


def _roc_points(
    con: duckdb.DuckDBPyConnection, metrics: list[dict[str, Any]], chart_models: list[str]
) -> list[dict[str, Any]]:
    selection = [
        (model_key, r["attack_key"], r["perturbation"])
        for model_key, rows in strongest(metrics, chart_models).items()
        for r in rows
    ]
    if not selection:
        return []
    table = pa.table(
        {
            "model_key": pa.array([s[0] for s in selection], pa.string()),
            "attack_key": pa.array([s[1] for s in selection], pa.string()),
            "perturbation": pa.array([s[2] for s in selection], pa.string()),
        }
    )
    con.register("__report_roc_selection", table)
    return _rows(con, _roc_sql(), {"buckets": ROC_FPR_BUCKETS})


def _histogram_bins(
    con: duckdb.DuckDBPyConnection, primary: dict[tuple[str, str], str], chart_models: list[str]
) -> list[dict[str, Any]]:
    wanted = set(chart_models)
    pairs = [(model_key, name) for (model_key, _kind), name in primary.items() if model_key in wanted]
    if not pairs:
        return []
    table = pa.table(
        {
            "model_key": pa.array([p[0] for p in pairs], pa.string()),
            "perturbation": pa.array([p[1] for p in pairs], pa.string()),
        }
    )
    con.register("__report_hist_selection", table)
    return _rows(con, _histogram_sql(), {"bins": HISTOGRAM_BINS})
