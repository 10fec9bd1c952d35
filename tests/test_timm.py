"""timm models as sources (``timm:NAME``), ``.safetensors`` weights, and the ONNX exporter choice.

timm is an optional dependency that the test install (``.[test,openvino,timm]``) includes. The
timm model is ``test_resnet``: a tiny registered ResNet whose data config (160x160, mean/std
0.5, bilinear, crop_pct 0.95) differs from the ImageNet defaults, so taking it from timm shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import dsdeploy
from dsdeploy.conversion.loading import load_model
from dsdeploy.data.preprocessing import resolve
from dsdeploy.errors import SourceError, WeightsError
from dsdeploy.export.exporters import META_EXPORTER_FALLBACK
from dsdeploy.export.graph import META_PREPROCESSING, load_onnx, metadata
from dsdeploy.export.onnx_export import export_onnx
from dsdeploy.models.infer import infer_source
from tests.clirun import ROOT, invoke

pytestmark = pytest.mark.usefixtures("users_exporter")  # about the exporter: "auto" as users get it
SPEC = "timm:test_resnet"
SHAPE = (1, 3, 64, 64)  # smaller than its own 160x160: fast, and the shape still wins over the recorded size


@pytest.fixture(scope="module")
def converted():
    """``timm:test_resnet`` (7 classes) converted at rank 1 at SHAPE, with the LoadedModel it came from."""
    torch.manual_seed(0)
    loaded = load_model(SPEC, model_kwargs={"num_classes": 7})
    return loaded, dsdeploy.convert(loaded, input_shape=SHAPE, rank=1)


def test_timm_spec_takes_timms_data_config_and_rebuilds_from_an_artifact(converted, tmp_path):
    loaded, cm = converted
    assert loaded.input_shape == (1, 3, 160, 160)
    pre = resolve(loaded.preprocessing, loaded.input_shape)
    assert pre.size == (160, 160) and pre.resize == 168  # floor(160 / 0.95), timm's eval resize
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)
    assert pre.source == "recorded with the model"
    assert loaded.preprocessing["interpolation"] == "bilinear"
    assert loaded.model.get_classifier().out_features == 7  # model_kwargs pass through to create_model
    assert infer_source(loaded.model) == (SPEC, {"num_classes": 7})  # a bare timm module names its source

    dsdeploy.save(cm, tmp_path / "m.dsd")
    back = load_model(str(tmp_path / "m.dsd"))  # a timm: source needs no trust_code, like torchvision:
    assert back.artifact.source["spec"] == SPEC and back.artifact.source["model_kwargs"] == {"num_classes": 7}
    x = torch.randn(SHAPE)
    with torch.no_grad():
        assert torch.allclose(back.model(x), cm.model(x), atol=1e-5)


def test_timm_model_converts_and_exports_with_dynamo_and_parity(converted, tmp_path):
    _, cm = converted
    assert cm.plan.converted
    rep = dsdeploy.export_onnx(cm, tmp_path / "m.onnx", simplify=False)
    assert rep.exporter == "dynamo" and rep.fallback is None and rep.opset >= 18
    assert rep.parity and all(p.ok for p in rep.parity) and rep.ds_problems == []
    meta = metadata(load_onnx(tmp_path / "m.onnx"))
    assert meta["dsdeploy.exporter"] == "dynamo" and META_EXPORTER_FALLBACK not in meta
    assert meta["dsdeploy.source"].startswith(SPEC)
    assert json.loads(meta[META_PREPROCESSING])["mean"] == [0.5, 0.5, 0.5]  # timm's, through to the bundle


def test_safetensors_weights_load_and_damaged_ones_are_refused(tmp_path):
    timm = pytest.importorskip("timm")  # installed by the test extra; the import is for making weights
    torch.manual_seed(1)
    trained = timm.create_model("test_resnet", pretrained=False)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p))
    state = {f"module.{k}": v.contiguous() for k, v in trained.state_dict().items()}  # DDP-style prefix
    save_file(state, tmp_path / "w.safetensors")
    (tmp_path / "w.bin").write_bytes((tmp_path / "w.safetensors").read_bytes())  # recognised by its header

    for name in ("w.safetensors", "w.bin"):
        loaded = load_model(SPEC, weights=str(tmp_path / name))
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert torch.equal(loaded.model(x), trained.eval()(x))

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tmp_path / "w.safetensors").read_bytes()[:-100])
    with pytest.raises(WeightsError, match="corrupt, truncated or not a safetensors file") as err:
        load_model(SPEC, weights=str(cut))
    assert "\n" not in str(err.value)
    save_file({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match="does not fit the model"):
        load_model(SPEC, weights=str(tmp_path / "other.safetensors"))


def test_timm_spec_errors_are_one_line():
    with pytest.raises(SourceError, match=r"unknown timm model 'test_resnett'.*did you mean test_resnet"):
        load_model("timm:test_resnett")
    with pytest.raises(SourceError, match="may not set 'pretrained'"):
        load_model(SPEC, model_kwargs={"pretrained": True})
    with pytest.raises(SourceError, match="cannot be built with"):
        load_model(SPEC, model_kwargs={"no_such_argument": 1})


def test_without_timm_a_timm_spec_is_refused_in_one_line():
    code = ("import sys, runpy; sys.modules['timm'] = None; "
            "sys.argv = ['dsdeploy', 'inspect', 'timm:resnet18']; runpy.run_module('dsdeploy', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode not in (0, 70), proc.stderr
    assert proc.stderr.strip() == "error: timm:resnet18 needs timm: pip install -e '.[timm]'"


def test_a_model_dynamo_cannot_export_falls_back_to_torchscript_with_the_reason(tmp_path):
    # SmallNet branches on a value of its input (`if x.mean() > 1e6`): torch.export cannot trace that
    out = tmp_path / "s.onnx"
    proc = invoke("export", "tests.conftest:small_net", "-o", out, "--input-shape", "1,3,16,16", "--no-simplify")
    assert proc.returncode == 0, proc.stderr
    assert "(torchscript exporter, opset 18" in proc.stdout
    warned = [ln for ln in proc.stderr.splitlines() if "dynamo exporter did not give a valid export" in ln]
    assert len(warned) == 1 and "data-dependent" in warned[0], proc.stderr
    meta = metadata(load_onnx(out))
    assert meta["dsdeploy.exporter"] == "torchscript" and "data-dependent" in meta[META_EXPORTER_FALLBACK]


def test_exporter_torchscript_forces_it_and_a_low_opset_takes_torchscript(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    rep = export_onnx(model, tmp_path / "t.onnx", (1, 3, 8, 8), exporter="torchscript", simplify=False)
    meta = metadata(load_onnx(tmp_path / "t.onnx"))
    assert rep.exporter == "torchscript" and rep.fallback is None and META_EXPORTER_FALLBACK not in meta
    assert meta["dsdeploy.exporter"] == "torchscript" and rep.opset == 18
    rep = export_onnx(model, tmp_path / "o.onnx", (1, 3, 8, 8), opset=17, simplify=False)  # auto, opset < 18
    assert rep.exporter == "torchscript" and rep.opset == 17 and "opset 17" in rep.fallback
    assert not rep.warnings  # the user asked for that opset: recorded, not warned
    assert metadata(load_onnx(tmp_path / "o.onnx"))[META_EXPORTER_FALLBACK] == rep.fallback
