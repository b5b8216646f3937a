"""The IBP kernel (bounds_interval) on the layouts it special-cases, against float64 interval arithmetic.

The plain pass keeps the input's layout and CROWN-IBP's runs maps channels-last (one-channel inputs
included); the kernel reads flattened channels-last maps in (H, W, C) order with permuted Linear columns,
takes Linear products from oneDNN and overwrites its own intermediates without autograd, caches derived
weights per parameter version, and merges the last layer with the margin specs by one product (a per-sample spec above
32 classes). Each of these is checked here against `numpy_intervals` (W+ / W- in float64).
"""

from __future__ import annotations

import copy
import gc

import numpy as np
import pytest
import torch
from bound_models import cnn28, numpy_intervals
from torch import nn

from robmia_db.runner import bounds_backward, bounds_core, bounds_interval
from robmia_db.runner.bounds import interval_bounds, margin_lower_bounds

torch.set_num_threads(1)
EPS = 0.05


def _rgb_flatten_last() -> nn.Sequential:
    # Three channels; the flattened channels-last map feeds the last layer directly (permuted margin table).
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(5, 6, 3, stride=2),
        nn.Flatten(),
        nn.Linear(54, 10),
    )


def _relu_first_stacked() -> nn.Sequential:
    # A ReLU on the box, two affine layers in a row, two ReLUs in a row.
    return nn.Sequential(
        nn.ReLU(), nn.Flatten(), nn.Linear(64, 30), nn.Linear(30, 20), nn.ReLU(), nn.ReLU(), nn.Linear(20, 10)
    )


def _many_classes() -> nn.Sequential:
    # 40 classes: above the pairwise table's limit, so the per-sample spec path.
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 40))


def _case(name: str) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    torch.manual_seed(11)
    if name == "cnn28":
        model, shape = cnn28(), (5, 1, 28, 28)
    elif name == "rgb_flatten_last":
        model, shape = _rgb_flatten_last(), (5, 3, 8, 8)
    elif name == "relu_first_stacked":
        model, shape = _relu_first_stacked(), (5, 1, 8, 8)
    else:
        model, shape = _many_classes(), (5, 1, 8, 8)
    x = torch.rand(shape, generator=generator)
    classes = model[-1].out_features
    y = torch.randint(0, classes, (shape[0],), generator=generator)
    return model, x, y


def _reference(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: float):
    lower = (x - eps).clamp(0, 1).double().numpy()
    upper = (x + eps).clamp(0, 1).double().numpy()
    logits = numpy_intervals(model, lower, upper, len(model))
    pen_lower, pen_upper = numpy_intervals(model, lower, upper, len(model) - 1)
    weight, bias = model[-1].weight.detach().double().numpy(), model[-1].bias.detach().double().numpy()
    elided = np.zeros((len(y), len(bias)))
    for n, label in enumerate(y.tolist()):
        spec = weight[label] - weight
        elided[n] = (
            np.maximum(spec, 0) @ pen_lower[n] + np.minimum(spec, 0) @ pen_upper[n] + bias[label] - bias
        )
    return logits, elided


def _assert_matches(got: torch.Tensor, expected: np.ndarray) -> None:
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(got.detach().double().numpy(), expected, rtol=1e-5, atol=1e-5 * scale)


CASES = ("cnn28", "rgb_flatten_last", "relu_first_stacked", "many_classes")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("grad", [False, True])
def test_ibp_kernel_matches_float64_intervals(case: str, grad: bool) -> None:
    model, x, y = _case(case)
    (ref_lower, ref_upper), ref_elided = _reference(model, x, y, EPS)
    x_before = x.clone()
    with torch.set_grad_enabled(grad):
        lower, upper = interval_bounds(model, x, EPS)
        elided = margin_lower_bounds(model, x, y, EPS, "ibp")
    _assert_matches(lower, ref_lower)
    _assert_matches(upper, ref_upper)
    _assert_matches(elided, ref_elided)
    assert torch.equal(x, x_before)  # the kernel overwrites only what it made
    assert (elided.gather(1, y.unsqueeze(1)) == 0).all()
    if grad:
        # The autograd path keeps the ReLU outputs intact: backward runs and reaches every parameter.
        (elided.sum() + upper.sum()).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("case", CASES)
def test_ibp_gradients_match_a_float64_autograd_reference(case: str) -> None:
    # The same elided bound written with W+ / W- in float64 autograd: gradients agree with the kernel's.
    model, x, y = _case(case)
    reference = copy.deepcopy(model).double()
    margins = margin_lower_bounds(model, x, y, EPS, "ibp")
    margins.sum().backward()
    lower, upper = (x - EPS).clamp(0, 1).double(), (x + EPS).clamp(0, 1).double()
    layers = list(reference)
    for layer in layers[:-1]:
        if isinstance(layer, nn.ReLU):
            lower, upper = lower.clamp(min=0), upper.clamp(min=0)
        elif isinstance(layer, nn.Flatten):
            lower, upper = lower.flatten(1), upper.flatten(1)
        else:
            positive, negative = layer.weight.clamp(min=0), layer.weight.clamp(max=0)
            apply = (
                (lambda t, w: nn.functional.linear(t, w))
                if isinstance(layer, nn.Linear)
                else (lambda t, w, layer=layer: nn.functional.conv2d(t, w, None, layer.stride, layer.padding))
            )
            lower, upper = (
                apply(lower, positive) + apply(upper, negative) + _bias(layer),
                apply(upper, positive) + apply(lower, negative) + _bias(layer),
            )
    last = layers[-1]
    spec = last.weight[y].unsqueeze(1) - last.weight.unsqueeze(0)
    expected = (
        (spec.clamp(min=0) * lower.unsqueeze(1)).sum(2)
        + (spec.clamp(max=0) * upper.unsqueeze(1)).sum(2)
        + last.bias[y].unsqueeze(1)
        - last.bias
    )
    expected.sum().backward()
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4)


def _bias(layer: nn.Module) -> torch.Tensor:
    return layer.bias if isinstance(layer, nn.Linear) else layer.bias[:, None, None]


def test_cached_weights_follow_every_parameter_update() -> None:
    model, x, y = _case("cnn28")

    def check() -> None:
        # A deep copy has new parameters, so nothing cached for the model can serve it.
        with torch.no_grad():
            got = margin_lower_bounds(model, x, y, EPS, "ibp")
            fresh = margin_lower_bounds(copy.deepcopy(model), x, y, EPS, "ibp")
        torch.testing.assert_close(got, fresh, rtol=0, atol=0)
        _assert_matches(got, _reference(model, x, y, EPS)[1])

    check()
    # An optimizer step updates the parameters in place (version counters move).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    margin_lower_bounds(model, x, y, EPS, "ibp").sum().backward()
    optimizer.step()
    check()
    # Only a bias, in place.
    with torch.no_grad():
        model[-1].bias.add_(1.0)
        model[5].bias.mul_(-1.0)
    check()
    # load_state_dict copies into the existing parameters.
    other = cnn28()
    model.load_state_dict(other.state_dict())
    check()
    # New memory: a dtype round trip.
    model.double().float()
    check()


def test_channels_last_and_noncontiguous_inputs_give_the_same_bounds() -> None:
    model, x, y = _case("rgb_flatten_last")
    with torch.no_grad():
        plain = margin_lower_bounds(model, x, y, EPS, "ibp")
        channels_last = margin_lower_bounds(
            model, x.contiguous(memory_format=torch.channels_last), y, EPS, "ibp"
        )
        strided = margin_lower_bounds(model, torch.cat([x, x], 3)[..., : x.shape[3]], y, EPS, "ibp")
    torch.testing.assert_close(channels_last, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(strided, plain, rtol=1e-6, atol=1e-6)


def test_cached_weights_leave_with_their_model() -> None:
    model, x, y = _case("cnn28")
    with torch.no_grad():
        margin_lower_bounds(model, x, y, EPS, "ibp")
    cached = {id(layer) for layer in bounds_interval._CACHE.keys()}
    assert {id(model[0]), id(model[2]), id(model[5]), id(model[7])} <= cached
    del model
    gc.collect()
    assert len(bounds_interval._CACHE) <= len(cached) - 4


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("eps", [EPS, 0.0])
def test_crown_ibp_relaxations_match_float64_intervals(case: str, eps: float) -> None:
    """CROWN-IBP's relaxations read off the kernel's pass equal the adaptive triangle relaxation of float64
    interval bounds (defenses.md: upper slope u / (u - l), intercept -l times it, lower slope 1 where
    u + l > 0 or l >= 0), in the backward pass's internal order; u = l = 0 (exact zeros at eps 0) takes slope 1."""
    model, x, y = _case(case)
    x[:, :, :2] = 0.0  # pixels whose box is the point 0 at eps 0: a ReLU on the box sees u = l = 0 there
    lower = (x - eps).clamp(0, 1).double().numpy()
    upper = (x + eps).clamp(0, 1).double().numpy()
    net = bounds_core._Network.build(model, x)
    box = bounds_core._input_box(x, eps, 0.0, 1.0, torch.float32)
    with torch.no_grad():
        relaxations, (centre, width, _) = bounds_interval.interval_relaxations(net, *box, len(model) - 1)
    indices = [i for i, layer in enumerate(model) if isinstance(layer, nn.ReLU) and i < len(model) - 1]
    assert sorted(relaxations) == indices
    for index in indices:
        low, high = numpy_intervals(model, lower, upper, index)
        positive, negative = np.maximum(high, 0), np.maximum(-low, 0)
        both = positive + negative
        slope = np.where(both > 0, positive / np.where(both > 0, both, 1), 1.0)
        active = ((high + low > 0) | (low >= 0)).astype(np.float64)
        expected = [active, slope * negative, slope - active]

        def internal(a: np.ndarray, index: int = index) -> np.ndarray:
            t = torch.from_numpy(a).reshape(len(a), *net.shapes[index])
            return bounds_backward.to_internal(t, net, index).unsqueeze(1).numpy()

        # A tie u + l = 0 may round either way in float32: the lower slope is compared away from ties.
        decided = internal((np.abs(high + low) > 1e-5).astype(np.float64)) > 0
        for got, want, name in zip(
            relaxations[index], map(internal, expected), ("lower", "intercept", "gap")
        ):
            got = got.double().numpy()
            assert got.shape == want.shape, name
            if name == "intercept":
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
            else:
                np.testing.assert_allclose(got[decided], want[decided], rtol=1e-4, atol=1e-5, err_msg=name)
    last = len(model) - 1
    for got, want in zip(
        (centre - width / 2, centre + width / 2), numpy_intervals(model, lower, upper, last)
    ):
        want = torch.from_numpy(want).reshape(len(x), *net.shapes[last])
        _assert_matches(got.reshape(len(x), -1), bounds_backward.to_internal(want, net, last).numpy())
    if eps == 0.0 and case == "relu_first_stacked":
        # The ReLU on the box: its zero pixels are the degenerate case.
        lower_slope, intercept, gap = (t.squeeze(1) for t in relaxations[0])
        zero = x.reshape(len(x), -1) == 0
        assert zero.any() and (lower_slope[zero] == 1).all() and (gap[zero] == 0).all()
        assert (intercept[zero] == 0).all()


def test_linear_products_without_autograd_match_f_linear_and_fall_back_for_good(monkeypatch) -> None:
    # `_linear` takes oneDNN's product where it applies: the same numbers as F.linear up to summation order.
    generator = torch.Generator().manual_seed(3)
    inputs = torch.rand(64, 300, generator=generator)
    weight = torch.randn(40, 300, generator=generator, requires_grad=True)
    bias = torch.randn(40, generator=generator)
    with torch.no_grad():
        expected = nn.functional.linear(inputs, weight, bias)
        torch.testing.assert_close(
            bounds_interval._linear(inputs, weight, bias), expected, rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            bounds_interval._linear(inputs, weight, None), expected - bias, rtol=1e-5, atol=1e-5
        )
    # Under autograd the product must carry the graph (the oneDNN op has no derivative).
    tracked = bounds_interval._linear(inputs, weight, bias)
    tracked.sum().backward()
    torch.testing.assert_close(weight.grad, inputs.sum(0).expand(40, -1), rtol=1e-5, atol=1e-4)
    # A frozen weight with a trainable bias: the bias alone carries the graph, and gets its gradient.
    trainable_bias = bias.clone().requires_grad_(True)
    bounds_interval._linear(inputs, weight.detach(), trainable_bias).sum().backward()
    torch.testing.assert_close(trainable_bias.grad, torch.full((40,), 64.0))

    def refuses(*args):
        raise RuntimeError("not for this input")

    monkeypatch.setattr(bounds_interval, "_ONEDNN_LINEAR", refuses)
    with torch.no_grad():
        assert torch.equal(bounds_interval._linear(inputs, weight, bias), expected)
    assert bounds_interval._ONEDNN_LINEAR is None  # refused once, never asked again


def test_the_onednn_linear_op_is_checked_against_f_linear_before_its_first_use(monkeypatch) -> None:
    # A private op: one that gives other numbers than F.linear is never used (F.linear's exact numbers).
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch build has no oneDNN")
    assert bounds_interval._checked_onednn_linear() is not None  # this build's op passes
    monkeypatch.setattr(bounds_interval, "_ONEDNN_LINEAR", bounds_interval._UNCHECKED)
    real = torch.ops.mkldnn._linear_pointwise

    class Wrong:
        def __getattr__(self, name):
            if name == "_linear_pointwise":
                return lambda *args: real(*args) * 1.001
            return getattr(torch.ops.mkldnn, name)

    monkeypatch.setattr(torch.ops, "mkldnn", Wrong(), raising=False)
    inputs, weight = torch.rand(8, 30), torch.randn(4, 30)
    with torch.no_grad():
        assert torch.equal(
            bounds_interval._linear(inputs, weight, None), nn.functional.linear(inputs, weight)
        )
    assert bounds_interval._ONEDNN_LINEAR is None


def test_the_plain_pass_keeps_the_input_layout_and_crown_ibp_runs_channels_last() -> None:
    # The layouts `_interval_pass` chooses (see its comment): what they give is checked above against
    # float64; here, that the choice is made (a channels-last plain pass convolves a one-channel 28x28
    # input about 2x slower on the AMD machines here; an NCHW CROWN-IBP pass would copy every relaxation).
    model, x, _ = _case("cnn28")
    net = bounds_core._Network.build(model, x)
    box = bounds_core._input_box(x, EPS, 0.0, 1.0, torch.float32)
    with torch.no_grad():
        centre, width, order = bounds_interval.interval_last(net, *box, 3)
        assert centre.is_contiguous() and width.is_contiguous() and order is None
        relaxations, (centre, width, _) = bounds_interval.interval_relaxations(net, *box, 3)
        assert centre.is_contiguous(memory_format=torch.channels_last) and not centre.is_contiguous()
