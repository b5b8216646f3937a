"""GPU benchmark: the verifiable defenses' training epoch and the bound kernels on a CUDA device.

Measures, on the first CUDA device, at 28x28 with the CNN of defenses.md section 5 (and bench_defenses.py):
  - seconds per training epoch of 10,000 samples (batch 128: loss, backward, clipping, Adam step) for ibp,
    crown_ibp (beta 1), diffai box, dual with 20 and 50 random projections and the exact dual; the natural
    epoch is the baseline printed beside them, measured in the same run;
  - convex_adversarial 0.4.4's projection-mode step on the same device when it is installed (ours / theirs);
  - ms per sample of each bound method (no grad), batch 128 (crown, dual: 32; zonotope: 8).
Every timing is wall-clock between `torch.cuda.synchronize()` calls, the minimum over `--repeats` after a
warm-up. Without CUDA it says so and exits 2 (the CPU numbers come from bench_bounds.py and
bench_defenses.py). Results go to benchmarks/results/gpu_bounds.json.

    python benchmarks/gpu_bounds.py [--repeats 5] [--out benchmarks/results/gpu_bounds.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_defenses import cnn_28  # noqa: E402

from robmia_db.runner.bounds import BOUND_METHODS, margin_lower_bounds  # noqa: E402
from robmia_db.runner.defenses import TrainProgress, build_defense  # noqa: E402
from robmia_db.spec.defenses import DEFENSE_PARAMS  # noqa: E402

EPS = 0.1
BATCH = 128
EPOCH_SAMPLES = 10_000
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("natural", "natural", {}),
    ("ibp", "ibp", {}),
    ("crown_ibp (beta 1)", "crown_ibp", {"beta_final": 1.0}),
    ("diffai box", "diffai", {}),
    ("dual (20 projections)", "dual", {"projections": 20, "norm": "l1_median"}),
    ("dual (50 projections)", "dual", {"projections": 50, "norm": "l1_median"}),
    ("dual (exact)", "dual", {}),
]
KERNEL_BATCH = {"ibp": 128, "crown_ibp": 128, "crown": 32, "dual": 32, "zonotope": 8}


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gpu_seconds(work: Callable[[], object], repeats: int) -> float:
    """Minimum wall-clock seconds of `work` between device synchronisations, after one warm-up."""
    work()
    _synchronize()
    best = float("inf")
    for _ in range(repeats):
        _synchronize()
        started = time.perf_counter()
        work()
        _synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def training_step(name: str, params: dict[str, Any], model: torch.nn.Module, x, y) -> Callable[[], None]:
    spec_params = DEFENSE_PARAMS[name](**params)
    eps = EPS if spec_params.uses_eps else None
    defense = build_defense(name, spec_params.resolved(eps), eps)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    progress = TrainProgress(epoch=99, step=990, steps_per_epoch=10, epochs=100)  # every ramp is done

    def step() -> None:
        loss = defense.loss(model, x, y, progress)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if defense.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), defense.grad_clip_norm)
        optimizer.step()

    return step


def convex_adversarial_step(projections: int, model: torch.nn.Module, x, y) -> Callable[[], None] | None:
    try:
        from convex_adversarial import robust_loss
    except ImportError:
        return None
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        loss, _ = robust_loss(model, EPS, x, y, proj=projections, norm_type="l1_median", bounded_input=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_bounds.json"))
    parser.add_argument("--device", default="cuda", help='"cpu" only to smoke-test this script without a GPU')
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (CPU numbers: bench_bounds.py, bench_defenses.py)")
        return 2
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 1, 28, 28, generator=generator).to(device)
    y = torch.randint(0, 10, (BATCH,), generator=generator).to(device)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke test)",
        "torch": torch.__version__,
        "batch": BATCH,
        "eps": EPS,
        "timer": "wall clock between cuda synchronize, min of repeats",
        "epochs": {},
        "kernels_ms_per_sample": {},
    }
    batches = EPOCH_SAMPLES / BATCH
    natural = None
    for label, name, params in CASES:
        torch.manual_seed(0)
        model = cnn_28().to(device)
        seconds = gpu_seconds(training_step(name, params, model, x, y), args.repeats) * batches
        natural = seconds if name == "natural" else natural
        row: dict[str, Any] = {
            "seconds_per_epoch_10k": round(seconds, 3),
            "ratio_to_natural": seconds / natural,
        }
        line = f"{label:<26} {seconds:9.3f} s/epoch  x{seconds / natural:8.1f} natural"
        if "projections" in params:
            torch.manual_seed(0)
            theirs_step = convex_adversarial_step(params["projections"], cnn_28().to(device), x, y)
            if theirs_step is not None:
                theirs = gpu_seconds(theirs_step, args.repeats) * batches
                row["convex_adversarial_seconds_per_epoch_10k"] = round(theirs, 3)
                row["ratio_to_convex_adversarial"] = seconds / theirs
                line += f"   convex_adversarial {theirs:8.3f} s/epoch, ours / theirs {seconds / theirs:.2f}x"
        results["epochs"][label] = row
        print(line, flush=True)
    torch.manual_seed(0)
    model = cnn_28().to(device)
    with torch.no_grad():
        forward = gpu_seconds(lambda: model(x), args.repeats) * 1000 / BATCH
        results["kernels_ms_per_sample"]["forward"] = forward
        print(f"{'forward':<26} {forward:9.5f} ms/sample")
        for method in BOUND_METHODS:
            n = KERNEL_BATCH[method]
            ms = gpu_seconds(
                lambda n=n, method=method: margin_lower_bounds(model, x[:n], y[:n], EPS, method), 3
            )
            ms = ms * 1000 / n
            results["kernels_ms_per_sample"][method] = ms
            print(f"{method:<26} {ms:9.5f} ms/sample  x{ms / forward:8.1f} forward", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
