"""The project's shipped sample models (``sample:NAME``): architectures, weights, metadata.

Weights and metadata live in the repository's top-level ``sample_models/`` folder
(``NAME.pt`` holds a state_dict, ``NAME.json`` its metadata). ``DSDEPLOY_SAMPLES``
points elsewhere. Weights load with ``weights_only=True`` and are checked against the
sha256 recorded in the metadata before use.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dsdeploy.errors import SourceError
from dsdeploy.fsutil import sha256_file


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DigitsCNN(nn.Module):
    """Compact CNN for 1x16x16 digits: conv 1->16, 16->32, pool, 32->64, 64->64, pool, linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(1, 16), *_conv_bn(16, 32), nn.MaxPool2d(2),
            *_conv_bn(32, 64), *_conv_bn(64, 64), nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity or 1x1-conv shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-8-style CNN for 3x32x32: stem conv at full resolution, then three stages of
    one BasicBlock each at 1/2, 1/4 and 1/8 resolution (``first_stride=2``), then linear."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128),
                 first_stride: int = 2) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Sequential(*_conv_bn(3, w1))
        self.layer1 = BasicBlock(w1, w1, stride=first_stride)
        self.layer2 = BasicBlock(w1, w2, stride=2)
        self.layer3 = BasicBlock(w2, w3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@dataclass(frozen=True)
class SampleInfo:
    """A registered sample: how to build it and what it was trained on."""

    name: str
    build: Callable[[], nn.Module]
    dataset: str
    description: str


SAMPLES: dict[str, SampleInfo] = {
    "digits_cnn": SampleInfo("digits_cnn", DigitsCNN, "digits",
                             "4-conv CNN on scikit-learn digits resized to 1x16x16"),
    "cifar_resnet": SampleInfo("cifar_resnet", CifarResNet, "cifar10",
                               "ResNet-8-style CNN (widths 32-64-128) on CIFAR-10 at 3x32x32"),
}


def samples_dir() -> Path:
    """The folder holding ``NAME.pt``/``NAME.json``: ``$DSDEPLOY_SAMPLES`` or the repo's ``sample_models/``."""
    env = os.environ.get("DSDEPLOY_SAMPLES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "sample_models"


def _info(name: str) -> SampleInfo:
    if name not in SAMPLES:
        raise SourceError(f"unknown sample {name!r}; available: {', '.join(sorted(SAMPLES))}")
    return SAMPLES[name]


def sample_arch(name: str) -> nn.Module:
    """Build the architecture of sample ``name`` without loading weights (random init)."""
    return _info(name).build()


def sample_meta(name: str) -> dict[str, Any]:
    """Read ``NAME.json`` (metadata only; no weights, no checksum)."""
    _info(name)
    path = samples_dir() / f"{name}.json"
    if not path.is_file():
        raise SourceError(f"sample {name!r} metadata missing at {path}; install dsdeploy from a clone "
                          f"(`pip install -e .`) so sample_models/ is present, or set DSDEPLOY_SAMPLES")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SourceError(f"sample metadata {path} is not valid JSON ({exc.msg})") from None


def load_sample(name: str) -> tuple[nn.Module, dict[str, Any]]:
    """Return (model in eval mode with the trained weights, metadata) for sample ``name``.

    Metadata holds ``input_shape``, ``preprocessing`` (``Preprocess.to_dict()``),
    ``labels``, ``accuracy`` and ``sha256``. Raises SourceError for an unknown name,
    missing files or a checksum mismatch.
    """
    meta = sample_meta(name)
    weights = samples_dir() / f"{name}.pt"
    if not weights.is_file():
        raise SourceError(f"sample {name!r} weights missing at {weights}; install dsdeploy from a clone "
                          f"(`pip install -e .`) so sample_models/ is present, or set DSDEPLOY_SAMPLES")
    digest = sha256_file(weights)
    if meta.get("sha256") and digest != meta["sha256"]:
        raise SourceError(f"sample {name!r} weights {weights} do not match the recorded sha256 "
                          f"(got {digest[:12]}…, want {meta['sha256'][:12]}…); restore the file from the repository")
    model = sample_arch(name)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval(), meta
