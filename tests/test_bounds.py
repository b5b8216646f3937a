"""Tests of the verified bound engine: soundness, theorems, and oracles (numpy, convex_adversarial, ART)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bound_models import NUM_CLASSES, cnn28, numpy_intervals
from torch import nn

from robmia_db.errors import ModelDefinitionError
from robmia_db.runner.bounds import (
    BOUND_METHODS,
    check_supported,
    crown_ibp_margin_bounds,
    interval_bounds,
    margin_lower_bounds,
    verified_loss,
    worst_case_logits,
)

torch.set_num_threads(1)

SOUND_TOL = 1e-5


# ------------------------------------------------------------------------------------------------
# Networks and data


def _mlp8() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, NUM_CLASSES)
    )


def _cnn8() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256, 32),
        nn.ReLU(),
        nn.Linear(32, NUM_CLASSES),
    )


def _odd8() -> nn.Sequential:
    """Two convolutions without a ReLU between, a dilated one, and a ReLU right after Flatten."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nn.Flatten(),
        nn.ReLU(),
        nn.Linear(128, 16),
        nn.ReLU(),
        nn.Linear(16, NUM_CLASSES),
    )


def _random_images(n: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=generator)
    # Exact 0s and 1s exercise the clipping of the ball to [0, 1].
    x[x < 0.3] = 0.0
    x[x > 0.9] = 1.0
    return x


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    return x, torch.tensor(digits.target, dtype=torch.long)


@pytest.fixture(scope="module")
def trained_cnn() -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """A CNN trained for ~1 s on scikit-learn digits, with 8 held-out images and labels."""
    torch.manual_seed(0)
    x, y = _digits()
    model = _cnn8()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        batch = torch.randint(0, 1500, (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    held_out_x, held_out_y = x[1700:1708], y[1700:1708]
    accuracy = (model(x[1500:]).argmax(1) == y[1500:]).float().mean().item()
    assert accuracy > 0.8, f"the trained test network only reached {accuracy:.2f}"
    return model, held_out_x, held_out_y


def _case(name: str, request: pytest.FixtureRequest) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    if name == "trained":
        return request.getfixturevalue("trained_cnn")
    torch.manual_seed({"mlp8": 1, "cnn8": 2, "cnn28": 3, "odd8": 4}[name])
    model = {"mlp8": _mlp8, "cnn8": _cnn8, "cnn28": cnn28, "odd8": _odd8}[name]()
    size = 28 if name == "cnn28" else 8
    x = _random_images(4, size, seed=len(name))
    y = torch.tensor([0, 3, 7, 9])
    return model, x, y


CASES = ("mlp8", "cnn8", "odd8", "cnn28", "trained")


def _clean_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(x)
    return logits.gather(1, y.unsqueeze(1)) - logits


def _box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


def _pgd_min_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 30):
    """Smallest z_y - z_j found by a targeted L-inf PGD for every (sample, j), +inf at j = y."""
    n = x.shape[0]
    lower, upper = _box(x, eps)
    lower, upper = lower.repeat_interleave(NUM_CLASSES, 0), upper.repeat_interleave(NUM_CLASSES, 0)
    labels = y.repeat_interleave(NUM_CLASSES)
    targets = torch.arange(NUM_CLASSES).repeat(n)
    generator = torch.Generator().manual_seed(0)
    point = lower + torch.rand(lower.shape, generator=generator) * (upper - lower)
    best = torch.full((n * NUM_CLASSES,), float("inf"))
    for _ in range(steps + 1):
        point.requires_grad_(True)
        logits = model(point)
        margin = logits.gather(1, labels.unsqueeze(1)).squeeze(1) - logits.gather(
            1, targets.unsqueeze(1)
        ).squeeze(1)
        (gradient,) = torch.autograd.grad(margin.sum(), point)
        best = torch.minimum(best, margin.detach())
        point = torch.maximum(torch.minimum(point.detach() - eps / 8 * gradient.sign(), upper), lower)
    best = best.reshape(n, NUM_CLASSES)
    best[torch.arange(n), y] = float("inf")
    return best


def _corner_min_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, corners: int = 128):
    lower, upper = _box(x, eps)
    generator = torch.Generator().manual_seed(1)
    best = torch.full((x.shape[0], NUM_CLASSES), float("inf"))
    with torch.no_grad():
        for _ in range(corners):
            pick = torch.rand(x.shape, generator=generator) < 0.5
            best = torch.minimum(best, _clean_margins(model, torch.where(pick, upper, lower), y))
    best[torch.arange(x.shape[0]), y] = float("inf")
    return best


# ------------------------------------------------------------------------------------------------
# Soundness and exactness at eps = 0


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("eps", [0.01, 0.05])
def test_every_method_is_sound(case: str, eps: float, request: pytest.FixtureRequest) -> None:
    model, x, y = _case(case, request)
    clean = _clean_margins(model, x, y)
    pgd = _pgd_min_margins(model, x, y, eps)
    corners = _corner_min_margins(model, x, y, eps)
    with torch.no_grad():
        for method in BOUND_METHODS:
            lb = margin_lower_bounds(model, x, y, eps, method)
            assert lb.shape == (x.shape[0], NUM_CLASSES) and lb.dtype == torch.float32
            assert torch.isfinite(lb).all(), method
            assert (lb[torch.arange(x.shape[0]), y] == 0).all(), method
            others = torch.ones_like(lb, dtype=torch.bool)
            others[torch.arange(x.shape[0]), y] = False
            assert (lb[others] <= clean[others] + SOUND_TOL).all(), f"{method}: above the clean margin"
            assert (lb[others] <= pgd[others] + SOUND_TOL).all(), f"{method}: above a PGD point's margin"
            assert (lb[others] <= corners[others] + SOUND_TOL).all(), f"{method}: above a corner's margin"


@pytest.mark.parametrize("case", CASES)
def test_every_method_equals_the_clean_margin_at_eps_zero(case: str, request: pytest.FixtureRequest) -> None:
    model, x, y = _case(case, request)
    clean = _clean_margins(model, x, y)
    with torch.no_grad():
        for method in BOUND_METHODS:
            lb = margin_lower_bounds(model, x, y, 0.0, method)
            torch.testing.assert_close(lb, clean, rtol=1e-5, atol=1e-5, msg=method)


# ------------------------------------------------------------------------------------------------
# Theorems


def test_exact_on_a_network_without_relu() -> None:
    """Linear bounds of an affine network over a box are exact; IBP through two layers is not."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 20), nn.Linear(20, NUM_CLASSES))
    x, y, eps = _random_images(3, 8, seed=5), torch.tensor([1, 4, 8]), 0.05
    with torch.no_grad():
        weight = (model[2].weight.double() @ model[1].weight.double()).numpy()
        bias = (model[2].weight.double() @ model[1].bias.double() + model[2].bias.double()).numpy()
    lower, upper = (t.flatten(1).double().numpy() for t in _box(x, eps))
    center, radius = (upper + lower) / 2, (upper - lower) / 2
    exact = np.stack(
        [
            (weight[label] - weight) @ c - np.abs(weight[label] - weight) @ r + bias[label] - bias
            for c, r, label in zip(center, radius, y.tolist(), strict=True)
        ]
    )
    with torch.no_grad():
        for method in ("crown_ibp", "crown", "dual", "zonotope"):
            lb = margin_lower_bounds(model, x, y, eps, method).double().numpy()
            np.testing.assert_allclose(lb, exact, rtol=1e-5, atol=1e-5, err_msg=method)
        ibp = margin_lower_bounds(model, x, y, eps, "ibp").double().numpy()
    assert (ibp <= exact + 1e-5).all() and (ibp < exact - 1e-3).any()


def test_crown_equals_crown_ibp_with_one_hidden_layer() -> None:
    """With one hidden layer the intermediate bounds are exact, so both share relaxations."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, NUM_CLASSES))
    x, y = _random_images(4, 8, seed=6), torch.tensor([0, 2, 5, 9])
    with torch.no_grad():
        crown = margin_lower_bounds(model, x, y, 0.05, "crown")
        crown_ibp = margin_lower_bounds(model, x, y, 0.05, "crown_ibp")
    torch.testing.assert_close(crown, crown_ibp, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["cnn8", "trained"])
def test_elided_ibp_is_at_least_the_unelided_box_bound(case: str, request: pytest.FixtureRequest) -> None:
    model, x, y = _case(case, request)
    with torch.no_grad():
        lower, upper = interval_bounds(model, x, 0.03)
        elided = margin_lower_bounds(model, x, y, 0.03, "ibp")
    box = lower.gather(1, y.unsqueeze(1)) - upper
    box[torch.arange(x.shape[0]), y] = 0
    assert (elided >= box - 1e-5).all()
    assert (elided > box + 1e-4).any()


def test_ibp_shrinks_as_eps_grows(trained_cnn) -> None:
    model, x, y = trained_cnn
    with torch.no_grad():
        bounds = [margin_lower_bounds(model, x, y, eps, "ibp") for eps in (0.0, 0.01, 0.03, 0.1)]
    for tighter, looser in zip(bounds, bounds[1:], strict=False):
        assert (looser <= tighter + 1e-6).all()


def test_crown_ibp_mix_matches_its_parts(trained_cnn) -> None:
    model, x, y = trained_cnn
    with torch.no_grad():
        ibp = margin_lower_bounds(model, x, y, 0.05, "ibp")
        crown_ibp = margin_lower_bounds(model, x, y, 0.05, "crown_ibp")
        torch.testing.assert_close(crown_ibp_margin_bounds(model, x, y, 0.05, beta=0.0), ibp)
        torch.testing.assert_close(crown_ibp_margin_bounds(model, x, y, 0.05, beta=1.0), crown_ibp)
        torch.testing.assert_close(
            crown_ibp_margin_bounds(model, x, y, 0.05, beta=0.3), 0.3 * crown_ibp + 0.7 * ibp
        )
    assert not torch.allclose(ibp, crown_ibp)


@pytest.mark.parametrize("method", BOUND_METHODS)
def test_per_sample_eps_equals_separate_calls(method: str, request: pytest.FixtureRequest) -> None:
    model, x, y = _case("odd8", request)
    eps = torch.tensor([0.0, 0.01, 0.04, 0.1])
    with torch.no_grad():
        batched = margin_lower_bounds(model, x, y, eps, method)
        separate = torch.cat(
            [margin_lower_bounds(model, x[i : i + 1], y[i : i + 1], float(eps[i]), method) for i in range(4)]
        )
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-5)


def test_interval_bounds_contain_attacked_and_corner_logits(trained_cnn) -> None:
    model, x, y = trained_cnn
    eps = 0.05
    with torch.no_grad():
        lower, upper = interval_bounds(model, x, eps)
        box_lower, box_upper = _box(x, eps)
        generator = torch.Generator().manual_seed(2)
        for _ in range(100):
            pick = torch.rand(x.shape, generator=generator) < 0.5
            logits = model(torch.where(pick, box_upper, box_lower))
            assert (logits >= lower - SOUND_TOL).all() and (logits <= upper + SOUND_TOL).all()


# ------------------------------------------------------------------------------------------------
# Oracles


@pytest.mark.parametrize("case", CASES)
def test_ibp_matches_numpy_float64_intervals(case: str, request: pytest.FixtureRequest) -> None:
    model, x, y = _case(case, request)
    eps = 0.03
    lower, upper = (t.double().numpy() for t in _box(x, eps))
    ref_lower, ref_upper = numpy_intervals(model, lower, upper, len(model))
    pen_lower, pen_upper = numpy_intervals(model, lower, upper, len(model) - 1)
    weight, bias = model[-1].weight.detach().double().numpy(), model[-1].bias.detach().double().numpy()
    elided = np.zeros((len(y), NUM_CLASSES))
    for n, label in enumerate(y.tolist()):
        spec = weight[label] - weight
        elided[n] = (
            np.maximum(spec, 0) @ pen_lower[n] + np.minimum(spec, 0) @ pen_upper[n] + bias[label] - bias
        )
    with torch.no_grad():
        got_lower, got_upper = interval_bounds(model, x, eps)
        got_elided = margin_lower_bounds(model, x, y, eps, "ibp")
    scale = max(1.0, float(np.abs(ref_upper).max()))
    np.testing.assert_allclose(got_lower.double().numpy(), ref_lower, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(got_upper.double().numpy(), ref_upper, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(got_elided.double().numpy(), elided, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("case", ["mlp8", "cnn8", "cnn28", "trained"])  # convex_adversarial fails on odd8
@pytest.mark.parametrize("eps", [0.02, 0.1])
def test_dual_matches_convex_adversarial(case: str, eps: float, request: pytest.FixtureRequest) -> None:
    convex_adversarial = pytest.importorskip("convex_adversarial")
    model, x, y = _case(case, request)
    with torch.no_grad():
        dual = convex_adversarial.DualNetwork(model, x, eps, bounded_input=True)
        specs = torch.eye(NUM_CLASSES)[y].unsqueeze(1) - torch.eye(NUM_CLASSES).unsqueeze(0)
        reference = dual(specs)
        got = margin_lower_bounds(model, x, y, eps, "dual")
    scale = max(1.0, float(reference.abs().max()))
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("case", ["odd8", "cnn28"])
@pytest.mark.parametrize("method", ["crown", "dual"])
def test_patch_specs_match_dense_specs(
    case: str, method: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Convolutional intermediate bounds from receptive-field patches equal the dense computation."""
    from robmia_db.runner import bounds_linear

    model, x, y = _case(case, request)
    with torch.no_grad():
        with_patches = margin_lower_bounds(model, x, y, 0.03, method)
        monkeypatch.setattr(bounds_linear, "_conv_chain", lambda net, index: False)
        dense = margin_lower_bounds(model, x, y, 0.03, method)
    torch.testing.assert_close(with_patches, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", BOUND_METHODS)
def test_splitting_the_batch_for_memory_changes_nothing(
    method: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    from robmia_db.runner import bounds_core

    model, x, y = _case("cnn8", request)
    eps = torch.tensor([0.0, 0.01, 0.04, 0.1])
    with torch.no_grad():
        whole = margin_lower_bounds(model, x, y, eps, method)
        monkeypatch.setattr(bounds_core, "_MEMORY_BUDGET_ELEMENTS", 1)  # one sample per chunk
        split = margin_lower_bounds(model, x, y, eps, method)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)


class _ArtView(nn.Module):
    """The same layers without Flatten: ART's DeepZ converter rejects Flatten and infers the reshape."""

    def __init__(self, model: nn.Sequential):
        super().__init__()
        for index, layer in enumerate(model):
            if not isinstance(layer, nn.Flatten):
                self.add_module(f"layer{index}", layer)
        self.model = [model]  # a plain list keeps it out of children()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model[0](x)


@pytest.mark.filterwarnings("ignore::UserWarning:art.estimators.certification.deep_z.pytorch")
@pytest.mark.parametrize("case", ["mlp8", "cnn8", "cnn28", "trained"])
@pytest.mark.parametrize("eps", [0.02, 0.1])
def test_zonotope_matches_art_deepz(case: str, eps: float, request: pytest.FixtureRequest) -> None:
    deep_z = pytest.importorskip("art.estimators.certification.deep_z")
    model, x, y = _case(case, request)
    if case == "cnn28":
        x, y = x[:2], y[:2]
    input_shape = (64,) if case == "mlp8" else tuple(x.shape[1:])

    def box_zonotope(sample: np.ndarray, bound: float) -> tuple[np.ndarray, np.ndarray]:
        # ART's default input clipping writes arrays into scalars, which numpy 2 refuses; this is the same box.
        lower, upper = np.clip(sample - bound, 0, 1), np.clip(sample + bound, 0, 1)
        generators = np.diag(((upper - lower) / 2).ravel()).reshape(-1, *sample.shape)
        return ((upper + lower) / 2)[None], generators

    certifier = deep_z.PytorchDeepZ(
        model=_ArtView(model),
        loss=nn.CrossEntropyLoss(),
        input_shape=input_shape,
        nb_classes=NUM_CLASSES,
        clip_values=(0.0, 1.0),
        device_type="cpu",
        concrete_to_zonotope=box_zonotope,
    )
    centers, generators = certifier.predict_zonotopes(x.reshape(len(x), *input_shape).numpy(), bound=eps)
    reference = np.zeros((len(y), NUM_CLASSES))
    for n, label in enumerate(y.tolist()):
        center, gens = centers[n][0].astype(np.float64), generators[n].astype(np.float64)
        reference[n] = (center[label] - center) - np.abs(gens[:, [label]] - gens).sum(0)
    with torch.no_grad():
        got = margin_lower_bounds(model, x, y, eps, "zonotope").double().numpy()
    scale = max(1.0, float(np.abs(reference).max()))
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5 * scale)


# ------------------------------------------------------------------------------------------------
# Gradients, dtype, device, and the model left untouched


@pytest.mark.parametrize("method", BOUND_METHODS)
def test_gradients_reach_every_parameter(method: str, request: pytest.FixtureRequest) -> None:
    model, x, y = _case("cnn8", request)
    loss = verified_loss(margin_lower_bounds(model, x, y, 0.02, method), y).mean()
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("method", [*BOUND_METHODS, "box", "crown_ibp_mix"])
def test_gradients_match_finite_differences(method: str) -> None:
    """Directional derivative in float64 against a central difference (no ReLU changes state for h=1e-6)."""
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(27, 12), nn.ReLU(), nn.Linear(12, 4)
    ).double()
    x = _random_images(3, 8, seed=7).double()
    y = torch.tensor([0, 1, 3])

    def objective() -> torch.Tensor:
        if method == "box":
            lower, upper = interval_bounds(model, x, 0.03)
            return (upper - lower).sum()
        if method == "crown_ibp_mix":
            return crown_ibp_margin_bounds(model, x, y, 0.03, beta=0.4).sum()
        lb = margin_lower_bounds(model, x, y, 0.03, method)
        assert lb.dtype == torch.float64
        return lb.sum()

    parameters = list(model.parameters())
    gradients = torch.autograd.grad(objective(), parameters)
    directions = [torch.randn_like(p) for p in parameters]
    analytic = sum((g * d).sum() for g, d in zip(gradients, directions, strict=True))
    step = 1e-6
    with torch.no_grad():
        for p, d in zip(parameters, directions, strict=True):
            p.add_(step * d)
        plus = objective()
        for p, d in zip(parameters, directions, strict=True):
            p.sub_(2 * step * d)
        minus = objective()
    numeric = (plus - minus) / (2 * step)
    assert abs(float(analytic) - float(numeric)) <= 1e-5 * max(1.0, abs(float(numeric)))


def test_the_model_is_left_untouched(trained_cnn) -> None:
    model, x, y = trained_cnn
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for method in BOUND_METHODS:
            margin_lower_bounds(model, x, y, 0.05, method)
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", BOUND_METHODS)
def test_cuda_matches_cpu(method: str, request: pytest.FixtureRequest) -> None:
    model, x, y = _case("odd8", request)
    with torch.no_grad():
        on_cpu = margin_lower_bounds(model, x, y, 0.05, method)
        on_gpu = margin_lower_bounds(model.to("cuda"), x.cuda(), y.cuda(), 0.05, method)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Worst-case logits and the verified loss


def test_worst_case_logits_and_verified_loss_match_numpy() -> None:
    generator = torch.Generator().manual_seed(3)
    lb = torch.randn(5, NUM_CLASSES, generator=generator, dtype=torch.float64) * 3
    y = torch.tensor([0, 9, 4, 4, 2])
    lb[torch.arange(5), y] = 0
    logits = worst_case_logits(lb, y)
    assert logits.dtype == torch.float32
    expected = -lb.numpy()
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert (logits[torch.arange(5), y] == 0).all()
    loss = verified_loss(lb, y)
    reference = np.log1p(np.exp(expected).sum(1) - 1.0)  # the label's term is exp(0) = 1
    np.testing.assert_allclose(loss.numpy(), reference, rtol=1e-6)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(logits, y, reduction="none"))
    confidence = torch.softmax(logits, 1)[torch.arange(5), y]
    torch.testing.assert_close(confidence, torch.exp(-loss))


def test_verified_loss_is_stable_for_huge_bounds() -> None:
    lb = torch.tensor([[0.0, -1000.0, -999.0], [0.0, 1000.0, 2000.0]])
    loss = verified_loss(lb, torch.tensor([0, 0]))
    assert torch.isfinite(loss).all()
    assert abs(loss[0].item() - (1000.0 + np.log1p(np.exp(-1.0)))) < 1e-3
    assert 0.0 <= loss[1].item() < 1e-30 or loss[1].item() == 0.0


# ------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(72, 10)),
            "layer 1 (BatchNorm2d) is not supported by the bound engine: use Conv2d, Linear, ReLU, Flatten",
        ),
        (
            nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)),
            "layer 2 (Tanh) is not supported by the bound engine: use Conv2d, Linear, ReLU, Flatten",
        ),
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 10)),
            "layer 1 (MaxPool2d) is not supported by the bound engine: use Conv2d, Linear, ReLU, Flatten",
        ),
        (
            nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Dropout()),
            "layer 2 (Dropout) is not supported by the bound engine: use Conv2d, Linear, ReLU, Flatten",
        ),
        (
            nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.ReLU()),
            "layer 2 (ReLU) cannot end a model for the bound engine: the last layer must be Linear "
            "(the margin specification is merged into it)",
        ),
        (
            nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.Flatten(), nn.Linear(128, 10)),
            "layer 0 (Conv2d) is not supported by the bound engine: only groups=1 and zero padding given as numbers",
        ),
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(start_dim=2), nn.Linear(36, 10)),
            "layer 1 (Flatten) is not supported by the bound engine: only start_dim=1, end_dim=-1",
        ),
        (
            nn.ModuleList([nn.Linear(64, 10)]),
            "the bound engine needs an nn.Sequential, got ModuleList: use Conv2d, Linear, ReLU, Flatten",
        ),
    ],
)
def test_unsupported_models_are_refused_in_one_line(model: nn.Module, message: str) -> None:
    with pytest.raises(ModelDefinitionError) as caught:
        check_supported(model)
    assert str(caught.value) == message
    assert "\n" not in str(caught.value)
    if isinstance(model, nn.Sequential):
        with pytest.raises(ModelDefinitionError):
            margin_lower_bounds(model, torch.rand(1, 1, 8, 8), torch.tensor([0]), 0.1, "crown")


def test_bad_arguments_are_refused(request: pytest.FixtureRequest) -> None:
    model, x, y = _case("mlp8", request)
    with pytest.raises(ValueError, match="unknown bound method 'lp'"):
        margin_lower_bounds(model, x, y, 0.1, "lp")
    with pytest.raises(ValueError, match="eps must be"):
        margin_lower_bounds(model, x, y, torch.tensor([0.1, 0.2]), "ibp")
    with pytest.raises(ValueError, match="eps must be >= 0"):
        margin_lower_bounds(model, x, y, -0.1, "ibp")
    with pytest.raises(ValueError, match="labels must lie in"):
        margin_lower_bounds(model, x, torch.tensor([0, 1, 2, 10]), 0.1, "ibp")
    with pytest.raises(ValueError, match="beta must lie in"):
        crown_ibp_margin_bounds(model, x, y, 0.1, beta=1.5)
