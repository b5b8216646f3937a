"""CROWN-IBP and CROWN (intersected with IBP) against a float64 reference written with dense matrices.

The engine pulls specs back with transposed convolutions in a channels-last layout, receptive-field
patches, a phase layout for the first convolution, in-place passes and cache-sized chunks. The reference
below does none of that: every affine layer becomes its dense float64 matrix (the layer applied to the unit
basis), and the bounds follow the textbook formulas in numpy, one sample and one spec row at a time.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from bound_models import NUM_CLASSES, cnn28
from torch import nn

from robmia_db.runner.bounds import margin_lower_bounds

torch.set_num_threads(1)


def _cnn_rgb() -> nn.Sequential:
    # Three input channels, stride 1 then stride 2 with odd kernels, a ReLU right after Flatten.
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=0),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        nn.Flatten(),
        nn.ReLU(),
        nn.Linear(36, 16),
        nn.ReLU(),
        nn.Linear(16, NUM_CLASSES),
    )


def _ops(model: nn.Sequential, input_shape: tuple[int, ...]) -> list[tuple]:
    """("affine", matrix, bias) and ("relu",) steps on flattened float64 activations."""
    ops, shape = [], input_shape
    for layer in model:
        if isinstance(layer, nn.ReLU):
            ops.append(("relu",))
        elif isinstance(layer, nn.Flatten):
            shape = (int(np.prod(shape)),)
        elif isinstance(layer, (nn.Linear, nn.Conv2d)):
            double = copy.deepcopy(layer).double()
            size = int(np.prod(shape))
            with torch.no_grad():
                zero = double(torch.zeros(1, *shape, dtype=torch.float64))
                basis = double(torch.eye(size, dtype=torch.float64).reshape(size, *shape)) - zero
            ops.append(("affine", basis.reshape(size, -1).numpy().T, zero.reshape(-1).numpy()))
            shape = tuple(zero.shape[1:])
    return ops


def _relaxation(lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CROWN's adaptive relaxation: (lower slope, upper slope, upper intercept)."""
    unstable = (lower < 0) & (upper > 0)
    active = (lower >= 0).astype(float)
    upper_slope = np.where(unstable, upper / np.where(unstable, upper - lower, 1.0), active)
    intercept = np.where(unstable, -upper_slope * lower, 0.0)
    lower_slope = np.where(unstable, (upper > -lower).astype(float), active)
    return lower_slope, upper_slope, intercept


def _backward(ops, rows, bias, relaxations, center, radius) -> np.ndarray:
    """Lower bounds of rows @ h + bias, h the output of ops[:len(ops)], over the input box."""
    for position in range(len(ops) - 1, -1, -1):
        op = ops[position]
        if op[0] == "relu":
            lower_slope, upper_slope, intercept = relaxations[position]
            bias = bias + np.minimum(rows, 0) @ intercept
            rows = rows * np.where(rows >= 0, lower_slope, upper_slope)
        else:
            bias = bias + rows @ op[2]
            rows = rows @ op[1]
    return bias + rows @ center - np.abs(rows) @ radius


def _reference(ops, x: np.ndarray, label: int, eps: float, method: str) -> np.ndarray:
    """Margin lower bounds of one sample by CROWN-IBP or CROWN intersected with IBP."""
    box_lower, box_upper = np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1)
    center, radius = (box_upper + box_lower) / 2, (box_upper - box_lower) / 2
    lower, upper = box_lower, box_upper
    relaxations, affine_seen = {}, 0
    for position, op in enumerate(ops[:-1]):
        if op[0] == "relu":
            if method == "crown" and (relaxations or affine_seen > 1):
                # Refine the neurons the interval step leaves unstable, then intersect with it.
                unstable = np.flatnonzero((lower < 0) & (upper > 0))
                units = np.eye(lower.size)[unstable]
                rows = np.concatenate([units, -units])
                both = _backward(ops[:position], rows, np.zeros(len(rows)), relaxations, center, radius)
                lower[unstable] = np.maximum(lower[unstable], both[: len(unstable)])
                upper[unstable] = np.minimum(upper[unstable], -both[len(unstable) :])
            relaxations[position] = _relaxation(lower, upper)
            lower, upper = np.maximum(lower, 0), np.maximum(upper, 0)
        else:
            matrix, bias = op[1], op[2]
            positive, negative = np.maximum(matrix, 0), np.minimum(matrix, 0)
            lower, upper = (
                positive @ lower + negative @ upper + bias,
                positive @ upper + negative @ lower + bias,
            )
            affine_seen += 1
    matrix, bias = ops[-1][1], ops[-1][2]
    rows, offsets = matrix[label] - matrix, bias[label] - bias
    return _backward(ops[:-1], rows, offsets, relaxations, center, radius)


@pytest.mark.parametrize("method", ["crown_ibp", "crown"])
@pytest.mark.parametrize("name", ["cnn28", "cnn_rgb"])
def test_bounds_match_a_dense_float64_reference(method: str, name: str) -> None:
    torch.manual_seed(5)
    model = {"cnn28": lambda: cnn28(hidden=24), "cnn_rgb": _cnn_rgb}[name]()
    shape = (1, 28, 28) if name == "cnn28" else (3, 8, 8)
    generator = torch.Generator().manual_seed(6)
    x = torch.rand(3, *shape, generator=generator)
    x[x > 0.85] = 1.0  # clipped ball at the upper end of the range
    y = torch.tensor([2, 5, 9])
    eps = 0.05
    ops = _ops(model, shape)
    reference = np.stack(
        [_reference(ops, x[n].double().reshape(-1).numpy(), int(y[n]), eps, method) for n in range(len(y))]
    )
    with torch.no_grad():
        got = margin_lower_bounds(model, x, y, eps, method).double().numpy()
    scale = max(1.0, float(np.abs(reference).max()))
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=2e-5 * scale)
    # The reference is not trivially loose: it is finite and below the clean margins.
    assert np.isfinite(reference).all()
    with torch.no_grad():
        logits = model(x).double().numpy()
    clean = logits[np.arange(len(y)), y.numpy()][:, None] - logits
    assert (reference <= clean + 1e-9).all()
