"""Runner layer: the verified bound engine (IBP, CROWN-IBP, CROWN, dual, DeepZ); imports torch and our errors.

Every method bounds the logit margins z_y - z_j of a ReLU `nn.Sequential` (Conv2d, Linear, ReLU, Flatten)
over the L-inf ball of radius eps around x intersected with [x_min, x_max]. All methods are batched over
samples, run on the model's device and dtype, and are differentiable with respect to the model parameters.

Notation used below: h_0 = x and h_{i+1} = layer_i(h_i); "pre-activation bounds" of the ReLU at index i
are bounds of h_i. A "linear spec" A on h_k has shape (N, S, *shape(h_k)) and asks for lower bounds of
<A[n, s], h_k[n]> over the input box.

Implementation: bounds_core (checks, intervals, margins), bounds_interval (the IBP kernel), bounds_linear (CROWN
family), bounds_backward, bounds_projected, bounds_zonotope.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robmia_db.runner.bounds_core import (
    _check_labels,
    _input_box,
    _model_dtype,
    _Network,
    check_supported,
)
from robmia_db.runner.bounds_interval import elided_margins, interval_last, interval_relaxations
from robmia_db.runner.bounds_linear import _final_backward, _linear_relaxations
from robmia_db.runner.bounds_projected import projected_relaxations
from robmia_db.runner.bounds_zonotope import _zonotope_margins

BOUND_METHODS = ("ibp", "crown_ibp", "crown", "dual", "zonotope")

__all__ = [
    "BOUND_METHODS",
    "check_supported",
    "crown_ibp_margin_bounds",
    "dual_margin_estimate",
    "interval_bounds",
    "margin_lower_bounds",
    "verified_loss",
    "worst_case_logits",
]


def interval_bounds(
    model: nn.Sequential, x: Tensor, eps: float | Tensor, x_min: float = 0.0, x_max: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Interval (DiffAI "Box") bounds of the logits, without merging the last layer into a specification.

    Args:
        model: a supported `nn.Sequential` (see `check_supported`).
        x: inputs (N, *input_shape).
        eps: L-inf radius, a float or a per-sample tensor of shape (N,).
        x_min: lower end of the valid input range.
        x_max: upper end of the valid input range.

    Returns:
        (lower, upper) logit bounds, each (N, C).
    """
    net = _Network.build(model, x)
    box = _input_box(x, eps, x_min, x_max, _model_dtype(model))
    centre, width, _ = interval_last(net, *box, upto=len(net.layers), owned=True)
    return torch.sub(centre, width, alpha=0.5), torch.add(centre, width, alpha=0.5)


def margin_lower_bounds(
    model: nn.Sequential,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    method: str,
    x_min: float = 0.0,
    x_max: float = 1.0,
) -> Tensor:
    """Lower bounds of the logit margins z_y - z_j over the L-inf ball intersected with [x_min, x_max].

    Methods: "ibp" (intervals, last layer merged with the specification as in Gowal et al.); "crown_ibp"
    (IBP intermediate bounds, one CROWN backward pass with the adaptive lower slope); "crown" (our variant,
    "CROWN intersected with IBP": CROWN intermediate bounds only for the neurons that interval bounds leave
    unstable, as auto_LiRPA selects them, then intersected elementwise with those interval bounds (one
    interval step from the refined bounds of the layer below, so at least as tight as plain IBP), which
    auto_LiRPA does not do; never looser than plain CROWN, and tighter where the intervals win); "dual" (Wong & Kolter,
    i.e. CROWN with lower slope u/(u-l) and all intermediate bounds by the same method); "zonotope" (DeepZ).

    Args:
        model: a supported `nn.Sequential` (see `check_supported`).
        x: inputs (N, *input_shape).
        y: labels (N,).
        eps: L-inf radius, a float or a per-sample tensor of shape (N,).
        method: one of `BOUND_METHODS`.
        x_min: lower end of the valid input range.
        x_max: upper end of the valid input range.

    Returns:
        (N, C) tensor: entry [n, j] bounds z_y - z_j from below for j != y; entry [n, y] is 0.
    """
    if method not in BOUND_METHODS:
        raise ValueError(f"unknown bound method {method!r}; choose one of {', '.join(BOUND_METHODS)}")
    net = _Network.build(model, x)
    y = _check_labels(y, x, net.layers[-1].out_features)
    box_lower, box_upper = _input_box(x, eps, x_min, x_max, _model_dtype(model))
    penultimate = len(net.layers) - 1
    if method == "ibp":
        return elided_margins(net, interval_last(net, box_lower, box_upper, penultimate, owned=True), y)
    if method == "crown_ibp":
        relaxations, _ = interval_relaxations(net, box_lower, box_upper, penultimate)
        return _final_backward(net, y, relaxations, box_lower, box_upper)
    if method == "crown":
        relaxations = _linear_relaxations(net, box_lower, box_upper, "adaptive", unstable_only=True)
        return _final_backward(net, y, relaxations, box_lower, box_upper)
    if method == "dual":
        relaxations = _linear_relaxations(net, box_lower, box_upper, "same", unstable_only=False)
        return _final_backward(net, y, relaxations, box_lower, box_upper)
    return _zonotope_margins(net, box_lower, box_upper, y)


def dual_margin_estimate(
    model: nn.Sequential,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    projections: int,
    x_min: float = 0.0,
    x_max: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Wong & Kolter's dual margin bounds with Cauchy random projections: a training estimate, NOT a bound.

    The intermediate bounds estimate each l1 norm by the median over `projections` Cauchy projections
    (Wong et al. 2018, "Scaling provable adversarial defenses"; convex_adversarial's
    `proj=k, norm_type="l1_median", bounded_input=True`); the margins then come from the exact backward
    pass over those relaxations. Unlike convex_adversarial, whose last step uses the unclipped eps ball, the
    final pass uses the ball clipped to [x_min, x_max] throughout. The estimate may exceed the true bound,
    so verified signals use `margin_lower_bounds(..., "dual")`.

    Args:
        model: a supported `nn.Sequential`.
        x: inputs (N, *input_shape) in [x_min, x_max], with x_min >= 0.
        y: labels (N,).
        eps: L-inf radius, a float or a per-sample tensor of shape (N,).
        projections: k, Cauchy projections per l1 norm (the CCS'19 authors: 20 Fashion-MNIST, 50 Yale).
        x_min: lower end of the valid input range (>= 0).
        x_max: upper end of the valid input range.
        generator: random source of the projections; the global torch generator when None.

    Returns:
        (N, C) estimated margin lower bounds, 0 at the label.
    """
    if x_min < 0:
        raise ValueError(f"random projections need x_min >= 0 (got {x_min})")
    net = _Network.build(model, x)
    y = _check_labels(y, x, net.layers[-1].out_features)
    box_lower, box_upper = _input_box(x, eps, x_min, x_max, _model_dtype(model))
    relaxations = projected_relaxations(net, box_lower, box_upper, projections, generator)
    return _final_backward(net, y, relaxations, box_lower, box_upper)


def crown_ibp_margin_bounds(
    model: nn.Sequential,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    beta: float,
    x_min: float = 0.0,
    x_max: float = 1.0,
) -> Tensor:
    """CROWN-IBP training bound: beta * lb_CROWN-IBP + (1 - beta) * lb_IBP (Zhang et al. 2020).

    Args:
        model: a supported `nn.Sequential`.
        x: inputs (N, *input_shape).
        y: labels (N,).
        eps: L-inf radius, a float or a per-sample tensor of shape (N,).
        beta: mixing weight in [0, 1]; the CROWN pass is skipped at 0.
        x_min: lower end of the valid input range.
        x_max: upper end of the valid input range.

    Returns:
        (N, C) margin lower bounds, 0 at the label.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1] (got {beta})")
    net = _Network.build(model, x)
    y = _check_labels(y, x, net.layers[-1].out_features)
    box_lower, box_upper = _input_box(x, eps, x_min, x_max, _model_dtype(model))
    relaxations, last = interval_relaxations(net, box_lower, box_upper, len(net.layers) - 1)
    ibp = elided_margins(net, last, y) if beta < 1.0 else None
    if beta == 0.0:
        return ibp
    crown = _final_backward(net, y, relaxations, box_lower, box_upper)
    if ibp is None:
        return crown
    return beta * crown + (1.0 - beta) * ibp


def worst_case_logits(lb: Tensor, y: Tensor) -> Tensor:
    """Verified worst-case logits: z_hat_y = 0 and z_hat_j = -lb_j (float32).

    Args:
        lb: (N, C) margin lower bounds from `margin_lower_bounds`.
        y: labels (N,).

    Returns:
        (N, C) float32 logits whose softmax at y is the verified worst-case confidence.
    """
    logits = (-lb).to(torch.float32)
    return logits.scatter(1, y.to(device=lb.device, dtype=torch.long).unsqueeze(1), 0.0)


def verified_loss(lb: Tensor, y: Tensor) -> Tensor:
    """Per-sample verified (robust) cross-entropy log(1 + sum_{j != y} exp(-lb_j)) = CE(z_hat, y).

    Args:
        lb: (N, C) margin lower bounds.
        y: labels (N,).

    Returns:
        (N,) float32 losses, computed with logsumexp so that very negative bounds do not overflow.
    """
    return torch.logsumexp(worst_case_logits(lb, y), dim=1)
