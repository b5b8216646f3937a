"""Benchmark (script, not a test): stratified bootstrap intervals against the point metrics, same run.

1,000 resamples of 20 models x 10,000 examples (float32 softmax-like confidences, ~30 % tied at 1.0f),
timed against the point metrics of the same rows through DuckDB (`compute_metrics`, what `score` runs)
and through the numpy reference. Two membership layouts:

- equal split sizes (the goal's case): every model has 5,000 members and 5,000 non-members, a different
  random member set per model, as the models of one spec have (one ``n_train``, whatever the split seed);
  the protocol's draws depend only on the seed, P and N, so the 20 models share them;
- varying split sizes (the worst case): membership drawn per row, so every model has its own P and N and
  nothing is shared.

Also timed: the previous vectorised path (resampled positions mapped to ranks over every distinct score,
one bincount per replicate; on 2 models, extrapolated) and the plain per-replicate loop (a few replicates,
extrapolated). Imports numpy, duckdb, pyarrow, scipy and our attacks layer; no torch.
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

from robmia_db.attacks.intervals import (
    RankedScores,
    _draw_block,
    _split,
    draw_positions,
    grouped_intervals,
    reference_replicates,
)
from robmia_db.attacks.metrics import compute_metrics, reference_metrics

DEFAULT_OUT = Path(__file__).parent / "results" / "bench_intervals.json"


def synthetic_signal(models: int, per_model: int, seed: int, equal_split: bool = True) -> pa.Table:
    rng = np.random.default_rng(seed)
    model = np.repeat(np.arange(models, dtype=np.int32), per_model)
    if equal_split:
        half = np.arange(per_model) < per_model // 2
        is_member = np.concatenate([rng.permutation(half) for _ in range(models)])
    else:
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


def previous_path(scores: np.ndarray, members: np.ndarray, n_resamples: int) -> dict[str, np.ndarray]:
    """The vectorised path this one replaced: positions -> ranks of every distinct score -> bincount."""
    m, n = _split(scores, members)
    ranked = RankedScores(m, n)
    rng = np.random.default_rng(0)
    chunk = max(1, 2_000_000 // max(m.size, n.size, ranked.n_distinct))
    parts: dict[str, list[np.ndarray]] = {}
    done = 0
    while done < n_resamples:
        rows = min(chunk, n_resamples - done)
        mp = np.empty((rows, m.size), dtype=np.int64)
        npos = np.empty((rows, n.size), dtype=np.int64)
        for i, (a, b) in enumerate(draw_positions(rng, m.size, n.size, rows)):
            mp[i], npos[i] = a, b
        for name, values in ranked.metrics(mp, npos).items():
            parts.setdefault(name, []).append(values)
        done += rows
    return {name: np.concatenate(v) for name, v in parts.items()}


def measure(args: argparse.Namespace, equal_split: bool) -> dict:
    table = synthetic_signal(args.models, args.examples, args.seed, equal_split)
    con = duckdb.connect(":memory:")
    con.execute("SET threads = 1")
    con.register("signal", table)
    point_wall, point_cpu, _ = best_of(lambda: compute_metrics(con, "signal", ["model"]), args.repeats)
    scores = table.column("score").to_numpy()
    members = table.column("is_member").to_numpy(zero_copy_only=False)
    bounds = np.arange(args.models + 1) * args.examples

    def numpy_point():
        return [reference_metrics(scores[a:b], members[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    numpy_wall, _, _ = best_of(numpy_point, args.repeats)
    boot_wall, boot_cpu, intervals = best_of(
        lambda: grouped_intervals(table, ["model"], n_resamples=args.resamples, seed=0), args.boot_repeats
    )
    # the protocol's draws alone (one block per distinct (P, N), as the bootstrap shares them)
    split = [_split(scores[a:b], members[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    sizes_pn = sorted({(m.size, n.size) for m, n in split})

    def draws_only():
        for P, N in sizes_pn:
            rng = np.random.default_rng(0)
            for _ in range(0, args.resamples, 100):
                _draw_block(rng, P, N, 100)

    draws_wall, draws_cpu, _ = best_of(draws_only, 1)
    # the same run's point metrics again, so that a load change during the bootstrap shows in the spread
    point_after, _, _ = best_of(lambda: compute_metrics(con, "signal", ["model"]), args.repeats)
    sizes = sorted({int(members[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])})
    return {
        "tied_share": float(np.mean(scores == 1.0)),
        "distinct_member_counts": len(sizes),
        "point_duckdb_seconds": point_wall,
        "point_duckdb_seconds_after": point_after,
        "point_duckdb_cpu_seconds": point_cpu,
        "point_numpy_seconds": numpy_wall,
        "bootstrap_seconds": boot_wall,
        "bootstrap_cpu_seconds": boot_cpu,
        "ratio_vs_point_duckdb": boot_wall / point_wall,
        "ratio_vs_point_duckdb_after": boot_wall / point_after,
        "ratio_vs_point_numpy": boot_wall / numpy_wall,
        # CPU time of this process (DuckDB runs on one thread): steadier than wall time on a loaded machine
        "cpu_ratio_vs_point_duckdb": boot_cpu / point_cpu,
        "draws_only_seconds": draws_wall,
        "draws_only_cpu_ratio_vs_point_duckdb": draws_cpu / point_cpu,
        "auc_interval_width_mean": float(
            np.mean(np.asarray(intervals.column("auc_ci_high")) - np.asarray(intervals.column("auc_ci_low")))
        ),
        "_scores": scores,
        "_members": members,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--examples", type=int, default=10_000, help="examples per model")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5, help="best-of rounds for the point metrics")
    parser.add_argument("--boot-repeats", type=int, default=2, help="best-of rounds for the bootstrap")
    parser.add_argument("--previous-models", type=int, default=2, help="models timed on the previous path")
    parser.add_argument("--loop-replicates", type=int, default=20, help="plain-loop replicates timed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    # scipy's sparse module is imported on first use (once per `score` run): paid here, outside the timings
    warm = synthetic_signal(2, 100, 1)
    import_wall, _, _ = best_of(lambda: grouped_intervals(warm, ["model"], n_resamples=2), 1)
    equal = measure(args, equal_split=True)
    varying = measure(args, equal_split=False)
    scores, members = equal.pop("_scores"), equal.pop("_members")
    varying.pop("_scores"), varying.pop("_members")
    n = args.examples
    previous_wall, _, _ = best_of(
        lambda: [
            previous_path(scores[i * n : (i + 1) * n], members[i * n : (i + 1) * n], args.resamples)
            for i in range(args.previous_models)
        ],
        1,
    )
    previous_estimate = previous_wall / args.previous_models * args.models
    loop_wall, _, _ = best_of(lambda: reference_replicates(scores[:n], members[:n], args.loop_replicates), 1)
    loop_estimate = loop_wall / args.loop_replicates * args.resamples * args.models
    load_after = os.getloadavg()[0]

    result = {
        "models": args.models,
        "examples_per_model": n,
        "resamples": args.resamples,
        "equal_split_sizes": equal,
        "varying_split_sizes": varying,
        "first_call_seconds_with_scipy_import": import_wall,
        "previous_vectorised_seconds_estimate": previous_estimate,
        "speedup_vs_previous_vectorised": previous_estimate / equal["bootstrap_seconds"],
        "plain_loop_seconds_estimate": loop_estimate,
        "speedup_vs_plain_loop": loop_estimate / equal["bootstrap_seconds"],
        "load_average": [load_before, load_after],
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    }
    head = f"{args.resamples} resamples x {args.models} models x {n} examples"
    for label, r in (("equal split sizes", equal), ("varying split sizes", varying)):
        print(
            f"{head}, {label} ({r['distinct_member_counts']} distinct P): bootstrap {r['bootstrap_seconds']:.2f} s "
            f"(cpu {r['bootstrap_cpu_seconds']:.2f} s); point metrics DuckDB {r['point_duckdb_seconds']:.3f} s "
            f"(after: {r['point_duckdb_seconds_after']:.3f} s), numpy {r['point_numpy_seconds']:.3f} s"
        )
        print(
            f"  ratio vs point metrics: {r['ratio_vs_point_duckdb']:.1f}x DuckDB "
            f"({r['ratio_vs_point_duckdb_after']:.1f}x vs the later timing), "
            f"{r['ratio_vs_point_numpy']:.1f}x numpy reference; CPU time {r['cpu_ratio_vs_point_duckdb']:.1f}x "
            f"DuckDB's; goal < 10x"
        )
        print(
            f"  the protocol's draws alone: {r['draws_only_seconds']:.2f} s, CPU time "
            f"{r['draws_only_cpu_ratio_vs_point_duckdb']:.1f}x the point metrics'"
        )
    print(
        f"previous vectorised path (from {args.previous_models} models): ~{previous_estimate:.1f} s "
        f"({result['speedup_vs_previous_vectorised']:.1f}x slower); plain per-replicate loop (from "
        f"{args.loop_replicates} replicates): ~{loop_estimate:.0f} s ({result['speedup_vs_plain_loop']:.0f}x "
        f"slower); first call incl. scipy import {import_wall:.2f} s; load average {load_before:.1f} -> "
        f"{load_after:.1f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
