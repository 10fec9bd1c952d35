"""Model specs and checkpoint loading: every shape real checkpoints come in, safely."""

import pytest
import torch

from dsdeploy.conversion.loading import load_model
from dsdeploy.errors import SourceError, WeightsError
from tests.conftest import small_net

FACTORY = "tests.conftest:small_net"


@pytest.fixture
def trained_state():
    model = small_net()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    return model.state_dict()


def outputs_match(model, state):
    ref = small_net()
    ref.load_state_dict(state)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        return torch.equal(ref.eval()(x), model(x))


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "model_state_dict", "net", "module_prefix"])
def test_checkpoint_shapes(tmp_path, trained_state, wrap):
    if wrap == "bare":
        obj = trained_state
    elif wrap == "module_prefix":
        obj = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in trained_state.items()}}
    else:
        obj = {wrap: trained_state, "epoch": 7, "best_acc": 91.5, "optimizer": {"lr": 0.1}}
    path = tmp_path / "w.pt"
    torch.save(obj, path)
    loaded = load_model(FACTORY, weights=str(path))
    assert outputs_match(loaded.model, trained_state)
    assert not loaded.model.training


def test_pickled_model_needs_opt_in(tmp_path, trained_state):
    path = tmp_path / "whole.pt"
    model = small_net()
    model.load_state_dict(trained_state)
    torch.save(model, path)
    with pytest.raises(WeightsError, match="trust_pickle=True"):
        load_model(FACTORY, weights=str(path))
    loaded = load_model(FACTORY, weights=str(path), trust_pickle=True)
    assert outputs_match(loaded.model, trained_state)


def test_mismatched_keys_and_shapes_are_named(tmp_path, trained_state):
    bad = dict(trained_state)
    bad.pop("conv1.weight")
    bad["extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "keys.pt")
    with pytest.raises(WeightsError, match=r"missing \(first: conv1.weight\).*unexpected \(first: extra.weight\)"):
        load_model(FACTORY, weights=str(tmp_path / "keys.pt"))
    wrong = dict(trained_state)
    wrong["head.weight"] = torch.zeros(3, 16)
    torch.save(wrong, tmp_path / "shape.pt")
    with pytest.raises(WeightsError, match="head.weight"):
        load_model(FACTORY, weights=str(tmp_path / "shape.pt"))


def test_corrupt_and_missing_checkpoints(tmp_path, trained_state):
    path = tmp_path / "w.pt"
    torch.save(trained_state, path)
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="corrupt"):
        load_model(FACTORY, weights=str(tmp_path / "trunc.pt"))
    with pytest.raises(Exception, match="not found"):
        load_model(FACTORY, weights=str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("spec,match", [
    ("torchvision:resnet19", "did you mean"),
    ("nosuchpkg.mod:factory", "cannot import"),
    ("tests.conftest:nope", "no attribute"),
    ("tests.conftest:failing_factory", "exploded on purpose"),
    ("resnet18", "unknown model spec"),
])
def test_bad_specs(spec, match):
    with pytest.raises(SourceError, match=match):
        load_model(spec)


def test_torchvision_and_factory_kwargs():
    loaded = load_model("torchvision:resnet18", model_kwargs={"num_classes": 7})
    assert loaded.model.fc.out_features == 7
    assert loaded.shape_or_default() == (1, 3, 224, 224)
    assert load_model(FACTORY, model_kwargs={"num_classes": 4}).model.head.out_features == 4


@pytest.mark.parametrize("seed", range(40))
def test_any_garbage_reads_as_corrupt(tmp_path, seed):
    import random

    path = tmp_path / "g.pt"
    path.write_bytes(random.Random(seed).randbytes(random.Random(seed).randint(1, 5000)))
    with pytest.raises(WeightsError, match="corrupt|pickled"):
        load_model(FACTORY, weights=str(path))


@pytest.mark.parametrize("spec, kwargs, key", [
    ("torchvision.models:resnet18", {"weights": "IMAGENET1K_V1"}, "weights"),
    ("torchvision.models:get_model", {"name": "resnet18", "weights": "DEFAULT"}, "weights"),
    ("torchvision.models.detection:fasterrcnn_mobilenet_v3_large_320_fpn", {"weights_backbone": "DEFAULT"}, "weights_backbone"),
    ("torchvision.models:resnet18", {"pretrained": True}, "pretrained"),
])
def test_library_builder_as_factory_never_downloads(monkeypatch, spec, kwargs, key):
    """A torchvision builder named as pkg.module:factory refuses download kwargs before any call,
    exactly like the torchvision:NAME path; no network is touched (a download attempt fails the test)."""
    import socket

    import torch.hub

    def no_network(*a, **k):
        raise AssertionError("tried the network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(SourceError, match=f"may not set '{key}'") as exc:
        load_model(spec, model_kwargs=kwargs)
    assert "\n" not in str(exc.value)
    # weights=None (and a detection builder's backbone) build without any download
    load_model("torchvision.models:get_model", model_kwargs={"name": "resnet18", "weights": None})
    load_model("torchvision.models.detection:fasterrcnn_mobilenet_v3_large_320_fpn", model_kwargs={"num_classes": 3})
