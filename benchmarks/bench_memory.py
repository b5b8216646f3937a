"""Benchmark (script, not a test): peak memory and rows/s of `import` and `score` on large stores.

Two cases, each phase in a fresh interpreter whose peak RSS is read from `resource.getrusage`:
- "single": ONE npz of R signal rows (R/2 examples x two perturbations, `probs__benign` and `logits__pgd`,
  10 classes) imported by `import_outputs` (the issue measured 6.1 GB at 1e7 rows before streaming);
- "fleet": M imported models of R/M rows each (M files, imported one after another into one store by one
  process), then `score_attacks` of `confidence` and `loss` on all of them (one process), with
  --resamples bootstrap replicates per metric. The files are generated inside the import process, one at a
  time beside the store, and only the `import_outputs` calls are timed.
"before" is the code of a baseline git ref (default: main), run from a `git archive` of it in the same run on
the same data (same seeds); "after" is this tree. The baseline runs only at --baseline-rows (its memory
grows with the rows). rows/s counts signal rows (import) or scored rows: rows x attacks (score).
Imports numpy only in this process; the phases use our attacks and store layers (no torch).
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

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(__file__).parent / "results" / "bench_memory.json"
CLASSES = 10
ATTACKS = ("confidence", "loss")
AFTER_COMMIT = subprocess.run(
    ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True
).stdout.strip()

WORKER = """
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import numpy as np
mode, db, arg = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])

def write_outputs(path, n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int64)
    logits = rng.normal(0.0, 1.0, (n, 10)).astype(np.float32)
    logits[np.arange(n), labels] += 3.0
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    np.savez(path, labels=labels, is_member=rng.random(n) < 0.5, probs__benign=probs, logits__pgd=logits - 1.0)

seconds = 0.0
if mode == "import":
    from robmia_db.attacks.importers import import_outputs
    for i in range(arg["models"]):
        npz = Path(db).with_name(f"outputs-{i}.npz")
        write_outputs(npz, arg["examples"], seed=i)
        start = time.perf_counter()
        import_outputs(db, npz, "npz", name=f"m{i:04d}")
        seconds += time.perf_counter() - start
        npz.unlink()
else:
    from robmia_db.attacks.scoring import score_attacks
    start = time.perf_counter()
    outcomes = score_attacks(db, list(arg["attacks"]), resamples=arg["resamples"])
    seconds = time.perf_counter() - start
    assert all(o.scored == 2 * arg["models"] for o in outcomes), [o.scored for o in outcomes]
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def phase(source: Path, mode: str, db: Path, arg: dict) -> dict[str, float]:
    done = subprocess.run(
        ["nice", sys.executable, "-c", WORKER, str(source), mode, str(db), json.dumps(arg)],
        capture_output=True,
        text=True,
        timeout=4 * 3600,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed ({source}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def baseline_tree(ref: str, folder: Path) -> Path:
    target = folder / "baseline"
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "robmia_db"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def show(case: str, rows: int, models: int, side: str, name: str, got: dict) -> None:
    print(
        f"{case:6} {rows:>12,} rows {models:>4} model(s)  {side:6} {name:6}  peak RSS "
        f"{got['peak_rss_mb']:7.0f} MB  {got['rows_per_s']:>10,.0f} rows/s  ({got['seconds']:.0f} s)",
        flush=True,
    )


def run_case(source: Path, case: str, side: str, rows: int, models: int, args, folder: Path) -> dict:
    store = folder / f"{case}-{rows}-{time.monotonic_ns()}"
    store.mkdir()
    db = store / "s.duckdb"
    examples = rows // (2 * models)
    out = {"import": phase(source, "import", db, {"models": models, "examples": examples})}
    out["import"]["rows_per_s"] = 2 * examples * models / out["import"]["seconds"]
    show(case, rows, models, side, "import", out["import"])
    if case == "fleet":
        arg = {"models": models, "attacks": list(args.attacks), "resamples": args.resamples}
        out["score"] = phase(source, "score", db, arg)
        out["score"]["rows_per_s"] = 2 * examples * models * len(args.attacks) / out["score"]["seconds"]
        show(case, rows, models, side, "score", out["score"])
    out["store_mb"] = sum(f.stat().st_size for f in store.iterdir() if f.is_file()) / 2**20
    shutil.rmtree(store)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=float, nargs="*", default=[1e7], help="fleet sizes (signal rows)")
    parser.add_argument("--single-rows", type=float, nargs="*", default=[1e7], help="one-file imports")
    parser.add_argument("--baseline-rows", type=float, nargs="*", default=[2e6], help="fleet sizes, baseline")
    parser.add_argument(
        "--baseline-single-rows", type=float, nargs="*", default=[1e7], help="one file, baseline"
    )
    parser.add_argument("--rows-per-model", type=float, default=1e6, help="fleet: signal rows per model")
    parser.add_argument("--resamples", type=int, default=20, help="bootstrap replicates per metric")
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    parser.add_argument("--baseline-ref", default="main", help="git ref of the code before")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the stores (large)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--score-store", type=Path, default=None,
        help="only score an existing fleet store (a copy of one an earlier run imported); added to --out",
    )  # fmt: skip
    parser.add_argument("--score-models", type=int, default=None, help="the models in --score-store")
    args = parser.parse_args()
    if args.score_store:
        score_existing(args)
        return
    results = []
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-memory-", dir=args.workdir) as tmp:
        folder = Path(tmp)
        wanted_before = {("single", int(r)) for r in args.baseline_single_rows}
        wanted_before |= {("fleet", int(r)) for r in args.baseline_rows}
        wanted_after = {("single", int(r)) for r in args.single_rows} | {("fleet", int(r)) for r in args.rows}
        baseline = baseline_tree(args.baseline_ref, folder) if wanted_before else None
        for case, rows in sorted(wanted_before | wanted_after, key=lambda c: (c[0] != "single", c[1])):
            models = 1 if case == "single" else max(1, round(rows / args.rows_per_model))
            entry: dict = {"case": case, "rows": rows, "models": models, "after_commit": AFTER_COMMIT}
            sides = []
            if (case, rows) in wanted_after:
                sides.append(("after", REPO))
            if (case, rows) in wanted_before:
                sides.append(("before", baseline))
            for side, source in sides:
                entry[side] = run_case(source, case, side, rows, models, args, folder)
            if "before" in entry and "after" in entry:
                entry["ratios_after_over_before"] = {
                    name: {
                        "peak_rss": entry["after"][name]["peak_rss_mb"]
                        / entry["before"][name]["peak_rss_mb"],
                        "rows_per_s": entry["after"][name]["rows_per_s"]
                        / entry["before"][name]["rows_per_s"],
                    }
                    for name in ("import", "score")
                    if name in entry["after"]
                }
                for name, ratio in entry["ratios_after_over_before"].items():
                    print(
                        f"{'':>42} ratio after/before {name:6}: peak memory {ratio['peak_rss']:.2f}x, "
                        f"rows/s {ratio['rows_per_s']:.2f}x",
                        flush=True,
                    )
            results.append(entry)
            write_results(args, results)  # after each case: a long run that is stopped keeps what finished
    print(f"wrote {args.out}")


def score_existing(args) -> None:
    """The score phase alone on a store imported earlier (import and score of 1e8 rows take longer together
    than one sitting allows); its entry is appended to the results already in --out."""
    models = args.score_models
    rows = int(models * args.rows_per_model)
    arg = {"models": models, "attacks": list(args.attacks), "resamples": args.resamples}
    got = phase(REPO, "score", args.score_store, arg)
    got["rows_per_s"] = rows * len(args.attacks) / got["seconds"]
    show("fleet", rows, models, "after", "score", got)
    results = json.loads(args.out.read_text())["results"] if args.out.exists() else []
    results.append({"case": "fleet", "rows": rows, "models": models, "after_commit": AFTER_COMMIT,
                    "store_imported_earlier": True,
                    "after": {"score": got}})  # fmt: skip
    write_results(args, results)


def write_results(args, results: list[dict]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"benchmark": "bench_memory", "python": platform.python_version(), "baseline_ref": args.baseline_ref,
             "after_commit": AFTER_COMMIT, "classes": CLASSES, "attacks": list(args.attacks), "resamples": args.resamples,
             "rows_per_model": args.rows_per_model, "cpus": os.cpu_count(), "results": results},
            indent=2,
        )
        + "\n"
    )  # fmt: skip


if __name__ == "__main__":
    main()
