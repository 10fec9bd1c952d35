"""The whole bench path for real: sessions, timing protocol, fallback report, parity, outputs, CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from dsdeploy.errors import InputShapeError, ProviderError
from dsdeploy.runtime import providers as eps
from dsdeploy.runtime.bench import BenchConfig, bench
from dsdeploy.runtime.bench_report import render_markdown, render_text, write_outputs
from dsdeploy.runtime.inputs import META_CONV_MACS, conv_macs_from_graph, model_info
from tests.clirun import invoke

OV_OK = any(p.name == "OpenVINOExecutionProvider" and p.available for p in eps.list_providers())
OV_WHY = next((p.note or "not installed" for p in eps.list_providers() if p.name == "OpenVINOExecutionProvider"),
              "OpenVINO plugin not installed")
OPENVINO = pytest.mark.skipif(not OV_OK, reason=f"OpenVINO EP not available here: {OV_WHY}")


class Tiny(nn.Module):
    def __init__(self, cin: int = 3, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def export(path, cin=3, width=8, size=16, dynamic=True, seed=0, metadata=None) -> str:
    torch.manual_seed(seed)
    model = Tiny(cin, width).eval()
    torch.onnx.export(model, torch.randn(1, cin, size, size), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}} if dynamic else None)
    if metadata:
        m = onnx.load(str(path))
        for k, v in metadata.items():
            m.metadata_props.add(key=k, value=v)
        onnx.save(m, str(path))
    return str(path)


def tiny_macs(cin=3, width=8, size=16) -> int:
    return size * size * width * cin * 9 + (size // 2) ** 2 * 2 * width * width * 9


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    return {"base": export(d / "base.onnx"), "small": export(d / "small.onnx", width=4, seed=1),
            "digits": export(d / "digits.onnx", cin=1), "fixed": export(d / "fixed.onnx", dynamic=False),
            "meta": export(d / "meta.onnx", metadata={META_CONV_MACS: "1000"})}


@pytest.fixture(scope="module")
def cpu_report(models):
    cfg = BenchConfig(providers=["cpu"], batches=[1, 3], warmup=1, iters=7, threads=1)
    return bench([models["base"], models["small"]], cfg)


def test_conv_macs_counted_from_graph_and_read_from_metadata(models):
    assert conv_macs_from_graph(onnx.load(models["base"])) == tiny_macs()
    info = model_info(models["base"])
    assert info.conv_macs == tiny_macs() and "counted" in info.conv_macs_source
    assert info.inputs == [{"name": "x", "shape": ["N", 3, 16, 16]}]
    meta = model_info(models["meta"])
    assert meta.conv_macs == 1000 and META_CONV_MACS in meta.conv_macs_source


def test_cpu_report_schema_and_statistics(cpu_report):
    d = json.loads(json.dumps(cpu_report.to_dict(), default=str))
    assert d["schema"] == "dsdeploy.bench/1"
    assert {"models", "results", "environment", "config", "providers", "comparisons", "created"} <= set(d)
    assert {"model", "flags", "summary"} <= set(d["environment"]["cpu"])
    assert set(d["environment"]["cpu"]["flags"]) >= {"avx2", "avx512f", "avx512_vnni", "amx_tile"}
    assert d["environment"]["packages"]["onnxruntime"]
    assert d["config"]["threads"] == 1 and d["config"]["resolved_providers"][0]["precision"] == "fp32"
    assert d["config"]["protocol"].startswith("sequential (one timed session alive at a time")  # stated
    assert len(d["results"]) == 4  # 2 models x 1 EP x 2 batches
    for r in cpu_report.results:
        assert r.status == "ok" and r.ep == "CPUExecutionProvider" and r.precision == "fp32" and r.threads == 1
        s = r.stats
        assert len(r.samples_ms) == s.n == 7 and not s.p99_reliable
        assert s.min_ms <= s.p50_ms <= s.p90_ms <= s.p99_ms <= s.max_ms and s.std_ms >= 0
        assert s.mean_ms == pytest.approx(np.mean(r.samples_ms))
        assert r.throughput_items_s == pytest.approx(r.batch * 1000 / s.mean_ms)
        assert r.session_create_ms > 0 and r.first_inference_ms > 0
        assert r.memory["peak_rss_mb"] >= r.memory["baseline_rss_mb"] > 0 and r.memory["method"]
        assert r.fallback["status"] == "none" and r.fallback["nodes_total"] >= 4
        assert r.fallback["nodes_by_provider"] == {"CPUExecutionProvider": r.fallback["nodes_total"]}
        assert r.parity["max_abs_diff"] == 0 and r.parity["top1_agreement"] == 1 and r.parity["inputs"] == "random"


def test_side_by_side_speedup_and_mac_ratio(cpu_report):
    comps = cpu_report.comparisons
    assert [(c["model"], c["batch"]) for c in comps] == [("small", 1), ("small", 3)]
    for c in comps:
        assert c["baseline"] == "base"
        assert c["conv_mac_ratio"] == pytest.approx(tiny_macs(width=4) / tiny_macs())
        assert c["speedup"] == pytest.approx(c["baseline_p50_ms"] / c["model_p50_ms"])
        assert c["fraction_of_limit"] == pytest.approx(c["speedup"] * c["conv_mac_ratio"])


def test_outputs_written_and_readable(cpu_report, tmp_path):
    paths = write_outputs(cpu_report, json_path=str(tmp_path / "r.json"), csv_path=str(tmp_path / "r.csv"),
                          markdown_path=str(tmp_path / "r.md"), plot_path=str(tmp_path / "r.png"))
    assert len(paths) == 4 and not list(tmp_path.glob(".*tmp"))
    data = json.loads((tmp_path / "r.json").read_text())
    assert len(data["results"][0]["samples_ms"]) == 7
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert len(rows) == 4 and rows[0]["fallback"] == "none" and float(rows[0]["p50_ms"]) > 0
    md = (tmp_path / "r.md").read_text()
    assert "| model | EP |" in md and "Side by side" in md and "p99 marked *" in md
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = render_text(cpu_report)
    assert "speedup" in text and "base" in text and render_markdown(cpu_report).startswith("# ")


def test_duration_mode_and_real_data_parity(models):
    cfg = BenchConfig(providers=["cpu"], batches=[4], warmup=0, iters=None, duration=0.05, data="digits",
                      parity_items=12, threads=1)
    rep = bench([models["digits"]], cfg)
    r = rep.results[0]
    assert r.stats.n >= 1 and r.parity["inputs"] == "data" and r.parity["top1_items"] == 12
    assert r.parity["top1_agreement"] == 1.0


def test_fixed_batch_model_skips_other_batches(models):
    rep = bench([models["fixed"]], BenchConfig(batches=[1, 2], warmup=0, iters=2))
    assert [r.status for r in rep.results] == ["ok", "skipped"]
    assert "fixed batch of 1" in rep.results[1].note


def test_unavailable_provider_is_an_error_or_skipped(models):
    missing = next(a for a in ("cuda", "coreml", "dml")
                   if not any(p.alias == a and p.available for p in eps.list_providers()))
    with pytest.raises(ProviderError, match="available: .*cpu"):
        bench([models["base"]], BenchConfig(providers=["cpu", missing], iters=2))
    rep = bench([models["base"]], BenchConfig(providers=["cpu", missing], iters=2, warmup=0, skip_unavailable=True))
    assert [r.alias for r in rep.results] == ["cpu"]
    assert rep.skipped_providers[0]["ep"] == eps.resolve_ep_name(missing)


def test_bad_config_is_rejected(models):
    with pytest.raises(InputShapeError):
        bench([models["base"]], BenchConfig(iters=5, duration=1.0))
    with pytest.raises(InputShapeError):
        bench([models["base"]], BenchConfig(batches=[0]))


@OPENVINO
def test_openvino_bench_fp32_and_bf16(models):
    ep_opts = {"OpenVINOExecutionProvider": {"precision": "fp32"}}
    rep = bench([models["base"]], BenchConfig(providers=["openvino", "cpu"], batches=[2], warmup=1, iters=5,
                                              ep_options=ep_opts, threads=1))
    cpu, ov = rep.results  # CPU runs first: it is the parity reference
    assert cpu.alias == "cpu" and ov.alias == "openvino" and ov.precision == "fp32"
    assert ov.fallback["nodes_by_provider"].get("OpenVINOExecutionProvider", 0) >= 1
    assert ov.fallback["status"] in ("none", "partial") and ov.parity["max_abs_diff"] < 1e-4
    bf = bench([models["base"]], BenchConfig(providers=["openvino"], batches=[1], warmup=0, iters=3,
                                             ep_options={"OpenVINOExecutionProvider": {"precision": "bf16"}}))
    assert bf.results[0].precision == "bf16" and bf.results[0].parity["reference"] == "CPUExecutionProvider"


def test_cli_bench_writes_json_and_prints_table(models, tmp_path):
    out = tmp_path / "b.json"
    proc = invoke("bench", models["base"], models["small"], "--providers", "cpu", "--batch", "1,2", "--iters", "3",
                  "--warmup", "0", "--threads", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "p50 ms" in proc.stdout and "speedup" in proc.stdout and "\r" not in proc.stderr  # no bar in a pipe
    assert len(json.loads(out.read_text())["results"]) == 4


def test_cli_bench_errors_are_one_line(models):
    proc = invoke("bench", models["base"], "--providers", "cpu,nosuch", "--iters", "2")
    assert proc.returncode == 2 and "unknown execution provider 'nosuch'" in proc.stderr
    proc = invoke("bench", models["base"], "--iters", "2", "--duration", "1s")
    assert proc.returncode != 0 and "--iters or --duration" in proc.stderr


def test_a_model_an_ep_cannot_load_is_an_error_row(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Frobnicate", ["x"], ["y"], domain="no.such.domain")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("no.such.domain", 1)])
    onnx.save(model, tmp_path / "odd.onnx")
    rep = bench([str(tmp_path / "odd.onnx")], BenchConfig(iters=2, warmup=0))
    (r,) = rep.results
    assert r.status == "error" and "could not create a session" in r.note
    assert "error: " in render_text(rep)
