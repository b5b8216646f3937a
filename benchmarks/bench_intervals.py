"""Benchmark (script, not a test): stratified bootstrap intervals against the point metrics, same run.

1,000 resamples of 20 models x 10,000 examples (float32 softmax-like confidences, ~30 % tied at 1.0f),
timed against the point metrics of the same rows through DuckDB (`compute_metrics`, what `score` runs)
and through the numpy reference; also the plain per-replicate loop on a few replicates (extrapolated), the
baseline the vectorised path replaces. Imports numpy, duckdb, pyarrow and our attacks layer; no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from robmia_db.attacks.intervals import grouped_intervals, reference_replicates
from robmia_db.attacks.metrics import compute_metrics, reference_metrics

DEFAULT_OUT = Path(__file__).parent / "results" / "bench_intervals.json"


def synthetic_signal(models: int, per_model: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    model = np.repeat(np.arange(models, dtype=np.int32), per_model)
    is_member = rng.random(model.size) < 0.5
    x = rng.gamma(np.where(is_member, 4.2, 3.8), 3.6)
    scores = (1.0 - np.exp(-x)).astype(np.float32).astype(np.float64)
    example_id = np.tile(np.arange(per_model, dtype=np.int32), models)
    return pa.table({"model": model, "example_id": example_id, "score": scores, "is_member": is_member})


def best_of(function, repeats: int) -> tuple[float, float, object]:
    wall = cpu = float("inf")
    result = None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        result = function()
        wall = min(wall, time.perf_counter() - w)
        cpu = min(cpu, time.process_time() - c)
    return wall, cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--examples", type=int, default=10_000, help="examples per model")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="best-of rounds for the point metrics")
    parser.add_argument("--loop-replicates", type=int, default=20, help="plain-loop replicates timed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    table = synthetic_signal(args.models, args.examples, args.seed)
    con = duckdb.connect(":memory:")
    con.execute("SET threads = 1")
    con.register("signal", table)
    point_wall, point_cpu, _ = best_of(lambda: compute_metrics(con, "signal", ["model"]), args.repeats)
    scores = table.column("score").to_numpy()
    members = table.column("is_member").to_numpy(zero_copy_only=False)
    bounds = np.arange(args.models + 1) * args.examples

    def numpy_point():
        return [reference_metrics(scores[a:b], members[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    numpy_wall, numpy_cpu, _ = best_of(numpy_point, args.repeats)
    boot_wall, boot_cpu, intervals = best_of(
        lambda: grouped_intervals(table, ["model"], n_resamples=args.resamples, seed=0), 1
    )
    loop_wall, _, _ = best_of(
        lambda: reference_replicates(scores[: args.examples], members[: args.examples], args.loop_replicates),
        1,
    )
    loop_estimate = loop_wall / args.loop_replicates * args.resamples * args.models
    load_after = os.getloadavg()[0]

    result = {
        "models": args.models,
        "examples_per_model": args.examples,
        "resamples": args.resamples,
        "tied_share": float(np.mean(scores == 1.0)),
        "point_duckdb_seconds": point_wall,
        "point_duckdb_cpu_seconds": point_cpu,
        "point_numpy_seconds": numpy_wall,
        "bootstrap_seconds": boot_wall,
        "bootstrap_cpu_seconds": boot_cpu,
        "ratio_vs_point_duckdb": boot_wall / point_wall,
        "ratio_vs_point_numpy": boot_wall / numpy_wall,
        "plain_loop_seconds_estimate": loop_estimate,
        "speedup_vs_plain_loop": loop_estimate / boot_wall,
        "auc_interval_width_mean": float(
            np.mean(np.asarray(intervals.column("auc_ci_high")) - np.asarray(intervals.column("auc_ci_low")))
        ),
        "load_average": [load_before, load_after],
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    }
    print(
        f"{args.resamples} resamples x {args.models} models x {args.examples} examples: "
        f"bootstrap {boot_wall:.2f} s (cpu {boot_cpu:.2f} s); point metrics DuckDB {point_wall:.3f} s, "
        f"numpy {numpy_wall:.3f} s"
    )
    print(
        f"ratio vs point metrics: {result['ratio_vs_point_duckdb']:.0f}x (DuckDB), "
        f"{result['ratio_vs_point_numpy']:.0f}x (numpy reference); goal < 10x"
    )
    print(
        f"plain per-replicate loop (estimated from {args.loop_replicates} replicates): {loop_estimate:.0f} s, "
        f"{result['speedup_vs_plain_loop']:.0f}x slower than the vectorised path; "
        f"load average {load_before:.1f} -> {load_after:.1f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
