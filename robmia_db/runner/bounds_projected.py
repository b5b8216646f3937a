"""Runner layer: Wong & Kolter's dual bound with random Cauchy projections (a training estimate, NOT sound).

Wong, Schmidt, Metzen & Kolter 2018 ("Scaling provable adversarial defenses", section 3.2), as
convex_adversarial 0.4.4 runs it with `proj=k, norm_type="l1_median", bounded_input=True`: the intermediate
(pre-activation) bounds are computed in forward mode, and every l1 norm they need is estimated by the median
of |<a, R_i>| over k Cauchy vectors R_i (the median of |Cauchy(scale s)| is s). The margin bounds themselves
come from one exact backward pass over the relaxations built on these estimates. The estimate can exceed the
true bound, so it is for training only; every recorded (verified) signal uses the exact `dual` bound.

Forward-mode state per sample: a stack of K channels on h_i, (N, K, *shape(h_i)), pushed through the linear
parts of the layers (no bias) and scaled by each ReLU's slope d. Channel 0 is the "centre"
M = b + A c - sum_r A_r(d_r l_r 1_I_r) / 2, with the biases added; the others come in groups whose |values|
are reduced (median for projections, sum for exact terms). At each ReLU the pre-activation bounds are
M -/+ D with D the signed half-sum of the reduced groups:
  - input: +|A (R u)|/2 and -|A (R l)|/2 (this identity needs 0 <= l <= u: inputs in [x_min >= 0, x_max]);
    if the input has no more than k entries, one exact group |A (e_i (u_i - l_i))| / 2 instead;
  - each earlier ReLU r: +|A_r (d_r l_r R_r on the unstable set I_r)| / 2, or exact unit channels when the
    whole batch has no more than k unstable neurons there (as convex_adversarial decides).
Random draws follow convex_adversarial's order (one (1, k, *input) Cauchy tensor, then per ReLU the unstable
entries of (N, k, *shape) in row-major order), so seeding both with the same global seed gives the same draws.

Imports torch and the bound engine's internal modules only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robmia_db.runner.bounds_core import _affine, _Network
from robmia_db.runner.bounds_linear import _Relaxation, _relu_relaxation

_MEDIAN, _SUM = "median", "sum"


def projected_relaxations(
    net: _Network,
    box_lower: Tensor,
    box_upper: Tensor,
    projections: int,
    generator: torch.Generator | None = None,
) -> dict[int, _Relaxation]:
    """Same-slope relaxations of every ReLU, on pre-activation bounds estimated with Cauchy projections.

    Args:
        net: the checked network.
        box_lower: input box lower end (N, *input_shape), >= 0.
        box_upper: input box upper end.
        projections: k, the number of Cauchy projections per l1 norm.
        generator: random source for the Cauchy draws (the global one when None).

    Returns:
        {ReLU index: relaxation}, as `_linear_relaxations` returns for the exact dual bound.
    """
    if projections < 1:
        raise ValueError(f"projections must be >= 1 (got {projections})")
    if box_lower.numel() and float(box_lower.min()) < 0:
        raise ValueError("random projections need inputs >= 0 (the l1 identity uses |a u| = |a| u)")
    n = box_lower.shape[0]
    center = (box_lower + box_upper) / 2
    groups: list[tuple[int, int, str, float]] = []  # (first channel, end, reducer, sign)
    if box_lower[0].numel() > projections:
        draws = box_lower.new_empty(1, projections, *box_lower.shape[1:]).cauchy_(generator=generator)
        channels = torch.cat(
            [center.unsqueeze(1), draws * box_upper.unsqueeze(1), draws * box_lower.unsqueeze(1)], 1
        )
        groups += [(1, 1 + projections, _MEDIAN, 0.5), (1 + projections, 1 + 2 * projections, _MEDIAN, -0.5)]
    else:
        size = box_lower[0].numel()
        eye = torch.eye(size, dtype=box_lower.dtype, device=box_lower.device)
        width = (box_upper - box_lower).flatten(1)
        exact = (eye.unsqueeze(0) * width.unsqueeze(1)).reshape(n, size, *box_lower.shape[1:])
        channels = torch.cat([center.unsqueeze(1), exact], 1)
        groups.append((1, 1 + size, _SUM, 0.5))

    relaxations: dict[int, _Relaxation] = {}
    for index, layer in enumerate(net.layers[:-1]):
        if isinstance(layer, nn.ReLU):
            lower, upper = _estimated_bounds(channels, groups)
            relaxation = _relu_relaxation(lower, upper, "same")
            relaxations[index] = relaxation
            channels, groups = _through_relu(
                channels, groups, relaxation, lower, upper, projections, generator
            )
        elif isinstance(layer, nn.Flatten):
            channels = channels.flatten(2)
        else:
            channels = _affine_channels(layer, channels)
    return relaxations


def _estimated_bounds(channels: Tensor, groups: list[tuple[int, int, str, float]]) -> tuple[Tensor, Tensor]:
    spread = torch.zeros_like(channels[:, 0])
    for first, end, reducer, sign in groups:
        magnitudes = channels[:, first:end].abs()
        # torch.median takes the lower middle value for even k, as convex_adversarial does.
        reduced = magnitudes.median(dim=1).values if reducer == _MEDIAN else magnitudes.sum(dim=1)
        spread = spread + sign * reduced
    return channels[:, 0] - spread, channels[:, 0] + spread


def _through_relu(
    channels: Tensor,
    groups: list[tuple[int, int, str, float]],
    relaxation: _Relaxation,
    lower: Tensor,
    upper: Tensor,
    projections: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, list[tuple[int, int, str, float]]]:
    slope = relaxation.upper_slope
    unstable = (lower < 0) & (upper > 0)
    # The centre takes half the ReLU's intercept (the "nu_one" term of the estimate, exact in both modes).
    scaled = channels * slope.unsqueeze(1)
    center = scaled[:, :1] + (relaxation.upper_intercept / 2).unsqueeze(1)
    scaled_lower = slope * lower * unstable.to(lower.dtype)  # d_i l_i on the unstable set, 0 elsewhere
    count = int(unstable.sum())
    first = channels.shape[1]
    if count > projections:
        mask = unstable.unsqueeze(1).expand(-1, projections, *unstable.shape[1:])
        draws = lower.new_zeros(mask.shape)
        draws[mask] = lower.new_empty(count * projections).cauchy_(generator=generator)
        new = scaled_lower.unsqueeze(1) * draws
        groups = [*groups, (first, first + projections, _MEDIAN, 0.5)]
    elif count:
        new = _unit_channels(scaled_lower, unstable)
        groups = [*groups, (first, first + new.shape[1], _SUM, 0.5)]
    else:
        new = None
    parts = [center, scaled[:, 1:]] + ([new] if new is not None else [])
    return torch.cat(parts, 1), groups


def _unit_channels(values: Tensor, unstable: Tensor) -> Tensor:
    """(N, m, *shape): one channel per unstable neuron of each sample holding its value, zero-padded to m."""
    n = values.shape[0]
    flat_mask = unstable.flatten(1)
    counts = flat_mask.sum(1)
    most = int(counts.max())
    neurons = torch.argsort((~flat_mask).to(torch.uint8), dim=1, stable=True)[:, :most]
    valid = (torch.arange(most, device=values.device) < counts.unsqueeze(1)).to(values.dtype)
    picked = values.flatten(1).gather(1, neurons) * valid
    units = values.new_zeros(n, most, flat_mask.shape[1])
    return units.scatter(2, neurons.unsqueeze(2), picked.unsqueeze(2)).reshape(n, most, *values.shape[1:])


def _affine_channels(layer: nn.Module, channels: Tensor) -> Tensor:
    n, k = channels.shape[:2]
    out = _affine(layer, channels.reshape(n * k, *channels.shape[2:]), with_bias=False)
    out = out.reshape(n, k, *out.shape[1:])
    if layer.bias is None:
        return out
    bias = layer.bias if isinstance(layer, nn.Linear) else layer.bias.reshape(-1, 1, 1)
    return torch.cat([out[:, :1] + bias, out[:, 1:]], 1)
