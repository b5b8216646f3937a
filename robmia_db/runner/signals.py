"""Runner layer: per-sample signals of one model under one perturbation (benign, adversarial, verified)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from robmia_db.runner.perturb import pgd_linf
from robmia_db.store.signals import signals_from_logits


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def perturbation_logits(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: dict[str, Any],
    batch_size: int = 512,
) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 logits for every row of x under one perturbation, and (verified only) verified correctness.

    Batches stay on x's device and are copied to the host once at the end (no per-batch transfers).
    """
    model.eval()
    kind = settings["kind"]
    outputs: list[torch.Tensor] = []
    correct: list[torch.Tensor] = []
    generator = None
    if kind == "adversarial" and settings.get("random_start"):
        generator = torch.Generator(device=x.device).manual_seed(int(settings.get("seed", 0)))
    for rows in _batches(len(x), batch_size):
        xb, yb = x[rows], y[rows]
        if kind == "benign":
            with torch.no_grad():
                logits = model(xb)
        elif kind == "adversarial":
            x_adv = pgd_linf(
                model, xb, yb, float(settings["eps"]), int(settings["steps"]), float(settings["step_size"]),
                bool(settings["random_start"]), generator=generator,
            )  # fmt: skip
            with torch.no_grad():
                logits = model(x_adv)
        elif kind == "verified":
            from robmia_db.runner import bounds

            with torch.no_grad():
                lb = bounds.margin_lower_bounds(model, xb, yb, float(settings["eps"]), settings["method"])
                logits = bounds.worst_case_logits(lb, yb)
                others = torch.ones_like(lb, dtype=torch.bool)
                others[torch.arange(len(yb)), yb] = False
                correct.append((torch.where(others, lb, torch.ones_like(lb)) > 0).all(dim=1))
        else:
            raise ValueError(f"unknown perturbation kind {kind!r}")
        outputs.append(logits.detach().float())
    logits_all = torch.cat(outputs).cpu().numpy() if outputs else np.zeros((0, 0), np.float32)
    return logits_all, (torch.cat(correct).cpu().numpy() if correct else None)


def compute_signal_columns(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: dict[str, Any], batch_size: int = 512
) -> dict[str, np.ndarray]:
    logits, verified_correct = perturbation_logits(model, x, y, settings, batch_size)
    return signals_from_logits(logits, y.cpu().numpy(), is_correct=verified_correct)
