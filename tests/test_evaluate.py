"""dsdeploy.recover.evaluate and the ``dsdeploy evaluate`` CLI on real data."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from PIL import Image

from dsdeploy.errors import DataError
from dsdeploy.models.samples import load_sample
from dsdeploy.recover.evaluate import evaluate
from tests.clirun import dsdeploy, invoke


def _loaded(name="digits_cnn"):
    from types import SimpleNamespace

    model, meta = load_sample(name)
    return SimpleNamespace(model=model, spec=f"sample:{name}", preprocessing=meta["preprocessing"],
                           labels=meta["labels"], input_shape=tuple(meta["input_shape"]))


def test_evaluate_loaded_model_matches_recorded_accuracy():
    loaded = _loaded()
    res = evaluate(loaded, "digits")
    _, meta = load_sample("digits_cnn")
    assert res["images"] == 359 and res["classes"] == [str(i) for i in range(10)]
    (only,) = res["models"]
    # recorded on the machine that trained it: another CPU may round a borderline image the other way
    assert only["metrics"]["top1"] == pytest.approx(meta["accuracy"], abs=2 / res["images"] + 1e-9)
    assert only["preprocessing"]["size"] == [16, 16]
    assert "delta" not in res


def test_compare_side_by_side_with_a_damaged_copy():
    a = _loaded()
    b = _loaded()
    b.model = copy.deepcopy(a.model)
    with torch.no_grad():
        b.model.fc.weight.add_(torch.randn_like(b.model.fc.weight, generator=torch.Generator().manual_seed(0)))
    b.spec = "damaged"
    res = evaluate(a, "digits", compare=b, limit=120)
    top_a, top_b = (r["metrics"]["top1"] for r in res["models"])
    assert res["delta"]["top1"] == pytest.approx(top_b - top_a)
    assert top_b < top_a and 0 <= res["agreement"] < 1
    assert evaluate(a, "digits", compare=a, limit=60)["agreement"] == 1.0


def test_label_order_is_mapped_by_name(tmp_path):
    # a 2-class folder whose class names match a model's labels in reverse order
    for i, (name, val) in enumerate([("dark", 0), ("light", 255)]):
        for j in range(3):
            (tmp_path / name).mkdir(exist_ok=True)
            Image.new("L", (4, 4), val).save(tmp_path / name / f"{j}.png")

    class Bright(torch.nn.Module):  # output 0 = "light" when bright
        def forward(self, x):
            m = x.mean(dim=(1, 2, 3))
            return torch.stack([m, -m], 1)

    from types import SimpleNamespace

    pre = {"size": [4, 4], "resize": None, "mean": [0.5], "std": [0.5], "channels": 1}
    loaded = SimpleNamespace(model=Bright(), spec="bright", preprocessing=pre, labels=["light", "dark"])
    res = evaluate(loaded, str(tmp_path), split="train", val_split=0)
    assert res["models"][0]["metrics"]["top1"] == 1.0


def test_unlabelled_and_missing_split_errors(tmp_path):
    with pytest.raises(DataError, match="split"):
        evaluate(_loaded(), "digits", split="test")
    with pytest.raises(DataError, match="no 'val' split"):
        evaluate(_loaded(), "digits", val_split=0)


def test_class_count_mismatch(tmp_path):
    from types import SimpleNamespace

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for j in range(2):
            Image.new("L", (4, 4), j * 100).save(tmp_path / name / f"{j}.png")
    one = SimpleNamespace(model=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 1)), spec="one",
                          preprocessing={"size": [4, 4], "resize": None, "mean": [0.5], "std": [0.5], "channels": 1},
                          labels=None)
    with pytest.raises(DataError, match="the data has 2 classes .* but model one has 1 outputs"):
        evaluate(one, str(tmp_path), split="train", val_split=0)


def test_cli_evaluate_json_and_table():
    import json

    from click.testing import CliRunner

    from dsdeploy.cli import load_commands

    runner = CliRunner()
    proc = runner.invoke(load_commands(), ["evaluate", "sample:digits_cnn", "--data", "digits", "--json"])
    assert proc.exit_code == 0, proc.output
    res = json.loads(proc.stdout)
    assert res["models"][0]["model"] == "sample:digits_cnn" and res["models"][0]["metrics"]["top1"] > 0.97
    assert len(res["models"][0]["metrics"]["confusion"]) == 10
    proc = runner.invoke(load_commands(), ["evaluate", "sample:digits_cnn", "--data", "digits", "--compare",
                                           "sample:digits_cnn", "--limit", "50"])
    assert proc.exit_code == 0, proc.output
    assert "top1" in proc.stdout and "delta" in proc.stdout and "prediction agreement: 1.0000" in proc.stdout


def test_cli_evaluate_bad_data_is_one_line():
    proc = dsdeploy("evaluate", "sample:digits_cnn", "--data", "/no/such/folder")
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error: data '/no/such/folder' not found")
    assert "Traceback" not in proc.stderr


def test_preprocess_for_precedence():
    from types import SimpleNamespace

    from dsdeploy.data.datasets import DIGITS_PREPROCESS, Preprocess
    from dsdeploy.recover.evaluate import preprocess_for

    own = {"size": [8, 8], "resize": None, "mean": [0.1], "std": [0.2], "channels": 1}
    given = Preprocess(size=(4, 4), resize=None, mean=(0.5,), std=(0.5,), channels=1)
    m = SimpleNamespace(preprocessing=own, input_shape=(1, 1, 8, 8))
    assert preprocess_for(m, "digits", given) is given
    assert preprocess_for(m, "/data").to_dict()["mean"] == [0.1]
    resized = preprocess_for(SimpleNamespace(preprocessing=own, input_shape=(1, 1, 12, 12)), "/data")
    assert resized.size == (12, 12) and resized.mean == (0.1,)  # the model's input shape wins over a stale record
    bare = SimpleNamespace(preprocessing=None, input_shape=(1, 3, 224, 224))
    pre = preprocess_for(bare, "/data")
    assert pre.size == (224, 224) and pre.resize == 256 and pre.channels == 3
    assert preprocess_for(SimpleNamespace(preprocessing=None, input_shape=None), "digits") == DIGITS_PREPROCESS
    small = preprocess_for(SimpleNamespace(preprocessing=None, input_shape=(1, 3, 32, 32)), "digits")
    assert small.size == (32, 32) and small.channels == 3 and small.resize is None


def _folder(root, side):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (side, side), (40 * i, 200 if c == "a" else 0, 90)).save(root / c / f"{i}.png")
    return root


def test_evaluate_input_shape_and_warning_for_small_images_at_default_size(tmp_path):
    """A factory model with no recorded shape gets the 224x224 default: images far smaller than that
    (32x32) draw one warning naming the size to give; --input-shape / --size size the preprocessing."""
    small = _folder(tmp_path / "small", 32)
    spec = "tests.conftest:small_net"
    proc = invoke("evaluate", spec, "--data", small)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "--size 32x32" in warnings[0] and "--input-shape 1,3,32,32" in warnings[0]
    for extra in (["--input-shape", "1,3,32,32"], ["--size", "32x32"]):
        proc = invoke("evaluate", spec, "--data", small, *extra)
        assert proc.returncode == 0 and "warning:" not in proc.stderr, proc.stderr
        assert "preprocessing: 3x32x32" in proc.stderr
    proc = invoke("evaluate", spec, "--data", _folder(tmp_path / "big", 160))  # not much smaller: no warning
    assert proc.returncode == 0 and "warning:" not in proc.stderr, proc.stderr
    result = evaluate(spec, str(small), input_shape=(1, 3, 32, 32))
    assert result["models"][0]["preprocessing"]["size"] == [32, 32]


def test_the_small_images_warning_names_the_library_fields(tmp_path, caplog):
    """From the library the warning names the fields a Python caller sets (the CLI shows them as flags)."""
    small = _folder(tmp_path / "small", 32)
    with caplog.at_level(logging.WARNING, logger="dsdeploy.data.preprocessing"):
        evaluate(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2)), str(small))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "preprocess.size 32x32" in lines[0] and "input_shape 1,3,32,32" in lines[0]
    assert "--" not in lines[0]
