"""Benchmark (script, not a test): store management costs, each against a baseline measured in the same run.

1. Storage format: the same models written through `ingest.write_model` into a store created in the
   compatible format (DuckDB storage v1.0.0, what robmia-db creates) and into one in DuckDB 2's default
   (v2.0.0): ingest time and file size, ratio v1.0.0 / v2.0.0.
2. `rm` + `gc`: half of the models removed (`housekeeping.remove`), then the file size after DuckDB's
   CHECKPOINT alone and after `gc`'s compaction, against the size of a store written with only the kept
   models (the baseline: the smallest file those rows can give). Compaction time against a plain file copy.
3. `export`: the per-sample view v_signals streamed to Parquet by `COPY ... TO` (`export.export_views`),
   against fetching it into Arrow and writing it with pyarrow (what a user would do by hand); time and peak
   resident memory of each, in a fresh process.
Imports numpy, pyarrow, duckdb and our store layer; no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from robmia_db.store import ingest
from robmia_db.store.connection import checkpoint_dir, reading, writing
from robmia_db.store.housekeeping import collect_garbage, remove
from robmia_db.store.signals import signal_table, signals_from_logits
from robmia_db.store.tables import Model

DEFAULT_OUT = Path(__file__).parent / "results" / "bench_store.json"


def in_subprocess(code: str) -> tuple[float, int]:
    """(seconds of `code` alone, peak resident bytes of the process) in a fresh interpreter."""
    wrapper = (
        "import time\n"
        "from robmia_db.store.connection import reading\n"  # imports paid before the clock starts
        "start = time.perf_counter()\n"
        f"{code}\n"
        # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak here
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "print(time.perf_counter() - start, int(hwm) * 1024)"
    )
    output = subprocess.run(
        [sys.executable, "-c", wrapper], capture_output=True, text=True, check=True
    ).stdout
    seconds, peak = output.strip().splitlines()[-1].split()  # DuckDB may draw a progress bar first
    return float(seconds), int(peak)


def model_rows(index: int, rows: int, classes: int):
    rng = np.random.default_rng(index)
    labels = rng.integers(0, classes, rows)
    logits = (rng.normal(size=(rows, classes)) * 4).astype(np.float32)
    logits[np.arange(rows), labels] += 3
    key = f"{index:016x}"
    is_member = np.arange(rows) % 2 == 0
    table = signal_table(
        f"s{key[1:]}", key, np.arange(rows), labels, is_member, signals_from_logits(logits, labels)
    )
    record = ingest.PerturbationRecord(f"s{key[1:]}", key, "benign", "benign", None, {}, table)
    model = Model(
        model_key=key, model_name=f"bench/m{index}", experiment="bench", origin="trained", dataset="d"
    )
    membership = pa.table({"example_id": pa.array(np.arange(rows, dtype=np.int32)), "is_member": is_member})
    return model, membership, record


def build(path: Path, models: list[int], rows: int, classes: int, storage: str | None) -> float:
    """A store holding the given models; returns the seconds spent in write_model."""
    if storage is not None:  # a store in DuckDB 2's default format, as robmia-db wrote before
        duckdb.connect(str(path), config={"storage_compatibility_version": storage}).close()
    spent = 0.0
    with writing(path) as con:
        for index in models:
            model, membership, record = model_rows(index, rows, classes)
            start = time.perf_counter()
            ingest.write_model(con, model, membership, None, [record])
            spent += time.perf_counter() - start
        con.execute("CHECKPOINT")
    checkpoint_dir(path).mkdir(exist_ok=True)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--rows", type=int, default=200_000, help="signal rows per model")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    result: dict = {"models": args.models, "rows_per_model": args.rows, "classes": args.classes}
    everything = list(range(args.models))
    kept = everything[::2]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # 1. storage format
        compat, default = folder / "compat.duckdb", folder / "default.duckdb"
        build(folder / "warmup.duckdb", everything[:1], args.rows, args.classes, None)  # first-call costs
        timings: dict[str, list[float]] = {"v1.0.0": [], "v2.0.0": []}
        for storage in ("v1.0.0", "v2.0.0", "v2.0.0", "v1.0.0"):  # ABBA: drift on a shared machine cancels
            path = compat if storage == "v1.0.0" else default
            for stale in (path, path.with_name(path.name + ".wal")):
                stale.unlink(missing_ok=True)
            timings[storage].append(
                build(path, everything, args.rows, args.classes, None if storage == "v1.0.0" else storage)
            )
        seconds_compat, seconds_default = sum(timings["v1.0.0"]) / 2, sum(timings["v2.0.0"]) / 2
        with reading(compat) as con:
            format_compat = con.execute(
                "SELECT tags FROM duckdb_databases() WHERE database_name = 'compat'"
            ).fetchall()
        result["storage"] = {
            "compat_format": str(format_compat),
            "ingest_s": timings,
            "bytes": {"v1.0.0": compat.stat().st_size, "v2.0.0": default.stat().st_size},
            "ratio_ingest_time": seconds_compat / seconds_default,
            "ratio_bytes": compat.stat().st_size / default.stat().st_size,
        }
        print(
            f"storage v1.0.0 vs v2.0.0 ({args.models} x {args.rows:,} rows): ingest {seconds_compat:.2f} s vs "
            f"{seconds_default:.2f} s (ratio {result['storage']['ratio_ingest_time']:.2f}), file "
            f"{compat.stat().st_size / 1e6:.1f} MB vs {default.stat().st_size / 1e6:.1f} MB "
            f"(ratio {result['storage']['ratio_bytes']:.3f})"
        )

        # 2. rm + gc against a store built with only the kept models
        full = compat.stat().st_size
        start = time.perf_counter()
        remove(compat, models=[f"{i:016x}" for i in everything if i not in kept])
        rm_seconds = time.perf_counter() - start
        after_rm = compat.stat().st_size
        copy_start = time.perf_counter()
        shutil.copy(compat, folder / "copy.duckdb")
        copy_seconds = time.perf_counter() - copy_start
        start = time.perf_counter()
        garbage = collect_garbage(compat, compact=False)
        checkpoint_seconds = time.perf_counter() - start
        after_checkpoint = compat.stat().st_size
        start = time.perf_counter()
        garbage = collect_garbage(compat)
        gc_seconds = time.perf_counter() - start
        after_gc = garbage.size_after
        baseline = folder / "kept.duckdb"
        build(baseline, kept, args.rows, args.classes, None)
        result["gc"] = {
            "bytes_full": full, "bytes_after_rm": after_rm, "bytes_after_checkpoint": after_checkpoint,
            "bytes_after_gc": after_gc, "bytes_kept_only": baseline.stat().st_size,
            "ratio_gc_to_kept_only": after_gc / baseline.stat().st_size,
            "rm_s": rm_seconds, "checkpoint_s": checkpoint_seconds, "gc_s": gc_seconds, "file_copy_s": copy_seconds,
            "ratio_gc_to_file_copy_time": gc_seconds / max(copy_seconds, 1e-9),
        }  # fmt: skip
        print(
            f"rm of {args.models - len(kept)} of {args.models} models: {rm_seconds:.2f} s; file {full / 1e6:.1f} MB -> "
            f"{after_rm / 1e6:.1f} MB after rm, {after_checkpoint / 1e6:.1f} MB after CHECKPOINT, "
            f"{after_gc / 1e6:.1f} MB after gc (a store of the kept models alone: "
            f"{baseline.stat().st_size / 1e6:.1f} MB, ratio {result['gc']['ratio_gc_to_kept_only']:.3f}); "
            f"gc {gc_seconds:.2f} s vs a file copy {copy_seconds:.2f} s"
        )

        # 3. export of v_signals: COPY ... TO vs fetch to Arrow + pyarrow writer
        # each way in a fresh process, so that its peak resident memory is its own
        export_seconds, export_peak = in_subprocess(
            f"from robmia_db.store.export import export_views; "
            f"export_views({str(compat)!r}, {str(folder / 'export')!r}, ['v_signals'])"
        )
        by_hand_seconds, by_hand_peak = in_subprocess(
            "import pyarrow.parquet as pq; from robmia_db.store.connection import reading\n"
            f"with reading({str(compat)!r}) as con:\n"
            "    table = con.sql('SELECT * FROM v_signals').to_arrow_table()\n"
            f"pq.write_table(table, {str(folder / 'by_hand.parquet')!r}, compression='zstd')"
        )
        exported_path = folder / "export" / "v_signals.parquet"
        exported = type("Exported", (), {"rows": pq.read_metadata(exported_path).num_rows,
                                         "bytes": exported_path.stat().st_size})  # fmt: skip
        assert pq.read_metadata(folder / "by_hand.parquet").num_rows == exported.rows
        result["export"] = {
            "rows": exported.rows, "seconds": export_seconds, "by_hand_seconds": by_hand_seconds,
            "ratio_time": export_seconds / by_hand_seconds, "peak_rss_bytes": export_peak,
            "by_hand_peak_rss_bytes": by_hand_peak, "parquet_bytes": exported.bytes,
        }  # fmt: skip
        print(
            f"export v_signals ({exported.rows:,} rows): {export_seconds:.2f} s vs fetch + pyarrow "
            f"{by_hand_seconds:.2f} s (ratio {result['export']['ratio_time']:.2f}); peak resident memory "
            f"{export_peak / 1e6:.0f} MB vs {by_hand_peak / 1e6:.0f} MB"
        )
    result["machine"] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "duckdb": duckdb.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
