"""Benchmark (script, not a test): peak memory and rows/s of `robmia-db import` on large output files.

Each import runs in a fresh interpreter (`import_outputs` into a new store) whose peak RSS is read from
`resource.getrusage`. "before" is the importer of a baseline git ref (default: main before streaming), run
from a `git archive` of it in the same run on the same files; "after" is this tree's streaming importer.
A file has N examples and two perturbations (`probs__benign`, `logits__pgd`, 10 classes): 2N signal rows.
The baseline grows with the file (the issue measured 6.1 GB at 1e7 rows), so it runs only at the sizes
given by --baseline-rows; peak memory at 1e8 rows is extrapolated from a straight-line fit of the measured
sizes (what each import holds is per-chunk plus per-example arrays, so the fit is honest only as a line).
Imports numpy only in this process; the imports themselves use our attacks and store layers (no torch).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(__file__).parent / "results" / "bench_memory.json"
CLASSES = 10

RUNNER = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from robmia_db.attacks.importers import import_outputs
start = time.perf_counter()
import_outputs(sys.argv[2], sys.argv[3], "npz", name="bench")
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_outputs(path: Path, n: int, seed: int = 0) -> None:
    """An npz of n examples: labels, membership, 10-class probabilities and logits (2n signal rows)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n).astype(np.int64)
    logits = rng.normal(0.0, 1.0, (n, CLASSES)).astype(np.float32)
    logits[np.arange(n), labels] += 3.0
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    np.savez(
        path, labels=labels, is_member=rng.random(n) < 0.5, probs__benign=probs, logits__pgd=logits - 1.0
    )


def measure(source: Path, npz: Path, folder: Path) -> dict[str, float]:
    db = folder / f"store-{time.monotonic_ns()}.duckdb"
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(source), str(db), str(npz)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if done.returncode != 0:
        raise SystemExit(f"import failed ({source}):\n{done.stderr[-2000:]}")
    for leftover in folder.glob(db.name + "*"):
        leftover.unlink()
    return json.loads(done.stdout.strip().splitlines()[-1])


def baseline_tree(ref: str, folder: Path) -> Path:
    target = folder / "baseline"
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "robmia_db"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=float, nargs="+", default=[1e6, 1e7], help="signal rows per import")
    parser.add_argument(
        "--baseline-rows", type=float, nargs="*", default=[1e6], help="sizes the baseline runs at"
    )
    parser.add_argument("--baseline-ref", default="main", help="git ref of the non-streaming importer")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        folder = Path(tmp)
        baseline = baseline_tree(args.baseline_ref, folder) if args.baseline_rows else None
        for rows in sorted(set(args.rows) | set(args.baseline_rows)):
            n = int(rows) // 2
            npz = folder / f"outputs-{n}.npz"
            write_outputs(npz, n)
            entry = {"rows": 2 * n, "file_mb": npz.stat().st_size / 2**20}
            if rows in args.rows:
                entry["after"] = measure(REPO, npz, folder)
            if baseline is not None and rows in args.baseline_rows:
                entry["before"] = measure(baseline, npz, folder)
            npz.unlink()
            for side in ("before", "after"):
                if side in entry:
                    entry[side]["rows_per_s"] = entry["rows"] / entry[side]["seconds"]
                    print(
                        f"{entry['rows']:>12,} rows  {side:6}  peak RSS {entry[side]['peak_rss_mb']:8.0f} MB  "
                        f"{entry[side]['rows_per_s']:>12,.0f} rows/s",
                        flush=True,
                    )
            if "before" in entry and "after" in entry:
                entry["peak_ratio_after_over_before"] = (
                    entry["after"]["peak_rss_mb"] / entry["before"]["peak_rss_mb"]
                )
                entry["speed_ratio_after_over_before"] = (
                    entry["after"]["rows_per_s"] / entry["before"]["rows_per_s"]
                )
                print(
                    f"{'':12}       ratio after/before: peak memory {entry['peak_ratio_after_over_before']:.2f}x, "
                    f"rows/s {entry['speed_ratio_after_over_before']:.2f}x"
                )
            results.append(entry)
    fits = {}
    for side in ("before", "after"):
        points = [(e["rows"], e[side]["peak_rss_mb"]) for e in results if side in e]
        if len(points) >= 2:
            slope, intercept = np.polyfit(*zip(*points), 1)
            fits[side] = {
                "mb_per_million_rows": slope * 1e6,
                "fixed_mb": intercept,
                "at_1e8_rows_mb": intercept + slope * 1e8,
            }
            print(
                f"{side}: straight-line fit -> {fits[side]['at_1e8_rows_mb']:.0f} MB at 1e8 rows (extrapolated)"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"benchmark": "bench_memory", "python": platform.python_version(), "baseline_ref": args.baseline_ref,
             "classes": CLASSES, "results": results, "fits": fits},
            indent=2,
        )
        + "\n"
    )  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
