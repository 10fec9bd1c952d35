"""Real third-party checkpoints load as torch loads them: in the library, through the CLI, through a recipe.

The checkpoints are ``shared/data/pretrained/*.th`` beside the clone (CI puts ``shared/`` next to
the repository; ``DSDEPLOY_SHARED`` names another place): two CIFAR-10 ResNets as their author
published them (legacy torch format, ``{"state_dict": ..., "best_prec1": ...}``, every key
``module.``-prefixed, no ``num_batches_tracked``). The architecture is user code,
``examples/cifar_resnet.py``, exactly as a user brings it. The data here is made by the tests
(random 32x32 PNGs): these tests are about loading and preprocessing, not accuracy, which
``benchmarks/pretrained_cifar.py`` measures on CIFAR-10.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.clirun import ROOT, dsdeploy, dsdeploy_chain

SHARED = Path(os.environ.get("DSDEPLOY_SHARED") or ROOT.parent / "shared")
PRETRAINED = SHARED / "data" / "pretrained"
EXAMPLES = ROOT / "examples"
RECIPE = ROOT / "converters" / "cifar10_resnet_pretrained.toml"
CHECKPOINTS = {"resnet32-d509ac18.th": 32, "resnet44-014dd654.th": 44}  # file -> depth (README's table)
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
USER_CODE = {"PYTHONPATH": str(EXAMPLES) + os.pathsep + str(ROOT), "OMP_NUM_THREADS": "1"}


def checkpoint(name: str) -> Path:
    path = PRETRAINED / name
    assert path.is_file(), (f"{path} is missing: the suite expects the shared folder beside the clone "
                            f"(or DSDEPLOY_SHARED=/path/to/shared)")
    return path


def torch_reference(name: str) -> torch.nn.Module:
    """The checkpoint loaded the plain-torch way its README describes (strict load_state_dict)."""
    arch = importlib.import_module("cifar_resnet")
    ck = torch.load(checkpoint(name), weights_only=True, map_location="cpu")
    model = getattr(arch, f"resnet{CHECKPOINTS[name]}")()
    model.load_state_dict({k.removeprefix("module."): v for k, v in ck["state_dict"].items()})
    return model.eval()


@pytest.fixture
def user_code(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A CIFAR-shaped ImageFolder of random 32x32 RGB PNGs: train/ 10 classes x 3, test/ 10 classes x 1."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cifar_like")
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 1)):
        for c in range(10):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    root / split / f"class{c}" / f"{i}.png")
    return root


def within_budget(layers: list[dict], budget: float) -> bool:
    """The MAC budget holds over the converted convs (the dense stem is outside it)."""
    converted = [layer for layer in layers if layer["convert"]]
    assert converted
    return sum(layer["macs_after"] for layer in converted) <= budget * 1.001 * sum(layer["macs"] for layer in converted)


def test_every_checkpoint_is_covered():
    found = sorted(p.name for p in PRETRAINED.glob("*.th"))
    assert found == sorted(CHECKPOINTS), f"{PRETRAINED}: each checkpoint needs an entry in CHECKPOINTS"


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_library_loads_it_as_torch_does(name, user_code):
    from dsdeploy.conversion.loading import load_model

    ref = torch_reference(name)
    loaded = load_model(f"cifar_resnet:resnet{CHECKPOINTS[name]}", weights=str(checkpoint(name)))
    assert not loaded.model.training
    got, want = loaded.model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), ref(x))  # same process, same modules, same weights


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_cli_inspect_loads_it(name):
    depth = CHECKPOINTS[name]
    proc = dsdeploy("inspect", f"cifar_resnet:resnet{depth}", "--weights", checkpoint(name),
                    "--input-shape", "1,3,32,32", "--json", env=USER_CODE)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    reasons = {layer["name"]: layer["reason"] for layer in out["layers"]}
    assert len(reasons) == out["summary"]["convs"] == depth - 1  # the stem + 2 per block; option A has no 1x1
    assert reasons.pop("conv1").startswith("stem")
    assert set(reasons.values()) == {"converted"} and out["summary"]["converted"] == depth - 2


def test_cli_convert_with_calibration_keeps_the_checkpoint_and_its_preprocessing(images, tmp_path):
    name = "resnet32-d509ac18.th"
    out = tmp_path / "r32.dsd"
    proc = dsdeploy("convert", "cifar_resnet:resnet32", "--weights", checkpoint(name), "--input-shape", "1,3,32,32",
                    "--mac-budget", "0.5", "--calib-data", images, "--calib-batches", "1", "--calib-rounds", "1", "-o", out,
                    "--json",
                    env=USER_CODE, timeout=300)  # seconds at 32x32; minutes only if the images were read at 224
    assert proc.returncode == 0, proc.stderr
    assert within_budget(json.loads(proc.stdout)["layers"], 0.5)
    payload = torch.load(out, weights_only=True)
    # what conversion and calibration leave alone is the checkpoint's, bit for bit
    ck = {k.removeprefix("module."): v for k, v in torch.load(checkpoint(name), weights_only=True,
                                                             map_location="cpu")["state_dict"].items()}
    sd = payload["state_dict"]
    for key in ("conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "linear.weight",
                "linear.bias"):
        assert torch.equal(sd[key], ck[key]), key
    history = payload["history"]
    assert [h["stage"] for h in history] == ["convert", "calibrate"] and history[1]["images"] == 30  # all of train/
    # the images were read at the model's 32x32, not resized/cropped to an ImageNet size
    pre = payload["metadata"]["preprocessing"]
    assert pre is not None, "the artifact must record the preprocessing calibration used"
    assert pre["size"] == [32, 32] and pre["resize"] is None and pre["channels"] == 3
    assert pre["mean"] == pytest.approx(MEAN) and pre["std"] == pytest.approx(STD)


def test_recipe_runs_on_the_real_checkpoint(images, tmp_path):
    out = tmp_path / "run"
    proc = dsdeploy("run", RECIPE, "--weights", checkpoint("resnet32-d509ac18.th"), "--data", images, "--out", out,
                    "--json", "--set", 'finetune.mode="none"', "--set", "calibrate.batches=1",
                    "--set", "calibrate.rounds=1",  # the default 3 alternating rounds: the same code, 3x the solves
                    "--set", 'calibrate.block_reconstruct="2s"',  # the recipe's 60 s, shortened for the suite
                    "--set", 'bench.providers=["cpu"]', "--set", "bench.batches=[1]", "--set", "bench.iters=3",
                    "--set", "bench.warmup=0", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["conv_macs"][1] < summary["conv_macs"][0]
    assert within_budget(json.loads((out / "convert" / "stage.json").read_text())["result"]["layers"], 0.5)
    inspect = json.loads((out / "inspect" / "stage.json").read_text())["result"]
    assert inspect["input_shape"] == [1, 3, 32, 32]
    pre = inspect["preprocess"]
    assert pre["size"] == [32, 32] and pre["resize"] is None and pre["channels"] == 3
    assert pre["mean"] == pytest.approx(MEAN) and pre["std"] == pytest.approx(STD)
    assert (out / "export" / "model.onnx").is_file()


def _printed_preprocessing(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("preprocessing: ")]


def test_cli_evaluate_and_calibrate_it_with_the_right_preprocessing_printed(images, tmp_path):
    """evaluate the checkpoint (options say its 32x32 preprocessing), convert it, calibrate the
    artifact, evaluate that: each command prints the resolved preprocessing once, and it is the
    checkpoint's (3x32x32, no resize, ImageNet mean/std), not an ImageNet 224 crop."""
    ck = checkpoint("resnet32-d509ac18.th")
    want = "preprocessing: 3x32x32, resize to 32x32, mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]"
    opts = ["--size", "32", "--resize", "none", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]
    dsd, cal = tmp_path / "r32.dsd", tmp_path / "r32-cal.dsd"
    evaluate, convert, *rest = dsdeploy_chain(  # one real process, each command's output its own (suite time)
        ("evaluate", "cifar_resnet:resnet32", "--weights", ck, "--data", images, *opts, "--json"),
        ("convert", "cifar_resnet:resnet32", "--weights", ck, "--input-shape", "1,3,32,32", "--rank", "2", "-o", dsd),
        ("calibrate", dsd, "--data", images, "--max-batches", "1", "--rounds", "1", "-o", cal, *opts, "--trust-code"),
        ("evaluate", cal, "--data", images, "--trust-code"),  # the .dsd records the user's factory
        env=USER_CODE, timeout=600)
    assert evaluate.returncode == 0, evaluate.stderr
    assert [line.startswith(want) for line in _printed_preprocessing(evaluate.stderr)] == [True], evaluate.stderr
    assert json.loads(evaluate.stdout)["images"] == 10  # test/ holds the evaluation images
    assert convert.returncode == 0, convert.stderr
    assert len(rest) == 2
    for proc in rest:
        assert proc.returncode == 0, (proc.args, proc.stderr)
        assert [line.startswith(want) for line in _printed_preprocessing(proc.stderr)] == [True], (proc.args, proc.stderr)
    assert [h["stage"] for h in torch.load(cal, weights_only=True)["history"]] == ["convert", "calibrate"]
