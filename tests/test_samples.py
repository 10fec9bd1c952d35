"""dsdeploy.models.samples: the shipped sample models load, verify and reach their recorded accuracy."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from dsdeploy.data.datasets import Preprocess, load_data, make_loader
from dsdeploy.errors import SourceError
from dsdeploy.models import samples
from dsdeploy.recover.metrics import predict


def _meta(name):
    return samples.sample_meta(name)


def test_registry_and_metadata_files():
    assert set(samples.SAMPLES) == {"digits_cnn", "cifar_resnet"}
    for name in samples.SAMPLES:
        meta = _meta(name)
        for key in ("input_shape", "preprocessing", "labels", "accuracy", "sha256", "command", "torch"):
            assert key in meta, (name, key)
        pre = Preprocess.from_dict(meta["preprocessing"])
        assert list(pre.input_shape(1)) == meta["input_shape"]
        assert len(meta["labels"]) == 10


def test_digits_sample_reaches_recorded_accuracy():
    model, meta = samples.load_sample("digits_cnn")
    assert not model.training
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.in_channels > 4]
    assert len(convs) >= 3  # something to convert
    ev = meta["eval"]
    splits = load_data("digits", Preprocess.from_dict(meta["preprocessing"]), val_split=ev["val_split"], seed=ev["seed"])
    y, scores = predict(model, make_loader(splits.val, 512, shuffle=False))
    acc = float((scores.argmax(1) == y).mean())
    assert len(y) == ev["images"]
    # recorded on the machine that trained it: another CPU may round a borderline image the other way
    assert acc == pytest.approx(meta["accuracy"], abs=2 / ev["images"] + 1e-9)
    assert acc > 0.97


def test_cifar_sample_checksum_and_forward():
    model, meta = samples.load_sample("cifar_resnet")
    assert meta["input_shape"] == [1, 3, 32, 32] and meta["accuracy"] > 0.5
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert sum(p.numel() for p in model.parameters()) == meta["params"]


def test_sample_arch_has_no_trained_weights():
    trained, _ = samples.load_sample("digits_cnn")
    fresh = samples.sample_arch("digits_cnn")
    assert set(fresh.state_dict()) == set(trained.state_dict())
    assert not torch.equal(fresh.fc.weight, trained.fc.weight)


def test_unknown_name_lists_available():
    with pytest.raises(SourceError, match="cifar_resnet, digits_cnn"):
        samples.load_sample("nope")


def test_missing_weights_and_checksum_mismatch(tmp_path, monkeypatch):
    monkeypatch.setenv("DSDEPLOY_SAMPLES", str(tmp_path))
    with pytest.raises(SourceError, match="pip install -e"):
        samples.load_sample("digits_cnn")
    shutil.copy(samples.__file__.replace("dsdeploy/models/samples.py", "sample_models/digits_cnn.json"), tmp_path)
    with pytest.raises(SourceError, match="pip install -e"):
        samples.load_sample("digits_cnn")
    torch.save(samples.sample_arch("digits_cnn").state_dict(), tmp_path / "digits_cnn.pt")
    with pytest.raises(SourceError, match="sha256"):
        samples.load_sample("digits_cnn")
    meta = json.loads((tmp_path / "digits_cnn.json").read_text())
    meta["sha256"] = __import__("dsdeploy.fsutil", fromlist=["sha256_file"]).sha256_file(tmp_path / "digits_cnn.pt")
    (tmp_path / "digits_cnn.json").write_text(json.dumps(meta))
    model, _ = samples.load_sample("digits_cnn")  # env override honoured
    assert isinstance(model, samples.DigitsCNN)
