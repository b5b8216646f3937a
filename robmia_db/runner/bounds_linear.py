"""Runner layer: the CROWN family of the bound engine (CROWN-IBP, CROWN, Wong & Kolter's dual).

Linear ReLU relaxations, the batched backward pass, receptive-field patches for convolutional intermediate
bounds, and layer-by-layer intermediate bounds. Imports torch and bounds_core only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robmia_db.runner.bounds_backward import (
    backward_rows,
    cache_chunk,
    flat_relaxation,
    internal_weight,
    to_internal,
)
from robmia_db.runner.bounds_core import (
    _interval_step,
    _is_affine,
    _margin_spec,
    _Network,
    _scatter_margins,
    memory_budget,
)


@dataclass(frozen=True)
class _Relaxation:
    """Linear bounds of one ReLU: lower_slope*z <= relu(z) <= upper_slope*z + upper_intercept."""

    lower_slope: Tensor
    upper_slope: Tensor
    upper_intercept: Tensor
    same_slopes: bool

    def rows(self, rows: slice) -> _Relaxation:
        return _Relaxation(
            self.lower_slope[rows], self.upper_slope[rows], self.upper_intercept[rows], self.same_slopes
        )

    def pull_back(
        self, spec: Tensor, slopes: tuple[Tensor, Tensor, Tensor | None], feature_dims: int
    ) -> tuple[Tensor, Tensor | None]:
        """Spec on the ReLU input and its intercept term, for a spec on the ReLU output.

        `slopes` are (lower_slope, upper_slope, upper_intercept) already shaped to broadcast with spec; the
        intercept term sums over the last `feature_dims` dimensions (None when upper_intercept is None).
        """
        lower_slope, upper_slope, upper_intercept = slopes
        negative = spec.clamp(max=0)
        intercept = None
        if upper_intercept is not None:
            intercept = (negative * upper_intercept).flatten(-feature_dims).sum(-1)
        if self.same_slopes:
            return spec * upper_slope, intercept
        # where(spec >= 0, lower, upper) * spec in two passes over the spec (slopes are window-sized).
        return (spec * lower_slope).addcmul_(negative, upper_slope - lower_slope), intercept


def _relu_relaxation(lower: Tensor, upper: Tensor, lower_rule: str) -> _Relaxation:
    """The triangle relaxation's upper line and a lower line chosen by `lower_rule`.

    "adaptive" (CROWN): slope 1 when u > -l, else 0. "same" (Fast-Lin, Wong & Kolter's dual): slope u/(u-l).
    """
    # Clamps and one ratio instead of masks and selects (about 3x faster on CPU), equal to the masked form
    # u/(u-l) on unstable neurons and (l >= 0) elsewhere, also when estimated bounds cross (l > u): the
    # numerator is 0 for inactive neurons and equals the denominator for active ones; the one 0/0 case
    # (l = 0 >= u) is filled with 1/1, which also keeps gradients finite and zero there.
    positive = torch.maximum(upper, lower).clamp(min=0)
    negative = lower.clamp(max=0).neg()
    denominator = positive + negative
    degenerate = denominator == 0
    upper_slope = positive.masked_fill(degenerate, 1.0) / denominator.masked_fill_(degenerate, 1.0)
    upper_intercept = upper_slope * negative
    if lower_rule == "adaptive":
        lower_slope = ((upper + lower > 0) | (lower >= 0)).to(lower.dtype)
        return _Relaxation(lower_slope, upper_slope, upper_intercept, same_slopes=False)
    return _Relaxation(upper_slope, upper_slope, upper_intercept, same_slopes=True)


def _backward_lower(
    net: _Network,
    spec: Tensor,
    bias: Tensor,
    start: int,
    relaxations: dict[int, _Relaxation | tuple[Tensor, Tensor, Tensor]],
    box_lower: Tensor,
    box_upper: Tensor,
    internal: bool = False,
) -> Tensor:
    """Lower bounds (N, S) of <spec, h_start> + bias over the input box, by one CROWN backward pass.

    `spec` is (N, S, *shape of h_start), or (N, S, F) in the internal order of bounds_backward when
    `internal`. The batch is split so that no spec tensor exceeds the memory budget, and into smaller
    chunks still for speed (see bounds_backward).
    """
    n, s = spec.shape[:2]
    if not internal:
        spec = to_internal(spec, net, start, lead=2)
    # Relaxations given as tuples are flat already (bounds_interval.interval_relaxations).
    flat = {
        i: r if isinstance(r, tuple) else flat_relaxation(r, net, i)
        for i, r in relaxations.items()
        if i < start
    }
    center = to_internal((box_upper + box_lower) / 2, net, 0).unsqueeze(1)
    radius = to_internal((box_upper - box_lower) / 2, net, 0).unsqueeze(1)
    widest = max(net.size(i) for i in range(start + 1))
    chunk = cache_chunk(n, s * widest, memory_budget())
    if chunk >= n:
        return backward_rows(net, spec, bias, start, flat, (center, radius))
    parts = []
    for first in range(0, n, chunk):
        rows = slice(first, first + chunk)
        parts.append(
            backward_rows(
                net,
                spec[rows],
                bias[rows],
                start,
                {i: tuple(t if t is None else t[rows] for t in r) for i, r in flat.items()},
                (center[rows], radius[rows]),
            )
        )
    return torch.cat(parts)


def _conv_chain(net: _Network, index: int) -> bool:
    """Whether h_index is a Conv2d output reached from the input through Conv2d and ReLU layers only."""
    layers = net.layers[:index]
    return isinstance(layers[-1], nn.Conv2d) and all(
        isinstance(layer, (nn.Conv2d, nn.ReLU)) for layer in layers
    )


def _windows(
    feature: Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    offset: tuple[int, int],
    grid: tuple[int, int],
    positions: Tensor | None,
) -> Tensor:
    """The (C, kh, kw) window of `feature` (N, C, H, W) that each spec's patch covers, zero outside the map.

    The patch of a spec at grid position (i, j) starts at (i * stride - offset) in feature coordinates.

    Returns:
        (N, S, C, kh, kw) for positions (N, S) (flat indices into `grid`), or (N, 1, cells, C, kh, kw) for
        every grid cell in order when positions is None.
    """
    n, channels, height, width = feature.shape
    bottom = max(0, (grid[0] - 1) * stride[0] - offset[0] + kernel[0] - height)
    right = max(0, (grid[1] - 1) * stride[1] - offset[1] + kernel[1] - width)
    padded = F.pad(feature, (offset[1], right, offset[0], bottom))
    columns = F.unfold(padded, kernel, stride=stride)
    rows_out = (padded.shape[2] - kernel[0]) // stride[0] + 1
    cols_out = (padded.shape[3] - kernel[1]) // stride[1] + 1
    columns = columns.reshape(n, -1, rows_out, cols_out)[:, :, : grid[0], : grid[1]].flatten(2)
    columns = columns.transpose(1, 2).contiguous()
    if positions is None:
        return columns.reshape(n, 1, columns.shape[1], channels, *kernel)
    picked = columns[torch.arange(n, device=positions.device).unsqueeze(1), positions]
    return picked.reshape(n, positions.shape[1], channels, *kernel)


def _dilated_kernel(conv: nn.Conv2d) -> Tensor:
    """The kernel as the dense patch it covers: zeros between taps when dilated."""
    weight = conv.weight
    if tuple(conv.dilation) == (1, 1):
        return weight
    (dh, dw), (kh, kw) = conv.dilation, weight.shape[-2:]
    dense = weight.new_zeros(*weight.shape[:2], dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    dense[..., ::dh, ::dw] = weight  # a copy into a fresh tensor, so gradients still reach the weight
    return dense


def _full_conv_transpose(layer: nn.Conv2d, patch: Tensor) -> Tensor:
    """Pull patches (N, S, C_out, ph, pw) through a convolution with no cropping.

    F.fold and conv_transpose2d both loop over the N*S patches internally, which dominates for thousands of
    tiny patches. When the map from a patch to its pulled-back patch is small as a dense matrix, it is built
    once (the transposed convolution of the unit patches) and applied as one matrix product: more
    multiply-adds than the taps below (up to 8x) but at full matrix-product speed, 3-5x faster on CPU for
    the first layer of the usual CNNs. Otherwise one small matmul per kernel tap, added into a strided view
    of the output.
    """
    n, s, channels_out, height, width = patch.shape
    weight = layer.weight
    channels_in, (kh, kw), (sh, sw), (dh, dw) = (
        weight.shape[1],
        weight.shape[-2:],
        layer.stride,
        layer.dilation,
    )
    out_h, out_w = (height - 1) * sh + dh * (kh - 1) + 1, (width - 1) * sw + dw * (kw - 1) + 1
    rows, columns = channels_out * height * width, channels_in * out_h * out_w
    if rows * columns <= 2**20 and columns <= 8 * channels_in * kh * kw:
        units = torch.eye(rows, dtype=patch.dtype, device=patch.device).reshape(
            rows, channels_out, height, width
        )
        matrix = F.conv_transpose2d(units, weight, None, layer.stride, 0, 0, 1, layer.dilation)
        pulled = patch.reshape(n * s, rows) @ matrix.reshape(rows, columns)
        return pulled.reshape(n, s, channels_in, out_h, out_w)
    # One contiguous matmul for all taps; a strided view per tap would make matmul copy the patches each time.
    taps = (patch.movedim(2, -1).reshape(-1, channels_out) @ weight.reshape(channels_out, -1)).reshape(
        n, s, height, width, channels_in, kh, kw
    )
    pulled = patch.new_zeros(n, s, out_h, out_w, channels_in)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + (height - 1) * sh + 1, sh)
            cols = slice(j * dw, j * dw + (width - 1) * sw + 1, sw)
            pulled[:, :, rows, cols, :] += taps[..., i, j]
    return pulled.movedim(-1, 2)


def _patch_backward_lower(
    net: _Network,
    index: int,
    neurons: Tensor,
    valid: Tensor,
    relaxations: dict[int, _Relaxation],
    box_lower: Tensor,
    box_upper: Tensor,
    every_neuron: bool,
) -> Tensor:
    """Lower bounds of +h_index[k] and -h_index[k] for selected neurons k of a convolutional layer.

    Each spec is kept as a small patch over its receptive field instead of a dense map (auto_LiRPA's
    "patches mode"): a unit spec behind two 4x4 stride-2 convolutions touches 10x10 of a 28x28 input.
    With `every_neuron` (neurons = all of h_index in order), specs are grouped by grid cell, so each
    window is shared by all channels instead of gathered once per spec.

    Returns:
        (N, 2S): lower bounds of h_index[k] for the S selected neurons, then of -h_index[k].
    """
    conv = net.layers[index - 1]
    grid = tuple(net.shapes[index][-2:])
    cells = grid[0] * grid[1]
    n = neurons.shape[0]
    kernels = _dilated_kernel(conv)
    conv_bias = conv.bias if conv.bias is not None else kernels.new_zeros(kernels.shape[0])
    if every_neuron:
        # Every row holds the same specs: one bank of +-kernels, broadcast over rows and grid cells, in
        # the grouped layout (rows, 2 C, cells, C_in, kh, kw); the first step below makes it per row.
        patch = torch.cat([kernels, -kernels]).unsqueeze(0).unsqueeze(2)
        bias = torch.cat([conv_bias, -conv_bias]).repeat_interleave(cells).unsqueeze(0)
        shared = None
    else:
        channel, positions = neurons // cells, neurons % cells
        mask = valid.to(conv.weight.dtype)
        patch = kernels[channel] * mask.reshape(*mask.shape, 1, 1, 1)
        bias = conv_bias[channel] * mask
        patch, bias = torch.cat([patch, -patch], 1), torch.cat([bias, -bias], 1)
        shared = positions.repeat(1, 2)
    stride, offset = tuple(conv.stride), tuple(conv.padding)

    def grouped(t: Tensor) -> Tensor:
        # (rows, S2, C, kh, kw) -> (rows, S2 / cells, cells, C, kh, kw) to broadcast against shared windows.
        if not every_neuron or t.dim() == 6:
            return t
        return t.reshape(t.shape[0], -1, cells, *t.shape[-3:])

    def specs(t: Tensor) -> Tensor:
        if t.dim() == 6 and t.shape[2] != cells:  # the bank, still broadcast over cells
            t = t.expand(-1, -1, cells, -1, -1, -1)
        return t.reshape(t.shape[0], -1, *t.shape[-3:])

    masked_outside = False
    for layer_index in range(index - 2, -1, -1):
        layer = net.layers[layer_index]
        kernel = tuple(patch.shape[-2:])
        if isinstance(layer, nn.ReLU):
            relaxation = relaxations[layer_index]
            upper_slope, upper_intercept = (
                _windows(t, kernel, stride, offset, grid, shared)
                for t in (relaxation.upper_slope, relaxation.upper_intercept)
            )
            lower_slope = (
                upper_slope
                if relaxation.same_slopes
                else _windows(relaxation.lower_slope, kernel, stride, offset, grid, shared)
            )
            if patch.shape[0] == 1 and n > 1 and every_neuron:
                # A bank shared by all rows: the intercepts are one matrix product over the windows.
                negative = patch.clamp(max=0).reshape(patch.shape[1], -1)
                windows = upper_intercept.reshape(n, cells, -1)
                intercept = (windows @ negative.t()).transpose(1, 2)
                pulled, _ = relaxation.pull_back(grouped(patch), (lower_slope, upper_slope, None), 3)
            else:
                pulled, intercept = relaxation.pull_back(
                    grouped(patch), (lower_slope, upper_slope, upper_intercept), 3
                )
            patch = pulled
            bias = bias + intercept.reshape(intercept.shape[0], -1)
            masked_outside = True  # zero-padded slopes vanish outside the map
            continue
        if not masked_outside:
            # Entries over the zero padding of h_{layer_index+1} must not collect its bias or pass through.
            inside = torch.ones(
                1, 1, *net.shapes[layer_index + 1][-2:], dtype=patch.dtype, device=patch.device
            )
            inside = _windows(inside.expand(n, 1, -1, -1), kernel, stride, offset, grid, shared)
            patch = grouped(patch) * inside
        patch = specs(patch)
        if layer.bias is not None:
            bias = bias + patch.sum(dim=(-2, -1)) @ layer.bias
        patch = _full_conv_transpose(layer, patch)
        stride = (stride[0] * layer.stride[0], stride[1] * layer.stride[1])
        offset = (
            offset[0] * layer.stride[0] + layer.padding[0],
            offset[1] * layer.stride[1] + layer.padding[1],
        )
        masked_outside = False
    kernel = tuple(patch.shape[-2:])
    center = _windows((box_upper + box_lower) / 2, kernel, stride, offset, grid, shared)
    radius = _windows((box_upper - box_lower) / 2, kernel, stride, offset, grid, shared)
    patch = grouped(patch)
    linear = (patch * center).flatten(-3).sum(-1) - (patch.abs() * radius).flatten(-3).sum(-1)
    return bias + linear.reshape(n, -1)


def _unit_specs(net: _Network, index: int, neurons: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, int]:
    """Dense unit specs e_k on h_index for neurons (N, S); rows where `valid` is False are zero.

    Returns:
        spec (N, S, F) in bounds_backward's internal order, bias (N, S) and the index of the activation the
        spec lives on (pulled through a Linear layer at once, since its rows are the weight's rows).
    """
    previous = net.layers[index - 1]
    mask = valid.to(net.layers[-1].weight.dtype)
    if isinstance(previous, nn.Linear):
        spec = internal_weight(previous, net, index - 1)[neurons] * mask.unsqueeze(2)
        bias = previous.bias[neurons] * mask if previous.bias is not None else torch.zeros_like(mask)
        return spec, bias, index - 1
    b, s = neurons.shape
    unit = mask.new_zeros(b, s, net.size(index))
    spec = unit.scatter(2, neurons.unsqueeze(2), mask.unsqueeze(2))
    return to_internal(spec, net, index, lead=2), torch.zeros_like(mask), index


def _refine_preactivation(
    net: _Network,
    index: int,
    reference: tuple[Tensor, Tensor],
    relaxations: dict[int, _Relaxation],
    box_lower: Tensor,
    box_upper: Tensor,
    unstable_only: bool,
) -> tuple[Tensor, Tensor]:
    """Bounds of h_index by backward passes from unit specs.

    With `unstable_only`, only neurons that the reference bounds (one interval step from the refined bounds
    below) leave unstable are bounded, and the result is intersected with the reference. Bounding only the
    interval-unstable neurons is auto_LiRPA's trick that makes full CROWN affordable; the intersection is ours
    (auto_LiRPA keeps the CROWN bounds), hence the name "CROWN intersected with IBP" for the `crown` method.
    Otherwise every neuron is bounded and the reference is ignored, which is exactly Wong & Kolter's dual
    network.
    """
    ref_lower, ref_upper = reference[0].flatten(1), reference[1].flatten(1)
    n, size = ref_lower.shape
    device = ref_lower.device
    if unstable_only:
        selected = (ref_lower < 0) & (ref_upper > 0)
    else:
        selected = torch.ones_like(ref_lower, dtype=torch.bool)
    counts = selected.sum(1)
    most = int(counts.max()) if n else 0
    if most == 0:
        return reference
    patches = _conv_chain(net, index)
    # A patch never exceeds the input's size per channel; bounding by the widest layer is safe.
    widest = max(net.size(i) for i in range(index))
    chunk = max(1, memory_budget() // (2 * most * widest))
    lowers, uppers = [], []
    for first in range(0, n, chunk):
        rows = slice(first, first + chunk)
        rows_selected, rows_counts = selected[rows], counts[rows]
        s = int(rows_counts.max())
        if s == 0:
            lowers.append(ref_lower[rows])
            uppers.append(ref_upper[rows])
            continue
        # Stable sort puts the selected neurons first; padding rows point at unselected neurons.
        neurons = torch.argsort((~rows_selected).to(torch.uint8), dim=1, stable=True)[:, :s]
        valid = torch.arange(s, device=device) < rows_counts.unsqueeze(1)
        rows_relaxations = {i: r.rows(rows) for i, r in relaxations.items()}
        if patches:
            both = _patch_backward_lower(
                net,
                index,
                neurons,
                valid,
                rows_relaxations,
                box_lower[rows],
                box_upper[rows],
                every_neuron=bool(rows_selected.all()),
            )
        else:
            spec, bias, start = _unit_specs(net, index, neurons, valid)
            both = _backward_lower(
                net,
                torch.cat([spec, -spec], 1),
                torch.cat([bias, -bias], 1),
                start,
                rows_relaxations,
                box_lower[rows],
                box_upper[rows],
                internal=True,
            )
        lower_sel, upper_sel = both[:, :s], -both[:, s:]
        if unstable_only:
            old_lower, old_upper = ref_lower[rows].gather(1, neurons), ref_upper[rows].gather(1, neurons)
            lower_sel = torch.where(valid, torch.maximum(lower_sel, old_lower), old_lower)
            upper_sel = torch.where(valid, torch.minimum(upper_sel, old_upper), old_upper)
            lowers.append(ref_lower[rows].scatter(1, neurons, lower_sel))
            uppers.append(ref_upper[rows].scatter(1, neurons, upper_sel))
        else:
            # Every neuron is selected, so the sorted order is the identity.
            lowers.append(lower_sel)
            uppers.append(upper_sel)
    shape = reference[0].shape
    return torch.cat(lowers).reshape(shape), torch.cat(uppers).reshape(shape)


def _linear_relaxations(
    net: _Network, box_lower: Tensor, box_upper: Tensor, lower_rule: str, unstable_only: bool
) -> dict[int, _Relaxation]:
    """Relaxations of every ReLU, with pre-activation bounds computed layer by layer by the same method."""
    relaxations: dict[int, _Relaxation] = {}
    lower, upper = box_lower, box_upper
    affine_seen = 0
    for index, layer in enumerate(net.layers[:-1]):
        if isinstance(layer, nn.ReLU):
            # Interval bounds are exact for a single affine map of the box; anything deeper is refined.
            if relaxations or affine_seen > 1:
                lower, upper = _refine_preactivation(
                    net, index, (lower, upper), relaxations, box_lower, box_upper, unstable_only
                )
            relaxations[index] = _relu_relaxation(lower, upper, lower_rule)
        lower, upper = _interval_step(layer, lower, upper)
        affine_seen += _is_affine(layer)
    return relaxations


def _final_backward(
    net: _Network,
    y: Tensor,
    relaxations: dict[int, _Relaxation | tuple[Tensor, Tensor, Tensor]],
    box_lower: Tensor,
    box_upper: Tensor,
) -> Tensor:
    spec, bias, others = _margin_spec(net.layers[-1], y)
    lower = _backward_lower(net, spec, bias, len(net.layers) - 1, relaxations, box_lower, box_upper)
    return _scatter_margins(lower, others, net.layers[-1].out_features)
