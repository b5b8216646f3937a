"""Defenses: each improves what it targets over natural training; losses against independent oracles; schedules;
parameter validation and model keys through real specs.

Training runs go through the real path (TOML spec -> `load_specs` -> `training.train_model`) on scikit-learn's
digits with a small MLP. Oracles: analytic gradients of a linear model in numpy (WRM, the CCS'19 L-inf WRM,
TRADES), numpy interval arithmetic (IBP, DiffAI box) and convex_adversarial (dual).
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import toml_dumps, use_one_torch_thread
from torch import nn

from robmia_db.runner import bounds
from robmia_db.runner.defenses import DEFENSES, TrainProgress, build_defense
from robmia_db.runner.defenses.empirical import linf_wrm_points, trades_points, wrm_l2_points
from robmia_db.runner.defenses.verifiable import diffai_worst_margin, ramp_fraction
from robmia_db.runner.perturb import pgd_linf
from robmia_db.spec import load_specs, read_spec
from robmia_db.spec.defenses import DEFENSE_PARAMS, schedule_epochs

use_one_torch_thread()

EPS = 0.1
HIDDEN = [128, 64]
BASE_SPEC: dict[str, Any] = {
    "experiment": {"name": "defenses"},
    "data": {"dataset": "digits", "split_seed": 0},
    "membership": {"scheme": "train_test", "n_members": 400, "n_nonmembers": 300},
    "model": {"arch": "mlp", "options": {"hidden": HIDDEN}},
    "training": {"eps": EPS, "seeds": [0], "batch_size": 50, "optimizer": {"name": "adam", "lr": 1e-3}},
    "runtime": {"device": "cpu", "threads": 1},
}


def spec_text(defense: str, params: dict[str, Any] | None = None, epochs: int = 20, **training: Any) -> str:
    spec = {
        **BASE_SPEC,
        "training": {**BASE_SPEC["training"], "defenses": [defense], "epochs": epochs, **training},
    }
    if params:
        spec["defense"] = {defense: params}
    return toml_dumps(spec)


def jobs_of(tmp_path: Path, text: str, name: str = "spec.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return load_specs([path])[0].jobs


@cache
def trained(defense: str, params_items: tuple[tuple[str, Any], ...], epochs: int) -> dict[str, float]:
    """Train through the real training loop; held-out clean, PGD-20 and verified accuracies (cached per config)."""
    import tempfile

    from robmia_db.datasets import load_dataset
    from robmia_db.runner.data import split_membership
    from robmia_db.runner.reporting import SilentReporter
    from robmia_db.runner.training import train_model

    with tempfile.TemporaryDirectory() as folder:
        job = jobs_of(Path(folder), spec_text(defense, dict(params_items), epochs))[0]
    dataset = load_dataset("digits")
    split = split_membership(dataset, job.identity)
    model, history = train_model(job, dataset, split, torch.device("cpu"), SilentReporter())
    x = torch.from_numpy(dataset.x[split.nonmember_ids])
    y = torch.from_numpy(dataset.y[split.nonmember_ids])
    x_adv = pgd_linf(model, x, y, EPS, 20, 2.5 * EPS / 20)
    result = {"history": history}
    with torch.no_grad():
        result["clean"] = float((model(x).argmax(1) == y).float().mean())
        result["pgd"] = float((model(x_adv).argmax(1) == y).float().mean())
        for method in ("ibp", "crown"):
            lb = bounds.margin_lower_bounds(model, x, y, EPS, method).scatter(1, y[:, None], 1.0)
            result[method] = float((lb > 0).all(dim=1).float().mean())
    return result


# --------------------------------------------------------------------------------------------------
# Each defense improves what it targets over natural training with the same budget


EMPIRICAL = [
    ("pgd_at", {"steps": 5}),
    ("trades", {"steps": 5}),
    ("trades", {"steps": 5, "preset": "ccs2019"}),
    ("distributional_at", {"mode": "wrm"}),
    ("distributional_at", {"mode": "ccs2019"}),
]


@pytest.mark.parametrize(("defense", "params"), EMPIRICAL, ids=lambda v: str(v))
def test_empirical_defense_raises_heldout_pgd_accuracy(defense: str, params: dict[str, Any]) -> None:
    natural = trained("natural", (), 20)
    robust = trained(defense, tuple(sorted(params.items())), 20)
    # measured: natural 0.43; PGD-AT 0.61, TRADES 0.67 (beta 6) / 0.58 (beta 1), WRM 0.69, CCS'19 WRM 0.61
    assert robust["pgd"] >= natural["pgd"] + 0.1, (natural, robust)
    assert robust["clean"] >= 0.8


VERIFIABLE = [
    ("ibp", {"warmup_epochs": "10%", "ramp_epochs": "50%"}, 40),
    ("crown_ibp", {}, 40),
    ("diffai", {}, 40),
    ("dual", {}, 20),
]


@pytest.mark.parametrize(("defense", "params", "epochs"), VERIFIABLE, ids=lambda v: str(v))
def test_verifiable_defense_raises_heldout_verified_accuracy(defense: str, params: dict, epochs: int) -> None:
    natural = trained("natural", (), epochs)
    robust = trained(defense, tuple(sorted(params.items())), epochs)
    # measured (CROWN at eps 0.1): natural 0.25-0.27; IBP 0.52, CROWN-IBP 0.53, DiffAI 0.49, dual 0.58
    assert robust["crown"] >= natural["crown"] + 0.15, (natural, robust)
    if defense in ("ibp", "crown_ibp"):  # both end on the pure IBP bound (beta_final 0)
        assert natural["ibp"] == 0.0 and robust["ibp"] >= 0.2, (natural, robust)
    assert robust["history"][-1]["eps"] == pytest.approx(EPS)


@pytest.mark.slow
def test_diffai_zonotope_raises_heldout_verified_accuracy() -> None:
    natural = trained("natural", (), 40)
    robust = trained("diffai", (("domain", "zonotope"),), 40)
    assert robust["crown"] >= natural["crown"] + 0.15, (natural, robust)


# --------------------------------------------------------------------------------------------------
# Attack points and losses against independent oracles


def linear_model(seed: int = 0) -> tuple[nn.Sequential, np.ndarray, np.ndarray]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.mul_(4.0)
    return model, model[1].weight.detach().double().numpy(), model[1].bias.detach().double().numpy()


def digits_batch(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    rows = np.random.default_rng(seed).choice(len(bunch.target), n, replace=False)
    x = (bunch.images[rows] / 16.0).astype(np.float32)[:, None]
    return torch.from_numpy(x), torch.from_numpy(bunch.target[rows].astype(np.int64))


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def ce_input_gradient(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gradient of the summed CE of a linear model with respect to each (flattened) input: (p - onehot) W."""
    p = softmax(x @ w.T + b)
    p[np.arange(len(y)), y] -= 1.0
    return p @ w


def test_wrm_points_follow_sinhas_update_rule() -> None:
    model, w, b = linear_model()
    x, y = digits_batch()
    gamma, steps = 0.4, 15
    got = wrm_l2_points(model, x, y, gamma, steps).double().numpy().reshape(len(y), -1)
    x0, labels = x.double().numpy().reshape(len(y), -1), y.numpy()
    z = x0 + ce_input_gradient(w, b, x0, labels) / (2 * gamma)
    for t in range(steps):
        z = z + (ce_input_gradient(w, b, z, labels) / (2 * gamma) - (z - x0)) / math.sqrt(t + 2)
    np.testing.assert_allclose(got, z, rtol=1e-4, atol=1e-4)
    assert (got < 0).any() or (got > 1).any()  # no clipping: WRM points may leave [0, 1]


def test_linf_wrm_points_follow_the_ccs2019_update_rule() -> None:
    model, w, b = linear_model(1)
    x, y = digits_batch(seed=1)
    coefficient, steps = 0.5, 8
    got = linf_wrm_points(model, x, y, coefficient, steps).double().numpy().reshape(len(y), -1)
    x0, labels = x.double().numpy().reshape(len(y), -1), y.numpy()
    x_adv = x0.copy()
    for _ in range(steps):
        g = coefficient * ce_input_gradient(w, b, x_adv, labels)
        x_adv = np.clip(x_adv + g - np.abs(g).mean() * np.sign(x_adv + g - x0), 0.0, 1.0)
    np.testing.assert_allclose(got, x_adv, rtol=1e-4, atol=1e-4)
    assert np.abs(got - x0).max() > EPS  # no eps ball: the points move beyond any training eps


def kl_input_gradient(w: np.ndarray, b: np.ndarray, x_adv: np.ndarray, p_clean: np.ndarray) -> np.ndarray:
    """d/dx' of sum_n KL(p_n || softmax(W x'_n + b)) = (q - p) W."""
    return (softmax(x_adv @ w.T + b) - p_clean) @ w


def test_trades_points_and_loss_match_numpy() -> None:
    model, w, b = linear_model(2)
    x, y = digits_batch(seed=2)
    params = DEFENSE_PARAMS["trades"](steps=7, preset="ccs2019").resolved(EPS)
    defense = build_defense("trades", params, EPS)
    progress = TrainProgress(epoch=0, step=0, steps_per_epoch=10, epochs=1)
    torch.manual_seed(123)
    loss = defense.loss(model, x, y, progress)
    torch.manual_seed(123)
    noise = (0.001 * torch.randn_like(x)).double().numpy().reshape(len(y), -1)

    x0, labels = x.double().numpy().reshape(len(y), -1), y.numpy()
    p_clean = softmax(x0 @ w.T + b)
    x_adv = x0 + noise
    for _ in range(7):
        x_adv = x_adv + params["step_size"] * np.sign(kl_input_gradient(w, b, x_adv, p_clean))
        x_adv = np.clip(np.clip(x_adv, x0 - EPS, x0 + EPS), 0.0, 1.0)
    q_adv = softmax(x_adv @ w.T + b)
    ce = -np.log(p_clean[np.arange(len(y)), labels]).mean()
    kl = (p_clean * (np.log(p_clean) - np.log(q_adv))).sum() / len(y)
    assert params["beta"] == 1.0 and params["step_size"] == pytest.approx(2.5 * EPS / 7)
    assert float(loss.detach()) == pytest.approx(ce + kl, rel=1e-4)
    torch.manual_seed(123)
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)
    points = trades_points(model, x, probs, EPS, 7, params["step_size"], 0.001).double().numpy()
    np.testing.assert_allclose(points.reshape(len(y), -1), x_adv, atol=1e-5)


def small_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10)
    )


def numpy_intervals(model: nn.Sequential, x: torch.Tensor, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Interval arithmetic in float64 up to the last layer's input (penultimate bounds)."""
    flat = x.double().numpy().reshape(len(x), -1)
    lower, upper = np.clip(flat - eps, 0, 1), np.clip(flat + eps, 0, 1)
    for layer in list(model)[1:-1]:
        if isinstance(layer, nn.Linear):
            w, b = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()
            centre, radius = (lower + upper) / 2, (upper - lower) / 2
            centre, radius = centre @ w.T + b, radius @ np.abs(w).T
            lower, upper = centre - radius, centre + radius
        else:
            lower, upper = np.maximum(lower, 0), np.maximum(upper, 0)
    return lower, upper


def progress_at(epoch_fraction: float, epochs: int = 10, steps_per_epoch: int = 100) -> TrainProgress:
    step = round(epoch_fraction * steps_per_epoch)
    return TrainProgress(
        epoch=step // steps_per_epoch, step=step, steps_per_epoch=steps_per_epoch, epochs=epochs
    )


def test_ibp_loss_matches_numpy_intervals_midway_through_the_ramp() -> None:
    model = small_mlp(3)
    x, y = digits_batch(seed=3)
    params = DEFENSE_PARAMS["ibp"](warmup_epochs=2, ramp_epochs=4, kappa_final=0.2).resolved(EPS)
    defense = build_defense("ibp", params, EPS)
    loss = float(defense.loss(model, x, y, progress_at(5.0)).detach())  # t = 3/4: eps 0.075, kappa 0.4
    eps_now, kappa = 0.75 * EPS, 1 - 0.75 * 0.8
    lower, upper = numpy_intervals(model, x, eps_now)
    w, b = model[-1].weight.detach().double().numpy(), model[-1].bias.detach().double().numpy()
    robust = []
    for n, label in enumerate(y.tolist()):
        spec = w[label] - w  # elided: the margin rows merged into the last layer
        lb = np.maximum(spec, 0) @ lower[n] + np.minimum(spec, 0) @ upper[n] + b[label] - b
        robust.append(np.log(np.exp(-lb).sum()))  # lb[label] = 0 contributes exp(0)
    with torch.no_grad():
        logits = model(x).double().numpy()
    ce = -np.log(softmax(logits)[np.arange(len(y)), y.numpy()]).mean()
    assert loss == pytest.approx(kappa * ce + (1 - kappa) * np.mean(robust), rel=1e-5)


def test_diffai_box_loss_matches_numpy_intervals() -> None:
    model = small_mlp(4)
    x, y = digits_batch(seed=4)
    params = DEFENSE_PARAMS["diffai"](natural_epochs=2, ramp_epochs=3).resolved(EPS)
    defense = build_defense("diffai", params, EPS)
    assert defense.grad_clip_norm == 1.0
    eps_now = EPS / 30 + (EPS - EPS / 30) * (1.5 / 3)
    loss = float(defense.loss(model, x, y, progress_at(3.5)).detach())
    lower, upper = numpy_intervals(model, x, eps_now)
    w, b = model[-1].weight.detach().double().numpy(), model[-1].bias.detach().double().numpy()
    centre, radius = (lower + upper) / 2 @ w.T + b, (upper - lower) / 2 @ np.abs(w).T
    out_lower, out_upper = centre - radius, centre + radius  # unelided box of the logits
    labels = y.numpy()
    r = out_upper - out_lower[np.arange(len(y)), labels][:, None]
    r[np.arange(len(y)), labels] = -1.0
    worst = r.max(axis=1)
    with torch.no_grad():
        logits = model(x).double().numpy()
    ce = -np.log(softmax(logits)[np.arange(len(y)), labels]).mean()
    expected = (0.2 * np.log1p(np.exp(worst)).mean() + 1.0 * ce) / 1.2
    assert loss == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        got_worst = diffai_worst_margin(model, x, y, eps_now, "box").double().numpy()
    np.testing.assert_allclose(got_worst, worst, rtol=1e-5, atol=1e-5)


def test_diffai_zonotope_margin_is_tighter_than_box_and_sound() -> None:
    model = small_mlp(5)
    x, y = digits_batch(8, seed=5)
    with torch.no_grad():
        box = diffai_worst_margin(model, x, y, 0.05, "box")
        zonotope = diffai_worst_margin(model, x, y, 0.05, "zonotope")
        corners = torch.clamp(x + 0.05 * torch.sign(torch.randn(64, *x.shape)), 0, 1)
        sampled = torch.stack([model(c) for c in corners])  # (64, N, C)
        margins = sampled - sampled.gather(2, y[None, :, None].expand(64, -1, 1))
        margins = margins.scatter(2, y[None, :, None].expand(64, -1, 1), -1.0)
        sampled_worst = margins.max(dim=2).values.max(dim=0).values
    assert (zonotope <= box + 1e-5).all()
    assert (zonotope >= sampled_worst - 1e-5).all()


def test_dual_loss_and_gradient_match_convex_adversarial() -> None:
    convex_adversarial = pytest.importorskip("convex_adversarial")
    model = small_mlp(6)
    x, y = digits_batch(16, seed=6)
    params = DEFENSE_PARAMS["dual"](preset="ccs2019").resolved(EPS)  # eps 0.003 -> 0.1 over 32.8% of training
    defense = build_defense("dual", params, EPS)
    progress = progress_at(2.0, epochs=61)
    eps_now = 0.03 * EPS + (EPS - 0.03 * EPS) * (2.0 / (0.327869 * 61))
    assert defense.describe_epoch(progress)["eps"] == pytest.approx(eps_now, rel=1e-5)
    ours = defense.loss(model, x, y, progress)
    (our_grad,) = torch.autograd.grad(ours, model[1].weight)
    reference, _ = convex_adversarial.robust_loss(model, eps_now, x, y, bounded_input=True)
    (reference_grad,) = torch.autograd.grad(reference, model[1].weight)
    assert float(ours.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    torch.testing.assert_close(our_grad, reference_grad, rtol=1e-4, atol=1e-6)
    assert defense.grad_clip_norm == 1.0


def test_verified_terms_vanish_at_zero_radius() -> None:
    """At eps -> 0 every bound is the clean margin, so each mixed loss collapses to plain CE."""
    model = small_mlp(7)
    x, y = digits_batch(seed=7)
    with torch.no_grad():
        ce = float(nn.functional.cross_entropy(model(x), y))
    tiny = 1e-7
    late = progress_at(9.9)
    for name, params in [
        ("ibp", {"warmup_epochs": 0, "ramp_epochs": 1}),
        ("crown_ibp", {"ramp_start_epochs": 0, "ramp_epochs": 1, "beta_final": 0.5}),
        ("dual", {"ramp_epochs": 0}),
    ]:
        defense = build_defense(name, DEFENSE_PARAMS[name](**params).resolved(tiny), tiny)
        assert float(defense.loss(model, x, y, late).detach()) == pytest.approx(ce, rel=1e-4), name


# --------------------------------------------------------------------------------------------------
# Schedules


def test_ramp_fraction() -> None:
    assert [ramp_fraction(d, 2.0, 4.0) for d in (0.0, 2.0, 3.0, 6.0, 9.0)] == [0.0, 0.0, 0.25, 1.0, 1.0]
    assert ramp_fraction(1.0, 1.0, 0.0) == 1.0 and ramp_fraction(0.99, 1.0, 0.0) == 0.0
    assert schedule_epochs("37.5%", 80) == 30.0 and schedule_epochs(2.5, 80) == 2.5


def test_ibp_schedule_warmup_then_linear_ramp_per_batch() -> None:
    # CCS'19 FMNIST in steps: warm-up 8k and ramp 30k of 80k -> "10%" and "37.5%" of the epochs
    defense = build_defense("ibp", DEFENSE_PARAMS["ibp"](preset="ccs2019").resolved(EPS), EPS)
    epochs, steps = 80, 1000
    for step, eps, kappa in [(0, 0, 1), (7999, 0, 1), (8000, 0, 1), (23000, 0.05, 0.75), (38000, 0.1, 0.5)]:
        now = defense.schedule(TrainProgress(step // steps, step, steps, epochs))
        assert now["eps"] == pytest.approx(eps) and now["kappa"] == pytest.approx(kappa), step
    mid_epoch = defense.schedule(TrainProgress(10, 10_500, steps, epochs))  # ramp moves within an epoch
    assert mid_epoch["eps"] == pytest.approx(0.1 * 2500 / 30000)
    factor = build_defense("ibp", DEFENSE_PARAMS["ibp"](eps_train_factor=1.1).resolved(0.3), 0.3)
    assert factor.schedule(progress_at(10.0))["eps"] == pytest.approx(0.33)


def test_crown_ibp_schedule_moves_beta_and_kappa_with_eps() -> None:
    params = DEFENSE_PARAMS["crown_ibp"](ramp_start_epochs=1, ramp_epochs=4, beta_final=0.2, kappa_final=0.0)
    defense = build_defense("crown_ibp", params.resolved(EPS), EPS)
    expected = {0.5: (0.0, 1.0, 1.0), 1.0: (0.0, 1.0, 1.0), 2.0: (0.025, 0.8, 0.75), 5.0: (0.1, 0.2, 0.0)}
    for epoch_fraction, (eps, beta, kappa) in expected.items():
        now = defense.describe_epoch(progress_at(epoch_fraction))
        assert (now["eps"], now["beta"], now["kappa"]) == pytest.approx((eps, beta, kappa)), epoch_fraction
    default = build_defense("crown_ibp", DEFENSE_PARAMS["crown_ibp"]().resolved(EPS), EPS)
    assert default.schedule(progress_at(31.0, epochs=100))["eps"] == pytest.approx(0.05)  # 1% start, 60% ramp


def test_diffai_schedule_plain_ce_then_ramp_from_a_thirtieth() -> None:
    defense = build_defense("diffai", DEFENSE_PARAMS["diffai"]().resolved(EPS), EPS)  # 20% CE, 30% ramp
    assert defense.schedule(progress_at(19.99, epochs=100)) == {"eps": 0.0, "abstract": 0.0}
    assert defense.schedule(progress_at(20.0, epochs=100))["eps"] == pytest.approx(EPS / 30)
    assert defense.schedule(progress_at(35.0, epochs=100))["eps"] == pytest.approx(
        EPS / 30 + (EPS - EPS / 30) / 2
    )
    assert defense.schedule(progress_at(80.0, epochs=100))["eps"] == pytest.approx(EPS)
    model = small_mlp(8)
    x, y = digits_batch(seed=8)
    with torch.no_grad():
        ce = float(nn.functional.cross_entropy(model(x), y))
        assert float(defense.loss(model, x, y, progress_at(5.0, epochs=100)).detach()) == pytest.approx(
            ce, rel=1e-6
        )


def test_dual_schedule_and_clipping_switch() -> None:
    defense = build_defense("dual", DEFENSE_PARAMS["dual"]().resolved(EPS), EPS)  # from 0.1 eps over 50%
    assert defense.schedule(progress_at(0.0, epochs=20))["eps"] == pytest.approx(0.01)
    assert defense.schedule(progress_at(5.0, epochs=20))["eps"] == pytest.approx(0.055)
    assert defense.schedule(progress_at(15.0, epochs=20))["eps"] == pytest.approx(EPS)
    unclipped = build_defense("dual", DEFENSE_PARAMS["dual"](grad_clip_norm=0).resolved(EPS), EPS)
    assert defense.grad_clip_norm == 1.0 and unclipped.grad_clip_norm is None


# --------------------------------------------------------------------------------------------------
# Registry, validation and model keys through real specs


def test_every_spec_defense_has_an_implementation() -> None:
    build_defense("natural", {}, None)  # loads the verifiable module into the registry
    expected = {"natural", "pgd_at", "distributional_at", "trades", "ibp", "crown_ibp", "diffai", "dual"}
    assert set(DEFENSE_PARAMS) == set(DEFENSES) == expected


BAD_PARAMS = [
    ("trades", "beta = -1", "defense.trades.beta: must be >= 0 (got -1)"),
    ("trades", "beta = 'x'", "defense.trades.beta: must be a number or \"auto\" (got 'x')"),
    ("trades", "step_size = 0", "defense.trades.step_size: must be > 0 (got 0)"),
    (
        "trades",
        "preset = 'madry'",
        "defense.trades.preset: must be one of 'default' or 'ccs2019' (got 'madry')",
    ),
    ("distributional_at", "gamma = 0", "defense.distributional_at.gamma: must be > 0 (got 0)"),
    (
        "distributional_at",
        "mode = 'l2'",
        "defense.distributional_at.mode: must be one of 'wrm' or 'ccs2019' (got 'l2')",
    ),
    ("distributional_at", "steps = 0", "defense.distributional_at.steps: must be > 0 (got 0)"),
    ("distributional_at", "eps = 0.3", "defense.distributional_at.eps: unknown key"),
    ("ibp", "warmup_epochs = -2", "defense.ibp.warmup_epochs: must be >= 0 (got -2)"),
    (
        "ibp",
        "ramp_epochs = '150%'",
        "defense.ibp.ramp_epochs: must be a percentage between 0% and 100% (got '150%')",
    ),
    (
        "ibp",
        "ramp_epochs = true",
        'defense.ibp.ramp_epochs: must be a number of epochs >= 0, a percentage of the training epochs like "10%", '
        'or "auto" (got True)',
    ),
    ("ibp", "kappa_final = 2", "defense.ibp.kappa_final: must be <= 1 (got 2)"),
    (
        "crown_ibp",
        "ramp_epochs = 'auto'",
        "defense.crown_ibp.ramp_epochs: must be a number of epochs >= 0 or a percentage of the training epochs "
        "like \"10%\" (got 'auto')",
    ),
    ("crown_ibp", "beta_final = 1.5", "defense.crown_ibp.beta_final: must be <= 1 (got 1.5)"),
    ("diffai", "domain = 'poly'", "defense.diffai.domain: must be one of 'box' or 'zonotope' (got 'poly')"),
    ("diffai", "abstract_weight = 0", "defense.diffai.abstract_weight: must be > 0 (got 0)"),
    ("dual", "eps_start_factor = 1.5", "defense.dual.eps_start_factor: must be <= 1 (got 1.5)"),
    ("dual", "proj = 20", "defense.dual.proj: unknown key"),
]


@pytest.mark.parametrize(
    ("defense", "line", "message"), BAD_PARAMS, ids=[f"{d}-{m}" for d, m, _ in BAD_PARAMS]
)
def test_bad_defense_parameters_are_reported_with_their_key(
    tmp_path: Path, defense: str, line: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        f"[experiment]\nname = 'x'\n[data]\ndataset = 'digits'\n[defense.{defense}]\n{line}\n",
        encoding="utf-8",
    )
    _, spec, errors = read_spec(path)
    assert spec is None
    assert [e.format() for e in errors] == [f"{path}: {message}"]


def model_key(tmp_path: Path, defense: str, params: dict[str, Any], **training: Any) -> str:
    jobs = jobs_of(tmp_path, spec_text(defense, params, **training))
    assert len(jobs) == 1
    return jobs[0].model_key


SAME_KEYS = [
    # unused parameters of the other mode are not hashed
    ("distributional_at", {"mode": "wrm"}, {"mode": "wrm", "coefficient": 3.0}),
    ("distributional_at", {"mode": "ccs2019"}, {"mode": "ccs2019", "gamma": 2.0}),
    # "auto" and presets hash as the values they stand for
    ("distributional_at", {"mode": "ccs2019"}, {"mode": "ccs2019", "coefficient": 1.0, "steps": 8}),
    ("trades", {"preset": "ccs2019"}, {"beta": 1.0}),
    ("trades", {}, {"beta": 6, "step_size": 0.025}),
    ("ibp", {"preset": "ccs2019"}, {"warmup_epochs": "10.0%", "ramp_epochs": "37.5%"}),
    ("dual", {"preset": "ccs2019"}, {"eps_start_factor": 0.03, "ramp_epochs": "32.7869%"}),
    ("diffai", {}, {"natural_epochs": "20%", "eps_start_factor": 1 / 30}),
]


@pytest.mark.parametrize(("defense", "left", "right"), SAME_KEYS, ids=[f"{d}-{r}" for d, _, r in SAME_KEYS])
def test_model_key_ignores_unused_and_equivalent_parameters(
    tmp_path: Path, defense: str, left: dict, right: dict
) -> None:
    assert model_key(tmp_path, defense, left) == model_key(tmp_path, defense, right)


def test_model_key_follows_used_parameters_and_eps(tmp_path: Path) -> None:
    wrm = model_key(tmp_path, "distributional_at", {"mode": "wrm"})
    assert wrm != model_key(tmp_path, "distributional_at", {"mode": "wrm", "gamma": 1.0})
    assert wrm != model_key(tmp_path, "distributional_at", {"mode": "ccs2019"})
    # neither WRM mode has an eps ball: a sweep over eps trains one model
    jobs = jobs_of(tmp_path, spec_text("distributional_at", None, eps=[0.05, 0.1]))
    assert len(jobs) == 1 and jobs[0].eps is None and jobs[0].identity["training"]["eps"] is None
    for defense in ("trades", "ibp", "crown_ibp", "diffai", "dual"):
        keys = {model_key(tmp_path, defense, {}, eps=eps) for eps in (0.05, 0.1)}
        assert len(keys) == 2, defense
    assert model_key(tmp_path, "trades", {}) != model_key(tmp_path, "trades", {"preset": "ccs2019"})
    assert model_key(tmp_path, "ibp", {"ramp_epochs": 5}) != model_key(tmp_path, "ibp", {"ramp_epochs": "5%"})
