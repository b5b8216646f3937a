"""Benchmark (script, not a test): signal ingest rows/s through `store.ingest.write_model` vs raw Arrow -> DuckDB.

Ours: one perturbation of N rows (10-class `probs` list column) written by `write_model` into a fresh
store (uniqueness check, accuracies, idempotent delete, metadata row, Arrow insert, one transaction).
Baseline: the same Arrow table inserted with a bare `INSERT INTO signals SELECT * FROM arrow_table` in one
transaction into an identical empty table of another fresh store. Both stores are files opened by
`store.connection.connect` (same DuckDB threads). Rounds interleave the two, alternating which goes first;
medians give the ratio. A second scenario ingests into stores that already hold `--existing-rows` rows of
other models, where `write_model`'s delete-before-insert must not scan its way to a slowdown.
Imports numpy, pyarrow, duckdb and our store layer; no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from robmia_db.store import ingest
from robmia_db.store.connection import connect
from robmia_db.store.signals import signal_table, signals_from_logits
from robmia_db.store.tables import Model

DEFAULT_OUT = Path(__file__).parent / "results" / "bench_ingest.json"


def synthetic_signals(
    rows: int, classes: int, seed: int, signal_key: str = "s" * 16, model_key: str = "m" * 16
):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows)
    logits = (rng.normal(size=(rows, classes)) * 4).astype(np.float32)
    logits[np.arange(rows), labels] += 3
    columns = signals_from_logits(logits, labels)
    return signal_table(signal_key, model_key, np.arange(rows), labels, np.arange(rows) % 2 == 0, columns)


def fresh_store(folder: Path, name: str, template: Path | None, threads: int) -> duckdb.DuckDBPyConnection:
    path = folder / f"{name}.duckdb"
    if template is not None:
        shutil.copy(template, path)
    return connect(path, read_only=False, create=True, threads=threads)


def ours(con: duckdb.DuckDBPyConnection, table: pa.Table) -> None:
    record = ingest.PerturbationRecord(
        table["signal_key"][0].as_py(), table["model_key"][0].as_py(), "pgd", "adversarial", 0.1, {}, table
    )
    model = Model(
        model_key=record.model_key,
        model_name="bench/m",
        experiment="bench",
        origin="trained",
        dataset="digits",
    )
    ingest.write_model(con, model, None, None, [record])


def raw(con: duckdb.DuckDBPyConnection, table: pa.Table) -> None:
    con.register("arrow_table", table)
    con.execute("BEGIN TRANSACTION")
    con.execute("INSERT INTO signals SELECT * FROM arrow_table")
    con.execute("COMMIT")
    con.unregister("arrow_table")


def scenario(table: pa.Table, repeats: int, threads: int, template: Path | None, folder: Path) -> dict:
    seconds: dict[str, list[float]] = {"ours": [], "raw": []}
    cpu: dict[str, list[float]] = {"ours": [], "raw": []}
    functions = {"ours": ours, "raw": raw}
    for round_index in range(repeats + 1):  # round 0 warms up (first Arrow scan, allocator)
        names = ["ours", "raw"] if round_index % 2 == 0 else ["raw", "ours"]
        for name in names:
            con = fresh_store(folder, f"{name}{round_index}", template, threads)
            try:
                wall_start, cpu_start = time.perf_counter(), time.process_time()
                functions[name](con, table)
                wall, used = time.perf_counter() - wall_start, time.process_time() - cpu_start
                stored = con.execute(
                    "SELECT count(*) FROM signals WHERE signal_key = ?", [table["signal_key"][0].as_py()]
                ).fetchone()[0]
                assert stored == table.num_rows, (name, stored)
            finally:
                con.close()
            (folder / f"{name}{round_index}.duckdb").unlink()
            if round_index:
                seconds[name].append(wall)
                cpu[name].append(used)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    median_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "wall_s": seconds,
        "cpu_s": cpu,
        "median_wall_s": median,
        "median_cpu_s": median_cpu,
        "rows_per_s": {k: table.num_rows / v for k, v in median.items()},
        "ratio_rows_per_s": median["raw"] / median["ours"],
        "ratio_rows_per_s_cpu": median_cpu["raw"] / median_cpu["ours"],
    }


def uniqueness_check_costs(table: pa.Table, repeats: int) -> dict:
    """Where write_model's extra time goes: its example-id uniqueness check vs a sort-based one."""
    record = ingest.PerturbationRecord("s", "m", "pgd", "adversarial", 0.1, {}, table)

    def sorted_check() -> bool:
        ids = np.sort(table.column("example_id").to_numpy())
        return bool((ids[1:] != ids[:-1]).all())

    timings: dict[str, list[float]] = {"ingest_check_unique_examples": [], "sort_and_compare": []}
    for _ in range(repeats):
        start = time.perf_counter()
        ingest._check_unique_examples(record)
        timings["ingest_check_unique_examples"].append(time.perf_counter() - start)
        start = time.perf_counter()
        assert sorted_check()
        timings["sort_and_compare"].append(time.perf_counter() - start)
    return {f"median_{k}_s": statistics.median(v) for k, v in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_500_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--existing-rows", type=int, default=6_000_000, help="rows already stored (0 = skip)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="DuckDB threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    table = synthetic_signals(args.rows, args.classes, seed=0)
    result: dict = {
        "rows": args.rows,
        "classes": args.classes,
        "duckdb_threads": args.threads,
        "repeats": args.repeats,
        "goal_ratio": 0.7,
        "arrow_bytes": table.nbytes,
    }
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        folder = Path(tmp)
        result["empty_store"] = scenario(table, args.repeats, args.threads, None, folder)
        result["uniqueness_check"] = uniqueness_check_costs(table, args.repeats)
        if args.existing_rows:
            template = folder / "template.duckdb"
            con = connect(template, read_only=False, create=True, threads=args.threads)
            per_model = args.rows
            for index in range(max(1, args.existing_rows // per_model)):
                other = synthetic_signals(per_model, args.classes, seed=index + 1,
                                          signal_key=f"{index:016x}", model_key=f"{index:016x}")  # fmt: skip
                raw(con, other)
            existing = con.execute("SELECT count(*) FROM signals").fetchone()[0]
            con.close()
            result["existing_rows"] = existing
            result["nonempty_store"] = scenario(table, args.repeats, args.threads, template, folder)
    result.update(
        {
            "load_average_1min_before": load_before,
            "load_average_1min_after": os.getloadavg()[0],
            "versions": {
                "duckdb": duckdb.__version__,
                "pyarrow": pa.__version__,
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
            "cpu_count": os.cpu_count(),
        }
    )
    for name in ("empty_store", "nonempty_store"):
        if name not in result:
            continue
        r = result[name]
        where = "empty store" if name == "empty_store" else f"store holding {result['existing_rows']:,} rows"
        print(
            f"{args.rows:,} rows x {args.classes} probs into a {where}: write_model "
            f"{r['rows_per_s']['ours'] / 1e6:.2f} M rows/s ({r['median_wall_s']['ours']:.3f} s), raw Arrow insert "
            f"{r['rows_per_s']['raw'] / 1e6:.2f} M rows/s ({r['median_wall_s']['raw']:.3f} s): ratio "
            f"{r['ratio_rows_per_s']:.3f} wall / {r['ratio_rows_per_s_cpu']:.3f} CPU (goal >= 0.7)"
        )
    check = result["uniqueness_check"]
    print(
        f"of which the example-id uniqueness check (np.unique): {check['median_ingest_check_unique_examples_s']:.3f} s; "
        f"a sort-and-compare check takes {check['median_sort_and_compare_s']:.3f} s"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
