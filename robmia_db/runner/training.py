"""Runner layer: train one model on its members, resuming from the partial checkpoint a killed run left.

The loop is the defense's loss, backward, its gradient clipping and an optimizer step per batch, in a
seeded order; every `PARTIAL_SAVE_INTERVAL_S` seconds the whole state (weights, optimizer, schedule, both
random generators, history) is saved, so a resumed run trains to the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from robmia_db.datasets import LoadedDataset
from robmia_db.errors import TrainingDivergedError
from robmia_db.runner.data import MembershipSplit
from robmia_db.runner.defenses import TrainProgress, build_defense
from robmia_db.runner.models import build_model
from robmia_db.runner.reporting import Reporter, notify
from robmia_db.spec import ModelJob

PARTIAL_SAVE_INTERVAL_S = 30.0


def _make_optimizer(model: torch.nn.Module, identity: dict[str, Any]):
    config = identity["training"]["optimizer"]
    if config["name"] == "sgd":
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=config["lr"],
            momentum=config["momentum"],
            weight_decay=config["weight_decay"],
        )
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    schedule = identity["training"]["lr_schedule"]
    epochs = identity["training"]["epochs"]
    if schedule["name"] == "multistep":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, schedule["milestones"], schedule["gamma"])
    elif schedule["name"] == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    else:
        scheduler = None
    return optimizer, scheduler


def train_model(
    job: ModelJob,
    dataset: LoadedDataset,
    split: MembershipSplit,
    device: torch.device,
    reporter: Reporter,
    partial_path: Path | None = None,
) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """Train one model on its members. Resumes from `partial_path` when a killed run left one."""
    identity = job.identity
    training = identity["training"]
    torch.manual_seed(training["seed"])
    model = build_model(
        job.arch, dataset.input_shape, dataset.n_classes, job.width, identity["model"]["options"]
    )
    model = model.to(device)
    defense = build_defense(job.defense, training["params"], training["eps"])
    optimizer, scheduler = _make_optimizer(model, identity)
    x = torch.from_numpy(dataset.x[split.member_ids]).to(device)
    y = torch.from_numpy(dataset.y[split.member_ids]).to(device)
    n = len(y)
    batch_size = int(training["batch_size"])
    steps_per_epoch = (n + batch_size - 1) // batch_size
    epochs = int(training["epochs"])
    order = torch.Generator(device="cpu").manual_seed(training["seed"])
    history: list[dict[str, Any]] = []
    start_epoch = 0
    elapsed_before = 0.0  # training seconds spent before an interruption, kept across resumes
    if partial_path is not None and partial_path.exists():
        state = torch.load(partial_path, map_location=device, weights_only=True)
        if state.get("model_key") == job.model_key:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state.get("scheduler") is not None:
                scheduler.load_state_dict(state["scheduler"])
            order.set_state(state["order_rng"])
            torch.set_rng_state(state["torch_rng"])
            history = list(state["history"])
            start_epoch = int(state["epoch"]) + 1
            elapsed_before = float(state.get("elapsed_seconds", 0.0))
            notify(reporter, "training_resumed", job, start_epoch, epochs)
    last_save = time.monotonic()
    resumed_at = time.perf_counter()
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, epochs):
        model.train()
        started = time.perf_counter()
        permutation = torch.randperm(n, generator=order).to(device)
        batch_losses: list[torch.Tensor] = []  # summed once per epoch: no extra tensor ops per batch
        for start in range(0, n, batch_size):
            index = permutation[start : start + batch_size]
            progress = TrainProgress(epoch=epoch, step=step, steps_per_epoch=steps_per_epoch, epochs=epochs)
            loss = defense.loss(model, x[index], y[index], progress)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if defense.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), defense.grad_clip_norm)
            optimizer.step()
            batch_losses.append(loss.detach())
            step += 1
        if scheduler is not None:
            scheduler.step()
        sizes = torch.full((len(batch_losses),), float(batch_size), device=device)
        sizes[-1] = n - batch_size * (len(batch_losses) - 1)
        epoch_loss = float((torch.stack(batch_losses) * sizes).sum()) / n
        if not math.isfinite(epoch_loss):
            raise TrainingDivergedError(
                f"training diverged at epoch {epoch + 1}/{epochs} (loss {epoch_loss})"
            )
        now = time.perf_counter()
        stats = {
            "epoch": epoch + 1,
            "loss": epoch_loss,
            "seconds": now - started,
            "elapsed_seconds": elapsed_before + now - resumed_at,
        }
        stats.update(defense.describe_epoch(TrainProgress(epoch, step, steps_per_epoch, epochs)))
        history.append(stats)
        reporter.epoch_done(job, epoch + 1, epochs, stats)
        if (
            partial_path is not None
            and epoch + 1 < epochs
            and time.monotonic() - last_save > PARTIAL_SAVE_INTERVAL_S
        ):
            _save_partial(partial_path, job, model, optimizer, scheduler, order, epoch, history, stats)
            last_save = time.monotonic()
    return model.eval(), history


def _save_partial(path, job, model, optimizer, scheduler, order, epoch, history, stats) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(
        {
            "model_key": job.model_key,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "order_rng": order.get_state(),
            "torch_rng": torch.get_rng_state(),
            "epoch": epoch,
            "history": history,
            "elapsed_seconds": stats["elapsed_seconds"],
        },
        tmp,
    )
    os.replace(tmp, path)
