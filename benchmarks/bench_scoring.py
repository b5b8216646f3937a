"""Benchmark (script, not a test): all metrics of one attack over many models in one DuckDB query.

Compares `compute_metrics` (grouped by model) with scikit-learn's `roc_curve` + `roc_auc_score` run
model by model on the same arrays, and with the numpy sort-based reference. Imports numpy, duckdb,
pyarrow, scikit-learn and our metrics module; no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import sklearn
from sklearn.metrics import roc_auc_score, roc_curve

from robmia_db.attacks.metrics import compute_metrics, reference_metrics

DEFAULT_OUT = Path(__file__).parent / "results" / "bench_scoring.json"


def synthetic_signal(rows: int, models: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float32 true-label confidences like a softmax's: members a bit more confident, ~30% exactly 1.0f."""
    rng = np.random.default_rng(seed)
    per_model = rows // models
    model = np.repeat(np.arange(models, dtype=np.int32), per_model)
    is_member = rng.random(model.size) < 0.5
    # 1 - exp(-x) in float32 is exactly 1.0 once exp(-x) < 2**-25, i.e. x > ~17.3: the saturation share
    # follows from the gamma tail (scale chosen to land near 30% overall).
    shape = np.where(is_member, 4.2, 3.8)
    x = rng.gamma(shape, 3.6)
    scores = (1.0 - np.exp(-x)).astype(np.float32).astype(np.float64)
    return model, scores, is_member


def time_interleaved(
    calls: dict[str, Callable[[], object]], repeats: int
) -> tuple[dict[str, float], dict[str, float], dict]:
    """Best-of-`repeats` wall and CPU seconds per call; rounds interleave the calls.

    Interleaving spreads load spikes of a shared machine over all methods alike. CPU time (all threads
    of this process) is the steadier number when other jobs compete for the cores.
    """
    best_wall = dict.fromkeys(calls, float("inf"))
    best_cpu = dict.fromkeys(calls, float("inf"))
    results: dict[str, object] = {}
    for _ in range(repeats):
        for name, function in calls.items():
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            results[name] = function()
            best_wall[name] = min(best_wall[name], time.perf_counter() - wall_start)
            best_cpu[name] = min(best_cpu[name], time.process_time() - cpu_start)
    return best_wall, best_cpu, results


def sklearn_all_models(
    model: np.ndarray, scores: np.ndarray, is_member: np.ndarray, models: int
) -> list[dict]:
    """The same metrics the way a notebook gets them: per model, roc_curve + roc_auc_score."""
    bounds = np.searchsorted(model, np.arange(models + 1))
    out = []
    for m in range(models):
        model_scores = scores[bounds[m] : bounds[m + 1]]
        model_members = is_member[bounds[m] : bounds[m + 1]]
        fpr, tpr, _ = roc_curve(model_members, model_scores)
        metrics = {"auc": roc_auc_score(model_members, model_scores)}
        metrics["balanced_accuracy"] = max(0.5, float(np.max(0.5 * (tpr + 1.0 - fpr))))
        for name, level in (("tpr_at_fpr_0", 0.0), ("tpr_at_fpr_1e3", 1e-3), ("tpr_at_fpr_1e2", 1e-2)):
            metrics[name] = float(tpr[fpr <= level].max())
        out.append(metrics)
    return out


def numpy_all_models(model: np.ndarray, scores: np.ndarray, is_member: np.ndarray, models: int) -> list[dict]:
    bounds = np.searchsorted(model, np.arange(models + 1))
    return [
        reference_metrics(scores[bounds[m] : bounds[m + 1]], is_member[bounds[m] : bounds[m + 1]])
        for m in range(models)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="signal rows in all (default 1e7)")
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="DuckDB threads")
    parser.add_argument(
        "--repeats", type=int, default=3, help="best-of rounds, each timing every method once"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    model, scores, is_member = synthetic_signal(args.rows, args.models, args.seed)
    saturated = float(np.mean(scores == 1.0))
    distinct_per_model = float(
        np.mean([np.unique(scores[model == m]).size for m in range(min(args.models, 3))])
    )

    con = duckdb.connect(":memory:")
    con.execute(f"SET threads = {args.threads}")
    con.register("signal_arrow", pa.table({"model": model, "score": scores, "is_member": is_member}))
    con.execute("CREATE TABLE signal AS SELECT * FROM signal_arrow")

    seconds, cpu_seconds, results = time_interleaved(
        {
            "duckdb_table": lambda: compute_metrics(con, "signal", ["model"]),
            "duckdb_arrow": lambda: compute_metrics(con, "signal_arrow", ["model"]),
            "sklearn": lambda: sklearn_all_models(model, scores, is_member, args.models),
            "numpy": lambda: numpy_all_models(model, scores, is_member, args.models),
        },
        args.repeats,
    )
    duck_seconds, duck_arrow_seconds = seconds["duckdb_table"], seconds["duckdb_arrow"]
    sk_seconds, np_seconds = seconds["sklearn"], seconds["numpy"]
    duck_table, sk_results, np_results = results["duckdb_table"], results["sklearn"], results["numpy"]

    duck_rows = duck_table.to_pylist()
    max_auc_diff = max(abs(d["auc"] - s["auc"]) for d, s in zip(duck_rows, sk_results, strict=True))
    max_bacc_diff = max(
        abs(d["balanced_accuracy"] - s["balanced_accuracy"])
        for d, s in zip(duck_rows, sk_results, strict=True)
    )
    max_tpr_diff = max(
        abs(d[k] - s[k])
        for d, s in zip(duck_rows, sk_results, strict=True)
        for k in ("tpr_at_fpr_0", "tpr_at_fpr_1e3", "tpr_at_fpr_1e2")
    )
    integers_equal = all(
        d[k] == r[k]
        for d, r in zip(duck_rows, np_results, strict=True)
        for k in ("tp_at_best", "fp_at_best", "auc_numerator2", "n_members", "n_nonmembers")
    )

    result = {
        "rows": int(model.size),
        "models": args.models,
        "duckdb_threads": args.threads,
        "repeats": args.repeats,
        "saturated_share": saturated,
        "distinct_scores_per_model": distinct_per_model,
        "load_average_1min_before": load_before,
        "load_average_1min_after": os.getloadavg()[0],
        "duckdb_table_s": duck_seconds,
        "duckdb_arrow_s": duck_arrow_seconds,
        "sklearn_s": sk_seconds,
        "numpy_reference_s": np_seconds,
        "ratio_duckdb_vs_sklearn": duck_seconds / sk_seconds,
        "ratio_duckdb_arrow_vs_sklearn": duck_arrow_seconds / sk_seconds,
        "ratio_duckdb_vs_numpy": duck_seconds / np_seconds,
        "cpu_s": cpu_seconds,
        "cpu_ratio_duckdb_vs_sklearn": cpu_seconds["duckdb_table"] / cpu_seconds["sklearn"],
        "goal_ratio_vs_sklearn": 0.5,
        "max_abs_auc_diff_vs_sklearn": max_auc_diff,
        "max_abs_balanced_accuracy_diff_vs_sklearn": max_bacc_diff,
        "max_abs_tpr_at_fpr_diff_vs_sklearn": max_tpr_diff,
        "integer_numerators_equal_numpy": integers_equal,
        "versions": {
            "duckdb": duckdb.__version__,
            "numpy": np.__version__,
            "sklearn": sklearn.__version__,
            "python": platform.python_version(),
        },
        "cpu_count": os.cpu_count(),
    }
    print(
        f"{result['rows']:,} rows, {args.models} models, {saturated:.1%} saturated at 1.0, "
        f"~{distinct_per_model:,.0f} distinct scores per model, DuckDB threads {args.threads}"
    )
    print(f"DuckDB compute_metrics (table)  {duck_seconds:8.3f} s")
    print(f"DuckDB compute_metrics (arrow)  {duck_arrow_seconds:8.3f} s")
    print(f"scikit-learn roc_curve+auc      {sk_seconds:8.3f} s")
    print(f"numpy sort-based reference      {np_seconds:8.3f} s")
    print(f"ratio DuckDB / scikit-learn     {result['ratio_duckdb_vs_sklearn']:8.3f}  (goal <= 0.5)")
    print(f"ratio DuckDB (arrow) / sklearn  {result['ratio_duckdb_arrow_vs_sklearn']:8.3f}")
    print(f"ratio DuckDB / numpy reference  {result['ratio_duckdb_vs_numpy']:8.3f}")
    print(
        "CPU seconds (all threads): "
        + ", ".join(f"{name} {value:.3f}" for name, value in cpu_seconds.items())
        + f"; DuckDB/sklearn CPU ratio {result['cpu_ratio_duckdb_vs_sklearn']:.3f}"
    )
    print(
        f"vs sklearn max |diff|: AUC {max_auc_diff:.1e}, bal.acc {max_bacc_diff:.1e}, "
        f"TPR@FPR {max_tpr_diff:.1e}; integers equal numpy: {integers_equal}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
