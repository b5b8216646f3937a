"""Runner layer: natural training and the empirical (attack-based) defenses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robmia_db.runner.defenses.base import Defense, TrainProgress, linear_ramp, register_defense
from robmia_db.runner.perturb import pgd_linf


@register_defense
class Natural(Defense):
    name = "natural"

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: TrainProgress) -> torch.Tensor:
        return F.cross_entropy(model(x), y)


@register_defense
class PgdAdversarialTraining(Defense):
    """Madry et al.: CE on PGD examples only; eps (and the step with it) optionally ramped from 0."""

    name = "pgd_at"

    def current_eps(self, progress: TrainProgress) -> float:
        return linear_ramp(float(self.eps), progress.epoch_fraction, float(self.params["eps_ramp_epochs"]))

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: TrainProgress) -> torch.Tensor:
        eps_now = self.current_eps(progress)
        step = float(self.params["step_size"]) * (eps_now / float(self.eps))
        was_training = model.training
        model.eval()  # attack on inference-mode statistics (matters only for batch norm)
        x_adv = pgd_linf(model, x, y, eps_now, int(self.params["steps"]), step, bool(self.params["random_start"]))
        model.train(was_training)
        return F.cross_entropy(model(x_adv), y)

    def describe_epoch(self, progress: TrainProgress) -> dict[str, float]:
        return {"eps": self.current_eps(progress)}
