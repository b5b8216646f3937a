"""Report tables, shaped for the template: the paper's table, per-model leaderboards, the overview, timings."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

from robmia_db.report.formatting import fmt_param, percent, raw
from robmia_db.report.queries import (
    KINDS,
    PAPER_ATTACK,
    ReportData,
    configuration,
    defense_rank,
    model_sort_key,
)

LEADERBOARD_COLUMNS = [
    ("balanced_accuracy", "balanced acc."),
    ("auc", "AUC"),
    ("tpr_at_fpr_1e3", "TPR @ 0.1% FPR"),
    ("tpr_at_fpr_1e2", "TPR @ 1% FPR"),
    ("advantage", "advantage"),
    ("calibrated_accuracy", "calibrated acc."),
]


def stat(values: list[float | None]) -> dict[str, Any] | None:
    """Mean and sample standard deviation (n - 1) over seeds; None when no seed has the value."""
    present = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not present:
        return None
    return {
        "mean": statistics.fmean(present),
        "std": statistics.stdev(present) if len(present) > 1 else None,
        "n": len(present),
    }


def paper_values(data: ReportData) -> dict[str, dict[str, float | None]]:
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


def paper_tables(data: ReportData, values: dict[str, dict[str, float | None]]) -> list[dict[str, Any]]:
    completed = [m for m in data.models if m["status"] == "completed"]
    tables = []
    for dataset in sorted({m["dataset"] or "" for m in completed}):
        models = [m for m in completed if (m["dataset"] or "") == dataset]
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for model in models:
            groups.setdefault(configuration(model), []).append(model)
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
                f"{p}={fmt_param(first[p])}"
                for p in varying
                if not (p == "eps" and first["defense"] == "natural")
            )
            cells = {}
            for column, _label in PAPER_COLUMNS:
                cells[column] = stat([values[m["model_key"]][column] for m in members])
            rows.append(
                {
                    "key": "|".join(f"{k}={v}" for k, v in key),
                    "defense": first["defense"] or "—",
                    "detail": detail,
                    # a configuration's models: its seeds, or a fleet's models (one seed, other member sets)
                    "n_models": len(members),
                    "n_seeds": len({m["seed"] for m in members if m["seed"] is not None}),
                    "seeds": sorted({m["seed"] for m in members if m["seed"] is not None}),
                    "model_keys": [m["model_key"] for m in members],
                    "cells": cells,
                    "sort": model_sort_key(first),
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
                "adv_eps": [fmt_param(float(e)) for e in adv_eps],
            }
        )
    return tables


def leaderboards(data: ReportData) -> list[dict[str, Any]]:
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
                                "raw": raw(r[c["key"]]),
                                "text": percent(r[c["key"]]),
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


def overview(data: ReportData) -> dict[str, Any]:
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
                "defenses": sorted({m["defense"] or "—" for m in subset}, key=defense_rank),
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


def timings(data: ReportData) -> dict[str, Any]:
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
