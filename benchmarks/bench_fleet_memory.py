"""Benchmark: peak memory and time of a reference-attack fleet scored in memory vs model by model from disk.

The fleet is bench_reference_attacks.py's synthetic one (M models on random halves of N examples, 3
perturbations: benign, PGD, verified), imported into a real store. `score_attacks(db, ["lira_online",
"rmia_offline"], force=True, resamples=0, calibration_models=0)` runs twice per size, each in a fresh
subprocess so that its peak resident memory (getrusage ru_maxrss; memmapped pages that are resident count)
is its own: once with `fleet_memory` above the in-memory estimate (the in-memory path, the baseline) and
once with `--budget` (the disk path, `attacks/fleet_disk.py`). Both runs' stored scores are checksummed
(every (model, example, score) bit pattern): the ratio only counts if they are identical. Sizes whose
in-memory estimate exceeds `--memory-cap` run the disk path only (the in-memory row is the estimate).

Usage: python benchmarks/bench_fleet_memory.py [--sizes 64x10000,256x20000] [--budget 1GB]
       [--memory-cap 3GB] [--store-dir DIR] [--out benchmarks/results/bench_fleet_memory.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ATTACKS = ["lira_online", "rmia_offline"]


def worker(db: Path, fleet_memory: str) -> None:
    from robmia_db.attacks import relations, scoring
    from robmia_db.attacks.scoring import score_attacks

    made = []
    original = relations.DiskFleet

    class Counted(original):  # the real class, counted: which path ran
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(1)

    relations.DiskFleet = Counted
    # the peak up to the first write transaction: lira_online's fleet phase, before any metrics are written
    before_write = []
    write = scoring.write_results

    def measured(*args, **kwargs):
        before_write.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return write(*args, **kwargs)

    scoring.write_results = measured
    start = time.perf_counter()
    outcomes = score_attacks(
        db, ATTACKS, force=True, resamples=0, calibration_models=0, fleet_memory=fleet_memory
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss_bytes": peak,
                "peak_rss_before_write_bytes": before_write[0],  # the first attack's fleet phase
                "disk_fleets": len(made),
                "scored": {o.attack.name: o.scored for o in outcomes},
            }
        )
    )


def checksum(db: Path) -> list:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(
            "SELECT attack, count(*), bit_xor(hash(model_key, example_id, score)) FROM v_scores "
            "WHERE attack IN ('lira_online', 'rmia_offline') GROUP BY attack ORDER BY attack"
        ).fetchall()


def estimates(db: Path) -> dict:
    from robmia_db.attacks import fleet_disk
    from robmia_db.attacks.planning import plan_units, read_state, reference_models
    from robmia_db.attacks.registry import load_registry
    from robmia_db.store.connection import reading

    registry = load_registry()
    out = {}
    with reading(db) as con:
        state = read_state(con)
        for name in ATTACKS:
            units, _ = plan_units(registry.get(name), state, reference_models(state), None)
            group = [u for u in units if u.perturbation == units[0].perturbation]
            found = fleet_disk.estimate(con, group)
            out[name] = {"in_memory": found.in_memory, "bounded": found.bounded, "rows": found.rows}
    return out


def run(db: Path, fleet_memory: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", str(db), fleet_memory],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"worker failed: {done.stderr.strip().splitlines()[-1:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["checksum"] = checksum(db)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="64x10000,256x20000")
    parser.add_argument("--budget", default="1GB", help="--fleet-memory of the disk path")
    parser.add_argument("--memory-cap", default="3GB", help="skip the in-memory run above this estimate")
    parser.add_argument("--store-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/bench_fleet_memory.json")
    parser.add_argument("--worker", nargs=2, default=None)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), args.worker[1])
        return
    from bench_reference_attacks import build_store

    from robmia_db.attacks.fleet_disk import format_bytes, parse_size

    cap = parse_size(args.memory_cap)
    rows = []
    if args.store_dir:
        Path(args.store_dir).mkdir(parents=True, exist_ok=True)
    for size in args.sizes.split(","):
        n_models, n = (int(x) for x in size.split("x"))
        folder = Path(tempfile.mkdtemp(prefix=f"fleet{size}-", dir=args.store_dir))
        start = time.perf_counter()
        db = build_store(folder, n_models, n)
        built = time.perf_counter() - start
        est = estimates(db)
        row = {
            "models": n_models,
            "examples": n,
            "perturbations": 3,
            "build_seconds": built,
            "estimates": est,
        }
        row["disk"] = run(db, args.budget)
        if max(e["in_memory"] for e in est.values()) <= cap:
            row["memory"] = run(db, "1TB")
            row["identical_scores"] = row["memory"]["checksum"] == row["disk"]["checksum"]
            row["time_ratio_disk_over_memory"] = row["disk"]["seconds"] / row["memory"]["seconds"]
            row["rss_ratio_disk_over_memory"] = (
                row["disk"]["peak_rss_bytes"] / row["memory"]["peak_rss_bytes"]
            )
        rows.append(row)
        line = (
            f"{n_models} x {n:,} x 3: disk path (--fleet-memory {args.budget}) {row['disk']['seconds']:.1f} s, "
            f"peak {format_bytes(row['disk']['peak_rss_bytes'])}, before the write "
            f"{format_bytes(row['disk']['peak_rss_before_write_bytes'])} ({row['disk']['disk_fleets']} fleets on disk)"
        )
        if "memory" in row:
            line += (
                f"; in memory {row['memory']['seconds']:.1f} s, peak {format_bytes(row['memory']['peak_rss_bytes'])}"
                f", before the write {format_bytes(row['memory']['peak_rss_before_write_bytes'])}"
                f" ({row['memory']['disk_fleets']} on disk); time {row['time_ratio_disk_over_memory']:.2f}x, "
                f"peak {row['rss_ratio_disk_over_memory']:.2f}x; identical scores: {row['identical_scores']}"
            )
        else:
            line += f"; in memory not run (estimated {format_bytes(est['lira_online']['in_memory'])} > cap)"
        print(line, flush=True)
        for db_file in folder.glob("*"):
            db_file.unlink()
        folder.rmdir()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.node(), "budget": args.budget, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
