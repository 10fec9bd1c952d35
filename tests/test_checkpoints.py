"""Checkpoints load exactly as torch's strict ``load_state_dict`` would, and damaged ones are refused."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsdeploy.errors import WeightsError
from dsdeploy.models.weights import load_weights

PRETRAINED = Path("/work/shared/data/pretrained/resnet32-d509ac18.th")
REPO_PRETRAINED = Path(__file__).resolve().parents[2] / "shared/data/pretrained/resnet32-d509ac18.th"


# -- the CIFAR ResNet of He et al. 2016 (option-A shortcut), as described in the checkpoint's README --

class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = cout - cin if (stride != 1 or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad // 2, self.pad // 2))
        return F.relu(out + short)


class CifarResNet(nn.Module):
    def __init__(self, n: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin, stages = 16, []
        for i, cout in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(_Block(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(x.mean((2, 3)))


def resnet32() -> CifarResNet:
    torch.manual_seed(0)
    return CifarResNet(5)


def bnnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4))


def _legacy(state: dict) -> dict:
    """A state_dict as torch < 0.4.1 wrote it: no num_batches_tracked buffers."""
    return collections.OrderedDict((k, v) for k, v in state.items() if not k.endswith("num_batches_tracked"))


def _torch_reference(factory, state: dict) -> dict:
    ref = factory()
    ref.load_state_dict(state, strict=True)
    return ref.state_dict()


@pytest.mark.parametrize("wrap", [lambda s: s, lambda s: {"state_dict": s, "best_prec1": 91.0},
                                  lambda s: {f"module.{k}": v for k, v in s.items()}])
def test_legacy_bn_state_loads_as_torch_loads_it(tmp_path, wrap):
    trained = bnnet()
    with torch.no_grad():
        trained[1].running_mean.uniform_(-1, 1)
        trained[1].num_batches_tracked.fill_(7)
    state = _legacy(trained.state_dict())
    path = tmp_path / "old.pth"
    torch.save(wrap(state), path)
    model = load_weights(bnnet(), path)
    want = _torch_reference(bnnet, state)
    assert_same_state(model.state_dict(), want)


@pytest.mark.parametrize("drop,extra", [("0.weight", None), ("1.running_var", None), (None, "1.surplus")])
def test_real_missing_or_unexpected_keys_are_refused_and_model_unchanged(tmp_path, drop, extra):
    state = _legacy(bnnet().state_dict())
    if drop:
        del state[drop]
    if extra:
        state[extra] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pth")
    model = bnnet()
    with torch.no_grad():
        model[0].weight.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError, match="missing" if drop else "unexpected") as err:
        load_weights(model, tmp_path / "bad.pth")
    assert (drop or extra) in str(err.value) and "\n" not in str(err.value)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("damage,words", [
    (lambda s: s["0.weight"].view(-1).__setitem__(3, float("nan")), "'0.weight' holds 1 NaN"),
    (lambda s: s["5.bias"].fill_(float("inf")), "'5.bias' holds 4 NaN/infinite"),
    (lambda s: s.__setitem__("5.weight", s["5.weight"].to_sparse()), "'5.weight' is sparse"),
    (lambda s: s.__setitem__("5.weight", torch.empty(4, 8, device="meta")), "'5.weight' is on the meta device"),
    (lambda s: s.__setitem__("5.weight", [1.0, 2.0]), "'5.weight' is a list"),
])
def test_damaged_entries_are_one_line_naming_the_tensor(tmp_path, damage, words):
    state = bnnet().state_dict()
    damage(state)
    path = tmp_path / "damaged.pth"
    torch.save(state, path)  # torch saves each of these entries; loading them is what must fail clearly
    with pytest.raises(WeightsError) as err:
        load_weights(bnnet(), path)
    assert words in str(err.value) and "\n" not in str(err.value)


def assert_same_state(got: dict, want: dict) -> None:
    """The same keys and bit-identical tensors (what torch's own strict load gives)."""
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _pretrained() -> Path:
    for p in (PRETRAINED, REPO_PRETRAINED):
        if p.is_file():
            return p
    pytest.fail("the third-party pretrained checkpoints are not in ../shared/data/pretrained (CI puts shared/ "
                "beside the clone)")


def test_real_legacy_third_party_checkpoint_loads_as_torch_loads_it():
    """resnet32-d509ac18.th: legacy (non-zip) format, nested under state_dict, module. prefix,
    CUDA-saved tensors, no num_batches_tracked (see shared/data/pretrained/README.md)."""
    path = _pretrained()
    raw = torch.load(path, map_location="cpu", weights_only=True)
    state = {k[len("module."):]: v for k, v in raw["state_dict"].items()}
    assert not any(k.endswith("num_batches_tracked") for k in state)
    model = load_weights(resnet32(), path)
    want = _torch_reference(resnet32, state)
    assert_same_state(model.state_dict(), want)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 31 and all(int(m.num_batches_tracked) == 0 for m in bns)
    assert all(torch.equal(m.running_var, state[n + ".running_var"]) for n, m in model.named_modules()
               if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():  # a trained CIFAR net: finite, non-constant logits
        out = model.eval()(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(out).all() and out.std() > 0
