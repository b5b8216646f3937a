"""The paper's architectures: layer sizes, flatten sizes and parameter counts against paper.md and published tables."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robmia_db.errors import ModelDefinitionError
from robmia_db.runner.paper_models import PAPER_MODELS, fmnist_vgg, wide_resnet, yale_vgg

torch.set_num_threads(1)


def conv_params(c_in: int, c_out: int, kernel: int = 3, bias: bool = True) -> int:
    return c_in * c_out * kernel * kernel + (c_out if bias else 0)


def linear_params(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flatten_size_by_dry_run(model: nn.Sequential, input_shape: tuple[int, int, int]) -> int:
    """Run the layers up to Flatten on a zero image: the size the first Linear must accept."""
    index = next(i for i, layer in enumerate(model) if isinstance(layer, nn.Flatten))
    with torch.no_grad():
        return int(model[: index + 1](torch.zeros(1, *input_shape)).shape[1])


def test_yale_vgg_paper_sizes():
    model = yale_vgg((1, 192, 168), 38)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 32, 32, 64, 64]
    assert [c.stride[0] for c in convs] == [1, 2, 1, 2, 1, 2, 1, 2]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert linears[0].in_features == 64 * 12 * 11 == 8448
    assert flatten_size_by_dry_run(model, (1, 192, 168)) == 8448
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(8448, 200), (200, 38)]
    with torch.no_grad():
        assert model(torch.rand(2, 1, 192, 168)).shape == (2, 38)
    channels = [1, 8, 8, 16, 16, 32, 32, 64, 64]
    conv_total = sum(conv_params(a, b) for a, b in zip(channels[:-1], channels[1:], strict=True))
    assert conv_total == 73_464
    assert n_params(model) == conv_total + linear_params(8448, 200) + linear_params(200, 38) == 1_770_902


def test_yale_vgg_without_conv_bias_matches_the_tf_count():
    # paper.md: about 1.77 M parameters, 73k conv and 1.70 M FC, TF convs without bias.
    model = yale_vgg((1, 192, 168), 38, bias=False)
    conv_total = sum(p.numel() for m in model if isinstance(m, nn.Conv2d) for p in m.parameters())
    fc_total = sum(p.numel() for m in model if isinstance(m, nn.Linear) for p in m.parameters())
    assert conv_total == 73_224 and round(fc_total / 1e6, 2) == 1.70
    assert round(n_params(model) / 1e6, 2) == 1.77


def test_yale_vgg_wong_kolter_variant_on_padded_input():
    model = yale_vgg((1, 192, 192), 38, downsample_kernel=4)
    assert [m.kernel_size[0] for m in model if isinstance(m, nn.Conv2d)] == [3, 4, 3, 4, 3, 4, 3, 4]
    assert flatten_size_by_dry_run(model, (1, 192, 192)) == 64 * 12 * 12
    assert model[17].in_features == 64 * 12 * 12


def test_fmnist_vgg_paper_sizes():
    model = fmnist_vgg((1, 28, 28), 10)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [256, 256, 256, 512, 512, 512]
    assert [c.stride[0] for c in convs] == [1, 1, 2, 1, 1, 2]
    assert flatten_size_by_dry_run(model, (1, 28, 28)) == 512 * 7 * 7 == 25_088
    channels = [1, 256, 256, 256, 512, 512, 512]
    expected = sum(conv_params(a, b) for a, b in zip(channels[:-1], channels[1:], strict=True))
    expected += linear_params(25_088, 200) + linear_params(200, 10)
    assert n_params(model) == expected == 12_102_306
    with torch.no_grad():
        assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("builder", [yale_vgg, fmnist_vgg])
def test_vggs_are_plain_sequential_for_the_bound_engine(builder):
    model = builder((1, 32, 30), 5, width=0.5)
    assert type(model) is nn.Sequential
    assert {type(m) for m in model} == {nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear}
    kinds = [type(m) for m in model]
    # a ReLU after every conv and after the hidden FC, none after the logits
    for i, kind in enumerate(kinds):
        if kind is nn.Conv2d:
            assert kinds[i + 1] is nn.ReLU
    assert kinds[-3:] == [nn.Linear, nn.ReLU, nn.Linear]
    flat = flatten_size_by_dry_run(model, (1, 32, 30))
    assert next(m for m in model if isinstance(m, nn.Linear)).in_features == flat


@pytest.mark.parametrize(
    "width,expected", [(0.5, [2, 2, 4, 4, 8, 8, 16, 16]), (0.1, [1, 1, 1, 1, 2, 2, 3, 3])]
)
def test_width_multiplier_rounds_with_a_floor_of_one(width, expected):
    model = yale_vgg((1, 24, 20), 4, width=width)
    assert [m.out_channels for m in model if isinstance(m, nn.Conv2d)] == expected
    with torch.no_grad():
        assert model(torch.rand(1, 1, 24, 20)).shape == (1, 4)


def test_wide_resnet_parameter_counts_match_published_table():
    # WRN parameter counts as tabulated for the TRADES/Madry WideResNet (10 classes, 32x32 input).
    published = {(34, 1): 466_714, (34, 2): 1_855_578, (10, 10): 7_435_354, (34, 10): 46_160_474}
    for (depth, k), count in published.items():
        assert n_params(wide_resnet((3, 32, 32), 10, depth=depth, widen_factor=k)) == count


def test_wide_resnet_forward_backward_and_width_multiplier():
    model = wide_resnet((3, 32, 32), 10, width=0.25, depth=10, widen_factor=4)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].out_channels == 4 and max(c.out_channels for c in convs) == 64
    x = torch.rand(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    leaky = wide_resnet((3, 16, 16), 7, width=0.25, depth=10, widen_factor=2, relu_slope=0.1)
    assert any(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.1 for m in leaky.modules())
    assert leaky(torch.rand(1, 3, 16, 16)).shape == (1, 7)


def test_bad_definitions_raise_model_definition_error():
    with pytest.raises(ModelDefinitionError, match=r"model.options: yale_vgg takes no option 'dropout'"):
        yale_vgg((1, 192, 168), 38, dropout=0.5)
    with pytest.raises(
        ModelDefinitionError, match=r"yale_vgg: input \(1, 8, 8\) is too small for 8 convolutions"
    ):
        yale_vgg((1, 8, 8), 38, downsample_kernel=4)
    with pytest.raises(ModelDefinitionError, match=r"wide_resnet depth must be 6n \+ 4"):
        wide_resnet((3, 32, 32), 10, depth=33)
    with pytest.raises(ModelDefinitionError, match=r"fmnist_vgg: input_shape must be \(C, H, W\)"):
        fmnist_vgg((28, 28), 10)
    with pytest.raises(ModelDefinitionError, match=r"width must be > 0"):
        fmnist_vgg((1, 28, 28), 10, width=0)


def test_registry_names():
    assert set(PAPER_MODELS) == {"yale_vgg", "fmnist_vgg", "wide_resnet"}
