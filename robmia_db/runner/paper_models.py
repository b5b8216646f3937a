"""Runner layer: the paper's architectures (Yale VGG, Fashion-MNIST VGG, Wide ResNet); imports torch and errors.

The two VGGs are plain `nn.Sequential` stacks of Conv2d / ReLU / Flatten / Linear (no batch norm, no dropout)
so the verified-bound engine can walk them layer by layer. The Wide ResNet uses batch norm and is for the
empirical defenses only. Layer sizes follow paper.md section 2 (the authors' code).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from robmia_db.errors import ModelDefinitionError

YALE_CONV_BASES = (4, 4, 8, 8, 16, 16, 32, 32)
YALE_CONV_STRIDES = (1, 2, 1, 2, 1, 2, 1, 2)
FMNIST_CONV_BASES = (16, 16, 16, 32, 32, 32)
FMNIST_CONV_STRIDES = (1, 1, 2, 1, 1, 2)
FC_HIDDEN = 200


def scaled_channels(base: int, width: float) -> int:
    """Channels of a layer with `base` channels at width multiplier `width`: max(1, round(base * width))."""
    return max(1, int(round(base * width)))


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial size after a convolution (floor division, as PyTorch computes it)."""
    return (size + 2 * padding - kernel) // stride + 1


def _check_input(arch: str, input_shape: Sequence[int], n_classes: int, width: float) -> tuple[int, int, int]:
    if len(input_shape) != 3 or any(int(d) < 1 for d in input_shape):
        raise ModelDefinitionError(
            f"{arch}: input_shape must be (C, H, W) with positive sizes, got {tuple(input_shape)}"
        )
    if int(n_classes) < 2:
        raise ModelDefinitionError(f"{arch}: n_classes must be at least 2, got {n_classes}")
    if not width > 0:
        raise ModelDefinitionError(f"{arch}: width must be > 0, got {width}")
    channels, height, width_px = (int(d) for d in input_shape)
    return channels, height, width_px


def _refuse_unknown(arch: str, options: dict[str, Any]) -> None:
    if options:
        raise ModelDefinitionError(f"model.options: {arch} takes no option {sorted(options)[0]!r}")


def _he_init_convs(model: nn.Module) -> None:
    # He-normal (fan-in, ReLU gain) as in the authors' TF and TRADES models; PyTorch's default is smaller.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def _vgg(
    arch: str,
    input_shape: Sequence[int],
    n_classes: int,
    width: float,
    bases: Sequence[int],
    strides: Sequence[int],
    options: dict[str, Any],
) -> nn.Sequential:
    options = dict(options)
    bias = bool(options.pop("bias", True))
    downsample_kernel = int(options.pop("downsample_kernel", 3))
    hidden = int(options.pop("hidden", FC_HIDDEN))
    _refuse_unknown(arch, options)
    if downsample_kernel not in (3, 4):
        raise ModelDefinitionError(
            f"model.options: {arch} downsample_kernel must be 3 or 4, got {downsample_kernel}"
        )
    if hidden < 1:
        raise ModelDefinitionError(f"model.options: {arch} hidden must be >= 1, got {hidden}")
    in_channels, height, width_px = _check_input(arch, input_shape, n_classes, width)
    layers: list[nn.Module] = []
    for base, stride in zip(bases, strides, strict=True):
        out_channels = scaled_channels(base, width)
        kernel = downsample_kernel if stride == 2 else 3
        layers += [
            nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=1, bias=bias),
            nn.ReLU(),
        ]
        height = conv_output_size(height, kernel, stride, 1)
        width_px = conv_output_size(width_px, kernel, stride, 1)
        if height < 1 or width_px < 1:
            raise ModelDefinitionError(
                f"{arch}: input {tuple(input_shape)} is too small for {len(bases)} convolutions"
            )
        in_channels = out_channels
    flat = in_channels * height * width_px
    layers += [nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, int(n_classes))]
    model = nn.Sequential(*layers)
    _he_init_convs(model)
    return model


def yale_vgg(
    input_shape: tuple[int, int, int], n_classes: int, width: float = 2.0, **options: Any
) -> nn.Sequential:
    """The Yale Face network: 8 conv3x3 (4w, 4w/s2, 8w, 8w/s2, 16w, 16w/s2, 32w, 32w/s2) + FC 200 + FC classes.

    Args:
        input_shape: (C, H, W); the paper's is (1, 192, 168), which flattens to 64 x 12 x 11 = 8,448 at w = 2.
        n_classes: outputs (38 for Yale).
        width: the width multiplier `w` (2 in all released models).
        **options: `bias` (default True; the TF models had no conv bias), `downsample_kernel` (3, or 4 for the
            Wong & Kolter variant's stride-2 convs), `hidden` (FC size, default 200).

    Returns:
        An `nn.Sequential` of Conv2d/ReLU/Flatten/Linear, ReLU after every conv and the hidden FC.

    Raises:
        ModelDefinitionError: bad shape, width or option.
    """
    return _vgg("yale_vgg", input_shape, n_classes, width, YALE_CONV_BASES, YALE_CONV_STRIDES, options)


def fmnist_vgg(
    input_shape: tuple[int, int, int], n_classes: int, width: float = 16.0, **options: Any
) -> nn.Sequential:
    """The Fashion-MNIST network: 6 conv3x3 (16w, 16w, 16w/s2, 32w, 32w, 32w/s2) + FC 200 + FC classes.

    Args:
        input_shape: (C, H, W); at (1, 28, 28) and w = 16 the flatten is 512 x 7 x 7 = 25,088.
        n_classes: outputs (10).
        width: the width multiplier `w` (16 in all released models).
        **options: as `yale_vgg` (`bias`, `downsample_kernel`, `hidden`).

    Raises:
        ModelDefinitionError: bad shape, width or option.
    """
    return _vgg("fmnist_vgg", input_shape, n_classes, width, FMNIST_CONV_BASES, FMNIST_CONV_STRIDES, options)


class _WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3, 1x1 conv shortcut on a shape change."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, activation: type[nn.Module], slope: float
    ):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.act1 = _activation(activation, slope)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = _activation(activation, slope)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.shortcut = (
            None
            if in_channels == out_channels and stride == 1
            else nn.Conv2d(in_channels, out_channels, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        out = self.conv2(self.act2(self.bn2(self.conv1(pre))))
        # As in the TRADES WideResNet, a projecting shortcut takes the pre-activated input.
        return out + (x if self.shortcut is None else self.shortcut(pre))


def _activation(kind: type[nn.Module], slope: float) -> nn.Module:
    return nn.LeakyReLU(slope) if kind is nn.LeakyReLU else nn.ReLU()


def wide_resnet(
    input_shape: tuple[int, int, int], n_classes: int, width: float = 1.0, **options: Any
) -> nn.Sequential:
    """Pre-activation Wide ResNet (Zagoruyko & Komodakis), as the TRADES `WideResNet(depth=34, widen_factor=10)`.

    Stem conv3x3 16, three stages of (depth - 4) / 6 blocks with 16k, 32k, 64k channels (strides 1, 2, 2),
    BN-ReLU, global average pooling, FC. Uses batch norm: not for the verified-bound engine.

    Args:
        input_shape: (C, H, W), e.g. (3, 32, 32).
        n_classes: outputs.
        width: a multiplier on every layer's channels on top of `widen_factor` (1.0 = the paper's WRN-34-10).
        **options: `depth` (default 34; must be 6n + 4), `widen_factor` (k, default 10), `relu_slope`
            (default 0.0; 0.1 gives the leaky ReLU of Madry's TF model).

    Raises:
        ModelDefinitionError: bad shape, width, depth or option.
    """
    options = dict(options)
    depth = int(options.pop("depth", 34))
    widen_factor = float(options.pop("widen_factor", 10))
    slope = float(options.pop("relu_slope", 0.0))
    _refuse_unknown("wide_resnet", options)
    in_channels, _, _ = _check_input("wide_resnet", input_shape, n_classes, width)
    if depth < 10 or (depth - 4) % 6:
        raise ModelDefinitionError(
            f"model.options: wide_resnet depth must be 6n + 4 with n >= 1, got {depth}"
        )
    if widen_factor <= 0:
        raise ModelDefinitionError(f"model.options: wide_resnet widen_factor must be > 0, got {widen_factor}")
    activation: type[nn.Module] = nn.LeakyReLU if slope else nn.ReLU
    blocks_per_stage = (depth - 4) // 6
    stem = scaled_channels(16, width)
    stage_channels = [scaled_channels(base, widen_factor * width) for base in (16, 32, 64)]
    layers: list[nn.Module] = [nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False)]
    current = stem
    for channels, stride in zip(stage_channels, (1, 2, 2), strict=True):
        blocks = [
            _WideBlock(current if i == 0 else channels, channels, stride if i == 0 else 1, activation, slope)
            for i in range(blocks_per_stage)
        ]
        layers.append(nn.Sequential(*blocks))
        current = channels
    layers += [
        nn.BatchNorm2d(current),
        _activation(activation, slope),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(current, int(n_classes)),
    ]
    model = nn.Sequential(*layers)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
    return model


PAPER_MODELS = {"yale_vgg": yale_vgg, "fmnist_vgg": fmnist_vgg, "wide_resnet": wide_resnet}
