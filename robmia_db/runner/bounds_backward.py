"""Runner layer: the dense CROWN backward pass of the bound engine; imports torch and bounds_core only.

A dense linear spec on h_k is held flat, (N, S, F_k), in the engine's internal feature order: feature maps
(and vectors flattened from them) are channels-last, (H, W, C). Why: the interval pass already produces
channels-last maps, so ReLU slopes flatten without a copy; the transposed convolutions run about 2x faster
on channels-last data; and every elementwise step is a plain (N, S, F) x (N, 1, F) broadcast. A Linear layer
reading a flattened map gets its weight's columns permuted once (weight-sized) instead of permuting specs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robmia_db.runner.bounds_core import _Network
from robmia_db.runner.bounds_interval import _cached

# Rows of the spec processed at once, in elements of the widest spec tensor (8 MB in float32). Measured on
# CPU at 28x28: elementwise passes over tens of MB run 2-6x slower per element (no cache reuse, fresh pages
# per allocation), while transposed convolutions slow down below a few hundred images (1.3x at 333 vs 666).
_CACHE_BUDGET_ELEMENTS = 2**21
# The first layer's phase convolution gets its output channels padded to a multiple of this (AVX2's 8 floats).
_PHASE_CHANNELS = 8


def map_order(net: _Network, index: int) -> tuple[int, int, int] | None:
    """(C, H, W) of the map whose channels-last order h_index uses internally, or None (natural order)."""
    shape = net.shapes[index]
    if len(shape) == 3:
        return tuple(shape)
    k = index
    while k > 0 and isinstance(net.layers[k - 1], nn.ReLU):
        k -= 1
    if k > 0 and isinstance(net.layers[k - 1], nn.Flatten) and len(net.shapes[k - 1]) == 3:
        return tuple(net.shapes[k - 1])
    return None


def to_internal(t: Tensor, net: _Network, index: int, lead: int = 1) -> Tensor:
    """(*lead dims, *shape of h_index) in natural order -> (*lead dims, F) in internal order."""
    order = map_order(net, index)
    head = t.shape[:lead]
    if order is None:
        return t.reshape(*head, -1)
    c, h, w = order
    return t.reshape(*head, c, h, w).movedim(lead, -1).reshape(*head, -1)


def internal_weight(layer: nn.Linear, net: _Network, index: int) -> Tensor:
    """The Linear layer at `index` with its columns in the internal order of its input h_index (cached)."""
    order = map_order(net, index)
    return _cached(("internal", order), layer, lambda: (to_internal(layer.weight, net, index),))[0]


def flat_relaxation(relaxation, net: _Network, index: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """(lower_slope, upper_intercept, upper_slope - lower_slope or None when equal), each (N, 1, F) internal."""
    upper = to_internal(relaxation.upper_slope, net, index).unsqueeze(1)
    intercept = to_internal(relaxation.upper_intercept, net, index).unsqueeze(1)
    if relaxation.same_slopes:
        return upper, intercept, None
    lower = to_internal(relaxation.lower_slope, net, index).unsqueeze(1)
    return lower, intercept, upper - lower


def cache_chunk(samples: int, per_sample: int, budget: int) -> int:
    """Samples per chunk so that one spec tensor stays under both the memory and the cache budget."""
    return max(1, min(budget, _CACHE_BUDGET_ELEMENTS) // max(1, per_sample)) if samples else 1


def backward_rows(
    net: _Network,
    spec: Tensor,
    bias: Tensor,
    start: int,
    relaxations: dict[int, tuple[Tensor, Tensor, Tensor | None]],
    box: tuple[Tensor, Tensor],
) -> Tensor:
    """Lower bounds (N, S) of <spec, h_start> + bias over the input box, by one CROWN backward pass.

    Args:
        spec: (N, S, F_start) in internal order.
        bias: (N, S).
        relaxations: `flat_relaxation` of every ReLU below `start`, rows matching spec.
        box: the input box's (centre, radius), each (N, 1, F_0) internal.
    """
    n, s = spec.shape[:2]
    # Without autograd, specs made here are overwritten in place (one fresh multi-MB tensor less per ReLU).
    owned = False
    for index in range(start - 1, -1, -1):
        layer = net.layers[index]
        if isinstance(layer, nn.ReLU):
            spec, bias = _relu_pull_back(relaxations[index], spec, bias, owned and not spec.requires_grad)
            owned = True
        elif isinstance(layer, nn.Linear):
            if layer.bias is not None:
                bias = bias + spec @ layer.bias
            spec = spec @ internal_weight(layer, net, index)
        elif isinstance(layer, nn.Conv2d):
            c_out, h_out, w_out = net.shapes[index + 1]
            # The channels-last spec seen as an NCHW tensor with channels-last strides (no copy).
            maps = spec.reshape(n * s, h_out, w_out, c_out).permute(0, 3, 1, 2)
            if index == 0 and tuple(layer.dilation) == (1, 1):
                return _concretize_phases(layer, net, spec, maps, bias, box)
            if layer.bias is not None:
                bias = bias + spec.reshape(n, s, h_out * w_out, c_out).sum(2) @ layer.bias
            spec = _conv_transpose(layer, maps, net.shapes[index]).permute(0, 2, 3, 1).reshape(n, s, -1)
        owned = owned or not isinstance(layer, nn.Flatten)
        # Flatten: the internal order of its output is its input's, so nothing moves.
    return _concretize(spec, bias, *box, in_place=owned and not spec.requires_grad)


def _relu_pull_back(
    relaxation: tuple[Tensor, Tensor, Tensor | None], spec: Tensor, bias: Tensor, in_place: bool
) -> tuple[Tensor, Tensor]:
    """Spec on the ReLU input for a spec (N, S, F) on its output, and the bias gained from the intercepts.

    where(spec >= 0, lower, upper) * spec = lower * spec + (upper - lower) * min(spec, 0): three passes over
    the spec plus a matrix-vector product per sample for the intercepts (oriented (1, F) x (F, S), which
    runs about 5x faster on CPU than (S, F) x (F, 1)).
    """
    lower, intercept, gap = relaxation
    negative = spec.clamp(max=0)
    bias = bias + _dot(intercept, negative)
    pulled = spec.mul_(lower) if in_place else spec * lower
    if gap is None:
        return pulled, bias
    return pulled.addcmul_(negative, gap), bias


def _conv_transpose(layer: nn.Conv2d, maps: Tensor, in_shape: torch.Size) -> Tensor:
    """The transposed linear part of a convolution on NCHW maps, output sized to the layer's input."""
    output_padding = tuple(
        size_in - ((size_out - 1) * stride - 2 * pad + dil * (k - 1) + 1)
        for size_in, size_out, stride, pad, dil, k in zip(
            in_shape[-2:],
            maps.shape[-2:],
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.weight.shape[-2:],
            strict=True,
        )
    )
    return F.conv_transpose2d(
        maps, layer.weight, None, layer.stride, layer.padding, output_padding, 1, layer.dilation
    )


def _phase_weight(layer: nn.Conv2d) -> Tensor:
    """`_make_phase_weight`, cached per parameter version (bounds_interval._cached)."""
    return _cached(("phase",), layer, lambda: (_make_phase_weight(layer),))[0]


def _make_phase_weight(layer: nn.Conv2d) -> Tensor:
    """The transposed convolution as a stride-1 convolution with one output channel per (C_in, phase).

    A stride-s transposed convolution writes output pixel s*m + p (phase p) from taps k = s*t + p only; per
    phase that is an ordinary correlation with the flipped kernel taps t.
    """
    weight = layer.weight
    c_out, c_in, kh, kw = weight.shape
    sh, sw = layer.stride
    ph, pw = -(-kh // sh), -(-kw // sw)
    padded = F.pad(weight, (0, pw * sw - kw, 0, ph * sh - kh)).reshape(c_out, c_in, ph, sh, pw, sw)
    phases = padded.flip(2, 4).permute(1, 3, 5, 0, 2, 4).reshape(c_in * sh * sw, c_out, ph, pw)
    # Zero filters up to a multiple of `_PHASE_CHANNELS`: measured on CPU (oneDNN, AVX2) at 28x28, the
    # convolution to 8 channels runs 20 % faster than to the 4 of a grey stride-2 layer.
    extra = -phases.shape[0] % _PHASE_CHANNELS
    return torch.cat([phases, phases.new_zeros(extra, *phases.shape[1:])]) if extra else phases


def _concretize_phases(
    layer: nn.Conv2d, net: _Network, spec: Tensor, maps: Tensor, bias: Tensor, box: tuple[Tensor, Tensor]
) -> Tensor:
    """Concretize through the first convolution without assembling the input-sized spec.

    conv_transpose2d to a few channels (1 for grey images) is up to 4x slower on CPU than a convolution to
    C_in * stride^2 channels; the result is the input spec in "phase" layout (each output pixel exactly once,
    plus zero-weight cells past the borders), and the box radius is rearranged to the same layout instead.
    The centre term needs no input spec: <W^T a, c> + <a, b> = <a, W c + b>, one product with the layer's
    output at the box centre (per sample, not per spec), which also takes the layer's bias.

    Args:
        spec: (N, S, F_1) on the layer's output, internal order; `maps` is the same as NCHW (N * S, C, H, W).
    """
    n, s = bias.shape
    center, radius = box
    c, h, w = net.shapes[0]
    image = center.reshape(n, h, w, c).permute(0, 3, 1, 2)
    output = F.conv2d(image, layer.weight, layer.bias, layer.stride, layer.padding)
    bias = bias + _dot(output.permute(0, 2, 3, 1).reshape(n, 1, -1), spec)
    phase_weight = _phase_weight(layer)
    ph, pw = phase_weight.shape[-2:]
    phases = F.conv2d(maps, phase_weight, None, 1, (ph - 1, pw - 1))
    flat = phases.permute(0, 2, 3, 1).reshape(n, s, -1)
    radius = _phase_layout(radius, layer, net, phases.shape[-2:])
    return bias - _dot(radius, flat.abs_() if not flat.requires_grad else flat.abs())


def _phase_layout(t: Tensor, layer: nn.Conv2d, net: _Network, grid: torch.Size) -> Tensor:
    """An input-box tensor (N, 1, F_0) internal -> (N, 1, grid * channels of `_phase_weight`) in the phase layout."""
    c, h, w = net.shapes[0]
    (sh, sw), (pad_h, pad_w) = layer.stride, layer.padding
    image = t.reshape(-1, h, w, c).permute(0, 3, 1, 2)
    # Image row y sits at full-output row y + pad = s*m + p; rows no output reaches are cut (negative pad).
    full = F.pad(image, (pad_w, grid[1] * sw - w - pad_w, pad_h, grid[0] * sh - h - pad_h))
    cells = full.reshape(-1, c, grid[0], sh, grid[1], sw).permute(0, 2, 4, 1, 3, 5)
    cells = cells.reshape(t.shape[0], grid[0], grid[1], c * sh * sw)
    # The zero filters' channels (see `_phase_weight`) get a zero radius.
    return F.pad(cells, (0, -cells.shape[-1] % _PHASE_CHANNELS)).reshape(t.shape[0], 1, -1)


def _dot(vector: Tensor, spec: Tensor) -> Tensor:
    """<vector[n], spec[n, s]> for vector (N, 1, F) and spec (N, S, F) -> (N, S)."""
    return torch.bmm(vector, spec.transpose(1, 2)).squeeze(1)


def _concretize(spec: Tensor, bias: Tensor, center: Tensor, radius: Tensor, in_place: bool = False) -> Tensor:
    """Lower bound of <spec, h> + bias over the box centre +- radius; all flat internal."""
    bias = bias + _dot(center, spec)
    return bias - _dot(radius, spec.abs_() if in_place else spec.abs())
