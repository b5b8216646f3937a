"""GPU check (script, not a test; needs a CUDA device, exits 2 without one): the CUDA path, end to end.

1. The quickstart (specs/quickstart.toml) on `cuda` and on `cpu`, each into a fresh store: wall time of
   each, and how far the GPU's numbers are from the CPU's (accuracies; max |probs| difference of the benign
   signals; kernels differ, so close, not bit-identical).
2. A CIFAR-10 lite model (specs/paper-lite/cifar10.toml: WRN-10-1, natural and PGD-AT at 8/255,
   shortened to `--cifar-epochs`) on `cuda` and `cpu`. Its data is $ROBMIA_DATA/cifar10 when present, else a CIFAR-shaped npz generated
   here (same shapes and sizes: the timing is what is measured, and the script says which it used).
3. Defenses and bounds on CUDA: specs/defenses.toml (all eight defenses, PGD and CROWN-verified signals)
   shortened to `--defense-epochs` epochs, on `cuda` and `cpu`: verified accuracies side by side.
4. Our training epoch vs a bare torch loop on the GPU (same model, data on the device, same seed and
   batches), PGD-AT and natural; goal ratio <= 1.05.

Prints one line per measurement and writes benchmarks/results/gpu_check.json. `--quick` shortens every
part (a smoke run of the path).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_OUT = Path(__file__).parent / "results" / "gpu_check.json"


def _with_epochs(text: str, epochs: int) -> str:
    """A shortened spec; a multistep schedule's milestones would fall past the end, so it becomes constant."""
    text = re.sub(r"(?m)^epochs = \d+", f"epochs = {epochs}", text)
    return re.sub(r"(?m)^lr_schedule = \{[^}]*multistep[^}]*\}", 'lr_schedule = { name = "constant" }', text)


def _run(
    spec_text: str, folder: Path, name: str, device: str, threads: int, label: str
) -> tuple[float, Path]:
    from robmia_db.runner.executor import run_specs

    spec = folder / f"{name}-{label}.toml"
    spec.write_text(spec_text)
    db = folder / f"{name}-{label}.duckdb"
    started = time.perf_counter()
    summary = run_specs([spec], db, device=device, threads=threads)
    seconds = time.perf_counter() - started
    failed = [f"{o.job.model_name}: {o.error}" for o in summary.failed]
    if failed:
        raise SystemExit(f"{name} on {device} failed: {failed}")
    return seconds, db


def _compare(cpu_db: Path, gpu_db: Path) -> dict:
    import duckdb

    con = duckdb.connect()
    con.execute(f"ATTACH '{cpu_db}' AS c (READ_ONLY); ATTACH '{gpu_db}' AS g (READ_ONLY)")
    accuracies = con.execute(
        """SELECT c.model_name, c.test_acc, g.test_acc, c.adv_test_acc, g.adv_test_acc,
                  c.verified_test_acc, g.verified_test_acc
           FROM c.v_models c JOIN g.v_models g USING (model_key) ORDER BY 1"""
    ).fetchall()
    gap = con.execute(
        """SELECT max(list_max(list_transform(list_zip(c.probs, g.probs), lambda t: abs(t[1] - t[2]))))
           FROM c.signals c JOIN g.signals g USING (signal_key, example_id)"""
    ).fetchone()[0]
    con.close()
    return {"accuracies_cpu_vs_gpu": accuracies, "max_abs_probs_difference": gap}


def _cifar_root(folder: Path, n_train: int, n_test: int) -> tuple[Path, str]:
    data = os.environ.get("ROBMIA_DATA")
    if data and (Path(data) / "cifar10").exists():
        return Path(data) / "cifar10", "real CIFAR-10 from $ROBMIA_DATA/cifar10"
    rng = np.random.default_rng(0)
    path = folder / "cifar10-shaped.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        y_train=rng.integers(0, 10, n_train),
        x_test=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, n_test),
    )
    return path, "a generated CIFAR-shaped npz (random images: timings only, accuracies meaningless)"


def sync(device) -> None:
    """Wait for queued kernels, so wall time is the work's (a no-op on CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _epoch_vs_bare(device, repeats: int) -> dict:
    """One PGD-AT epoch and a few natural epochs, ours vs a bare loop, both fully on `device`."""
    import torch
    import torch.nn.functional as F

    from robmia_db.datasets import load_dataset
    from robmia_db.runner.data import split_membership
    from robmia_db.runner.models import build_model
    from robmia_db.runner.reporting import SilentReporter
    from robmia_db.runner.training import train_model
    from robmia_db.spec import load_specs

    spec_text = (ROOT / "specs" / "quickstart.toml").read_text()
    results = {}
    dataset = load_dataset("digits")
    for defense, epochs in (("pgd_at", 1), ("natural", 5)):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "s.toml"
            path.write_text(_with_epochs(spec_text, epochs))
            job = next(j for j in load_specs([path])[0].jobs if j.defense == defense)
        split = split_membership(dataset, job.identity)
        training = job.identity["training"]

        def ours(job=job, split=split):
            train_model(job, dataset, split, device, SilentReporter())

        def bare(job=job, split=split, training=training, defense=defense):
            torch.manual_seed(training["seed"])
            model = build_model(job.arch, dataset.input_shape, dataset.n_classes, job.width,
                                job.identity["model"]["options"]).to(device)  # fmt: skip
            optimizer = torch.optim.Adam(model.parameters(), lr=training["optimizer"]["lr"])
            x = torch.from_numpy(dataset.x[split.member_ids]).to(device)
            y = torch.from_numpy(dataset.y[split.member_ids]).to(device)
            order = torch.Generator().manual_seed(training["seed"])
            eps = float(training["eps"] or 0.0)
            for _ in range(training["epochs"]):
                for index in torch.randperm(len(y), generator=order).to(device).split(training["batch_size"]):
                    xb, yb = x[index], y[index]
                    if defense == "pgd_at":
                        steps, alpha = (
                            int(training["params"]["steps"]),
                            float(training["params"]["step_size"]),
                        )
                        low, high = (xb - eps).clamp(min=0.0), (xb + eps).clamp(max=1.0)
                        x_adv = torch.min(torch.max(xb + torch.empty_like(xb).uniform_(-eps, eps), low), high)
                        for p in model.parameters():
                            p.requires_grad_(False)
                        for _ in range(steps):
                            x_adv.requires_grad_(True)
                            loss = F.cross_entropy(model(x_adv), yb, reduction="sum")
                            grad = torch.autograd.grad(loss, x_adv)[0]
                            x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), low), high)
                        for p in model.parameters():
                            p.requires_grad_(True)
                        xb = x_adv
                    loss = F.cross_entropy(model(xb), yb)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            sync(device)

        def timed(call):
            sync(device)
            started = time.perf_counter()
            call()
            sync(device)
            return time.perf_counter() - started

        ours()
        bare()  # warm-up: kernels, allocator
        walls = {"ours": [], "bare": []}
        for round_index in range(repeats):
            for name in ("ours", "bare") if round_index % 2 == 0 else ("bare", "ours"):
                walls[name].append(timed(ours if name == "ours" else bare))
        medians = {k: statistics.median(v) for k, v in walls.items()}
        results[defense] = {"epochs": epochs, "wall_s": walls, "ratio": medians["ours"] / medians["bare"]}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument(
        "--cpu-threads", type=int, default=1, help="torch threads of the CPU runs (project default 1)"
    )
    parser.add_argument("--defense-epochs", type=int, default=10)
    parser.add_argument(
        "--cifar-epochs",
        type=int,
        default=3,
        help="of the CIFAR-10 lite spec's 15 (its CPU run is the long part)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="shorten every part: a smoke run of the path")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    import torch

    device = torch.device(args.device)
    if device.type == "cpu":
        print("--device cpu: a smoke run of this script itself, not a GPU check")
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check (this script needs a GPU)")
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    report: dict = {"device": name, "torch": torch.__version__}

    quickstart = (ROOT / "specs" / "quickstart.toml").read_text()
    if args.quick:
        quickstart = _with_epochs(quickstart, 5)
    gpu_s, gpu_db = _run(quickstart, folder, "quickstart", args.device, 1, "gpu")
    cpu_s, cpu_db = _run(quickstart, folder, "quickstart", "cpu", args.cpu_threads, "cpu")
    report["quickstart"] = {"gpu_s": gpu_s, "cpu_s": cpu_s, **_compare(cpu_db, gpu_db)}
    print(f"quickstart: GPU {gpu_s:.1f} s, CPU ({args.cpu_threads} thread(s)) {cpu_s:.1f} s, "
          f"x{cpu_s / gpu_s:.2f}; max |probs| GPU-CPU {report['quickstart']['max_abs_probs_difference']:.2e}", flush=True)  # fmt: skip

    cifar = (ROOT / "specs" / "paper-lite" / "cifar10.toml").read_text()
    root, what = _cifar_root(folder, 1000, 500)
    cifar = cifar.replace('options = { layout = "npz" }', f'root = "{root}"\noptions = {{ layout = "npz" }}')
    cifar = _with_epochs(cifar, 1 if args.quick else args.cifar_epochs)
    gpu_s, gpu_db = _run(cifar, folder, "cifar10-lite", args.device, 1, "gpu")
    cpu_s, cpu_db = _run(cifar, folder, "cifar10-lite", "cpu", args.cpu_threads, "cpu")
    report["cifar10_lite"] = {"data": what, "gpu_s": gpu_s, "cpu_s": cpu_s, **_compare(cpu_db, gpu_db)}
    print(f"cifar10 lite ({what}): GPU {gpu_s:.1f} s, CPU {cpu_s:.1f} s, x{cpu_s / gpu_s:.2f}", flush=True)

    defenses = _with_epochs(
        (ROOT / "specs" / "defenses.toml").read_text(), 1 if args.quick else args.defense_epochs
    )
    gpu_s, gpu_db = _run(defenses, folder, "defenses", args.device, 1, "gpu")
    cpu_s, cpu_db = _run(defenses, folder, "defenses", "cpu", args.cpu_threads, "cpu")
    report["defenses"] = {"gpu_s": gpu_s, "cpu_s": cpu_s, **_compare(cpu_db, gpu_db)}
    print(f"defenses + CROWN bounds: GPU {gpu_s:.1f} s, CPU {cpu_s:.1f} s", flush=True)
    for name, *accs in report["defenses"]["accuracies_cpu_vs_gpu"]:
        print(
            f"  {name}: test acc CPU/GPU {accs[0]}/{accs[1]}, adv {accs[2]}/{accs[3]}, verified {accs[4]}/{accs[5]}"
        )

    epoch = _epoch_vs_bare(device, 2 if args.quick else args.repeats)
    report["epoch_vs_bare_torch"] = epoch
    for defense, values in epoch.items():
        print(f"our {defense} epoch vs a bare torch loop on the GPU: x{values['ratio']:.3f} (goal <= 1.05)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
