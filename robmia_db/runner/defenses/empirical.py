"""Runner layer: natural training and the empirical (attack-based) defenses; imports torch and `runner.perturb`."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from robmia_db.runner.defenses.base import Defense, TrainProgress, linear_ramp, register_defense
from robmia_db.runner.perturb import pgd_linf


@register_defense
class Natural(Defense):
    name = "natural"

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: TrainProgress
    ) -> torch.Tensor:
        return F.cross_entropy(model(x), y)


@register_defense
class PgdAdversarialTraining(Defense):
    """Madry et al.: CE on PGD examples only; eps (and the step with it) optionally ramped from 0."""

    name = "pgd_at"

    def current_eps(self, progress: TrainProgress) -> float:
        return linear_ramp(float(self.eps), progress.epoch_fraction, float(self.params["eps_ramp_epochs"]))

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: TrainProgress
    ) -> torch.Tensor:
        eps_now = self.current_eps(progress)
        step = float(self.params["step_size"]) * (eps_now / float(self.eps))
        was_training = model.training
        model.eval()  # attack on inference-mode statistics (matters only for batch norm)
        x_adv = pgd_linf(
            model, x, y, eps_now, int(self.params["steps"]), step, bool(self.params["random_start"])
        )
        model.train(was_training)
        return F.cross_entropy(model(x_adv), y)

    def describe_epoch(self, progress: TrainProgress) -> dict[str, float]:
        return {"eps": self.current_eps(progress)}


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Switch off parameter gradients while an attack differentiates with respect to the input only."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Attack on inference-mode statistics (matters only for batch norm and dropout), then restore."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _summed_ce_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return grad


def wrm_l2_points(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, gamma: float, steps: int
) -> torch.Tensor:
    """Sinha et al.'s WRM ascent on CE(f(z), y) - gamma * ||z - x||^2, exactly as their TF code runs it.

    One step z = x + (1/2gamma) grad, then `steps` steps z <- z + (1/sqrt(t+2)) [(1/2gamma) grad - (z - x)]
    for t = 0..steps-1; gradients are per sample (summed loss); no projection and no clipping.

    Args:
        model: the network (mode chosen by the caller).
        x: clean inputs.
        y: labels.
        gamma: Lagrangian penalty (> 0).
        steps: ascent steps after the first.

    Returns:
        Detached adversarial points.
    """
    scale = 1.0 / (2.0 * gamma)
    x = x.detach()
    with frozen_parameters(model):
        z = x + scale * _summed_ce_gradient(model, x, y)
        for t in range(steps):
            ascent = scale * _summed_ce_gradient(model, z, y) - (z - x)
            z = z + ascent / math.sqrt(t + 2)
    return z.detach()


def linf_wrm_points(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    coefficient: float,
    steps: int,
    x_min: float = 0.0,
    x_max: float = 1.0,
) -> torch.Tensor:
    """The CCS'19 code's LinfWRMAttack: ascent on CE - lambda * ||x' - x||_1 with an adaptive lambda.

    From x' = x, `steps` times: g = coefficient * grad; x' <- clip(x' + g - mean(|g|) sign(x' + g - x)),
    where the mean runs over the whole batch (as the original does). No projection onto an eps ball.

    Args:
        model: the network (mode chosen by the caller).
        x: clean inputs.
        y: labels.
        coefficient: the gradient coefficient a.
        steps: ascent steps.
        x_min: lower end of the valid input range.
        x_max: upper end of the valid input range.

    Returns:
        Detached adversarial points.
    """
    x = x.detach()
    x_adv = x.clone()
    with frozen_parameters(model):
        for _ in range(steps):
            g = coefficient * _summed_ce_gradient(model, x_adv, y)
            moved = x_adv + g
            x_adv = torch.clamp(moved - g.abs().mean() * torch.sign(moved - x), x_min, x_max)
    return x_adv.detach()


@register_defense
class DistributionalAdversarialTraining(Defense):
    """Sinha et al.: CE on the WRM points only (mode "wrm") or on the CCS'19 L-inf/L1 variant ("ccs2019")."""

    name = "distributional_at"

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: TrainProgress
    ) -> torch.Tensor:
        steps = int(self.params["steps"])
        with eval_mode(model):
            if self.params["mode"] == "wrm":
                x_adv = wrm_l2_points(model, x, y, float(self.params["gamma"]), steps)
            else:
                x_adv = linf_wrm_points(model, x, y, float(self.params["coefficient"]), steps)
        return F.cross_entropy(model(x_adv), y)


def trades_points(
    model: nn.Module,
    x: torch.Tensor,
    clean_probs: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float,
    init_std: float,
    x_min: float = 0.0,
    x_max: float = 1.0,
) -> torch.Tensor:
    """TRADES inner maximisation: sign steps on the summed KL(clean_probs || softmax f(x')) in the eps ball.

    Starts at x + init_std * N(0, I) (global torch RNG), projects onto the ball and clips after every step.

    Args:
        model: the network (the caller puts it in eval mode).
        x: clean inputs.
        clean_probs: softmax f(x), computed once without gradient.
        eps: L-inf radius.
        steps: sign-gradient steps.
        step_size: step length.
        init_std: standard deviation of the Gaussian start.
        x_min: lower end of the valid input range.
        x_max: upper end of the valid input range.

    Returns:
        Detached adversarial points.
    """
    x = x.detach()
    x_adv = x + init_std * torch.randn_like(x)
    if eps <= 0:
        return x.clone()
    with frozen_parameters(model):
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), clean_probs, reduction="sum")
            (grad,) = torch.autograd.grad(kl, x_adv)
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), x_min, x_max)
    return x_adv.detach()


@register_defense
class Trades(Defense):
    """Zhang et al.: CE(f(x), y) + beta * KL(f(x) || f(x')) / batch, x' from the KL attack in eval mode."""

    name = "trades"

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: TrainProgress
    ) -> torch.Tensor:
        eps = float(self.eps)
        with eval_mode(model):
            with torch.no_grad():
                clean_probs = F.softmax(model(x), dim=1)
            x_adv = trades_points(
                model, x, clean_probs, eps, int(self.params["steps"]), float(self.params["step_size"]),
                float(self.params["init_std"]),
            )  # fmt: skip
        logits = model(x)
        natural = F.cross_entropy(logits, y)
        robust = F.kl_div(
            F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="sum"
        ) / len(x)
        return natural + float(self.params["beta"]) * robust

    def describe_epoch(self, progress: TrainProgress) -> dict[str, float]:
        return {"eps": float(self.eps), "beta": float(self.params["beta"])}
