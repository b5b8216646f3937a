"""Report layer: read the store's public views and render one self-contained HTML page; imports duckdb, jinja2, altair.

Only the public views (v_models, v_perturbations, v_metrics, v_scores, v_signals, v_experiments,
v_attack_skips, and v_attacks where a store has it) are read, through one short read-only connection.
Everything bulky is aggregated in SQL before it reaches Python: ROC curves are cumulated per distinct
score and thinned to log-spaced FPR buckets, histograms are binned, so the page never embeds per-sample
rows and its size does not grow with the number of samples.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from robmia_db.errors import StoreError
from robmia_db.report import charts
from robmia_db.store.connection import reading

STATIC_FORMATS = ("png", "svg")
PAPER_ATTACK = (
    "confidence"  # the paper's I_B / I_A / I_V are this attack on benign / adversarial / verified signals
)
KINDS = ("benign", "adversarial", "verified")
DEFENSE_ORDER = ["natural", "pgd_at", "distributional", "wrm", "trades", "duality", "convex", "diffai", "ibp"]
MAX_MODEL_CHARTS = 24  # ROC and histogram charts are per model; more than this stops being readable
ROC_CURVES_PER_MODEL = 3
ROC_FPR_BUCKETS = 200  # log-spaced FPR buckets per curve: at most ~200 points per curve
HISTOGRAM_BINS = 25
MAX_SWEEP_CHARTS = 24
SWEEP_PARAMETERS = ("eps", "width", "epochs")
OPEN_LEADERBOARD_MODELS = 6  # leaderboards of small stores start expanded

LEADERBOARD_COLUMNS = [
    ("balanced_accuracy", "balanced acc."),
    ("auc", "AUC"),
    ("tpr_at_fpr_1e3", "TPR @ 0.1% FPR"),
    ("tpr_at_fpr_1e2", "TPR @ 1% FPR"),
    ("advantage", "advantage"),
    ("calibrated_accuracy", "calibrated acc."),
]


@dataclass
class ChartSlot:
    """One chart on the page: its DOM id, a file-name stem for static export and its Vega-Lite spec."""

    chart_id: str
    name: str
    spec: dict[str, Any]


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
    histogram_bins: list[dict[str, Any]] = field(default_factory=list)
    chart_models: list[str] = field(default_factory=list)
    package_versions: list[dict[str, Any]] = field(default_factory=list)
    query_seconds: float = 0.0


# ------------------------------------------------------------------------------------------------
# Queries


def _rows(
    con: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    return con.sql(sql, params=params).to_arrow_table().to_pylist()


def _view_columns(con: duckdb.DuckDBPyConnection, view: str) -> set[str]:
    rows = con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [view]
    ).fetchall()
    return {row[0] for row in rows}


def _defense_rank(defense: str | None) -> tuple[int, str]:
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


def _configuration(model: dict[str, Any], without: str | None = None) -> tuple:
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


def _model_sort_key(model: dict[str, Any]) -> tuple:
    def num(value: Any) -> float:
        return float(value) if isinstance(value, (int, float)) else -1.0

    return (
        model["dataset"] or "",
        _defense_rank(model["defense"]),
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
    for model in sorted(models, key=_model_sort_key):
        key = _configuration(model)
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
    # Confidence bins span [0, 1]; loss bins span [min, 99th percentile] of the model's rows over all
    # its kinds (so kinds share bins) and the last bin also takes the larger losses.
    return """
    WITH base AS (
        SELECT s.model_key, s.kind, s.is_member, CAST(s.confidence AS DOUBLE) AS confidence, s.loss
        FROM v_signals s
        JOIN __report_hist_selection h ON h.model_key = s.model_key AND h.perturbation = s.perturbation
        WHERE s.is_member IS NOT NULL
    ),
    loss_range AS (
        SELECT model_key, min(loss) AS lo, quantile_cont(loss, 0.99) AS hi
        FROM base WHERE loss IS NOT NULL AND isfinite(loss) GROUP BY model_key
    ),
    loss_span AS (
        SELECT model_key, lo, CASE WHEN hi > lo THEN hi - lo ELSE 1.0 END AS width FROM loss_range
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
        FROM base b JOIN loss_span r USING (model_key)
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


def collect_report_data(db_path: str | Path, experiment: str | None = None) -> ReportData:
    """Run every query the report needs, in one short read-only session.

    Args:
        db_path: The store file.
        experiment: Only models (and specs) of this experiment; None for the whole store.

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
        models.sort(key=_model_sort_key)
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
                      x.attack_key
               FROM v_metrics x JOIN __report_models USING (model_key)
               -- a re-scored attack (edited source) leaves one row per version: show the newest
               QUALIFY row_number() OVER (
                   PARTITION BY x.model_key, x.attack, x.perturbation ORDER BY x.created_at DESC NULLS LAST
               ) = 1
               ORDER BY x.model_key, x.balanced_accuracy DESC NULLS LAST, x.attack, x.perturbation""",
        )
        data.attacks = _attack_overview(con, data.metrics)
        data.skips = _rows(
            con,
            """SELECT k.attack, k.reason, count(*) AS n, count(DISTINCT k.model_key) AS n_models
               FROM v_attack_skips k JOIN __report_models USING (model_key)
               GROUP BY ALL ORDER BY k.attack, k.reason""",
        )

        representatives = _representatives(models)
        data.chart_models = [m["model_key"] for m in representatives]
        data.roc_points = _roc_points(con, data.metrics, data.chart_models)
        data.histogram_bins = _histogram_bins(con, data.primary, data.chart_models)
    data.query_seconds = time.perf_counter() - started
    return data


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
        for row in _rows(con, f"SELECT {name_column} AS attack, description{paper}{title} FROM v_attacks"):
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
                "n_models": len(entry["models"]),
                "perturbations": sorted(entry["perturbations"]),
            }
        )
    return result


def _strongest(metrics: list[dict[str, Any]], model_keys: list[str]) -> dict[str, list[dict[str, Any]]]:
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
        for model_key, rows in _strongest(metrics, chart_models).items()
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


# ------------------------------------------------------------------------------------------------
# Shaping for the template


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _stat(values: list[float | None]) -> dict[str, Any] | None:
    """Mean and sample standard deviation (n - 1) over seeds; None when no seed has the value."""
    present = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not present:
        return None
    return {
        "mean": statistics.fmean(present),
        "std": statistics.stdev(present) if len(present) > 1 else None,
        "n": len(present),
    }


def _fmt_param(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        # budgets are usually k/255 (8/255 reads better than 0.0313725)
        steps = value * 255
        if 0 < value < 1 and round(value, 4) != value and abs(steps - round(steps)) < 1e-6:
            return f"{round(steps)}/255"
        return f"{value:g}"
    return str(value)


def _paper_values(data: ReportData) -> dict[str, dict[str, float | None]]:
    """Per model: the accuracy columns and the paper attack's inference accuracy per kind."""
    paper_metric: dict[tuple[str, str], float | None] = {}
    for row in data.metrics:
        if row["attack"] == PAPER_ATTACK:
            paper_metric[(row["model_key"], row["perturbation"])] = row["balanced_accuracy"]
    values: dict[str, dict[str, float | None]] = {}
    for model in data.models:
        key = model["model_key"]
        entry = {
            "train_acc": model["train_acc"],
            "test_acc": model["test_acc"],
            "adv_train_acc": model["adv_train_acc"],
            "adv_test_acc": model["adv_test_acc"],
            "verified_train_acc": model["verified_train_acc"],
            "verified_test_acc": model["verified_test_acc"],
        }
        for kind, column in zip(KINDS, ("i_b", "i_a", "i_v"), strict=True):
            name = data.primary.get((key, kind))
            entry[column] = paper_metric.get((key, name)) if name else None
        values[key] = entry
    return values


PAPER_COLUMNS = [
    ("train_acc", "train acc"),
    ("test_acc", "test acc"),
    ("adv_train_acc", "adv-train acc"),
    ("adv_test_acc", "adv-test acc"),
    ("verified_train_acc", "verified-train acc"),
    ("verified_test_acc", "verified-test acc"),
    ("i_b", "I<sub>B</sub>"),
    ("i_a", "I<sub>A</sub>"),
    ("i_v", "I<sub>V</sub>"),
]


def _paper_tables(data: ReportData, values: dict[str, dict[str, float | None]]) -> list[dict[str, Any]]:
    completed = [m for m in data.models if m["status"] == "completed"]
    tables = []
    for dataset in sorted({m["dataset"] or "" for m in completed}):
        models = [m for m in completed if (m["dataset"] or "") == dataset]
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for model in models:
            groups.setdefault(_configuration(model), []).append(model)
        # Name rows by defense, adding only the parameters that differ between rows of this dataset.
        # Natural models have no training eps, which alone does not make eps worth a label.
        varying = [
            p
            for p in ("arch", "width", "eps", "epochs", "membership_scheme", "n_members", "origin")
            if len({str(m[p]) for m in models if p != "eps" or m["defense"] != "natural"}) > 1
        ]
        rows = []
        for key, members in groups.items():
            first = members[0]
            detail = ", ".join(
                f"{p}={_fmt_param(first[p])}"
                for p in varying
                if not (p == "eps" and first["defense"] == "natural")
            )
            cells = {}
            for column, _label in PAPER_COLUMNS:
                cells[column] = _stat([values[m["model_key"]][column] for m in members])
            rows.append(
                {
                    "key": "|".join(f"{k}={v}" for k, v in key),
                    "defense": first["defense"] or "—",
                    "detail": detail,
                    "n_seeds": len(members),
                    "seeds": sorted(m["seed"] for m in members if m["seed"] is not None),
                    "model_keys": [m["model_key"] for m in members],
                    "cells": cells,
                    "sort": _model_sort_key(first),
                }
            )
        rows.sort(key=lambda r: r["sort"])
        columns = [
            {"key": column, "label": label}
            for column, label in PAPER_COLUMNS
            if any(row["cells"][column] is not None for row in rows)
            or column in ("train_acc", "test_acc", "i_b", "i_a")
        ]
        adv_eps = sorted({m["adv_eps"] for m in models if m["adv_eps"] is not None})
        tables.append(
            {
                "dataset": dataset or "—",
                "rows": rows,
                "columns": columns,
                "n_members": sorted({m["n_members"] for m in models if m["n_members"] is not None}),
                "n_nonmembers": sorted({m["n_nonmembers"] for m in models if m["n_nonmembers"] is not None}),
                "adv_eps": [_fmt_param(float(e)) for e in adv_eps],
                "multi_seed": any(row["n_seeds"] > 1 for row in rows),
            }
        )
    return tables


def _leaderboards(data: ReportData) -> list[dict[str, Any]]:
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in data.metrics:
        by_model[row["model_key"]].append(row)
    boards = []
    for model in data.models:
        rows = by_model.get(model["model_key"])
        if not rows:
            continue
        best = {}
        for column, _label in LEADERBOARD_COLUMNS:
            present = [r[column] for r in rows if r[column] is not None and math.isfinite(r[column])]
            best[column] = max(present) if present else None
        columns = [
            {"key": c, "label": label}
            for c, label in LEADERBOARD_COLUMNS
            if c != "calibrated_accuracy" or best["calibrated_accuracy"] is not None
        ]
        top = rows[0]
        boards.append(
            {
                "model": model,
                "columns": columns,
                # cells precomputed: a macro call per cell costs more than the rest of the page together
                "rows": [
                    {
                        **r,
                        "cells": [
                            {
                                "raw": _raw(r[c["key"]]),
                                "text": _percent(r[c["key"]]),
                                "best": r[c["key"]] is not None and r[c["key"]] == best[c["key"]],
                            }
                            for c in columns
                        ],
                    }
                    for r in rows
                ],
                "top": top,
            }
        )
    return boards


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:80] or "chart"


class _ChartList:
    def __init__(self) -> None:
        self.slots: list[ChartSlot] = []

    def add(self, name: str, spec: dict[str, Any]) -> ChartSlot:
        slot = ChartSlot(
            chart_id=f"chart-{len(self.slots) + 1}",
            name=f"{len(self.slots) + 1:02d}-{_slug(name)}",
            spec=spec,
        )
        self.slots.append(slot)
        return slot


def _curve_label(attack: str, perturbation: str, kind: str | None) -> str:
    return f"{attack} on {perturbation}" + (f" ({kind})" if kind and kind != perturbation else "")


def _roc_charts(data: ReportData, chart_list: _ChartList) -> list[dict[str, Any]]:
    names = {m["model_key"]: m["model_name"] for m in data.models}
    strongest = _strongest(data.metrics, data.chart_models)
    by_curve: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for point in data.roc_points:
        by_curve[(point["model_key"], point["attack"], point["perturbation"])].append(point)
    result = []
    for model_key in data.chart_models:
        records: list[dict[str, Any]] = []
        curves: list[str] = []
        n_neg = 1
        for rank, metric in enumerate(strongest.get(model_key, []), start=1):
            points = by_curve.get((model_key, metric["attack"], metric["perturbation"]))
            if not points:
                continue
            # numbered by strength so the legend (sorted by label) lists the strongest first
            curves.append(
                f"{rank}. {_curve_label(metric['attack'], metric['perturbation'], metric['kind'])}"
                f" · bal. acc. {100 * metric['balanced_accuracy']:.2f}%"
            )
            records.extend(
                {"c": len(curves) - 1, "fpr": round(p["fpr"], 7), "tpr": round(p["tpr"], 7)} for p in points
            )
            n_neg = max(n_neg, *(int(p["n_neg"]) for p in points))
        if not records:
            continue
        spec = charts.roc_chart(records, curves, min_fpr=1.0 / n_neg, title=names[model_key])
        slot = chart_list.add(f"roc-{names[model_key]}", spec)
        result.append(
            {"slot": slot, "model_name": names[model_key], "curves": curves, "n_points": len(records)}
        )
    return result


def _histogram_charts(data: ReportData, chart_list: _ChartList) -> list[dict[str, Any]]:
    names = {m["model_key"]: m["model_name"] for m in data.models}
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in data.histogram_bins:
        grouped[row["model_key"]].append(row)
    result = []
    for model_key in data.chart_models:
        rows = grouped.get(model_key)
        if not rows:
            continue
        totals: dict[tuple, int] = defaultdict(int)
        for row in rows:
            totals[(row["kind"], row["signal"], row["is_member"])] += row["n"]
        records = []
        for row in rows:
            step = row["width"] / HISTOGRAM_BINS
            start = row["lo"] + row["bin"] * step
            records.append(
                {
                    "signal": row["signal"],
                    "kind": row["kind"],
                    "group": "members" if row["is_member"] else "non-members",
                    "start": round(start, 6),
                    "end": round(start + step, 6),
                    "share": round(row["n"] / totals[(row["kind"], row["signal"], row["is_member"])], 6),
                }
            )
        kinds = sorted(
            {row["kind"] for row in rows}, key=lambda k: KINDS.index(k) if k in KINDS else len(KINDS)
        )
        spec = charts.histogram_chart(records, title=names[model_key], kinds=kinds)
        slot = chart_list.add(f"hist-{names[model_key]}", spec)
        result.append({"slot": slot, "model_name": names[model_key], "kinds": kinds})
    return result


def _gap_chart(
    data: ReportData, values: dict[str, dict[str, float | None]], chart_list: _ChartList
) -> dict[str, Any] | None:
    best_adversarial: dict[str, float] = {}
    for row in data.metrics:
        if row["kind"] == "adversarial" and row["balanced_accuracy"] is not None:
            best_adversarial[row["model_key"]] = max(
                best_adversarial.get(row["model_key"], 0.0), row["balanced_accuracy"]
            )
    use_paper = any(values[m["model_key"]]["i_a"] is not None for m in data.models)
    points = []
    for model in data.models:
        if model["adv_train_acc"] is None or model["adv_test_acc"] is None:
            continue
        inference = (
            values[model["model_key"]]["i_a"] if use_paper else best_adversarial.get(model["model_key"])
        )
        if inference is None:
            continue
        points.append(
            {
                "model": model["model_name"],
                "dataset": model["dataset"] or "—",
                "defense": model["defense"] or "—",
                "gap": round(100 * (model["adv_train_acc"] - model["adv_test_acc"]), 4),
                "inference": round(100 * inference, 4),
            }
        )
    if not points:
        return None
    y_title = (
        f"I_A: {PAPER_ATTACK} attack on adversarial inputs (%)"
        if use_paper
        else "best attack on adversarial inputs: balanced accuracy (%)"
    )
    slot = chart_list.add("robustness-gap", charts.gap_chart(points, y_title))
    return {"slot": slot, "n_points": len(points), "y_title": y_title}


SWEEP_QUANTITIES = [
    ("train_acc", "train acc", "accuracy"),
    ("test_acc", "test acc", "accuracy"),
    ("adv_train_acc", "adv-train acc", "accuracy"),
    ("adv_test_acc", "adv-test acc", "accuracy"),
    ("verified_train_acc", "verified-train acc", "accuracy"),
    ("verified_test_acc", "verified-test acc", "accuracy"),
    ("i_b", "I_B", "inference"),
    ("i_a", "I_A", "inference"),
    ("i_v", "I_V", "inference"),
]


def _sweeps(
    data: ReportData, values: dict[str, dict[str, float | None]], chart_list: _ChartList
) -> tuple[list[dict[str, Any]], int]:
    completed = [m for m in data.models if m["status"] == "completed"]
    found = []
    for parameter in SWEEP_PARAMETERS:
        groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for model in completed:
            if isinstance(model[parameter], (int, float)):
                groups[_configuration(model, without=parameter)].append(model)
        for key, models in groups.items():
            settings = sorted({float(m[parameter]) for m in models})
            if len(settings) < 2:
                continue
            found.append((parameter, key, models, settings))
    result = []
    for parameter, key, models, settings in found[:MAX_SWEEP_CHARTS]:
        records = []
        for setting in settings:
            at = [m for m in models if float(m[parameter]) == setting]
            for column, label, group in SWEEP_QUANTITIES:
                stat = _stat([values[m["model_key"]][column] for m in at])
                if stat is not None:
                    records.append(
                        {
                            "value": setting,
                            "quantity": label,
                            "group": group,
                            "mean": round(100 * stat["mean"], 4),
                        }
                    )
        if not records:
            continue
        fixed = dict(key)
        title = f"{fixed.get('dataset')} · {fixed.get('defense')} · {parameter}"
        details = ", ".join(
            f"{k}={_fmt_param(v)}"
            for k, v in key
            if k not in ("dataset", "defense", "origin") and v is not None
        )
        log_x = settings[0] > 0 and settings[-1] / settings[0] >= 10
        slot = chart_list.add(f"sweep-{title}", charts.sweep_chart(records, parameter, title, log_x))
        result.append(
            {
                "slot": slot,
                "parameter": parameter,
                "title": title,
                "details": details,
                "settings": [_fmt_param(s) for s in settings],
                "n_models": len(models),
            }
        )
    return result, len(found)


def _overview(data: ReportData) -> dict[str, Any]:
    models = data.models
    datasets = []
    for dataset in sorted({m["dataset"] or "—" for m in models}):
        subset = [m for m in models if (m["dataset"] or "—") == dataset]
        datasets.append(
            {
                "dataset": dataset,
                "n_models": len(subset),
                "n_members": sorted({m["n_members"] for m in subset if m["n_members"] is not None}),
                "n_nonmembers": sorted({m["n_nonmembers"] for m in subset if m["n_nonmembers"] is not None}),
                "n_classes": sorted({m["n_classes"] for m in subset if m["n_classes"] is not None}),
                "defenses": sorted({m["defense"] or "—" for m in subset}, key=_defense_rank),
            }
        )
    perturbations: dict[tuple, dict[str, Any]] = {}
    for row in data.perturbations:
        key = (row["perturbation"], row["kind"], row["eps"])
        entry = perturbations.setdefault(
            key, {"name": row["perturbation"], "kind": row["kind"], "eps": row["eps"], "n_models": 0}
        )
        entry["n_models"] += 1
    commits: dict[tuple, dict[str, Any]] = {}
    for model in models:
        key = (model["git_commit"], model["git_dirty"])
        entry = commits.setdefault(
            key, {"commit": model["git_commit"], "dirty": model["git_dirty"], "n_models": 0}
        )
        entry["n_models"] += 1
    started = [m["started_at"] for m in models if m["started_at"] is not None]
    finished = [m["finished_at"] for m in models if m["finished_at"] is not None]
    return {
        "n_models": len(models),
        "n_completed": sum(1 for m in models if m["status"] == "completed"),
        "failed": [m for m in models if m["status"] != "completed"],
        "datasets": datasets,
        "perturbations": sorted(
            perturbations.values(),
            key=lambda p: (KINDS.index(p["kind"]) if p["kind"] in KINDS else 9, p["name"], p["eps"] or 0),
        ),
        "commits": sorted(commits.values(), key=lambda c: -c["n_models"]),
        "first_started": min(started) if started else None,
        "last_finished": max(finished) if finished else None,
    }


def _timings(data: ReportData) -> dict[str, Any]:
    signal_seconds: dict[str, float] = defaultdict(float)
    for row in data.perturbations:
        signal_seconds[row["model_key"]] += row["seconds"] or 0.0
    score_seconds: dict[str, float] = defaultdict(float)
    for row in data.metrics:
        score_seconds[row["model_key"]] += row["seconds"] or 0.0
    rows = [
        {
            "model_name": m["model_name"],
            "device": m["device"],
            "host": m["host"],
            "train_seconds": m["train_seconds"],
            "signal_seconds": signal_seconds.get(m["model_key"]),
            "score_seconds": score_seconds.get(m["model_key"]),
            "started_at": m["started_at"],
            "finished_at": m["finished_at"],
        }
        for m in data.models
    ]
    return {
        "rows": rows,
        "train_total": sum(m["train_seconds"] or 0.0 for m in data.models),
        "signal_total": sum(signal_seconds.values()),
        "score_total": sum(score_seconds.values()),
    }


# ------------------------------------------------------------------------------------------------
# Rendering


def _percent(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{100 * value:.{digits}f}"


def _seconds(value: Any) -> str:
    if value is None:
        return "—"
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.2f} h"


def _when(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return str(value)


def _raw(value: Any) -> str:
    """Full-precision value for data attributes (tests and scripts read these, people read the cell)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return repr(float(value))


def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("robmia_db.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    # Compact JSON; NaN is not JSON and would break JSON.parse in the page, so refuse it loudly.
    env.policies["json.dumps_kwargs"] = {"sort_keys": False, "separators": (",", ":"), "allow_nan": False}
    env.filters.update(percent=_percent, seconds=_seconds, when=_when, raw=_raw, param=_fmt_param)
    return env


def render_report(data: ReportData) -> tuple[str, list[ChartSlot]]:
    """Render the page from collected data.

    Args:
        data: From `collect_report_data`.

    Returns:
        The HTML text and the charts it embeds (for static export).
    """
    chart_list = _ChartList()
    values = _paper_values(data)
    paper_tables = _paper_tables(data, values)
    leaderboards = _leaderboards(data)
    roc = _roc_charts(data, chart_list)
    histograms = _histogram_charts(data, chart_list)
    gap = _gap_chart(data, values, chart_list)
    sweeps, n_sweeps = _sweeps(data, values, chart_list)
    completed = sum(1 for m in data.models if m["status"] == "completed")
    context = {
        "title": f"robmia-db report: {data.experiment or data.db_path.stem}",
        "data": data,
        "store_name": data.db_path.name,
        "overview": _overview(data),
        "paper_tables": paper_tables,
        "paper_attack": PAPER_ATTACK,
        "has_paper_metrics": any(row["attack"] == PAPER_ATTACK for row in data.metrics),
        "leaderboards": leaderboards,
        "open_leaderboards": len(leaderboards) <= OPEN_LEADERBOARD_MODELS,
        "roc": roc,
        "histograms": histograms,
        "charted_models": len(data.chart_models),
        "n_configurations": len({_configuration(m) for m in data.models if m["status"] == "completed"}),
        "n_completed": completed,
        "max_model_charts": MAX_MODEL_CHARTS,
        "gap": gap,
        "sweeps": sweeps,
        "n_sweeps": n_sweeps,
        "timings": _timings(data),
        "bundle": charts.vega_bundle(),
        "n_charts": len(chart_list.slots),
        "histogram_bins": HISTOGRAM_BINS,
        "roc_buckets": ROC_FPR_BUCKETS,
        "roc_per_model": ROC_CURVES_PER_MODEL,
        "version": _robmia_version(),
    }
    html = _environment().get_template("report.html.j2").render(**context)
    return html, chart_list.slots


def _robmia_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("robmia-db")
    except metadata.PackageNotFoundError:
        return "unknown"


def default_output(db_path: str | Path, experiment: str | None = None) -> Path:
    """`reports/<store stem>.html` (with `-<experiment>` when the report is for one experiment)."""
    stem = Path(db_path).stem
    if experiment:
        stem += f"-{_slug(experiment)}"
    return Path("reports") / f"{stem}.html"


def build_report(
    db_path: str | Path,
    output: str | Path | None = None,
    experiment: str | None = None,
    static: str | None = None,
) -> Path:
    """Write the self-contained HTML report of a store.

    Args:
        db_path: The store file.
        output: Page to write; default `reports/<store stem>.html`.
        experiment: Only this experiment's models; None for all.
        static: ``"png"`` or ``"svg"`` to also write every chart as a file in `<page stem>-charts/`.

    Returns:
        The path of the written page.

    Raises:
        StoreError: if the store is missing or unusable, or has no experiment of that name.
        ValueError: if `static` is not None, ``"png"`` or ``"svg"``.
    """
    if static is not None and static not in STATIC_FORMATS:
        raise ValueError(f"static must be one of {STATIC_FORMATS}, not {static!r}")
    data = collect_report_data(db_path, experiment)
    html, slots = render_report(data)
    path = Path(output) if output is not None else default_output(db_path, experiment)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    if static:
        folder = path.with_name(path.stem + "-charts")
        folder.mkdir(exist_ok=True)
        for slot in slots:
            charts.export_static(slot.spec, folder / slot.name, static)
    return path
