"""Networks and a float64 interval reference shared by the bound-engine tests (test_bounds*.py; imports torch)."""

from __future__ import annotations

import numpy as np
from torch import nn

NUM_CLASSES = 10


def cnn28(hidden: int = 32) -> nn.Sequential:
    """The benchmark network's shape (two 4x4 stride-2 convolutions at 28x28), narrower for test speed."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 8, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(392, hidden),
        nn.ReLU(),
        nn.Linear(hidden, NUM_CLASSES),
    )


def numpy_conv(x: np.ndarray, weight: np.ndarray, layer: nn.Conv2d) -> np.ndarray:
    """Direct float64 convolution, looping over kernel taps only."""
    (sh, sw), (ph, pw), (dh, dw) = layer.stride, layer.padding, layer.dilation
    n, _, height, width = x.shape
    kh, kw = weight.shape[-2:]
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, weight.shape[0], out_h, out_w))
    for i in range(kh):
        for j in range(kw):
            window = padded[:, :, i * dh : i * dh + sh * out_h : sh, j * dw : j * dw + sw * out_w : sw]
            out += np.einsum("nchw,oc->nohw", window, weight[:, :, i, j])
    return out


def numpy_intervals(model: nn.Sequential, lower: np.ndarray, upper: np.ndarray, layers: int):
    """Interval arithmetic with W+ and W- in float64 over the first `layers` layers."""
    for layer in list(model)[:layers]:
        if isinstance(layer, nn.ReLU):
            lower, upper = np.maximum(lower, 0), np.maximum(upper, 0)
        elif isinstance(layer, nn.Flatten):
            lower, upper = lower.reshape(len(lower), -1), upper.reshape(len(upper), -1)
        else:
            weight = layer.weight.detach().double().numpy()
            positive, negative = np.maximum(weight, 0), np.minimum(weight, 0)
            if isinstance(layer, nn.Linear):
                new_lower, new_upper = (
                    lower @ positive.T + upper @ negative.T,
                    upper @ positive.T + lower @ negative.T,
                )
                bias = layer.bias.detach().double().numpy()
            else:
                new_lower = numpy_conv(lower, positive, layer) + numpy_conv(upper, negative, layer)
                new_upper = numpy_conv(upper, positive, layer) + numpy_conv(lower, negative, layer)
                bias = layer.bias.detach().double().numpy()[:, None, None]
            lower, upper = new_lower + bias, new_upper + bias
    return lower, upper
