"""Benchmark: the runner's glibc malloc setting (`malloc.keep_freed_memory`) against glibc's defaults.

The setting cannot be undone inside a process, so each measurement is a fresh child process, with the
setting or without, alternating (`--rounds` pairs, the first of each pair alternating too) so that both see
the same drift of a shared machine's load. Each child times, in process CPU seconds at 1 torch thread:
training steps of batch 128 at 28x28 (bench_defenses' step: the defense's loss, backward, clipping, Adam)
for natural, PGD-10 adversarial training, IBP and CROWN-IBP (beta 1), and the bound calls of bench_bounds
(IBP, CROWN-IBP at batch 128, CROWN at 16; no autograd), each the minimum and median of `--repeats` after
one warm-up, with its minor page faults per call. The parent prints, per case, the median over rounds of
each child's minimum and the ratio set / default, and writes JSON to benchmarks/results/bench_malloc.json.

    python benchmarks/bench_malloc.py [--rounds 3] [--repeats 7] [--out benchmarks/results/bench_malloc.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _timed(work, repeats: int) -> dict[str, float]:
    work()
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        started = time.process_time()
        work()
        times.append(time.process_time() - started)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / repeats
    return {"min_s": min(times), "median_s": statistics.median(times), "page_faults_per_call": faults}


def child(setting: bool, repeats: int) -> dict[str, object]:
    import torch

    from robmia_db.runner.malloc import keep_freed_memory

    applied = keep_freed_memory() if setting else False
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    from bench_bounds import digits, network
    from bench_defenses import EPS, _inputs, cnn_28

    from robmia_db.runner.bounds import margin_lower_bounds
    from robmia_db.runner.defenses import TrainProgress, build_defense
    from robmia_db.spec.defenses import DEFENSE_PARAMS

    results: dict[str, object] = {}
    for label, name, params in (
        ("train natural", "natural", {}),
        ("train pgd_at (10 steps)", "pgd_at", {"steps": 10}),
        ("train ibp", "ibp", {}),
        ("train crown_ibp (beta 1)", "crown_ibp", {"beta_final": 1.0}),
    ):
        # bench_defenses.step_seconds' step, timed here so that page faults are counted after the warm-up.
        torch.manual_seed(0)
        model = cnn_28()
        spec_params = DEFENSE_PARAMS[name](**params)
        eps = EPS if spec_params.uses_eps else None
        defense = build_defense(name, spec_params.resolved(eps), eps)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        x, y = _inputs(128, 28)
        progress = TrainProgress(epoch=99, step=99 * 10, steps_per_epoch=10, epochs=100)

        def step(defense=defense, model=model, optimizer=optimizer, x=x, y=y, progress=progress) -> None:
            loss = defense.loss(model, x, y, progress)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if defense.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), defense.grad_clip_norm)
            optimizer.step()

        results[label] = _timed(step, repeats)
    torch.manual_seed(0)
    model = network("28x28")
    x, y = digits("28x28", 128)
    with torch.no_grad():
        for method, batch in (("ibp", 128), ("crown_ibp", 128), ("crown", 16)):
            xb, yb = x[:batch], y[:batch]
            results[f"bound {method} (batch {batch})"] = _timed(
                lambda xb=xb, yb=yb, method=method: margin_lower_bounds(model, xb, yb, 0.1, method), repeats
            )
    return {"setting": setting, "applied": applied, "cases": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_malloc.json")
    parser.add_argument("--child", choices=["default", "set"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "set", args.repeats)))
        return
    environment = {k: v for k, v in os.environ.items() if k != "ROBMIA_MALLOC"}
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, object]]] = {"default": [], "set": []}
    for index in range(args.rounds):
        order = ("default", "set") if index % 2 == 0 else ("set", "default")
        for which in order:
            output = subprocess.run(
                [sys.executable, __file__, "--child", which, "--repeats", str(args.repeats)],
                check=True,
                capture_output=True,
                text=True,
                env=environment,
            ).stdout
            runs[which].append(json.loads(output.strip().splitlines()[-1]))
    if not all(run["applied"] for run in runs["set"]):
        print("the setting was not applied (not glibc, or glibc's malloc tuning set in the environment)")
    summary = {}
    print(f"\n{'CPU ms per call (median over rounds of each min)':<46}{'default':>10}{'set':>10}{'set/def':>9}"
          f"{'faults def':>12}{'faults set':>12}")  # fmt: skip
    for case in runs["default"][0]["cases"]:
        row = {}
        for which in ("default", "set"):
            cases = [run["cases"][case] for run in runs[which]]
            row[which] = {
                "min_ms": 1000 * statistics.median(c["min_s"] for c in cases),
                "median_ms": 1000 * statistics.median(c["median_s"] for c in cases),
                "page_faults_per_call": statistics.median(c["page_faults_per_call"] for c in cases),
            }
        row["ratio_set_to_default"] = row["set"]["min_ms"] / row["default"]["min_ms"]
        summary[case] = row
        print(
            f"{case:<46}{row['default']['min_ms']:10.2f}{row['set']['min_ms']:10.2f}"
            f"{row['ratio_set_to_default']:9.3f}{row['default']['page_faults_per_call']:12.0f}"
            f"{row['set']['page_faults_per_call']:12.0f}"
        )
    result = {
        "python": platform.python_version(),
        "rounds": args.rounds,
        "repeats": args.repeats,
        "timer": "process CPU time per call, 1 torch thread; min of repeats per child, median over rounds",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "summary": summary,
        "runs": runs,
    }
    print(f"load average before / after: {load_before} / {result['load_average_after']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
