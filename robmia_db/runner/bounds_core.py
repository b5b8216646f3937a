"""Runner layer: shared parts of the bound engine (layer checks, shapes, affine maps, intervals, margins).

Imports torch and our errors only. Notation: h_0 = x and h_{i+1} = layer_i(h_i); the "pre-activation
bounds" of the ReLU at index i are bounds of h_i; a "linear spec" on h_k has shape (N, S, *shape(h_k)) and
asks for lower bounds of <spec[n, s], h_k[n]> over the input box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robmia_db.errors import ModelDefinitionError

_SUPPORTED_LAYERS = (nn.Conv2d, nn.Linear, nn.ReLU, nn.Flatten)
_SUPPORTED_NAMES = "use Conv2d, Linear, ReLU, Flatten"
# Largest linear-spec tensor (in elements) materialised at once; batches are split to stay under it.
_MEMORY_BUDGET_ELEMENTS = 2**25


def memory_budget() -> int:
    """Largest number of elements one spec or generator tensor may hold (read at call time, for tests)."""
    return _MEMORY_BUDGET_ELEMENTS


# --------------------------------------------------------------------------------------------------
# Validation and network description


def check_supported(model: nn.Module) -> None:
    """Refuse any model the bound engine cannot bound.

    Args:
        model: the network; it must be an `nn.Sequential` of Conv2d (groups=1, numeric zero padding),
            Linear, ReLU and Flatten (start_dim=1) layers, ending in a Linear layer.

    Raises:
        ModelDefinitionError: naming the first offending layer by index and type.
    """
    if not isinstance(model, nn.Sequential):
        raise ModelDefinitionError(
            f"the bound engine needs an nn.Sequential, got {type(model).__name__}: {_SUPPORTED_NAMES}"
        )
    if len(model) == 0:
        raise ModelDefinitionError("the bound engine got an empty nn.Sequential")
    for index, layer in enumerate(model):
        name = type(layer).__name__
        # Exact types: a subclass may override forward() and silently break the bounds.
        if type(layer) not in _SUPPORTED_LAYERS:
            raise ModelDefinitionError(
                f"layer {index} ({name}) is not supported by the bound engine: {_SUPPORTED_NAMES}"
            )
        if isinstance(layer, nn.Conv2d) and (
            layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str)
        ):
            raise ModelDefinitionError(
                f"layer {index} (Conv2d) is not supported by the bound engine: "
                "only groups=1 and zero padding given as numbers"
            )
        if isinstance(layer, nn.Flatten) and (layer.start_dim != 1 or layer.end_dim != -1):
            raise ModelDefinitionError(
                f"layer {index} (Flatten) is not supported by the bound engine: only start_dim=1, end_dim=-1"
            )
    if not isinstance(model[-1], nn.Linear):
        raise ModelDefinitionError(
            f"layer {len(model) - 1} ({type(model[-1]).__name__}) cannot end a model for the bound engine: "
            "the last layer must be Linear (the margin specification is merged into it)"
        )


@dataclass(frozen=True)
class _Network:
    """The layers of a checked model with the shape (without batch) of every h_i."""

    layers: tuple[nn.Module, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def build(cls, model: nn.Sequential, x: Tensor) -> _Network:
        check_supported(model)
        layers = tuple(model)
        # Shapes depend only on the input shape and each layer's geometry: cached, so that a training step
        # does not pay a one-sample forward pass (about 5 % of an IBP step) to rediscover them.
        key = (tuple(x.shape[1:]), tuple(_geometry(layer) for layer in layers))
        shapes = _SHAPES.get(key)
        if shapes is None:
            shapes = [x.shape[1:]]
            with torch.no_grad():
                h = x[:1].detach()
                for layer in layers:
                    h = _forward_layer(layer, h)
                    shapes.append(h.shape[1:])
            if len(_SHAPES) >= 256:
                _SHAPES.clear()
            shapes = _SHAPES[key] = tuple(shapes)
        return cls(layers, shapes)

    def size(self, index: int) -> int:
        return math.prod(self.shapes[index])


_SHAPES: dict[tuple, tuple[torch.Size, ...]] = {}


def _geometry(layer: nn.Module) -> tuple:
    """What a layer's output shape depends on, besides its input shape."""
    if isinstance(layer, nn.Conv2d):
        return ("conv", tuple(layer.weight.shape), layer.stride, layer.padding, layer.dilation)
    if isinstance(layer, nn.Linear):
        return ("linear", tuple(layer.weight.shape))
    return (type(layer).__name__,)


def _forward_layer(layer: nn.Module, h: Tensor) -> Tensor:
    # Functional calls so that an in-place ReLU never touches tensors we still need.
    if isinstance(layer, nn.ReLU):
        return F.relu(h)
    if isinstance(layer, nn.Flatten):
        return h.flatten(1)
    return _affine(layer, h)


def _is_affine(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.Linear, nn.Conv2d))


def _affine(layer: nn.Module, h: Tensor, weight: Tensor | None = None, with_bias: bool = True) -> Tensor:
    """Apply a Linear/Conv2d layer to h (N, *in_shape), optionally with another weight and no bias."""
    weight = layer.weight if weight is None else weight
    bias = layer.bias if with_bias else None
    if isinstance(layer, nn.Linear):
        return F.linear(h, weight, bias)
    return F.conv2d(h, weight, bias, layer.stride, layer.padding, layer.dilation)


def _affine_grouped(layer: nn.Module, h: Tensor) -> Tensor:
    """Apply the bias-free linear part of a layer to h (N, K, *in_shape), e.g. zonotope generators."""
    n, k = h.shape[:2]
    out = _affine(layer, h.reshape(n * k, *h.shape[2:]), with_bias=False)
    return out.reshape(n, k, *out.shape[1:])


def _input_box(
    x: Tensor, eps: float | Tensor, x_min: float, x_max: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    x = x.to(dtype)
    if torch.is_tensor(eps):
        if eps.dim() == 0:
            eps = eps.to(device=x.device, dtype=dtype)
        elif eps.shape == (x.shape[0],):
            eps = eps.to(device=x.device, dtype=dtype).reshape(-1, *([1] * (x.dim() - 1)))
        else:
            raise ValueError(
                f"eps must be a float or a tensor of shape ({x.shape[0]},), got {tuple(eps.shape)}"
            )
        if bool((eps < 0).any()):
            raise ValueError("eps must be >= 0")
    elif eps < 0:
        raise ValueError(f"eps must be >= 0 (got {eps})")
    if torch.is_grad_enabled() and (x.requires_grad or (torch.is_tensor(eps) and eps.requires_grad)):
        return (x - eps).clamp(min=x_min, max=x_max), (x + eps).clamp(min=x_min, max=x_max)
    # Clamped in place: two fresh input-sized tensors less (page faults on CPU) per bound call.
    return (x - eps).clamp_(min=x_min, max=x_max), (x + eps).clamp_(min=x_min, max=x_max)


def channels_last(t: Tensor) -> Tensor:
    """A 4-D map with channels-last strides (a view for one channel, where `contiguous` keeps NCHW strides)."""
    if t.dim() != 4:
        return t
    if t.shape[1] == 1 and t.is_contiguous():
        # Same memory, but the channel stride 1 makes the convolution choose its channels-last kernel.
        return t.as_strided(t.shape, (t.stride(0), 1, t.stride(2), t.stride(3)))
    return t.contiguous(memory_format=torch.channels_last)


def _model_dtype(model: nn.Sequential) -> torch.dtype:
    # The layers' own weights: `model.parameters()` walks every submodule (about 10 us per bound call).
    for layer in model:
        if _is_affine(layer):
            return layer.weight.dtype
    return torch.get_default_dtype()


# --------------------------------------------------------------------------------------------------
# Interval bound propagation


def _interval_step(layer: nn.Module, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """Interval bounds after one layer."""
    if isinstance(layer, nn.ReLU):
        return F.relu(lower), F.relu(upper)
    if isinstance(layer, nn.Flatten):
        return lower.flatten(1), upper.flatten(1)
    # Centre/radius form (as in Gowal et al.): one affine call plus one on |W|, instead of four. The 1/2 of
    # centre and radius is folded into the (small) weights, which saves two passes over the activations.
    half = layer.weight * 0.5
    # channels_last again: sums of one-channel maps come back with NCHW strides (and NCHW outputs).
    center = _affine(layer, channels_last(upper + lower), weight=half)
    radius = _affine(layer, channels_last(upper - lower), weight=half.abs(), with_bias=False)
    lower = center - radius
    return lower, center.add_(radius)  # the convolution's backward needs its inputs, not its output


# --------------------------------------------------------------------------------------------------
# Margin specification


def _other_classes(num_classes: int, y: Tensor) -> Tensor:
    """(N, C-1) indices of the classes other than y, in increasing order."""
    # Position j holds class j below the label and j + 1 from it on: no Python loop, no host sync.
    positions = torch.arange(num_classes - 1, device=y.device)
    return positions + (positions.unsqueeze(0) >= y.unsqueeze(1)).long()


def _margin_spec(last: nn.Linear, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The margin specs e_y - e_j merged with the last Linear layer.

    Returns:
        spec (N, C-1, in_features), bias (N, C-1), and the (N, C-1) class indices j.
    """
    others = _other_classes(last.out_features, y)
    weight = last.weight
    spec = weight[y].unsqueeze(1) - weight[others]
    if last.bias is None:
        bias = torch.zeros(others.shape, dtype=weight.dtype, device=weight.device)
    else:
        bias = last.bias[y].unsqueeze(1) - last.bias[others]
    return spec, bias, others


def _scatter_margins(lower_others: Tensor, others: Tensor, num_classes: int) -> Tensor:
    full = torch.zeros(others.shape[0], num_classes, dtype=lower_others.dtype, device=lower_others.device)
    return full.scatter(1, others, lower_others)


def _check_labels(y: Tensor, x: Tensor, num_classes: int) -> Tensor:
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    y = y.to(device=x.device, dtype=torch.long)
    # On an accelerator the range check would cost a host sync per batch; there an out-of-range label
    # fails the indexing kernel instead (an error as well, though a less readable one).
    if y.device.type == "cpu" and y.numel():
        smallest, largest = (int(v) for v in torch.aminmax(y))
        if smallest < 0 or largest >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), got [{smallest}, {largest}]")
    return y
