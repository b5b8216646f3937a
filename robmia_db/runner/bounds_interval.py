"""Runner layer: the IBP kernel of the bound engine (interval pass, CROWN-IBP's relaxations, elided margins).

Imports torch and bounds_core only. Why a kernel of its own rather than `bounds_core._interval_step` layer
by layer (which CROWN's intermediate bounds use): the pass carries whichever form the next step needs and
overwrites its own intermediates, and CROWN-IBP takes its ReLU relaxations from it without keeping any
interval bounds. Measured on CPU (1 thread, 28x28 CNN, batch 128) the convolutions and matrix products
are about 2x those of a forward pass by construction (one on the centre with W, one on the width with |W|),
so everything else must stay small:
- the pass carries the centre and the width (c, d) = ((u + l) / 2, u - l): an affine layer maps them with
  (W, b) and |W| (derived weights cached per parameter version when no gradient is tracked), a ReLU in four
  in-place passes over the maps (see `_interval_pass`; the earlier (u + l, u - l) form needed a `lerp`
  into a fresh map: the whole kernel 2-4 % slower, interleaved at the same load);
- the plain pass keeps the input's layout (NCHW, as the forward pass); CROWN-IBP's pass runs its maps
  channels-last, including one-channel inputs, as its backward pass reads them (see `_interval_pass`); a
  Linear layer reading a flattened channels-last map gets its weight columns permuted once instead of the
  map being copied;
- without autograd, Linear products go through oneDNN rather than MKL (`_linear`: 2x faster on the AMD
  machines here);
- the last layer merged with the margin specification (Gowal et al.'s elision): every pair's margin bound
  by two (N, F) x (F, C*C) products, of the centre with the pairwise rows W_i - W_j and of the width with
  -|W_i - W_j| / 2 (C up to `_PAIRWISE_CLASSES`), instead of per-sample specs.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robmia_db.runner.bounds_core import _Network, _other_classes, _scatter_margins, channels_last

# Above this many classes the (C*C, F) pairwise table outgrows the per-sample (C-1, F) specs.
_PAIRWISE_CLASSES = 32
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[tuple, tuple[Tensor | None, ...]]]] = (
    weakref.WeakKeyDictionary()
)


def _cached(key: tuple, layer: nn.Module, make) -> tuple[Tensor | None, ...]:
    """Tensors derived from a layer's weight and bias, remade only when either changes.

    Never cached while autograd tracks them (the result must carry the graph). The version counters move
    with every in-place update (optimizer steps, `load_state_dict`); `.to()` and `.data =` give new memory,
    a new data pointer. Not seen: an in-place edit through `p.data` (it bypasses the version counter, as
    PyTorch documents); edit parameters in place under `torch.no_grad()` instead, as the runner does. One
    entry per layer and key, dropped with the layer.
    """
    parameters = [t for t in (layer.weight, layer.bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in parameters):
        return make()
    stamp = tuple((t._version, t.data_ptr()) for t in parameters)
    entries = _CACHE.setdefault(layer, {})
    hit = entries.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    with torch.no_grad():
        value = make()
    entries[key] = (stamp, value)
    return value


def _columns(weight: Tensor, order: tuple[int, int, int] | None) -> Tensor:
    """A Linear weight with its columns in the channels-last order (H, W, C) of a flattened (C, H, W) map."""
    if order is None:
        return weight
    c, h, w = order
    return weight.reshape(-1, c, h, w).permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _pair_weights(
    layer: nn.Module, order: tuple[int, int, int] | None, maps_channels_last: bool = True
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(W, |W|, b) of an affine layer: Linear columns permuted for `order`, Conv2d weights in the maps' layout."""
    # The layout concerns convolution weights only: a Linear layer keeps one entry for both passes.
    maps_channels_last = maps_channels_last and isinstance(layer, nn.Conv2d)

    def make() -> tuple[Tensor, Tensor, Tensor | None]:
        weight = layer.weight
        if isinstance(layer, nn.Linear):
            weight = _columns(weight, order)
        elif maps_channels_last:
            # The convolution would otherwise reorder its weight to the input's layout on every call (and a
            # channels-last weight turns an NCHW input's convolution channels-last).
            weight = weight.contiguous(memory_format=torch.channels_last)
        return weight, weight.abs(), layer.bias

    return _cached(("pair", order, maps_channels_last), layer, make)


def _apply(layer: nn.Module, inputs: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if isinstance(layer, nn.Linear):
        return _linear(inputs, weight, bias)
    return F.conv2d(inputs, weight, bias, layer.stride, layer.padding, layer.dilation)


def _linear(inputs: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear, through oneDNN where it applies: float32 on the CPU, no autograd, the op built in.

    Why: PyTorch's CPU matrix product goes to MKL, whose sgemm on the AMD EPYC (Zen 5) machines here runs
    the 28x28 network's (128, 1568) x (1568, 100) product in 0.42 ms against 0.21 ms for oneDNN's
    (`torch.ops.mkldnn._linear_pointwise`, the op PyTorch's own compiler emits for frozen Linear layers).
    The two differ by summation order only (about 1e-6 relative). The op is private to PyTorch, so its first
    use checks it against F.linear (`_checked_onednn_linear`); under autograd it has no derivative, so
    training keeps F.linear; a build without it, a failed check or a call it refuses mean F.linear for good.
    """
    global _ONEDNN_LINEAR
    if (
        _ONEDNN_LINEAR is not None
        and inputs.dtype == torch.float32
        and inputs.device.type == "cpu"
        # any operand tracked (a trainable bias beside a frozen weight too) must keep its gradient
        and not (
            torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (inputs, weight, bias))
        )
    ):
        if _ONEDNN_LINEAR is _UNCHECKED:
            _ONEDNN_LINEAR = _checked_onednn_linear()
        if _ONEDNN_LINEAR is not None:
            try:
                return _ONEDNN_LINEAR(inputs, weight, bias, "none", [], "")
            except RuntimeError:
                _ONEDNN_LINEAR = None
    return F.linear(inputs, weight, bias)


def _checked_onednn_linear():
    """oneDNN's Linear op if this build has it and it gives F.linear's numbers (with and without a bias,
    on a strided input), else None."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(6, 40, generator=generator)[::2]
        weight, bias = torch.randn(5, 40, generator=generator), torch.randn(5, generator=generator)
        with torch.no_grad():
            for with_bias in (bias, None):
                got = op(inputs, weight, with_bias, "none", [], "")
                if not torch.allclose(got, F.linear(inputs, weight, with_bias), rtol=1e-5, atol=1e-5):
                    return None
    except (AttributeError, RuntimeError):
        return None
    return op


_UNCHECKED = object()
_ONEDNN_LINEAR = _UNCHECKED


def interval_last(
    net: _Network, lower: Tensor, upper: Tensor, upto: int, owned: bool = False
) -> tuple[Tensor, Tensor, tuple[int, int, int] | None]:
    """Interval bounds of h_upto only, as the centre (u + l) / 2 and the width u - l.

    Args:
        owned: the box (lower, upper) is the caller's no longer, and may be overwritten.

    Returns:
        (centre, width, order): `order` is the (C, H, W) of a flattened channels-last map whose (H, W, C)
        order a vector h_upto uses, or None.
    """
    return _interval_pass(net, lower, upper, upto, owned, None)


def interval_relaxations(
    net: _Network, lower: Tensor, upper: Tensor, upto: int
) -> tuple[dict[int, tuple[Tensor, Tensor, Tensor]], tuple[Tensor, Tensor, tuple[int, int, int] | None]]:
    """CROWN-IBP's front: `interval_last`'s pass plus every ReLU's adaptive relaxation on the way.

    The relaxations come straight in the form the backward pass reads (bounds_backward.flat_relaxation:
    lower slope, upper intercept, upper minus lower slope; each (N, 1, F) in its internal order), from the
    pass's (centre, width) and the same formulas as bounds_linear._relu_relaxation ("adaptive"): no interval
    bounds are kept and no relaxation is reshaped (measured: a separate interval pass, relaxations and
    reshapes cost 0.14 ms per sample at 28x28, about a fifth of CROWN-IBP). The box is not overwritten.

    Returns:
        (relaxations by ReLU index, `interval_last`'s (centre, width, order) of h_upto).
    """
    relaxations: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
    return relaxations, _interval_pass(net, lower, upper, upto, False, relaxations)


def _interval_pass(
    net: _Network,
    lower: Tensor,
    upper: Tensor,
    upto: int,
    owned: bool,
    relaxations: dict[int, tuple[Tensor, Tensor, Tensor]] | None,
) -> tuple[Tensor, Tensor, tuple[int, int, int] | None]:
    """The pass of `interval_last`; fills `relaxations` (by ReLU index) when given one."""
    # Centre c and width d = u - l throughout: an affine layer maps them with (W, b) and |W|, and a ReLU in
    # four passes: top = relu(c + d / 2) = relu(u), d' = min(top, d) and c' = top - d' / 2 (where the lower
    # end is active these give back c and d; where it is cut, d' = u and c' = u / 2; where both ends are
    # cut, 0). Without autograd every pass runs in place: each fresh multi-MB tensor costs page faults on
    # CPU, about as much as a pass over it.
    reuse = not torch.is_grad_enabled()
    # Layout: CROWN-IBP's backward pass reads its relaxations channels-last, so its maps run channels-last
    # (then each relaxation is a view, not a transposing copy). The plain interval pass keeps the input's
    # layout, the forward pass's: measured on the AMD EPYC machines here (1 thread, batch 128), a one-channel
    # 28x28 input convolves in 0.14 ms NCHW against 0.32 ms channels-last, the next (16-channel) convolution
    # in 0.55 against 0.45 ms, and a transposing copy of a map costs 0.13 ms: the whole pass is 5 % faster
    # NCHW at 28x28 (interleaved, 300 rounds), 13 % on a three-channel 32x32 network.
    maps_channels_last = relaxations is not None
    if maps_channels_last:
        lower, upper = channels_last(lower), channels_last(upper)
    if owned and reuse:
        width = upper.sub_(lower)
        centre = lower.add_(width, alpha=0.5)
    else:
        width = upper - lower
        centre = torch.add(lower, width, alpha=0.5)
    order = None
    for index, layer in enumerate(net.layers[:upto]):
        if isinstance(layer, nn.Flatten):
            if (
                centre.dim() == 4
                and centre.shape[1] > 1
                and centre.is_contiguous(memory_format=torch.channels_last)
            ):
                c, h, w = centre.shape[1:]
                order = (c, h, w) if h * w > 1 else None
                centre, width = (t.permute(0, 2, 3, 1).reshape(t.shape[0], -1) for t in (centre, width))
            else:
                centre, width = centre.flatten(1), width.flatten(1)
        elif isinstance(layer, nn.ReLU):
            if relaxations is None:
                top = torch.add(centre, width, alpha=0.5) if not reuse else centre.add_(width, alpha=0.5)
                top = top.relu_()
            else:
                relaxations[index], top = _adaptive_relaxation(centre, width)
            if reuse:
                width = torch.minimum(top, width, out=width)
                centre = top.sub_(width, alpha=0.5)
            else:
                width = torch.minimum(top, width)
                centre = torch.sub(top, width, alpha=0.5)
        else:
            weight, weight_abs, bias = _pair_weights(layer, order, maps_channels_last)
            if maps_channels_last:
                # Maps of one channel come back with NCHW strides, which the backward pass would copy.
                centre, width = channels_last(centre), channels_last(width)
            centre = _apply(layer, centre, weight, bias)
            width = _apply(layer, width, weight_abs, None)
            order = None
    return centre, width, order


def _adaptive_relaxation(centre: Tensor, width: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """(lower slope, upper intercept, upper - lower slope) flat (N, 1, F), and relu(u), from c and d = u - l.

    bounds_linear._relu_relaxation's formulas: u = c + d / 2 and -l = d - u, so relu(u) / (relu(u) +
    relu(-l)) is the upper slope (1 where both vanish, u = l = 0), times relu(-l) the intercept; the lower
    slope is 1 where u + l > 0 (c > 0) or l >= 0, else 0. `centre` and `width` are left as they are.
    """
    upper = torch.add(centre, width, alpha=0.5)
    negative = torch.sub(width, upper).relu_()
    top = upper.relu_()
    denominator = top + negative
    degenerate = denominator == 0
    # 1 / 1 where degenerate (top is 0 there). Not masked_fill, whose copy comes back in NCHW order (a copy
    # more to flatten). The gradients there stay 0: relu has a zero gradient at 0.
    upper_slope = (top + degenerate) / denominator.masked_fill_(degenerate, 1.0)
    intercept = upper_slope * negative
    # l >= 0 with c <= 0 only where u = l = 0, which is where the denominator vanishes.
    lower_slope = (centre > 0).logical_or_(degenerate).to(centre.dtype)
    gap = upper_slope - lower_slope if upper_slope.requires_grad else upper_slope.sub_(lower_slope)
    return (_flat(lower_slope), _flat(intercept), _flat(gap)), top


def _flat(t: Tensor) -> Tensor:
    """(N, *shape) -> (N, 1, F) in the backward pass's internal order (channels-last for maps)."""
    if t.dim() == 4:
        t = t.permute(0, 2, 3, 1)
    return t.reshape(t.shape[0], 1, -1)


def elided_margins(
    net: _Network, state: tuple[Tensor, Tensor, tuple[int, int, int] | None], y: Tensor
) -> Tensor:
    """IBP margin lower bounds (N, C), the last Linear layer merged with the specs e_y - e_j; 0 at y.

    Args:
        state: `interval_last` of the penultimate layer.
    """
    centre, width, order = state
    last = net.layers[-1]
    num_classes = last.out_features

    def make() -> tuple[Tensor, Tensor | None, Tensor | None]:
        weight = _columns(last.weight, order)
        if num_classes > _PAIRWISE_CLASSES:
            return weight, None, None
        # Column i * C + j: the margin z_i - z_j's rows W_i - W_j (for the centre) and -|W_i - W_j| / 2 (for
        # the width), transposed for `addmm`; exactly 0 where i = j.
        difference = (weight.unsqueeze(1) - weight.unsqueeze(0)).reshape(-1, weight.shape[1])
        bias = None
        if last.bias is not None:
            bias = (last.bias.unsqueeze(1) - last.bias.unsqueeze(0)).reshape(-1)
        return difference.t().contiguous(), difference.abs().mul_(-0.5).t().contiguous(), bias

    first, second, bias = _cached(("margins", order), last, make)
    if second is None:
        weight = first
        others = _other_classes(num_classes, y)
        spec = weight[y].unsqueeze(1) - weight[others]
        bias = torch.zeros(others.shape, dtype=centre.dtype, device=centre.device)
        if last.bias is not None:
            bias = last.bias[y].unsqueeze(1) - last.bias[others]
        lower = (
            bias
            + torch.bmm(spec, centre.unsqueeze(2)).squeeze(2)
            - torch.bmm(spec.abs(), width.unsqueeze(2)).squeeze(2) * 0.5
        )
        return _scatter_margins(lower, others, num_classes)
    # Every pair's bound in two products (measured: fewer passes than the centre's logits and a per-label
    # width term, or one product of the concatenated [c, d]), then the label's row.
    every = torch.mm(centre, first) if bias is None else torch.addmm(bias, centre, first)
    every = torch.addmm(every, width, second) if every.requires_grad else every.addmm_(width, second)
    every = every.reshape(-1, num_classes, num_classes)
    return every.gather(1, y.reshape(-1, 1, 1).expand(-1, 1, num_classes)).squeeze(1)
