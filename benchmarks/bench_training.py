"""Benchmark (script, not a test): our training loop vs a bare torch loop doing the same work.

`robmia_db.runner.training.train_model` (defense registry, TrainProgress, PGD with frozen parameters, loss
bookkeeping) trains one epoch of `pgd_at` and of `natural` on digits; a bare loop written here trains the
same architecture from the same seed on the same members, batch size, optimizer, PGD steps and step size.
Both consume the random streams in the same order, so they also end with the same weights (checked and
reported). Rounds interleave the two, alternating which goes first; the medians give the ratio.
Imports torch, numpy and our spec/runner layers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from robmia_db.datasets import load_dataset
from robmia_db.runner.data import split_membership
from robmia_db.runner.models import build_model
from robmia_db.runner.reporting import SilentReporter
from robmia_db.runner.training import train_model
from robmia_db.spec import ModelJob, load_specs

DEFAULT_OUT = Path(__file__).parent / "results" / "bench_training.json"

SPEC = """
[experiment]
name = "bench"
[data]
dataset = "digits"
[membership]
n_members = {members}
n_nonmembers = 100
[model]
arch = "{arch}"
[training]
defenses = ["natural", "pgd_at"]
eps = 0.1
seeds = [0]
epochs = {epochs}
batch_size = {batch_size}
optimizer = {{ name = "adam", lr = 0.001 }}
[defense.pgd_at]
steps = {steps}
random_start = true
"""


def jobs(args: argparse.Namespace, epochs: int) -> dict[str, ModelJob]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.toml"
        path.write_text(
            SPEC.format(
                members=args.members,
                arch=args.arch,
                epochs=epochs,
                batch_size=args.batch_size,
                steps=args.steps,
            )
        )
        (loaded,) = load_specs([path])
    return {job.defense: job for job in loaded.jobs}


def bare_loop(job: ModelJob, dataset, member_ids: np.ndarray) -> torch.nn.Module:
    """Madry PGD-AT / natural training as one would write it directly in torch."""
    training = job.identity["training"]
    seed, epochs, batch_size = training["seed"], training["epochs"], training["batch_size"]
    torch.manual_seed(seed)
    model = build_model(
        job.arch, dataset.input_shape, dataset.n_classes, job.width, job.identity["model"]["options"]
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=training["optimizer"]["lr"])
    x = torch.from_numpy(dataset.x[member_ids])
    y = torch.from_numpy(dataset.y[member_ids])
    order = torch.Generator().manual_seed(seed)
    adversarial = job.defense == "pgd_at"
    if adversarial:
        eps, steps = float(training["eps"]), int(training["params"]["steps"])
        alpha = float(training["params"]["step_size"])
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(y), generator=order).split(batch_size):
            xb, yb = x[index], y[index]
            if adversarial:
                low, high = (xb - eps).clamp(min=0.0), (xb + eps).clamp(max=1.0)
                x_adv = torch.min(torch.max(xb + torch.empty_like(xb).uniform_(-eps, eps), low), high)
                for p in model.parameters():
                    p.requires_grad_(False)
                for _ in range(steps):
                    x_adv.requires_grad_(True)
                    grad = torch.autograd.grad(F.cross_entropy(model(x_adv), yb, reduction="sum"), x_adv)[0]
                    x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), low), high)
                for p in model.parameters():
                    p.requires_grad_(True)
                xb = x_adv
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model


def max_weight_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def measure(job: ModelJob, dataset, split, repeats: int) -> dict:
    ours = lambda: train_model(job, dataset, split, torch.device("cpu"), SilentReporter())[0]  # noqa: E731
    bare = lambda: bare_loop(job, dataset, split.member_ids)  # noqa: E731
    calls = {"ours": ours, "bare": bare}
    weights_gap = max_weight_difference(ours(), bare())  # also the warm-up (first optimizer imports dynamo)
    wall: dict[str, list[float]] = {"ours": [], "bare": []}
    cpu: dict[str, list[float]] = {"ours": [], "bare": []}
    for round_index in range(repeats):
        names = ["ours", "bare"] if round_index % 2 == 0 else ["bare", "ours"]
        for name in names:
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            calls[name]()
            wall[name].append(time.perf_counter() - wall_start)
            cpu[name].append(time.process_time() - cpu_start)
    median_wall = {k: statistics.median(v) for k, v in wall.items()}
    median_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "epochs": job.identity["training"]["epochs"],
        "wall_s": wall,
        "cpu_s": cpu,
        "median_wall_s": median_wall,
        "median_cpu_s": median_cpu,
        "ratio_wall": median_wall["ours"] / median_wall["bare"],
        "ratio_cpu": median_cpu["ours"] / median_cpu["bare"],
        "max_abs_weight_difference": weights_gap,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="cnn", choices=["cnn", "mlp"])
    parser.add_argument("--members", type=int, default=1200, help="training examples (digits has 1,797)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="PGD steps of pgd_at")
    parser.add_argument(
        "--natural-epochs", type=int, default=5, help="natural epochs per timing (one is ~50 ms)"
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per loop (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]
    dataset = load_dataset("digits")
    results = {}
    for defense, epochs in (("pgd_at", 1), ("natural", args.natural_epochs)):
        job = jobs(args, epochs)[defense]
        split = split_membership(dataset, job.identity)
        results[defense] = measure(job, dataset, split, args.repeats)
        r = results[defense]
        print(
            f"{defense:8s} {epochs} epoch(s), {args.members} members, batch {args.batch_size}, {args.arch}: "
            f"ours {r['median_wall_s']['ours']:.3f} s, bare torch {r['median_wall_s']['bare']:.3f} s, "
            f"ratio {r['ratio_wall']:.3f} wall / {r['ratio_cpu']:.3f} CPU (goal <= 1.05); "
            f"max |weight diff| {r['max_abs_weight_difference']:.1e}"
        )
    result = {
        "arch": args.arch,
        "members": args.members,
        "batch_size": args.batch_size,
        "pgd_steps": args.steps,
        "repeats": args.repeats,
        "torch_threads": args.threads,
        "goal_ratio": 1.05,
        "pgd_at": results["pgd_at"],
        "natural": results["natural"],
        "load_average_1min_before": load_before,
        "load_average_1min_after": os.getloadavg()[0],
        "versions": {
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "cpu_count": os.cpu_count(),
    }
    print(
        f"load average {load_before:.1f} -> {result['load_average_1min_after']:.1f} on {os.cpu_count()} cores "
        "(on a loaded machine the CPU-time ratio is the steadier number)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
