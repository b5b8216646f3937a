"""Tests of the random-projection dual estimate (training only) against convex_adversarial 0.4.4 and the exact bound."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from robmia_db.runner.bounds import dual_margin_estimate, margin_lower_bounds, verified_loss
from robmia_db.runner.defenses import TrainProgress, build_defense
from robmia_db.spec.defenses import DEFENSE_PARAMS

torch.set_num_threads(1)

NUM_CLASSES = 10


def _network(name: str) -> nn.Sequential:
    torch.manual_seed({"mlp8": 1, "cnn8": 2, "cnn28": 3}[name])
    if name == "mlp8":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 32),
            nn.ReLU(),
            nn.Linear(32, 24),
            nn.ReLU(),
            nn.Linear(24, NUM_CLASSES),
        )
    first = nn.Conv2d(1, 8, 3, padding=1) if name == "cnn8" else nn.Conv2d(1, 4, 4, stride=2, padding=1)
    second = (
        nn.Conv2d(8, 16, 4, stride=2, padding=1)
        if name == "cnn8"
        else nn.Conv2d(4, 8, 4, stride=2, padding=1)
    )
    flat = 256 if name == "cnn8" else 392
    return nn.Sequential(
        first,
        nn.ReLU(),
        second,
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(flat, 32),
        nn.ReLU(),
        nn.Linear(32, NUM_CLASSES),
    )


def _images(name: str, n: int, low: float = 0.0, high: float = 1.0, seed: int = 0) -> torch.Tensor:
    size = 28 if name == "cnn28" else 8
    generator = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, 1, size, size, generator=generator)


LABELS = torch.tensor([0, 3, 7, 9, 1, 4])


@pytest.mark.parametrize("name", ["mlp8", "cnn8", "cnn28"])
@pytest.mark.parametrize("eps", [0.002, 0.02, 0.1])
@pytest.mark.parametrize("projections", [5, 20, 50])
def test_estimate_equals_convex_adversarial_projection_mode_with_the_same_draws(
    name: str, eps: float, projections: int
) -> None:
    """Same global seed -> same Cauchy draws in the same order -> the same estimate up to float32 rounding.

    The small eps makes some layers fall back to exact terms (few unstable neurons), as convex_adversarial
    decides. Inputs stay in [eps, 1 - eps]: convex_adversarial's projection mode takes the clipped box for the
    intermediate bounds but the unclipped ball in its last step (InfBallProjBounded inherits InfBall's
    objective), while ours clips throughout; inside [eps, 1 - eps] both are the same box.
    """
    convex_adversarial = pytest.importorskip("convex_adversarial")
    model = _network(name)
    x = _images(name, len(LABELS), low=eps, high=1 - eps, seed=projections)
    specs = torch.eye(NUM_CLASSES)[LABELS].unsqueeze(1) - torch.eye(NUM_CLASSES).unsqueeze(0)
    with torch.no_grad():
        torch.manual_seed(11)
        reference = convex_adversarial.DualNetwork(
            model, x, eps, proj=projections, norm_type="l1_median", bounded_input=True
        )(specs)
        torch.manual_seed(11)
        got = dual_margin_estimate(model, x, LABELS, eps, projections)
    scale = max(1.0, float(reference.abs().max()))
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("name", ["mlp8", "cnn8"])
@pytest.mark.parametrize("eps", [0.01, 0.1])
def test_with_more_projections_than_terms_the_estimate_is_the_exact_bound(name: str, eps: float) -> None:
    """Every l1 norm falls back to its exact sum when k exceeds its terms: the exact dual bound, clipped box.

    (convex_adversarial cannot be the oracle here: it raises for k >= the input size in l1_median mode.)
    """
    model = _network(name)
    x = _images(name, len(LABELS), seed=1)
    x[x < 0.3], x[x > 0.9] = 0.0, 1.0  # exact 0s and 1s: the box is clipped
    with torch.no_grad():
        estimate = dual_margin_estimate(model, x, LABELS, eps, projections=10**6)
        exact = margin_lower_bounds(model, x, LABELS, eps, "dual")
    torch.testing.assert_close(estimate, exact, rtol=1e-5, atol=1e-5)


def test_the_estimate_is_not_a_bound() -> None:
    """Why verified signals never use it: with few projections some estimates exceed the exact bound."""
    model = _network("mlp8")
    x = _images("mlp8", len(LABELS), seed=2)
    with torch.no_grad():
        exact = margin_lower_bounds(model, x, LABELS, 0.1, "dual")
        generator = torch.Generator().manual_seed(0)
        above = [
            bool((dual_margin_estimate(model, x, LABELS, 0.1, 5, generator=generator) > exact + 1e-4).any())
            for _ in range(10)
        ]
    assert any(above)


def test_a_generator_makes_the_estimate_reproducible_and_gradients_reach_every_parameter() -> None:
    model = _network("cnn8")
    x = _images("cnn8", len(LABELS), seed=3)
    first = dual_margin_estimate(model, x, LABELS, 0.05, 20, generator=torch.Generator().manual_seed(5))
    second = dual_margin_estimate(model, x, LABELS, 0.05, 20, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, second)
    verified_loss(first, LABELS).mean().backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), parameter_name
        assert parameter.grad.abs().sum() > 0, parameter_name


def test_negative_inputs_are_refused() -> None:
    model = _network("mlp8")
    x = _images("mlp8", len(LABELS))
    with pytest.raises(ValueError, match="x_min >= 0"):
        dual_margin_estimate(model, x, LABELS, 0.1, 20, x_min=-1.0)
    with pytest.raises(ValueError, match="projections must be >= 1"):
        dual_margin_estimate(model, x, LABELS, 0.1, 0)


def test_the_dual_defense_trains_on_the_estimate_with_projections() -> None:
    model = _network("cnn8")
    x = _images("cnn8", len(LABELS), seed=4)
    progress = TrainProgress(epoch=9, step=90, steps_per_epoch=10, epochs=10)  # the ramp is done: eps 0.1
    params = DEFENSE_PARAMS["dual"](projections=20, norm="l1_median").resolved(0.1)
    defense = build_defense("dual", params, 0.1)
    torch.manual_seed(3)
    loss = defense.loss(model, x, LABELS, progress)
    torch.manual_seed(3)
    expected = verified_loss(dual_margin_estimate(model, x, LABELS, 0.1, 20), LABELS).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    exact = build_defense("dual", DEFENSE_PARAMS["dual"]().resolved(0.1), 0.1).loss(
        model, x, LABELS, progress
    )
    assert float(exact.detach()) == pytest.approx(
        float(verified_loss(margin_lower_bounds(model, x, LABELS, 0.1, "dual"), LABELS).mean().detach()),
        rel=1e-6,
    )


def test_exact_dual_models_keep_their_parameters_and_keys() -> None:
    """The new options are left out of the resolved (hashed) parameters at their exact default."""
    assert DEFENSE_PARAMS["dual"]().resolved(0.1) == {
        "eps_start_factor": 0.1,
        "ramp_epochs": "50%",
        "grad_clip_norm": 1.0,
    }
    resolved = DEFENSE_PARAMS["dual"](projections=50, norm="l1_median").resolved(0.1)
    assert (resolved["projections"], resolved["norm"]) == (50, "l1_median")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"projections": 20}, 'projections = 20 needs norm = "l1_median"'),
        (
            {"norm": "l1_median"},
            '"l1_median" estimates norms from random projections: set projections = k > 0',
        ),
        ({"projections": -1, "norm": "l1_median"}, "greater than or equal to 0"),
        ({"norm": "l2"}, "Input should be 'l1' or 'l1_median'"),
    ],
)
def test_inconsistent_projection_options_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DEFENSE_PARAMS["dual"](**fields)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_when_every_term_is_exact() -> None:
    model = _network("cnn8")
    x = _images("cnn8", len(LABELS), seed=6)
    with torch.no_grad():
        on_cpu = dual_margin_estimate(model, x, LABELS, 0.05, projections=10**6)
        on_gpu = dual_margin_estimate(model.to("cuda"), x.cuda(), LABELS.cuda(), 0.05, projections=10**6)
        sampled = dual_margin_estimate(model, x.cuda(), LABELS.cuda(), 0.05, projections=20)
    assert on_gpu.device.type == "cuda" and sampled.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-4, atol=1e-4)
