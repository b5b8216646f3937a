"""Runner layer: the defense interface and registry."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from robmia_db.errors import ModelDefinitionError


@dataclass
class TrainProgress:
    """Where training stands, for schedules: epoch (0-based), global step and totals."""

    epoch: int
    step: int
    steps_per_epoch: int
    epochs: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def epoch_fraction(self) -> float:
        """Epochs done so far, counting partial epochs by batch (for per-batch ramps)."""
        return self.step / max(1, self.steps_per_epoch)


class Defense:
    """A training objective. Subclasses set `name` and implement `loss`."""

    name: ClassVar[str] = ""
    # gradient-norm clipping some methods prescribe (DiffAI, Wong & Kolter); None = no clipping
    grad_clip_norm: ClassVar[float | None] = None

    def __init__(self, params: dict[str, Any], eps: float | None):
        self.params = params
        self.eps = eps

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: TrainProgress
    ) -> torch.Tensor:
        raise NotImplementedError

    def describe_epoch(self, progress: TrainProgress) -> dict[str, float]:
        """Schedule values worth logging per epoch (current eps, kappa, ...)."""
        return {}


DEFENSES: dict[str, type[Defense]] = {}
_EXTRA_MODULES = ("robmia_db.runner.defenses.verifiable",)


def register_defense(cls: type[Defense]) -> type[Defense]:
    DEFENSES[cls.name] = cls
    return cls


def build_defense(name: str, params: dict[str, Any], eps: float | None) -> Defense:
    for module in _EXTRA_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    if name not in DEFENSES:
        raise ModelDefinitionError(f"defense {name!r} has no implementation in this robmia-db")
    return DEFENSES[name](params, eps)


def linear_ramp(value: float, done: float, length: float) -> float:
    """value * done / length, capped at value; a zero-length ramp is the full value at once."""
    if length <= 0:
        return value
    return value * min(1.0, max(0.0, done / length))
