"""The public Python API (``import dsdeploy; dsdeploy.convert(...)``): real models, real files, real numbers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import dsdeploy
from dsdeploy.conversion.artifact import read_payload
from dsdeploy.errors import ArtifactError, DsdeployError, PlanError, SourceError
from tests.conftest import SmallNet, small_net

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 3, 16, 16)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_import_dsdeploy_does_not_import_torch():
    code = "import sys, dsdeploy; assert 'torch' not in sys.modules; print(callable(dsdeploy.convert))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


def test_dsdeploy_convert_is_the_function_whatever_was_imported_first():
    import dsdeploy
    import dsdeploy.conversion.plan  # noqa: F401  (the stage package is imported: the name is not taken)

    assert dsdeploy.convert.__module__ == "dsdeploy.api" and dsdeploy.convert.__name__ == "convert"


def test_convert_full_rank_is_exact_and_leaves_the_input_alone(net):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    m = dsdeploy.convert(net, input_shape=SHAPE, rank=10 ** 6, require_gain=False, convert_stem=True)
    assert isinstance(m, dsdeploy.ConvertedModel) and m.plan.converted
    assert all(isinstance(m.model.get_submodule(d.name), nn.Module) for d in m.plan.converted)
    assert m.before.conv_macs > 0 and m.after.conv_macs > 0
    x = torch.randn(4, *SHAPE[1:])
    with torch.no_grad():
        assert rel_err(m(x), net(x)) < 1e-4
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(type(mod).__name__ == "DSConv" for mod in net.modules())


def test_convert_takes_example_inputs_and_a_low_rank_is_cheaper(net):
    m = dsdeploy.convert(net, example_inputs=torch.zeros(2, 3, 16, 16), rank=1)
    assert m.input_shape == (2, 3, 16, 16)
    assert m.mac_ratio < 1


def test_options_are_the_config_fields_and_errors_name_them(net):
    with pytest.raises(PlanError, match="rank"):
        dsdeploy.convert(net, input_shape=SHAPE, rank=0)
    with pytest.raises(DsdeployError, match="'ranks'"):
        dsdeploy.convert(net, input_shape=SHAPE, ranks=2)
    m = dsdeploy.convert(net, input_shape=SHAPE, rank=1)
    with pytest.raises(DsdeployError, match="lr"):
        dsdeploy.finetune(m, (torch.randn(8, 3, 16, 16), torch.zeros(8)), lr=-1.0)
    with pytest.raises(DsdeployError, match="ridge"):
        dsdeploy.calibrate(m, torch.randn(8, 3, 16, 16), ridge=-1.0)
    with pytest.raises(DsdeployError, match="ConvertedModel"):
        dsdeploy.calibrate(net, torch.randn(8, 3, 16, 16))


def test_calibrate_on_in_memory_inputs_reduces_the_output_error(net):
    m = dsdeploy.convert(net, input_shape=SHAPE, rank=1)
    held_out = torch.randn(32, *SHAPE[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = net(held_out)
        err_before = rel_err(m(held_out), want)
        report = dsdeploy.calibrate(m, torch.randn(256, *SHAPE[1:], generator=torch.Generator().manual_seed(2)),
                                    batch_size=64)
        err_after = rel_err(m(held_out), want)
    assert report.layers and all(layer.error_after <= layer.error_before for layer in report.layers)
    assert err_after < err_before
    assert m.history[-1]["stage"] == "calibrate"


def test_finetune_in_memory_without_an_output_path(net, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = dsdeploy.convert(net, input_shape=SHAPE, rank=1)
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(64, *SHAPE[1:], generator=g), torch.randn(32, *SHAPE[1:], generator=g)
    with torch.no_grad():
        y, yv = net(x).argmax(1), net(xv).argmax(1)
    start = {k: v.clone() for k, v in m.model.state_dict().items()}
    result = dsdeploy.finetune(m, (x, y, xv, yv), epochs=1, batch_size=16, progress=False)
    assert result.stopped in ("completed", "early-stop") and result.best_accuracy is not None
    changed = any(not torch.equal(start[k], v) for k, v in m.model.state_dict().items())
    assert changed == (not result.kept_input)  # trained weights, or the input unchanged when no epoch beat it
    assert list(tmp_path.iterdir()) == []  # no output path: nothing written
    assert m.history[-1]["stage"] == "finetune"

    out = tmp_path / "ft.dsd"
    dsdeploy.finetune(m, (x, y), out=out, epochs=1, batch_size=16, progress=False)
    loaded = dsdeploy.load(out, factory=SmallNet)
    with torch.no_grad():
        assert torch.allclose(loaded(xv), m(xv), atol=1e-6)


def test_save_load_torchvision_module_infers_its_spec(tmp_path):
    model = torchvision.models.resnet18(num_classes=7).eval()
    m = dsdeploy.convert(model, input_shape=(1, 3, 32, 32), rank=2)
    path = dsdeploy.save(m, tmp_path / "r.dsd")
    source = read_payload(path)["source"]
    assert source["spec"] == "torchvision:resnet18" and source["model_kwargs"] == {"num_classes": 7}
    assert source["weights"] and Path(source["weights"]).is_file()  # the original, the later teacher
    loaded = dsdeploy.load(path)
    assert type(loaded) is type(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), m(x), rtol=1e-5, atol=1e-6)


def test_save_records_module_class_which_loads_only_when_trusted(net, tmp_path):
    m = dsdeploy.convert(net, input_shape=SHAPE, rank=1)
    path = dsdeploy.save(m, tmp_path / "s.dsd")
    assert read_payload(path)["source"]["spec"] == f"{SmallNet.__module__}:SmallNet"
    with pytest.raises(ArtifactError, match="trust"):
        dsdeploy.load(path)
    x = torch.randn(2, *SHAPE[1:])
    with torch.no_grad():
        for loaded in (dsdeploy.load(path, trust_code=True), dsdeploy.load(path, factory=SmallNet)):
            assert torch.allclose(loaded(x), m(x), atol=1e-6)


def test_save_names_the_way_out_when_the_source_cannot_be_inferred(tmp_path):
    class Local(SmallNet):
        pass

    model = Local().eval()
    m = dsdeploy.convert(model, input_shape=SHAPE, rank=1)
    with pytest.raises(SourceError, match="source="):
        dsdeploy.save(m, tmp_path / "l.dsd")
    assert not (tmp_path / "l.dsd").exists()
    with pytest.raises(ArtifactError, match=".dsd"):
        dsdeploy.save(m, tmp_path / "l.pt")
    path = dsdeploy.save(m, tmp_path / "l.dsd", source="tests.conftest:small_net")
    loaded = dsdeploy.load(path, factory=small_net)
    x = torch.randn(2, *SHAPE[1:])
    with torch.no_grad():
        assert torch.allclose(loaded(x), m(x), atol=1e-6)


def test_save_a_plain_module(tmp_path):
    model = torchvision.models.squeezenet1_1(num_classes=3).eval()
    path = dsdeploy.save(model, tmp_path / "plain.dsd")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(dsdeploy.load(path)(x), model(x), atol=1e-6)


def test_export_and_benchmark_the_converted_model(net, tmp_path):
    m = dsdeploy.convert(net, input_shape=SHAPE, rank=2)
    report = dsdeploy.export_onnx(m, tmp_path / "m.onnx", simplify=False)
    assert Path(report.path).is_file() and report.input_shape == list(SHAPE)
    assert report.conv_kinds  # the DS structure is in the graph
    bench = dsdeploy.benchmark(report.path, iters=3, warmup=1)
    assert [r.status for r in bench.results] == ["ok"]
    with pytest.raises(DsdeployError, match="input_shape"):
        dsdeploy.export_onnx(net, tmp_path / "n.onnx")


def test_evaluate_converted_against_its_original():
    m = dsdeploy.convert("sample:digits_cnn", rank=10 ** 6, require_gain=False)
    scores = dsdeploy.evaluate(m, "digits", compare="sample:digits_cnn", limit=200)
    names = [r["model"] for r in scores["models"]]
    assert names[0] != names[1]
    assert scores["agreement"] > 0.95  # full rank: the same predictions up to rounding


def test_the_readme_notebook_section_runs(tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"## Python API \(notebook\).*?```python\n(.*?)```", readme, re.S)
    assert code, "README has no Python API (notebook) section with a python block"
    proc = subprocess.run([sys.executable, "-c", code.group(1)], capture_output=True, text=True, cwd=tmp_path,
                          env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "digits_ds.dsd").is_file() and (tmp_path / "digits_ds.onnx").is_file()
