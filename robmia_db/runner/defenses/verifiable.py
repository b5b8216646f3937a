"""Runner layer: the verifiable defenses (IBP, CROWN-IBP, DiffAI, dual), all on the bound engine `runner.bounds`.

Every schedule is evaluated per batch from `TrainProgress.epoch_fraction`, so ramps measured in (fractional)
epochs move smoothly within an epoch. Schedule lengths arrive resolved from the spec: a number of epochs or
"N%" of the training epochs (`spec.defenses.schedule_epochs`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robmia_db.runner import bounds
from robmia_db.runner.defenses.base import Defense, TrainProgress, register_defense
from robmia_db.spec.defenses import schedule_epochs


def ramp_fraction(done_epochs: float, start_epochs: float, length_epochs: float) -> float:
    """How far a linear ramp that starts at `start_epochs` and lasts `length_epochs` has gone, in [0, 1].

    A zero-length ramp jumps to 1 at its start.
    """
    if done_epochs < start_epochs:
        return 0.0
    if length_epochs <= 0:
        return 1.0
    return min(1.0, (done_epochs - start_epochs) / length_epochs)


def _mixed_loss(logits: torch.Tensor, y: torch.Tensor, lb: torch.Tensor | None, kappa: float) -> torch.Tensor:
    natural = F.cross_entropy(logits, y)
    if lb is None:
        return natural
    return kappa * natural + (1.0 - kappa) * bounds.verified_loss(lb, y).mean()


@register_defense
class IntervalBoundPropagation(Defense):
    """Gowal et al.: kappa * CE + (1 - kappa) * verified CE of the elided IBP bounds at eps_now.

    eps is 0 (and kappa 1) for `warmup_epochs`, then both move linearly over `ramp_epochs`: eps to
    eps_train = eps_train_factor * eps, kappa to kappa_final.
    """

    name = "ibp"

    def schedule(self, progress: TrainProgress) -> dict[str, float]:
        """Current eps and kappa at this batch."""
        warmup = schedule_epochs(self.params["warmup_epochs"], progress.epochs)
        ramp = schedule_epochs(self.params["ramp_epochs"], progress.epochs)
        t = ramp_fraction(progress.epoch_fraction, warmup, ramp)
        eps_train = float(self.eps) * float(self.params["eps_train_factor"])
        kappa_final = float(self.params["kappa_final"])
        return {"eps": t * eps_train, "kappa": 1.0 - t * (1.0 - kappa_final)}

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: TrainProgress
    ) -> torch.Tensor:
        now = self.schedule(progress)
        logits = model(x)
        # At kappa 1 the verified term has no weight: skip the bound pass (the whole warm-up).
        lb = None if now["kappa"] >= 1.0 else bounds.margin_lower_bounds(model, x, y, now["eps"], "ibp")
        return _mixed_loss(logits, y, lb, now["kappa"])

    def describe_epoch(self, progress: TrainProgress) -> dict[str, float]:
        return self.schedule(progress)


@register_defense
class CrownIbp(Defense):
    """Zhang et al. 2020: kappa * CE + (1 - kappa) * verified CE of beta * CROWN-IBP + (1 - beta) * IBP.

    With t = eps_now / eps_train along the ramp, beta = 1 - t (1 - beta_final) and
    kappa = 1 - t (1 - kappa_final).
    """

    name = "crown_ibp"

    def schedule(self, progress: TrainProgress) -> dict[str, float]:
        """Current eps, beta and kappa at this batch."""
        start = schedule_epochs(self.params["ramp_start_epochs"], progress.epochs)
        length = schedule_epochs(self.params["ramp_epochs"], progress.epochs)
        t = ramp_fraction(progress.epoch_fraction, start, length)
        eps_train = float(self.eps) * float(self.params["eps_train_factor"])
        return {
            "eps": t * eps_train,
            "beta": 1.0 - t * (1.0 - float(self.params["beta_final"])),
            "kappa": 1.0 - t * (1.0 - float(self.params["kappa_final"])),
        }

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: TrainProgress
    ) -> torch.Tensor:
        now = self.schedule(progress)
        logits = model(x)
        lb = None
        if now["kappa"] < 1.0:
            lb = bounds.crown_ibp_margin_bounds(model, x, y, now["eps"], min(1.0, max(0.0, now["beta"])))
        return _mixed_loss(logits, y, lb, now["kappa"])

    def describe_epoch(self, progress: TrainProgress) -> dict[str, float]:
        return self.schedule(progress)


def diffai_worst_margin(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, domain: str
) -> torch.Tensor:
    """DiffAI v1's max_j r_j: r_j bounds z_j - z_y from above for j != y, and r_y = -1.

    The box domain takes the unelided logit intervals, r_j = ub(z_j) - lb(z_y); the zonotope domain takes
    the DeepZ margin bounds, r_j = -lb(z_y - z_j).

    Args:
        model: a bound-engine model.
        x: inputs.
        y: labels.
        eps: L-inf radius.
        domain: "box" or "zonotope".

    Returns:
        (N,) worst margins.
    """
    if domain == "box":
        lower, upper = bounds.interval_bounds(model, x, eps)
        r = upper - lower.gather(1, y.unsqueeze(1))
    elif domain == "zonotope":
        r = -bounds.margin_lower_bounds(model, x, y, eps, "zonotope")
    else:
        raise ValueError(f"unknown DiffAI domain {domain!r}")
    r = r.scatter(1, y.unsqueeze(1), -1.0)
    return r.max(dim=1).values


@register_defense
class DiffAi(Defense):
    """DiffAI v1 as the CCS'19 code ran it: plain CE, then (tw softplus(max_j r_j) + sw CE) / (tw + sw).

    The abstract loss starts after `natural_epochs`; eps grows from eps_start_factor * eps to eps over
    `ramp_epochs` and then stays.
    """

    name = "diffai"

    def __init__(self, params: dict[str, Any], eps: float | None):
        super().__init__(params, eps)
        clip = float(params["grad_clip_norm"])
        self.grad_clip_norm = clip if clip > 0 else None

    def schedule(self, progress: TrainProgress) -> dict[str, float]:
        """Current eps (0 during the plain-CE phase) and whether the abstract loss is on."""
        natural = schedule_epochs(self.params["natural_epochs"], progress.epochs)
        ramp = schedule_epochs(self.params["ramp_epochs"], progress.epochs)
        if progress.epoch_fraction < natural:
            return {"eps": 0.0, "abstract": 0.0}
        start = float(self.eps) * float(self.params["eps_start_factor"])
        t = ramp_fraction(progress.epoch_fraction, natural, ramp)
        return {"eps": start + t * (float(self.eps) - start), "abstract": 1.0}

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: TrainProgress
    ) -> torch.Tensor:
        now = self.schedule(progress)
        natural = F.cross_entropy(model(x), y)
        if not now["abstract"]:
            return natural
        worst = diffai_worst_margin(model, x, y, now["eps"], self.params["domain"])
        tw, sw = float(self.params["abstract_weight"]), float(self.params["natural_weight"])
        return (tw * F.softplus(worst).mean() + sw * natural) / (tw + sw)

    def describe_epoch(self, progress: TrainProgress) -> dict[str, float]:
        return self.schedule(progress)


@register_defense
class DualBound(Defense):
    """Wong & Kolter: the verified CE of the dual bound only, eps linear from eps_start_factor * eps.

    With `projections` > 0 the intermediate bounds are the random-projection estimate (Cauchy, median) of
    Wong et al. 2018, the CCS'19 authors' training recipe; the estimate is not sound and serves training only.
    """

    name = "dual"

    def __init__(self, params: dict[str, Any], eps: float | None):
        super().__init__(params, eps)
        clip = float(params["grad_clip_norm"])
        self.grad_clip_norm = clip if clip > 0 else None

    def schedule(self, progress: TrainProgress) -> dict[str, float]:
        """Current eps at this batch."""
        ramp = schedule_epochs(self.params["ramp_epochs"], progress.epochs)
        start = float(self.eps) * float(self.params["eps_start_factor"])
        t = ramp_fraction(progress.epoch_fraction, 0.0, ramp)
        return {"eps": start + t * (float(self.eps) - start)}

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: TrainProgress
    ) -> torch.Tensor:
        eps = self.schedule(progress)["eps"]
        projections = int(self.params.get("projections", 0))
        if projections:
            lb = bounds.dual_margin_estimate(model, x, y, eps, projections)
        else:
            lb = bounds.margin_lower_bounds(model, x, y, eps, "dual")
        return bounds.verified_loss(lb, y).mean()

    def describe_epoch(self, progress: TrainProgress) -> dict[str, float]:
        return self.schedule(progress)
