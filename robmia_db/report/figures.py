"""Report figures, shaped for the template: which data each chart gets (ROC, histograms, gap, sweeps).

The Vega-Lite specs themselves are built in `charts`; this module decides what goes into them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from robmia_db.report import charts, queries
from robmia_db.report.formatting import fmt_param, slug
from robmia_db.report.intervals import bootstrap_intervals, cell_interval
from robmia_db.report.queries import (
    HISTOGRAM_BINS,
    KINDS,
    PAPER_ATTACK,
    ReportData,
    configuration,
    defense_rank,
    strongest,
)
from robmia_db.report.tables import stat

MAX_SWEEP_CHARTS = 24
SWEEP_PARAMETERS = ("eps", "width", "epochs")


@dataclass
class ChartSlot:
    """One chart on the page: its DOM id, a file-name stem for static export and its Vega-Lite spec."""

    chart_id: str
    name: str
    spec: dict[str, Any]


class ChartList:
    def __init__(self) -> None:
        self.slots: list[ChartSlot] = []

    def add(self, name: str, spec: dict[str, Any]) -> ChartSlot:
        slot = ChartSlot(
            chart_id=f"chart-{len(self.slots) + 1}",
            name=f"{len(self.slots) + 1:02d}-{slug(name)}",
            spec=spec,
        )
        self.slots.append(slot)
        return slot


def _curve_label(attack: str, perturbation: str, kind: str | None) -> str:
    return f"{attack} on {perturbation}" + (f" ({kind})" if kind and kind != perturbation else "")


def roc_charts(data: ReportData, chart_list: ChartList) -> list[dict[str, Any]]:
    names = {m["model_key"]: m["model_name"] for m in data.models}
    top = strongest(data.metrics, data.chart_models)
    by_curve: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for point in data.roc_points:
        by_curve[(point["model_key"], point["attack"], point["perturbation"])].append(point)
    result = []
    for model_key in data.chart_models:
        records: list[dict[str, Any]] = []
        curves: list[str] = []
        n_neg = 1
        for rank, metric in enumerate(top.get(model_key, []), start=1):
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


def attack_roc_charts(data: ReportData, chart_list: ChartList) -> list[dict[str, Any]]:
    """One log-log ROC per (dataset, attack) with every defense and perturbation on shared axes, each
    curve pooled over that defense's models (the figure a paper needs)."""
    groups: dict[tuple[str, str], dict[tuple, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for point in data.attack_roc_points:
        curve = (defense_rank(point["defense"]), point["eps"] or 0.0, point["perturbation"])
        groups[(point["dataset"], point["attack"])][curve].append(point)
    result = []
    for (dataset, attack), curves_of in sorted(groups.items())[: queries.MAX_ATTACK_ROC_CHARTS]:
        records: list[dict[str, Any]] = []
        curves: list[str] = []
        n_neg = 1
        for key in sorted(curves_of):
            points = curves_of[key]
            first = points[0]
            eps = f" eps {first['eps']:g}" if first["eps"] and first["defense"] != "natural" else ""
            curves.append(f"{first['defense']}{eps} · {first['perturbation']} ({first['n_models']} models)")
            records.extend(
                {"c": len(curves) - 1, "fpr": round(p["fpr"], 7), "tpr": round(p["tpr"], 7)} for p in points
            )
            n_neg = max(n_neg, *(int(p["n_neg"]) for p in points))
        title = f"{attack} · {dataset}"
        spec = charts.roc_chart(records, curves, 1.0 / n_neg, title, points_name="attack_roc_points")
        slot = chart_list.add(f"attack-roc-{dataset}-{attack}", spec)
        result.append(
            {"slot": slot, "attack": attack, "dataset": dataset, "curves": curves, "n_points": len(records)}
        )
    return result


def histogram_charts(data: ReportData, chart_list: ChartList) -> list[dict[str, Any]]:
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


def gap_chart(
    data: ReportData, values: dict[str, dict[str, float | None]], chart_list: ChartList
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


def sweeps(
    data: ReportData, values: dict[str, dict[str, float | None]], chart_list: ChartList
) -> tuple[list[dict[str, Any]], int]:
    completed = [m for m in data.models if m["status"] == "completed"]
    found = []
    for parameter in SWEEP_PARAMETERS:
        groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for model in completed:
            if isinstance(model[parameter], (int, float)):
                groups[configuration(model, without=parameter)].append(model)
        for key, models in groups.items():
            settings = sorted({float(m[parameter]) for m in models})
            if len(settings) < 2:
                continue
            found.append((parameter, key, models, settings))
    result = []
    bootstrap = bootstrap_intervals(data)
    for parameter, key, models, settings in found[:MAX_SWEEP_CHARTS]:
        records = []
        for setting in settings:
            at = [m for m in models if float(m[parameter]) == setting]
            for column, label, group in SWEEP_QUANTITIES:
                summary = stat([values[m["model_key"]][column] for m in at])
                if summary is not None:
                    low, high, _ = cell_interval(summary, column, [m["model_key"] for m in at], bootstrap)
                    records.append(
                        {
                            "value": setting,
                            "quantity": label,
                            "group": group,
                            "mean": round(100 * summary["mean"], 4),
                            "low": None if low is None else round(100 * low, 4),
                            "high": None if high is None else round(100 * high, 4),
                        }
                    )
        if not records:
            continue
        fixed = dict(key)
        title = f"{fixed.get('dataset')} · {fixed.get('defense')} · {parameter}"
        details = ", ".join(
            f"{k}={fmt_param(v)}"
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
                "settings": [fmt_param(s) for s in settings],
                "n_models": len(models),
            }
        )
    return result, len(found)
