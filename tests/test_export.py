"""ONNX export: parity-gated, one self-contained file, provenance metadata, DS structure."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from dsdeploy.conversion.loading import load_model
from dsdeploy.conversion.opcount import profile_model
from dsdeploy.conversion.rewrite import convert
from dsdeploy.errors import ExportError
from dsdeploy.export.graph import (
    META_CONV_MACS,
    META_LABELS,
    META_PREPROCESSING,
    load_onnx,
    metadata,
    summarize,
)
from dsdeploy.export.onnx_export import export_model, export_onnx
from dsdeploy.runtime.sessions import cpu_session
from tests.clirun import dsdeploy, invoke, json_out
from tests.conftest import small_net

pytestmark = pytest.mark.usefixtures("users_exporter")  # about the exporter: "auto" as users get it
DIGITS_SHAPE = (1, 1, 16, 16)


@pytest.fixture(scope="module")
def digits():
    return load_model("sample:digits_cnn")


def _run(path, batch, shape):
    sess = cpu_session(path)
    x = np.random.default_rng(0).standard_normal((batch, *shape[1:])).astype(np.float32)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_sample_export_with_data_parity_metadata_and_one_file(digits, tmp_path):
    out = tmp_path / "digits.onnx"
    rep = export_model("sample:digits_cnn", out, data="digits")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.onnx"]  # no stray external data
    assert rep.exporter == "dynamo" and rep.opset == 18 and rep.simplified and rep.fallback is None  # the default
    labels = {p.inputs for p in rep.parity}
    assert {"export, random batch 1", "export, random batch 3", "export, data batch 16"} <= labels
    assert all(p.ok for p in rep.parity)
    meta = metadata(load_onnx(out))
    assert json.loads(meta[META_PREPROCESSING]) == digits.preprocessing
    assert json.loads(meta[META_LABELS]) == digits.labels
    assert meta["dsdeploy.exporter"] == "dynamo" and meta["dsdeploy.source"] == "sample:digits_cnn"
    prof = profile_model(digits.model, DIGITS_SHAPE)
    assert int(meta[META_CONV_MACS]) == prof.conv_macs == rep.conv_macs
    # dynamic batch: runs at two batch sizes
    assert _run(out, 1, DIGITS_SHAPE).shape == (1, 10) and _run(out, 5, DIGITS_SHAPE).shape == (5, 10)


def test_static_batch_fixes_axis_0(digits, tmp_path):
    out = tmp_path / "static.onnx"
    rep = export_onnx(digits.model, out, (2, 1, 16, 16), dynamic_batch=False, simplify=False)
    dims = load_onnx(out).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 1, 16, 16]
    assert [p.inputs for p in rep.parity] == ["export, random batch 2"] and not rep.simplified


def test_converted_artifact_export_records_plan_and_counts_before_after(digits, tmp_path):
    from dsdeploy.conversion.artifact import save_artifact, source_record

    res = convert(digits.model, input_shape=DIGITS_SHAPE, rank=1)
    art = tmp_path / "digits_ds.dsd"
    save_artifact(art, res.model, res.plan, source_record("sample:digits_cnn"),
                  {"input_shape": list(DIGITS_SHAPE), "preprocessing": digits.preprocessing, "labels": digits.labels})
    out = tmp_path / "ds.onnx"
    rep = invoke("export", art, "-o", out, "--json")
    data = json_out(rep)
    assert metadata(load_onnx(out))["dsdeploy.plan_digest"] == res.plan.digest()
    assert data["ds_problems"] == []
    n_conv = len(res.plan.converted)
    assert data["conv_kinds"]["depthwise"] >= n_conv
    assert data["op_counts"]["Conv"] == data["original"]["op_counts"]["Conv"] + n_conv
    assert data["conv_macs"] == res.after.conv_macs < data["original"]["conv_macs"] == res.before.conv_macs


@pytest.mark.parametrize("name,kw", [("resnet18", {}), ("mobilenet_v2", {"convert_stem": True})])
def test_torchvision_original_and_converted(name, kw, tmp_path):
    import torchvision

    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    shape = (1, 3, 64, 64)
    orig = export_onnx(model, tmp_path / "orig.onnx", shape, simplify=False)  # onnxsim: covered on digits
    res = convert(model, input_shape=shape, rank=1, **kw)
    conv = export_onnx(res.model, tmp_path / "conv.onnx", shape, simplify=False)
    for rep in (orig, conv):
        assert rep.parity and all(p.ok for p in rep.parity)
    assert conv.ds_problems == [] and "BatchNormalization" not in conv.op_counts
    assert conv.conv_kinds.get("depthwise", 0) >= orig.conv_kinds.get("depthwise", 0) + len(res.plan.converted)
    assert conv.conv_macs == res.after.conv_macs < orig.conv_macs == res.before.conv_macs


def test_rank2_branches_fold_batchnorm_after_the_sum(net, tmp_path):
    res = convert(net, input_shape=(1, 3, 16, 16), rank=2, include=r"conv1")
    rep = export_onnx(res.model, tmp_path / "r2.onnx", (1, 3, 16, 16), simplify=False)
    assert "BatchNormalization" not in rep.op_counts and rep.ds_problems == []
    assert any(p.inputs.startswith("BN folding") and p.ok for p in rep.parity)


def test_simplification_that_breaks_parity_is_discarded(digits, tmp_path, monkeypatch):
    import onnxsim

    def broken(model, *a, **k):
        bad = onnx.ModelProto()
        bad.CopyFrom(model)
        init = bad.graph.initializer[0]
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 1.0, init.name))
        return bad, True

    monkeypatch.setattr(onnxsim, "simplify", broken)
    out = tmp_path / "d.onnx"
    with pytest.warns(UserWarning, match="simplification broke parity"):
        rep = export_onnx(digits.model, out, DIGITS_SHAPE)
    assert not rep.simplified and all(p.ok for p in rep.parity)
    assert all(not p.inputs.startswith("simplification") for p in rep.parity)
    from dsdeploy.export.parity import check_parity

    assert all(r.ok for r in check_parity(digits.model, out, (4, 1, 16, 16)))


def test_dynamo_exporter_single_file_and_recorded(digits, tmp_path):
    out = tmp_path / "dyn.onnx"
    with pytest.warns(UserWarning, match="opset >= 18"):
        rep = export_onnx(digits.model, out, DIGITS_SHAPE, exporter="dynamo", opset=17, simplify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dyn.onnx"]
    assert rep.exporter == "dynamo" and rep.opset == 18 and all(p.ok for p in rep.parity)
    assert metadata(load_onnx(out))["dsdeploy.exporter"] == "dynamo"


def test_dsdeploy_exporter_pins_what_auto_means(digits, tmp_path, monkeypatch):
    """DSDEPLOY_EXPORTER (what the rest of the suite sets to torchscript): "auto" takes that exporter,
    the reason recorded; a named exporter wins over it; a bad value is one line naming the variable."""
    from dsdeploy.export.exporters import META_EXPORTER_FALLBACK

    assert "DSDEPLOY_EXPORTER" not in os.environ  # this module exports as users do
    monkeypatch.setenv("DSDEPLOY_EXPORTER", "torchscript")
    rep = export_onnx(digits.model, tmp_path / "t.onnx", DIGITS_SHAPE, simplify=False)
    meta = metadata(load_onnx(tmp_path / "t.onnx"))
    assert rep.exporter == "torchscript" and rep.fallback == "DSDEPLOY_EXPORTER is torchscript"
    assert meta["dsdeploy.exporter"] == "torchscript" and meta[META_EXPORTER_FALLBACK] == rep.fallback
    rep = export_onnx(digits.model, tmp_path / "d.onnx", DIGITS_SHAPE, simplify=False, exporter="dynamo")
    assert rep.exporter == "dynamo" and rep.fallback is None
    monkeypatch.setenv("DSDEPLOY_EXPORTER", "dynamo")  # dynamo only: no TorchScript fallback
    with pytest.raises(ExportError, match=r"torch.onnx.export \(dynamo\) failed for SmallNet"):
        export_onnx(small_net().eval(), tmp_path / "s.onnx", (1, 3, 16, 16), simplify=False)
    monkeypatch.setenv("DSDEPLOY_EXPORTER", "jit")
    with pytest.raises(ExportError, match="^DSDEPLOY_EXPORTER must be one of auto, dynamo, torchscript, got 'jit'$"):
        export_onnx(digits.model, tmp_path / "j.onnx", DIGITS_SHAPE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx", "t.onnx"]


def test_small_net_with_every_conv_kind(tmp_path):
    rep = export_onnx(small_net().eval(), tmp_path / "s.onnx", (1, 3, 16, 16))
    assert rep.parity and all(p.ok for p in rep.parity)
    assert summarize(load_onnx(tmp_path / "s.onnx")).kinds()["depthwise"] == 1


def test_detection_model_fails_with_a_specific_error(tmp_path):
    import torchvision

    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    with pytest.raises(ExportError, match="detection model") as err:
        export_onnx(model, tmp_path / "det.onnx", (1, 3, 320, 320))
    assert "\n" not in str(err.value) and not (tmp_path / "det.onnx").exists()


def test_corrupt_and_missing_onnx_give_one_line_errors(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not an onnx model at all")
    for path in (bad, tmp_path / "missing.onnx"):
        with pytest.raises(ExportError) as err:
            load_onnx(path)
        assert "\n" not in str(err.value)
    proc = dsdeploy("deploy", bad, "-o", tmp_path / "bundle")
    assert proc.returncode != 0 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    assert not (tmp_path / "bundle").exists()


def test_bad_exporter_and_shape(digits, tmp_path):
    with pytest.raises(ExportError, match="exporter must be one of auto, dynamo, torchscript"):
        export_onnx(digits.model, tmp_path / "x.onnx", DIGITS_SHAPE, exporter="tflite")
    proc = invoke("export", "sample:digits_cnn", "-o", tmp_path / "x.onnx", "--input-shape", "1,3,16,16")
    assert proc.returncode != 0 and "input shape" in proc.stderr and not (tmp_path / "x.onnx").exists()
