"""Runner layer: L-inf PGD, shared by PGD adversarial training and the adversarial signals.

The paper's evaluation attack is `pgd_linf(..., steps=20, step_size=2.5 * eps / 20, random_start=False)`:
sign-gradient ascent on the true-label cross-entropy, projected onto the eps ball, then clipped to [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pgd_linf(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float,
    random_start: bool = False,
    generator: torch.Generator | None = None,
    x_min: float = 0.0,
    x_max: float = 1.0,
) -> torch.Tensor:
    """Untargeted L-inf PGD on the summed CE; returns detached adversarial inputs.

    The caller chooses train/eval mode; gradients w.r.t. parameters are not accumulated.
    """
    if eps <= 0 or steps <= 0:
        return x.detach().clone()
    x = x.detach()
    lower = torch.clamp(x - eps, min=x_min)
    upper = torch.clamp(x + eps, max=x_max)
    if random_start:
        noise = torch.empty_like(x).uniform_(-eps, eps, generator=generator)
        x_adv = torch.min(torch.max(x + noise, lower), upper)
    else:
        x_adv = x.clone()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, lower), upper)
    finally:
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)
    return x_adv.detach()
