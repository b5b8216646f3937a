"""Runner layer: architectures as plain nn.Sequential (Conv2d/Linear/ReLU/Flatten) with a width multiplier.

No batch norm or dropout in the bound-friendly architectures: the verified-bound engine needs exactly these
layers. Checkpoints are state_dicts plus the few facts needed to rebuild the network.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robmia_db.errors import ModelDefinitionError


def _channels(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


def mlp(
    input_shape: tuple[int, int, int], n_classes: int, width: float = 1.0, **options: Any
) -> nn.Sequential:
    """Flatten -> 256w -> ReLU -> 128w -> ReLU -> classes."""
    hidden = options.pop("hidden", [256, 128])
    _refuse_options("mlp", options)
    features = int(input_shape[0] * input_shape[1] * input_shape[2])
    layers: list[nn.Module] = [nn.Flatten()]
    for size in hidden:
        out = _channels(size, width)
        layers += [nn.Linear(features, out), nn.ReLU()]
        features = out
    layers.append(nn.Linear(features, n_classes))
    return nn.Sequential(*layers)


def cnn(
    input_shape: tuple[int, int, int], n_classes: int, width: float = 1.0, **options: Any
) -> nn.Sequential:
    """Conv3x3(16w) -> ReLU -> Conv4x4 s2 (32w) -> ReLU -> FC 100w -> ReLU -> classes (paper.md section 10)."""
    _refuse_options("cnn", options)
    channels, height, width_px = input_shape
    c1, c2, hidden = _channels(16, width), _channels(32, width), _channels(100, width)
    out_h, out_w = (height + 2 - 4) // 2 + 1, (width_px + 2 - 4) // 2 + 1
    return nn.Sequential(
        nn.Conv2d(channels, c1, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, kernel_size=4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c2 * out_h * out_w, hidden),
        nn.ReLU(),
        nn.Linear(hidden, n_classes),
    )


def _refuse_options(arch: str, options: dict[str, Any]) -> None:
    if options:
        raise ModelDefinitionError(f"model.options: {arch} takes no option {sorted(options)[0]!r}")


def _paper(name: str) -> Callable[..., nn.Module]:
    def build(input_shape, n_classes, width=1.0, **options):
        from robmia_db.runner import paper_models

        return getattr(paper_models, name)(input_shape, n_classes, width=width, **options)

    return build


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "yale_vgg": _paper("yale_vgg"),
    "fmnist_vgg": _paper("fmnist_vgg"),
    "wide_resnet": _paper("wide_resnet"),
}


def build_model(
    arch: str,
    input_shape: tuple[int, int, int],
    n_classes: int,
    width: float = 1.0,
    options: dict | None = None,
) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise ModelDefinitionError(
            f"unknown architecture {arch!r} (known: {', '.join(sorted(ARCHITECTURES))})"
        )
    return ARCHITECTURES[arch](tuple(input_shape), int(n_classes), width=width, **dict(options or {}))


def checkpoint_bytes(model: nn.Module, meta: dict[str, Any]) -> bytes:
    """The checkpoint file's exact content, for a worker that hands it to the driver instead of writing it."""
    buffer = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "meta": meta}, buffer)
    return buffer.getvalue()


def write_atomically(path: Path, content: bytes) -> None:
    """tmp + os.replace: a killed run never leaves a truncated file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(content)
    os.replace(tmp, path)


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write atomically (tmp + os.replace): a killed run never leaves a truncated checkpoint."""
    write_atomically(path, checkpoint_bytes(model, meta))


def load_checkpoint(
    source: Path | bytes, device: torch.device | str = "cpu", expect: dict[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network and load its weights with weights_only=True (no arbitrary unpickling).

    `source` is a checkpoint file or its bytes (a Ray worker gets them from the driver, not from disk).
    `expect` (model_key, arch, width, input_shape, n_classes) is compared with the file's own record before
    anything is built: a checkpoint of another model (swapped files, an MLP under a CNN's key) is refused.
    """
    from robmia_db.errors import CheckpointError

    shown = "the checkpoint" if isinstance(source, bytes) else f"checkpoint {source}"
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    payload = torch.load(source, map_location=device, weights_only=True)
    meta = payload["meta"]
    for key, wanted in (expect or {}).items():
        found = meta.get(key)
        if key == "input_shape":
            found, wanted = list(found or []), list(wanted)
        if found != wanted and not (key == "model_key" and found is None):
            raise CheckpointError(
                f"{shown} holds model {meta.get('model_key')} ({meta.get('arch')}, {key} {found!r}), "
                f"not {expect.get('model_key')} ({expect.get('arch')}, {key} {wanted!r})"
            )
    model = build_model(
        meta["arch"], meta["input_shape"], meta["n_classes"], meta["width"], meta.get("options")
    )
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), meta
