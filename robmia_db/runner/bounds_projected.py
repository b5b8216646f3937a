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
        box_lower: input box lower end (N, *input_shape), >= 0 (the caller clips it at x_min >= 0; not
            re-checked here, which would cost a device-to-host sync per batch on a GPU).
        box_upper: input box upper end.
        projections: k, the number of Cauchy projections per l1 norm.
        generator: random source for the Cauchy draws (the global one when None).

    Returns:
        {ReLU index: relaxation}, as `_linear_relaxations` returns for the exact dual bound.
    """
    if projections < 1:
        raise ValueError(f"projections must be >= 1 (got {projections})")
    n = box_lower.shape[0]
    center = (box_lower + box_upper) / 2
    # Parts are kept apart: slicing one stacked tensor would make autograd zero-fill all of it per slice.
    parts = [center.unsqueeze(1)]
    groups: list[tuple[str, float]] = []  # per part after the centre: (reducer, sign)
    if box_lower[0].numel() > projections:
        draws = box_lower.new_empty(1, projections, *box_lower.shape[1:]).cauchy_(generator=generator)
        parts += [draws * box_upper.unsqueeze(1), draws * box_lower.unsqueeze(1)]
        groups += [(_MEDIAN, 0.5), (_MEDIAN, -0.5)]
    else:
        size = box_lower[0].numel()
        eye = torch.eye(size, dtype=box_lower.dtype, device=box_lower.device)
        width = (box_upper - box_lower).flatten(1)
        parts.append((eye.unsqueeze(0) * width.unsqueeze(1)).reshape(n, size, *box_lower.shape[1:]))
        groups.append((_SUM, 0.5))

    relaxations: dict[int, _Relaxation] = {}
    last_relu = max((i for i, layer in enumerate(net.layers) if isinstance(layer, nn.ReLU)), default=-1)
    for index, layer in enumerate(net.layers[: last_relu + 1]):
        if isinstance(layer, nn.ReLU):
            lower, upper = _estimated_bounds(parts, groups)
            relaxation = _relu_relaxation(lower, upper, "same")
            relaxations[index] = relaxation
            if index == last_relu:
                break  # nothing later needs intermediate bounds (nor random draws)
            parts, groups = _through_relu(parts, groups, relaxation, lower, upper, projections, generator)
        elif isinstance(layer, nn.Flatten):
            parts = [part.flatten(2) for part in parts]
        else:
            parts = _affine_parts(layer, parts)
    return relaxations


def _estimated_bounds(parts: list[Tensor], groups: list[tuple[str, float]]) -> tuple[Tensor, Tensor]:
    center = parts[0][:, 0]
    spread = torch.zeros_like(center)
    for part, (reducer, sign) in zip(parts[1:], groups, strict=True):
        magnitudes = part.abs()
        # torch.median takes the lower middle value for even k, as convex_adversarial does.
        reduced = magnitudes.median(dim=1).values if reducer == _MEDIAN else magnitudes.sum(dim=1)
        spread = spread + sign * reduced
    return center - spread, center + spread


def _through_relu(
    parts: list[Tensor],
    groups: list[tuple[str, float]],
    relaxation: _Relaxation,
    lower: Tensor,
    upper: Tensor,
    projections: int,
    generator: torch.Generator | None,
) -> tuple[list[Tensor], list[tuple[str, float]]]:
    slope = relaxation.upper_slope
    unstable = (lower < 0) & (upper > 0)
    scale = slope.unsqueeze(1)
    # The centre takes half the ReLU's intercept (the "nu_one" term of the estimate, exact in both modes).
    parts = [parts[0] * scale + (relaxation.upper_intercept / 2).unsqueeze(1)] + [
        part * scale for part in parts[1:]
    ]
    scaled_lower = slope * lower * unstable.to(lower.dtype)  # d_i l_i on the unstable set, 0 elsewhere
    count = int(unstable.sum())
    if count > projections:
        mask = unstable.unsqueeze(1).expand(-1, projections, *unstable.shape[1:])
        # Row-major fill of the unstable entries: convex_adversarial's order, so seeded draws agree.
        values = lower.new_empty(count * projections).cauchy_(generator=generator)
        draws = lower.new_zeros(mask.shape).masked_scatter(mask, values)
        parts.append(scaled_lower.unsqueeze(1) * draws)
        groups = [*groups, (_MEDIAN, 0.5)]
    elif count:
        parts.append(_unit_channels(scaled_lower, unstable))
        groups = [*groups, (_SUM, 0.5)]
    return parts, groups


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


def _affine_parts(layer: nn.Module, parts: list[Tensor]) -> list[Tensor]:
    # One call per part: measured on CPU, a convolution over all parts stacked (thousands of images) runs
    # 1.6x slower forward and backward than the same work in calls of a few hundred images.
    out = []
    for part in parts:
        n, k = part.shape[:2]
        mapped = _affine(layer, part.reshape(n * k, *part.shape[2:]), with_bias=False)
        out.append(mapped.reshape(n, k, *mapped.shape[1:]))
    if layer.bias is not None:
        out[0] = out[0] + (layer.bias if isinstance(layer, nn.Linear) else layer.bias.reshape(-1, 1, 1))
    return out
