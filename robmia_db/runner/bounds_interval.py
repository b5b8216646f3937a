"""Runner layer: the IBP kernel of the bound engine (interval pass to one layer, elided margins); torch only.

Why a separate kernel from `bounds_core._interval_pass` (which keeps every layer's bounds for CROWN-IBP):
when only the last bounds are wanted, the pass can carry whichever form the next step needs and overwrite
its own intermediates. Measured on CPU (1 thread, 28x28 CNN, batch 128) the convolutions and matrix
products are about 2x a forward pass by construction (one on the centre with W, one on the radius with
|W|), so everything else must stay small:
- affine layers read (u + l, u - l) with W/2 and |W|/2 (the 1/2 folded into the small weights, cached per
  parameter version when no gradient is tracked) and return (centre, radius); a ReLU turns (centre, radius)
  into (relu(c + r), relu(c - r)) in four passes, two of them in place;
- feature maps run channels-last, including one-channel inputs (whose default strides make convolutions
  fall back to NCHW); a Linear layer reading a flattened channels-last map gets its weight columns permuted
  once instead of the map being copied;
- the last layer merged with the margin specification (Gowal et al.'s elision) is one (N, F) x (F, C*C)
  product against the pairwise |W_i - W_j| (C up to `_PAIRWISE_CLASSES`) instead of a per-sample spec.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robmia_db.runner.bounds_core import _affine, _Network, _other_classes, _scatter_margins, channels_last

# Above this many classes the (C*C, F) pairwise table outgrows the per-sample (C-1, F) specs.
_PAIRWISE_CLASSES = 32
_CACHE: dict[tuple, tuple[weakref.ref, tuple[Tensor, ...]]] = {}


def _cached(key: tuple, owner: Tensor, make) -> tuple[Tensor, ...]:
    """Derived weights, recomputed only when the parameter changes; never cached while autograd tracks it."""
    if torch.is_grad_enabled() and owner.requires_grad:
        return make()
    # The version counter moves with every in-place update (optimizer steps); the data pointer with `.data =`.
    full_key = (id(owner), owner._version, owner.data_ptr(), owner.dtype, owner.device, *key)
    hit = _CACHE.get(full_key)
    if hit is not None and hit[0]() is owner:
        return hit[1]
    with torch.no_grad():
        value = make()
    if len(_CACHE) >= 256:
        _CACHE.clear()
    _CACHE[full_key] = (weakref.ref(owner), value)
    return value


def _columns(weight: Tensor, order: tuple[int, int, int] | None) -> Tensor:
    """A Linear weight with its columns in the channels-last order (H, W, C) of a flattened (C, H, W) map."""
    if order is None:
        return weight
    c, h, w = order
    return weight.reshape(-1, c, h, w).permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _pair_weights(layer: nn.Module, half: bool, order: tuple[int, int, int] | None) -> tuple[Tensor, Tensor]:
    """(W, |W|) of an affine layer, halved when it reads (u + l, u - l), columns permuted for `order`."""

    def make() -> tuple[Tensor, Tensor]:
        weight = layer.weight * 0.5 if half else layer.weight
        if isinstance(layer, nn.Linear):
            weight = _columns(weight, order)
        return weight, weight.abs()

    return _cached(("pair", half, order), layer.weight, make)


def interval_last(
    net: _Network, lower: Tensor, upper: Tensor, upto: int, owned: bool = False
) -> tuple[bool, Tensor, Tensor, tuple[int, int, int] | None]:
    """Interval bounds of h_upto only, in whichever form the last step left them.

    Args:
        owned: the box (lower, upper) may be overwritten (the caller no longer needs it).

    Returns:
        (is_center_radius, a, b, order): (centre, radius) when is_center_radius, else (lower, upper); `order`
        is the (C, H, W) of a flattened channels-last map whose (H, W, C) order a vector h_upto uses, or None.
    """
    center_radius = False
    a, b = lower, upper
    order = None
    # Without autograd, tensors made here are overwritten once dead, and `spare` (a dead radius) takes the
    # next sum: each fresh multi-MB tensor costs page faults on CPU, about as much as a pass over it.
    reuse = not torch.is_grad_enabled()
    spare = None
    for layer in net.layers[:upto]:
        if isinstance(layer, nn.Flatten):
            if a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last):
                c, h, w = a.shape[1:]
                order = (c, h, w) if c > 1 and h * w > 1 else None
                a, b = (t.permute(0, 2, 3, 1).reshape(t.shape[0], -1) for t in (a, b))
            else:
                a, b = a.flatten(1), b.flatten(1)
            spare = None
        elif isinstance(layer, nn.ReLU):
            if center_radius:
                # Centre a and radius b are affine outputs made here that no backward needs.
                lower = a - b
                a, b = lower.relu_(), a.add_(b).relu_()
                center_radius = False
            elif owned and reuse:
                a, b = a.relu_(), b.relu_()
            else:
                a, b = F.relu(a), F.relu(b)
            owned = True
        else:
            if center_radius:
                weight, weight_abs = _pair_weights(layer, False, order)
                inputs = a, b
            else:
                weight, weight_abs = _pair_weights(layer, True, order)
                a, b = channels_last(a), channels_last(b)
                if owned and reuse:
                    fits = spare is not None and spare.shape == a.shape and spare.stride() == a.stride()
                    total = torch.add(a, b, out=spare) if fits else a + b
                    difference = b.sub_(a)
                else:
                    # A ReLU's outputs are saved for its backward: not overwritten under autograd.
                    total, difference = a + b, b - a
                # Again: sums of one-channel maps come back with NCHW strides.
                inputs = channels_last(total), channels_last(difference)
            center = _affine(layer, inputs[0], weight=weight)
            radius = _affine(layer, inputs[1], weight=weight_abs, with_bias=False)
            a, b, center_radius, owned, order = center, radius, True, True, None
            spare = radius if reuse else None
    return center_radius, a, b, order


def elided_margins(
    net: _Network, state: tuple[bool, Tensor, Tensor, tuple[int, int, int] | None], y: Tensor
) -> Tensor:
    """IBP margin lower bounds (N, C), the last Linear layer merged with the specs e_y - e_j; 0 at y.

    Args:
        state: `interval_last` of the penultimate layer.
    """
    center_radius, a, b, order = state
    last = net.layers[-1]
    # Centre and radius, or twice both (u + l, u - l) with the halving folded into the weights.
    half = not center_radius
    p, q = (a, b) if center_radius else (a + b, b - a)
    num_classes = last.out_features

    def make() -> tuple[Tensor, Tensor]:
        weight = _columns(last.weight * 0.5 if half else last.weight, order)
        if num_classes > _PAIRWISE_CLASSES:
            return weight, weight
        # Row i * C + j holds |W_i - W_j|: the radius term of margin z_i - z_j.
        return weight, (weight.unsqueeze(1) - weight.unsqueeze(0)).abs().reshape(-1, weight.shape[1])

    weight, pairs = _cached(("margins", half, order), last.weight, make)
    if num_classes > _PAIRWISE_CLASSES:
        others = _other_classes(num_classes, y)
        spec = weight[y].unsqueeze(1) - weight[others]
        bias = torch.zeros(others.shape, dtype=p.dtype, device=p.device)
        if last.bias is not None:
            bias = last.bias[y].unsqueeze(1) - last.bias[others]
        lower = (
            bias
            + torch.bmm(spec, p.unsqueeze(2)).squeeze(2)
            - torch.bmm(spec.abs(), q.unsqueeze(2)).squeeze(2)
        )
        return _scatter_margins(lower, others, num_classes)
    logits = F.linear(p, weight, last.bias)
    radius = F.linear(q, pairs).reshape(-1, num_classes, num_classes)
    label = y.unsqueeze(1)
    # z_y - z_j - |W_y - W_j| r: exactly 0 at j = y (equal logits, zero pairwise row), as the scatter gave.
    label_radius = radius.gather(1, label.unsqueeze(2).expand(-1, 1, num_classes)).squeeze(1)
    return logits.gather(1, label) - logits - label_radius
