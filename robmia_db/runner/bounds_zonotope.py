"""Runner layer: the exact DeepZ zonotope domain of the bound engine; imports torch and bounds_core only."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robmia_db.runner.bounds_core import (
    _affine,
    _affine_grouped,
    _margin_spec,
    _Network,
    _scatter_margins,
    memory_budget,
)


def _zonotope_margins(net: _Network, box_lower: Tensor, box_upper: Tensor, y: Tensor) -> Tensor:
    """Exact DeepZ (Singh et al. 2018): one new generator per crossing ReLU, none dropped."""
    n = box_lower.shape[0]
    generators_worst = net.size(0) + sum(
        net.size(i) for i, layer in enumerate(net.layers) if isinstance(layer, nn.ReLU)
    )
    widest = max(net.size(i) for i in range(len(net.layers)))
    chunk = max(1, memory_budget() // (generators_worst * widest))
    parts = [
        _zonotope_rows(
            net, box_lower[first : first + chunk], box_upper[first : first + chunk], y[first : first + chunk]
        )
        for first in range(0, max(n, 1), chunk)
    ]
    lower = torch.cat([p[0] for p in parts])
    others = torch.cat([p[1] for p in parts])
    return _scatter_margins(lower, others, net.layers[-1].out_features)


def _zonotope_rows(net: _Network, box_lower: Tensor, box_upper: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    n = box_lower.shape[0]
    center = (box_upper + box_lower) / 2
    radius = ((box_upper - box_lower) / 2).flatten(1)
    generators = torch.diag_embed(radius).reshape(n, radius.shape[1], *center.shape[1:])
    for layer in net.layers[:-1]:
        if isinstance(layer, nn.Flatten):
            center, generators = center.flatten(1), generators.flatten(2)
        elif isinstance(layer, nn.ReLU):
            spread = generators.abs().sum(1)
            lower, upper = center - spread, center + spread
            crossing = (lower < 0) & (upper > 0)
            gap = torch.where(crossing, upper - lower, torch.ones_like(upper))
            slope = torch.where(crossing, upper / gap, (lower >= 0).to(lower.dtype))
            shift = torch.where(crossing, -slope * lower / 2, torch.zeros_like(lower))
            center = slope * center + shift
            generators = slope.unsqueeze(1) * generators
            fresh = _new_generators(shift.flatten(1), crossing.flatten(1))
            generators = torch.cat([generators, fresh.reshape(n, fresh.shape[1], *center.shape[1:])], 1)
        else:
            center = _affine(layer, center)
            generators = _affine_grouped(layer, generators)
    spec, bias, others = _margin_spec(net.layers[-1], y)
    center_margin = torch.bmm(spec, center.unsqueeze(2)).squeeze(2) + bias
    spread = torch.bmm(generators, spec.transpose(1, 2)).abs().sum(1)
    return center_margin - spread, others


def _new_generators(shift: Tensor, crossing: Tensor) -> Tensor:
    """(N, M, size) generators, one per crossing neuron (value = shift there), M = most crossings in the batch."""
    n, size = shift.shape
    counts = crossing.sum(1)
    most = int(counts.max()) if n else 0
    if most == 0:
        return shift.new_zeros(n, 0, size)
    neurons = torch.argsort((~crossing).to(torch.uint8), dim=1, stable=True)[:, :most]
    valid = torch.arange(most, device=shift.device) < counts.unsqueeze(1)
    values = shift.gather(1, neurons) * valid.to(shift.dtype)
    return shift.new_zeros(n, most, size).scatter(2, neurons.unsqueeze(2), values.unsqueeze(2))
