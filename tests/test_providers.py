"""EP discovery, aliases, options/precision, sessions, and the fallback report (real ONNX Runtime)."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from dsdeploy.errors import ProviderError
from dsdeploy.runtime import providers as eps
from dsdeploy.runtime import sessions
from tests.clirun import invoke


def _available(name: str) -> bool:
    return any(p.name == name and p.available for p in eps.list_providers())


def _why_not(name: str) -> str:
    info = {p.name: p for p in eps.list_providers()}.get(name)
    return f"{name} not available here: {info.note if info and info.note else 'not in this onnxruntime build'}"


OPENVINO = pytest.mark.skipif(not _available("OpenVINOExecutionProvider"), reason=_why_not("OpenVINOExecutionProvider"))


@pytest.fixture(scope="module")
def conv_model(tmp_path_factory) -> str:
    """A Conv -> Relu -> GlobalAveragePool -> Flatten model with a dynamic batch axis."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 3, 3, 3], rng.standard_normal(216).astype(np.float32))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("prov") / "conv.onnx"
    onnx.save(model, path)
    return str(path)


def test_aliases_resolve_to_ep_names():
    assert eps.resolve_ep_name("cpu") == "CPUExecutionProvider"
    assert eps.resolve_ep_name("OpenVINO") == "OpenVINOExecutionProvider"
    assert eps.resolve_ep_name("trt") == eps.resolve_ep_name("tensorrt") == "TensorrtExecutionProvider"
    assert eps.resolve_ep_name("cudaexecutionprovider") == "CUDAExecutionProvider"
    assert eps.resolve_ep_name("dml") == "DmlExecutionProvider" and eps.resolve_ep_name("coreml").startswith("CoreML")
    with pytest.raises(ProviderError, match="unknown execution provider 'tpu'"):
        eps.resolve_ep_name("tpu")


def test_list_providers_has_cpu_and_plugin_entries():
    infos = {p.name: p for p in eps.list_providers()}
    cpu = infos["CPUExecutionProvider"]
    assert cpu.available and cpu.kind == "builtin" and cpu.alias == "cpu" and cpu.devices
    assert cpu.version == ort.__version__
    assert "OpenVINOExecutionProvider" in infos  # listed even when not installed or claiming no device
    ov = infos["OpenVINOExecutionProvider"]
    assert ov.kind == "plugin"
    assert ov.available == bool(ov.devices)
    if not ov.available:
        assert ov.note  # the reason is said


def test_plugin_registration_is_idempotent():
    first = eps.register_plugins()
    installed = {ep for ep, (module, _dist) in eps.PLUGINS.items() if importlib.util.find_spec(module)}
    # every installed plugin is registered or its failure recorded; nothing else is registered
    assert set(first) | set(eps._register_errors) == installed
    assert set(first) <= installed
    for ep, path in first.items():  # the library the installed package ships
        assert Path(path).is_file()
        assert Path(importlib.util.find_spec(eps.PLUGINS[ep][0]).origin).parent in Path(path).parents
    assert eps.register_plugins() == first  # a second call registers nothing and raises nothing


def test_a_plugin_that_fails_to_load_is_recorded_once_not_raised(tmp_path, monkeypatch):
    """Runs without any plugin installed: a real package whose library ONNX Runtime cannot load."""
    pkg = tmp_path / "dsdeploy_test_broken_ep"
    pkg.mkdir()
    (pkg / "not_a_library.so").write_bytes(b"not an ELF file")
    (pkg / "__init__.py").write_text("import os\ncalls = []\n\ndef get_library_path():\n    calls.append(1)\n"
                                     "    return os.path.join(os.path.dirname(__file__), 'not_a_library.so')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(eps, "PLUGINS", {"BrokenTestExecutionProvider": ("dsdeploy_test_broken_ep", "dsdeploy-broken")})
    monkeypatch.setattr(eps, "_registered", {})
    monkeypatch.setattr(eps, "_register_errors", {})
    assert eps.register_plugins() == {}
    assert list(eps._register_errors) == ["BrokenTestExecutionProvider"]
    assert eps._register_errors["BrokenTestExecutionProvider"].strip()
    mod = importlib.import_module("dsdeploy_test_broken_ep")
    assert mod.calls == [1]
    assert eps.register_plugins() == {} and mod.calls == [1]  # not retried


def test_unavailable_provider_error_names_available_ones():
    missing = next(n for n in ("CUDAExecutionProvider", "CoreMLExecutionProvider", "DmlExecutionProvider")
                   if not _available(n))
    with pytest.raises(ProviderError) as err:
        eps.check_available(missing)
    assert "available: " in str(err.value) and "cpu" in str(err.value)
    assert "\n" not in str(err.value)


def test_parse_ep_options():
    got = eps.parse_ep_options(["openvino:precision=bf16", "trt:trt_fp16_enable=1", "openvino:num_streams=2"])
    assert got == {"OpenVINOExecutionProvider": {"precision": "bf16", "num_streams": "2"},
                   "TensorrtExecutionProvider": {"trt_fp16_enable": "1"}}
    for bad in ("openvino", "openvino:precision", "openvino:=1"):
        with pytest.raises(ProviderError, match="EP:KEY=VALUE"):
            eps.parse_ep_options([bad])


def test_openvino_defaults_to_fp32_and_labels_other_precisions():
    cfg = eps.ep_config("OpenVINOExecutionProvider", {}, threads=2)
    assert cfg.precision == "fp32"
    assert json.loads(cfg.options["load_config"]) == {"CPU": {"INFERENCE_PRECISION_HINT": "f32",
                                                              "INFERENCE_NUM_THREADS": 2}}
    assert json.loads(eps.ep_config("OpenVINOExecutionProvider").options["load_config"]) == {
        "CPU": {"INFERENCE_PRECISION_HINT": "f32"}}
    bf16 = eps.ep_config("OpenVINOExecutionProvider", {"precision": "bf16"})
    assert bf16.precision == "bf16" and "bf16" in bf16.options["load_config"] and "precision" not in bf16.options
    default = eps.ep_config("OpenVINOExecutionProvider", {"precision": "default"})
    assert "load_config" not in default.options and "bf16" in default.precision
    custom = eps.ep_config("OpenVINOExecutionProvider", {"load_config": '{"CPU":{"INFERENCE_PRECISION_HINT":"f16"}}'})
    assert custom.precision == "fp16"
    with pytest.raises(ProviderError, match="not one of"):
        eps.ep_config("OpenVINOExecutionProvider", {"precision": "int3"})
    with pytest.raises(ProviderError, match="not both"):
        eps.ep_config("OpenVINOExecutionProvider", {"precision": "bf16", "load_config": "{}"})


def test_gpu_ep_precision_labels():
    assert eps.ep_config("TensorrtExecutionProvider", {"trt_fp16_enable": "1"}).precision.startswith("fp16")
    assert eps.ep_config("TensorrtExecutionProvider", {"trt_int8_enable": "True"}).precision.startswith("int8")
    assert eps.ep_config("TensorrtExecutionProvider").precision == "fp32"
    assert eps.ep_config("CUDAExecutionProvider", {"device_id": "0"}).options == {"device_id": "0"}


def test_cpu_session_profile_counts_nodes_per_provider(conv_model, tmp_path):
    cfg = eps.ep_config("CPUExecutionProvider")
    sess = sessions.create_session(conv_model, cfg, threads=1, profile_prefix=str(tmp_path / "p"))
    sess.run(None, {"x": np.ones((2, 3, 8, 8), np.float32)})
    nodes = eps.nodes_by_provider(sess.end_profiling())
    assert set(nodes) == {"CPUExecutionProvider"} and nodes["CPUExecutionProvider"] >= 2
    rep = eps.fallback_report("CPUExecutionProvider", sess.get_providers(), nodes)
    assert rep["status"] == "none" and rep["nodes_on_requested"] == rep["nodes_total"] == sum(nodes.values())


def test_fallback_report_full_and_partial():
    full = eps.fallback_report("CUDAExecutionProvider", ["CPUExecutionProvider"], {"CPUExecutionProvider": 5})
    assert full["status"] == "full" and full["nodes_on_requested"] == 0
    part = eps.fallback_report("OpenVINOExecutionProvider", ["OpenVINOExecutionProvider", "CPUExecutionProvider"],
                               {"OpenVINOExecutionProvider": 1, "CPUExecutionProvider": 2})
    assert part["status"] == "partial" and part["nodes_total"] == 3
    none = eps.fallback_report("OpenVINOExecutionProvider", ["OpenVINOExecutionProvider"],
                               {"OpenVINOExecutionProvider": 1})
    assert none["status"] == "none"
    no_profile = eps.fallback_report("CUDAExecutionProvider", ["CPUExecutionProvider"], {})
    assert no_profile["status"] == "full"


def test_creating_a_session_on_a_bad_file_is_one_line_provider_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ProviderError, match="could not create a session") as err:
        sessions.create_session(str(bad), eps.ep_config("CPUExecutionProvider"))
    assert "\n" not in str(err.value)


@OPENVINO
def test_openvino_fp32_session_matches_cpu(conv_model, tmp_path):
    x = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    ref = sessions.create_session(conv_model, eps.ep_config("CPUExecutionProvider")).run(None, x)[0]
    sess = sessions.create_session(conv_model, eps.ep_config("OpenVINOExecutionProvider", {}, 1),
                              profile_prefix=str(tmp_path / "ov"))
    out = sess.run(None, x)[0]
    nodes = eps.nodes_by_provider(sess.end_profiling())
    assert nodes.get("OpenVINOExecutionProvider", 0) >= 1
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not _available("CUDAExecutionProvider"), reason=_why_not("CUDAExecutionProvider"))
def test_cuda_session_runs(conv_model):
    sess = sessions.create_session(conv_model, eps.ep_config("CUDAExecutionProvider"))
    assert "CUDAExecutionProvider" in sess.get_providers()


@pytest.mark.skipif(not _available("TensorrtExecutionProvider"), reason=_why_not("TensorrtExecutionProvider"))
def test_tensorrt_fp16_session_runs(conv_model):
    cfg = eps.ep_config("TensorrtExecutionProvider", {"trt_fp16_enable": "1"})
    out = sessions.create_session(conv_model, cfg).run(None, {"x": np.ones((1, 3, 8, 8), np.float32)})[0]
    assert out.shape == (1, 8)


def test_cli_providers_json_and_table():
    proc = invoke("providers", "--json")
    assert proc.returncode == 0
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["CPUExecutionProvider"]["available"] is True
    table = invoke("providers")
    assert table.returncode == 0 and "CPUExecutionProvider" in table.stdout and "openvino" in table.stdout
