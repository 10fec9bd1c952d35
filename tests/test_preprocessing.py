"""One place decides preprocessing; every image-reading command uses it; images and labels are never mis-read.

Tiny models defined here are loaded through ``tests.test_preprocessing:NAME`` factory specs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dsdeploy.data.datasets import load_data
from dsdeploy.data.preprocessing import Preprocess, describe, resolve
from dsdeploy.errors import DataError
from tests.clirun import invoke

HERE = "tests.test_preprocessing"


# ------------------------------------------------------------------------------ tiny models


def graynet() -> nn.Module:
    """1-channel 16x16 classifier (2 classes)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, stride=2),
                         nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))


class ShapeGuard(nn.Module):
    """RGB model for 20x24 inputs that refuses any other input size (so a wrong size cannot pass silently)."""

    def __init__(self, size=(20, 24), channels=3) -> None:
        super().__init__()
        self.size = tuple(size)
        self.f = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                               nn.ReLU())
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        if tuple(x.shape[2:]) != self.size:
            raise ValueError(f"expected {self.size} inputs, got {tuple(x.shape)}")
        return self.fc(self.f(x).mean((2, 3)))


def rgbnet() -> nn.Module:
    torch.manual_seed(0)
    return ShapeGuard()


def rgbd() -> nn.Module:
    """4-channel (RGBA / RGB-D) 16x16 classifier."""
    torch.manual_seed(0)
    return ShapeGuard((16, 16), 4)


def _bright_model() -> nn.Module:
    """Class 1 when the mean normalised gray value is positive (a bright image), else class 0."""
    lin = nn.Linear(1, 2)
    with torch.no_grad():
        lin.bias.zero_()
        lin.weight.copy_(torch.tensor([[-1.0], [1.0]]))
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin).eval()


def images(root: Path, mode: str = "L", n: int = 6, size=(20, 24), classes=("a", "b"), empty=()) -> Path:
    """root/<class>/<i>.png random images (seeded); classes in ``empty`` get a folder and no image."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        if c in empty:
            continue
        for i in range(n):
            shape = size if mode == "L" else (*size, len(mode))
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")
    return root


def bright_dark(root: Path, bits: int) -> Path:
    """dark/ and bright/ gray images of 8 or 16 bits (the 16-bit ones are the 8-bit ones x 257)."""
    rng = np.random.default_rng(1)
    for cls, (lo, hi) in (("0dark", (10, 100)), ("1bright", (160, 250))):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(8):
            arr = rng.integers(lo, hi, (12, 12)).astype(np.uint16)
            if bits == 16:
                Image.fromarray(arr * 257).save(root / cls / f"{i}.png")  # a 16-bit PNG
            else:
                Image.fromarray(arr.astype(np.uint8), "L").save(root / cls / f"{i}.png")
    return root


def _pre_line(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("preprocessing:")]


# ------------------------------------------------------------------------------ the rule


def test_derived_from_the_input_shape():
    small = resolve(None, (1, 1, 16, 16))
    assert (small.channels, small.size, small.resize, small.mean) == (1, (16, 16), None, (0.5,))
    big = resolve(None, (1, 3, 224, 224))
    assert (big.size, big.resize, big.mean) == ((224, 224), 256, (0.485, 0.456, 0.406))
    odd = resolve(None, (1, 3, 160, 192))
    assert odd.resize == round(160 * 256 / 224)
    four = resolve(None, (1, 4, 16, 16))
    assert four.channels == 4 and len(four.mean) == 4
    assert "from the model's input shape" in describe(small)


def test_overrides_beat_recorded_beat_shape():
    recorded = Preprocess(size=(8, 8), resize=None, mean=(0.1,), std=(0.2,), channels=1).to_dict()
    assert resolve(recorded, (1, 1, 8, 8)).mean == (0.1,)
    assert resolve(recorded, (1, 1, 8, 8), {"mean": (0.3,)}).mean == (0.3,)
    # the input shape the model takes wins over a stale record; mean/std stay where channels match
    grown = resolve(recorded, (1, 1, 12, 12))
    assert grown.size == (12, 12) and grown.mean == (0.1,)
    # channels override without mean/std gets that channel count's defaults
    rgb = resolve(recorded, None, {"channels": 3})
    assert rgb.channels == 3 and len(rgb.mean) == 3


def test_size_without_resize_derives_resize():
    imagenet = Preprocess().to_dict()  # 224, resize 256
    small = resolve(imagenet, None, {"size": [32, 32]})
    assert small.size == (32, 32) and small.resize is None  # not: upscale to 256 and crop a 32x32 patch
    mid = resolve(imagenet, None, {"size": [112]})
    assert mid.size == (112, 112) and mid.resize == 128
    assert resolve(imagenet, None, {"size": [112], "resize": 0}).resize is None


def test_first_conv_gives_channels_when_the_shape_is_unknown():
    pre = resolve(None, None, model=graynet())
    assert pre.channels == 1 and pre.size == (224, 224)


def test_recipe_size_without_resize(tmp_path):
    from dsdeploy.pipeline.recipe import recipe_from_dict
    from dsdeploy.pipeline.stages import recipe_source

    images(tmp_path / "imgs", "RGB", size=(32, 32))
    recipe = recipe_from_dict({"model": {"spec": "torchvision:resnet18", "input_shape": [1, 3, 32, 32]},
                               "preprocess": {"size": [32, 32]}, "data": {"spec": str(tmp_path / "imgs")}})
    loaded, pre, shape = recipe_source(SimpleNamespace(config=recipe))
    assert pre.size == (32, 32) and pre.resize is None and shape == (1, 3, 32, 32)
    assert loaded.preprocessing["resize"] is None
    # the images are the images, not a 32x32 patch of a 256 upscale
    x = load_data(str(tmp_path / "imgs"), pre, val_split=0).train[0][0]
    raw = np.asarray(Image.open(sorted((tmp_path / "imgs" / "a").iterdir())[0]), np.float32) / 255
    want = (raw.transpose(2, 0, 1) - np.array(pre.mean)[:, None, None]) / np.array(pre.std)[:, None, None]
    assert np.abs(x.numpy() - want).max() < 1e-5
    bad = recipe_from_dict({"model": {"spec": "torchvision:resnet18", "input_shape": [1, 3, 64, 64]},
                            "preprocess": {"size": [32, 32]}})
    from dsdeploy.errors import RecipeError

    with pytest.raises(RecipeError, match="disagrees with model.input_shape"):
        recipe_source(SimpleNamespace(config=bad))


# ------------------------------------------------------------------------------ commands


@pytest.mark.parametrize("factory,shape,mode,want", [
    ("graynet", "1,1,16,16", "L", "1x16x16"),
    ("rgbnet", "1,3,20,24", "RGB", "3x20x24"),
])
def test_factory_models_get_their_own_preprocessing_in_every_command(tmp_path, factory, shape, mode, want):
    data = images(tmp_path / "imgs", mode, n=5)
    dsd, spec = tmp_path / "m.dsd", f"{HERE}:{factory}"
    proc = invoke("convert", spec, "--input-shape", shape, "--rank", "1", "-o", dsd, "--calib-data", data)
    assert proc.returncode == 0, proc.stderr
    assert _pre_line(proc.stderr) and want in _pre_line(proc.stderr)[0]
    runs = [("calibrate", dsd, "--data", data, "-o", tmp_path / "c.dsd"),
            ("finetune", dsd, "--data", data, "--epochs", "1", "-o", tmp_path / "f.dsd"),
            ("export", dsd, "-o", tmp_path / "m.onnx", "--data", data),
            ("evaluate", dsd, "--data", data, "--split", "train", "--val-split", "0")]
    for args in runs:  # the .dsd records this test module's factory: reloading it is an explicit opt-in
        proc = invoke(*args, "--trust-code")
        assert proc.returncode == 0, (args[0], proc.stderr)
        lines = _pre_line(proc.stderr)
        assert len(lines) == 1 and want in lines[0], (args[0], proc.stderr)
    # an unconverted factory model with no recorded shape: options say what it takes
    proc = invoke("evaluate", spec, "--data", data, "--size", shape.split(",", 2)[2], "--channels", shape.split(",")[1],
                  "--split", "train", "--val-split", "0")
    assert proc.returncode == 0, proc.stderr
    assert want in _pre_line(proc.stderr)[0] and "size, channels given" in _pre_line(proc.stderr)[0]


def test_preprocessing_options_on_every_image_command():
    from dsdeploy.cli import load_commands

    cli = load_commands()
    for name in ("convert", "calibrate", "finetune", "evaluate", "export", "deploy", "bench"):
        opts = {o for p in cli.commands[name].params for o in p.opts}
        assert {"--size", "--resize", "--mean", "--std", "--channels"} <= opts, name


# ------------------------------------------------------------------------------ images


def test_16bit_png_scores_like_its_8bit_twin(tmp_path):
    eight, sixteen = bright_dark(tmp_path / "u8", 8), bright_dark(tmp_path / "u16", 16)
    assert Image.open(next((sixteen / "1bright").iterdir())).mode.startswith("I")
    pre = Preprocess(size=(12, 12), resize=None, mean=(0.5,), std=(0.5,), channels=1)
    a = load_data(str(eight), pre, val_split=0).train
    b = load_data(str(sixteen), pre, val_split=0).train
    xa = torch.stack([a[i][0] for i in range(len(a))])
    xb = torch.stack([b[i][0] for i in range(len(b))])
    assert (xa - xb).abs().max() <= 2 / 255 / 0.5 + 1e-6  # one 8-bit step (after /std)
    from dsdeploy.recover.evaluate import evaluate

    model = SimpleNamespace(model=_bright_model(), spec="bright", preprocessing=pre.to_dict(), labels=None,
                            input_shape=(1, 1, 12, 12))
    scores = [evaluate(model, str(d), split="train", val_split=0)["models"][0]["metrics"]["top1"]
              for d in (eight, sixteen)]
    assert scores == [1.0, 1.0]


def test_rgba_images_for_a_4_channel_model(tmp_path):
    data = images(tmp_path / "rgba", "RGBA", size=(16, 16))
    pre = resolve(None, (1, 4, 16, 16))
    x = load_data(str(data), pre, val_split=0).train[0][0]
    assert x.shape == (4, 16, 16)


# ------------------------------------------------------------------------------ labels


def test_empty_class_folder_keeps_later_labels(tmp_path):
    data = images(tmp_path / "flat", classes=("a", "b", "c"), empty=("b",))
    splits = load_data(str(data), Preprocess(size=(8, 8), resize=None, mean=(0.5,), std=(0.5,), channels=1),
                       val_split=0)
    assert splits.classes == ["a", "b", "c"]
    assert sorted(set(splits.train.labels)) == [0, 2]  # c keeps index 2, as torchvision's ImageFolder
    split_layout = tmp_path / "tv"
    images(split_layout / "train", classes=("a", "b", "c"), empty=("b",))
    images(split_layout / "test", classes=("a", "b", "c"))
    s = load_data(str(split_layout), Preprocess(size=(8, 8), resize=None, mean=(0.5,), std=(0.5,), channels=1))
    assert sorted(set(s.train.labels)) == [0, 2] and sorted(set(s.val.labels)) == [0, 1, 2]


def test_data_classes_map_to_model_labels_by_name(tmp_path):
    data = images(tmp_path / "d", classes=("cat", "dog"))
    pre = Preprocess(size=(8, 8), resize=None, mean=(0.5,), std=(0.5,), channels=1)
    s = load_data(str(data), pre, val_split=0, model_labels=["dog", "bird", "cat"])
    assert s.classes == ["dog", "bird", "cat"] and sorted(set(s.train.labels)) == [0, 2]
    assert s.train.labels[0] == 2  # the first files are cats
    with pytest.raises(DataError, match="data class 'dog' .* not one of the model's 2 labels"):
        load_data(str(data), pre, val_split=0, model_labels=["cat", "bird"])


def test_class_mismatch_is_one_line_in_commands(tmp_path):
    data = images(tmp_path / "three", classes=("a", "b", "c"), n=4, size=(16, 16))
    dsd = tmp_path / "g.dsd"
    assert invoke("convert", f"{HERE}:graynet", "--input-shape", "1,1,16,16", "-o", dsd).returncode == 0
    for args in (("finetune", dsd, "--data", data, "--epochs", "1", "-o", tmp_path / "f.dsd"),
                 ("evaluate", dsd, "--data", data),
                 ("calibrate", dsd, "--data", data, "-o", tmp_path / "c.dsd")):
        proc = invoke(*args, "--trust-code")
        errors = [line for line in proc.stderr.splitlines() if "error" in line]
        assert proc.returncode not in (0, 70), (args[0], proc.stderr)
        assert errors == [errors[0]] and "the data has 3 classes" in errors[0] and "2 outputs" in errors[0], args[0]
        assert not (tmp_path / "f.dsd").exists()


# ------------------------------------------------------------------------------ bundles


@pytest.mark.parametrize("factory,shape,mode", [("rgbnet", (1, 3, 20, 24), "RGB"), ("rgbd", (1, 4, 16, 16), "RGBA"),
                                                ("graynet", (1, 1, 16, 16), "L")])
def test_bundle_predicts_for_factory_models(tmp_path, factory, shape, mode):
    from dsdeploy.export.bundle import deploy
    from dsdeploy.export.onnx_export import export_model

    export_model(f"{HERE}:{factory}", tmp_path / "m.onnx", input_shape=shape)
    deploy(tmp_path / "m.onnx", tmp_path / "bundle", latency_iters=0)
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["preprocessing"]["channels"] == shape[1] and manifest["preprocessing"]["size"] == list(shape[2:])
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 28, len(mode)) if mode != "L" else (30, 28),
                                                      dtype=np.uint8), mode).save(img)
    proc = subprocess.run([sys.executable, str(tmp_path / "bundle" / "predict.py"), str(img)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[0])["top"][0]["index"] in (0, 1)


def test_predict_py_decodes_like_dsdeploy_data(tmp_path):
    """The bundle's standalone decoder and dsdeploy.data.datasets agree (16-bit gray, RGBA, crop path)."""
    import importlib.util

    from dsdeploy.data.datasets import _decode

    spec = importlib.util.spec_from_file_location("predict", Path(__file__).parents[1] / "dsdeploy" / "export" / "templates"
                                                  / "predict.py")
    predict = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(predict)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 65535, (20, 30)).astype(np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(rng.integers(0, 255, (20, 30, 4), dtype=np.uint8), "RGBA").save(tmp_path / "rgba.png")
    for name, pre in (("g16.png", Preprocess(size=(16, 16), resize=None, mean=(0.5,), std=(0.5,), channels=1)),
                      ("rgba.png", resolve(None, (1, 4, 16, 16))),
                      ("g16.png", resolve(None, (1, 3, 96, 96))),
                      ("rgba.png", resolve(None, (1, 3, 12, 12), {"interpolation": "bicubic", "resize": 14}))):
        ours = _decode(tmp_path / name, pre).astype(np.float32) / 255
        ours = ours[None] if ours.ndim == 2 else ours.transpose(2, 0, 1)
        c = pre.channels
        ours = (ours - np.broadcast_to(pre.mean, (c,))[:, None, None]) / np.broadcast_to(pre.std, (c,))[:, None, None]
        theirs = predict.load_image(str(tmp_path / name), pre.to_dict())
        assert theirs.shape == ours.shape and np.abs(theirs - ours).max() < 1e-5, name


# ------------------------------------------------------------------------------ one split in run


def test_run_makes_one_split_for_every_stage(tmp_path):
    from dsdeploy.pipeline.runner import run_recipe

    data = images(tmp_path / "imgs", n=20, size=(16, 16))
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'''
[model]
spec = "{HERE}:graynet"
input_shape = [1, 1, 16, 16]
[data]
spec = "{data}"
val_split = 0.3
limit = 10
[calibrate]
batch_size = 4
[finetune]
epochs = 1
batch_size = 8
[export]
enabled = false
''')
    res = run_recipe(recipe, tmp_path / "out")
    rec = {name: r.get("result") or {} for name, r in res.records.items()}
    splits = [rec["convert"]["calibration"]["split"], rec["finetune"]["split"], rec["evaluate"]["data_split"]]
    assert all(s == splits[0] for s in splits), splits
    assert splits[0]["val_split"] == 0.3 and splits[0]["limit"] == 10
    assert splits[0]["train"] == 10 and splits[0]["val"] == 10  # data.limit caps each split
    assert rec["convert"]["calibration"]["images"] <= splits[0]["train"]
    # the split itself: same arguments, same members, and no held-out image among the training ones
    s = load_data(str(data), resolve(None, (1, 1, 16, 16)), val_split=0.3, seed=0, limit=10)
    assert s.split["digest"] == splits[0]["digest"]
    assert not set(s.train.files or []) & set(s.val.files or [])
    report = (tmp_path / "out" / "report" / "report.md").read_text()
    assert f"digest {splits[0]['digest']}" in report


def eightnet() -> nn.Module:
    """A model whose input has 8 channels: no image can be made into its input."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def test_image_data_for_a_model_images_cannot_feed_is_one_line(tmp_path):
    """8 input channels: resolve refuses when data is given (with or without a known input shape);
    without data (e.g. a bundle of such a model) it still resolves."""
    with pytest.raises(DataError, match="takes 8-channel inputs"):
        resolve(None, (1, 8, 16, 16), data="digits")
    with pytest.raises(DataError, match="takes 8-channel inputs"):
        resolve(None, None, data=str(tmp_path), model=eightnet())
    assert resolve(None, (1, 8, 16, 16)).size == (16, 16)
    data = images(tmp_path / "imgs", "RGB", n=4)
    for args in (("evaluate", f"{HERE}:eightnet", "--data", data),
                 ("convert", f"{HERE}:eightnet", "--input-shape", "1,8,16,16", "--rank", "1",
                  "--calib-data", data, "-o", tmp_path / "e.dsd")):
        proc = invoke(*args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and "takes 8-channel inputs" in proc.stderr, proc.stderr
    assert not (tmp_path / "e.dsd").exists()


@pytest.mark.parametrize("kwargs, words", [
    ({"mean": (float("nan"),)}, "mean must be finite"),
    ({"mean": (float("inf"),)}, "mean must be finite"),
    ({"std": (float("inf"),)}, "std must be positive finite"),
    ({"std": (float("nan"),)}, "std must be positive finite"),
    ({"size": (100000, 100000)}, "at most 4096"),
    ({"size": (16, 16), "resize": 10**6}, "at most 4096"),
])
def test_preprocess_refuses_non_finite_stats_and_huge_sizes(kwargs, words):
    from dsdeploy.data.preprocessing import Preprocess
    from dsdeploy.errors import DataError
    args = {"size": (16, 16), "resize": None, "mean": (0.3,), "std": (0.32,), "channels": 1, **kwargs}
    with pytest.raises(DataError, match=words):
        Preprocess(**args)


def test_channels_override_that_the_model_input_shape_cannot_take_is_refused():
    from dsdeploy.data.preprocessing import resolve
    from dsdeploy.errors import DataError
    with pytest.raises(DataError, match="channels 3 do not fit"):
        resolve(None, (1, 1, 16, 16), {"channels": 3}, data="digits")


def test_images_too_small_for_the_model_fail_as_one_line():
    from dsdeploy.errors import InputShapeError
    from dsdeploy.recover.metrics import predict
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(3))
    loader = [(torch.zeros(2, 1, 3, 3), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(InputShapeError, match=r"shape 2,1,3,3 \(check size/channels\)"):
        predict(model, loader)
