"""Shared fixtures: small real models built in-process."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

# The suite's exactness promises are CPU ones: device "auto" means the CPU here even where a GPU
# exists (CLI subprocesses inherit it); tests that run on CUDA name their device.
os.environ.setdefault("DSDEPLOY_DEVICE", "cpu")
# Export "auto" means TorchScript here (suite time: torch.export costs 5-20x more per export and
# SmallNet's data-dependent branch makes every "auto" export try it, fail, and redo). The modules
# about the exporter (test_export, test_timm, test_model_edges) use ``users_exporter``: "auto" as
# users get it, dynamo first with the fallback.
os.environ.setdefault("DSDEPLOY_EXPORTER", "torchscript")
# the latency verification's rounds in the test process, not one child process per round (seconds per
# conversion on 2 cores); tests/test_latency_verify.py runs the child-process rounds once
os.environ.setdefault("DSDEPLOY_VERIFY_ROUNDS_IN", "process")


@pytest.fixture(scope="module")
def users_exporter():
    """For a whole module (its module-scoped fixtures and CLI subprocesses too): DSDEPLOY_EXPORTER
    unset, so export "auto" is what users get. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DSDEPLOY_EXPORTER", raising=False)
        yield


class SmallNet(nn.Module):
    """A small CNN with every kind of conv the planner must decide on."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.grouped = nn.Conv2d(32, 32, (3, 1), padding=(1, 0), groups=4)
        self.point = nn.Conv2d(32, 48, 1)
        self.conv2 = nn.Conv2d(48, 48, 3, stride=2, padding=1, padding_mode="reflect")
        self.up = nn.ConvTranspose2d(48, 16, 2, stride=2)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.point(torch.relu(self.grouped(self.dw(x))))
        x = self.up(torch.relu(self.conv2(x)))
        if x.mean() > 1e6:  # data-dependent control flow: not traceable by torch.fx
            x = x * 0
        return self.head(x.mean(dim=(2, 3)))


def small_net(num_classes: int = 10) -> SmallNet:
    """Factory used by ``pkg.module:factory`` specs in tests (tests.conftest:small_net)."""
    torch.manual_seed(0)
    return SmallNet(num_classes)


def failing_factory() -> nn.Module:
    raise RuntimeError("factory exploded on purpose")


@pytest.fixture
def net() -> SmallNet:
    model = small_net()
    # non-trivial BN statistics
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16))
    return model.eval()
