"""CIFAR-10 ResNets of He et al. (2016) as user code: the architecture a user brings with a checkpoint.

"Deep Residual Learning for Image Recognition", K. He, X. Zhang, S. Ren, J. Sun, CVPR 2016,
section 4.2 (CIFAR-10): depth 6n+2, a 3x3 stem conv (3->16) with BatchNorm and ReLU, three
stages of n basic blocks with 16, 32 and 64 channels (the first block of stages 2 and 3 has
stride 2), global average pooling and one linear layer. Where a block changes the shape, the
shortcut is the paper's "option A": identity on every second pixel, the new channels zero
(no parameters).

Module names follow the common public implementation (``conv1``, ``bn1``,
``layer{1,2,3}.{i}.conv1/bn1/conv2/bn2``, ``linear``), so checkpoints published for it load
with ``load_state_dict`` once their ``module.`` prefix (DataParallel) is stripped, which
dsdeploy does. Used by ``converters/cifar10_resnet_pretrained.toml`` and
``benchmarks/pretrained_cifar.py``::

    PYTHONPATH=examples dsdeploy inspect cifar_resnet:resnet32 --weights resnet32-d509ac18.th
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarResNet", "BasicBlock", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]


class ShortcutA(nn.Module):
    """Option-A shortcut: ``x[:, :, ::stride, ::stride]`` with ``pad`` zero channels on each side."""

    def __init__(self, stride: int, pad: int) -> None:
        super().__init__()
        self.stride, self.pad = stride, pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        return F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers and a shortcut, then ReLU: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            if planes - in_planes != 2 * (planes // 4):
                raise ValueError(f"option-A shortcut pads {planes // 4} channels per side: "
                                 f"{in_planes} -> {planes} channels is not that")
            self.shortcut: nn.Module = ShortcutA(stride, planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 3x32x32 inputs; ``forward(x: (N, 3, H, W)) -> logits (N, num_classes)``."""

    def __init__(self, n: int, num_classes: int = 10) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"blocks per stage must be >= 1, got {n}")
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes = 16
        stages = []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(planes, width, stride if i == 0 else 1))
                planes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _depth(depth: int, num_classes: int) -> CifarResNet:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth is 6n+2, got {depth}")
    return CifarResNet((depth - 2) // 6, num_classes)


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 (n=3), randomly initialised."""
    return _depth(20, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    """ResNet-32 (n=5), randomly initialised."""
    return _depth(32, num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    """ResNet-44 (n=7), randomly initialised."""
    return _depth(44, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 (n=9), randomly initialised."""
    return _depth(56, num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    """ResNet-110 (n=18), randomly initialised."""
    return _depth(110, num_classes)
