"""The latency table: measured once per environment and layer shape, reused from the cache, invalidated
by a different EP, batch, thread count or ONNX Runtime version, and a corrupt cache is one line.
The small graphs it times compute what the torch layers compute (parity). No speed is asserted."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dsdeploy.conversion.block import LAYOUTS
from dsdeploy.errors import LatencyCacheError, PlanError
from dsdeploy.export.small_graphs import ConvSpec, layer_graph, layer_module
from dsdeploy.runtime.latency_cache import cache_file, environment_key
from dsdeploy.runtime.latency_table import latency_table
from dsdeploy.runtime.sessions import cpu_session
from dsdeploy.runtime.timing import Protocol
from tests.clirun import invoke

FAST = Protocol(warmup=1, iters=3)
SHAPE = (1, 8, 12, 12)


class TwinNet(nn.Module):
    """Two identical 3x3 convs (one shape key), two others, 1x1 convs first and last (never candidates)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(8, 8, 1)
        self.a = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.d = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.point = nn.Conv2d(24, 10, 1)

    def forward(self, x):
        x = torch.relu(self.bn(self.a(self.stem(x))))
        x = torch.relu(self.c(torch.relu(self.b(x))))
        return self.point(self.d(x)).mean(dim=(2, 3))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TwinNet().eval()


def table(model, tmp_path, **kw):
    opts = {"threads": 1, "max_rank": 1, "layouts": ("branches",), "protocol": FAST, "cache_dir": tmp_path / "cache"}
    return latency_table(model, kw.pop("shape", SHAPE), **{**opts, **kw})


def test_measures_each_layer_shape_once_and_reuses_the_cache(model, tmp_path):
    first = table(model, tmp_path)
    names = [lt.name for lt in first.candidates]
    assert names == ["a", "b", "c", "d"]
    assert first.layers[0].reason.startswith("1x1") and first.layers[-1].reason.startswith("1x1")
    b, c = first.candidates[1], first.candidates[2]
    assert b.key == c.key and b.dense_ms == c.dense_ms  # identical layers: one measurement
    # whole model + (a, b=c, d) x (dense + rank 1 branches)
    assert first.measured == 1 + 3 * 2 and first.reused == 0
    assert first.remainder_ms == pytest.approx(first.model_ms - sum(lt.dense_ms for lt in first.candidates))
    second = table(model, tmp_path)
    assert second.measured == 0 and second.reused == first.measured
    assert second.layers == first.layers and second.model_ms == first.model_ms
    assert second.cache_file == first.cache_file
    data = json.loads(Path(second.cache_file).read_text())
    assert data["env"]["batch"] == 1 and data["env"]["threads"] == 1 and len(data["entries"]) == first.measured
    low = table(model, tmp_path, protocol=dataclasses.replace(FAST, statistic="min"))
    assert low.measured == 0 and "min of 3" in low.protocol  # the cache keeps median and min
    assert all(lo.dense_ms <= hi.dense_ms for lo, hi in zip(low.candidates, first.candidates))
    third = table(model, tmp_path, refresh=True)
    assert third.measured == first.measured and third.reused == 0
    assert "negative" not in first.render() or first.remainder_ms < 0
    small = dataclasses.replace(first, model_ms=0.5 * sum(lt.dense_ms for lt in first.candidates))
    assert small.remainder_ms < 0 and "(negative: the convs cost less inside the whole model" in small.render()


@pytest.mark.parametrize("change", [{"shape": (2, 8, 12, 12)}, {"threads": 2}, {"ort_version": "0.0-test"},
                                    {"precision": "int8"}])
def test_a_different_batch_threads_or_runtime_version_remeasures(model, tmp_path, change):
    first = table(model, tmp_path)
    other = table(model, tmp_path, **change)
    assert other.measured == first.measured and other.reused == 0
    assert other.cache_file != first.cache_file
    assert table(model, tmp_path).measured == 0  # the first environment's entries are still there


def test_a_different_ep_or_device_is_another_cache_file(tmp_path):
    base = environment_key("CPUExecutionProvider", {}, threads=2, batch=1, ort_version="1", device="x")
    others = [environment_key("OpenVINOExecutionProvider", {}, threads=2, batch=1, ort_version="1", device="x"),
              environment_key("CPUExecutionProvider", {"k": "v"}, threads=2, batch=1, ort_version="1", device="x"),
              environment_key("CPUExecutionProvider", {}, threads=2, batch=1, ort_version="1", device="y"),
              environment_key("CPUExecutionProvider", {}, threads=2, batch=1, ort_version="1", device="x",
                              spinning=False),
              environment_key("CPUExecutionProvider", {}, threads=2, batch=1, ort_version="1", device="x",
                              precision="int8-dynamic")]
    files = {cache_file(e, tmp_path) for e in [base, *others]}
    assert len(files) == 6
    # fp32 said explicitly is the key it always was (caches written before precision existed stay valid)
    assert environment_key("CPUExecutionProvider", {}, threads=2, batch=1, ort_version="1", device="x",
                           precision="fp32") == base


@pytest.mark.parametrize("precision,op", [("int8", "QuantizeLinear"), ("int8-dynamic", "ConvInteger")])
def test_a_quantized_table_times_the_quantized_graphs(model, tmp_path, monkeypatch, precision, op):
    """Every graph the table times (whole model, dense convs, DS blocks) is quantized as deploy would."""
    import onnx

    from dsdeploy.runtime import latency_table as lt_mod

    seen: list[set[str]] = []
    real = lt_mod.measure

    def spy(graph, **kw):
        seen.append({n.op_type for n in onnx.load_from_string(graph).graph.node})
        return real(graph, **kw)

    monkeypatch.setattr(lt_mod, "measure", spy)
    t = table(model, tmp_path, precision=precision)
    assert len(seen) == t.measured == 7 and all(op in ops for ops in seen)
    assert "graphs quantized " + precision in t.render()


def test_corrupt_cache_is_one_line_error_and_refresh_replaces_it(model, tmp_path):
    path = table(model, tmp_path).cache_file
    Path(path).write_text('{"env": {"batch": 1}, "entr')
    with pytest.raises(LatencyCacheError, match="unreadable .*refresh") as err:
        table(model, tmp_path)
    assert "\n" not in str(err.value)
    again = table(model, tmp_path, refresh=True)
    assert again.measured == 7 and json.loads(Path(path).read_text())["entries"]
    assert table(model, tmp_path).measured == 0


def test_bad_layout_or_rank_is_refused(model, tmp_path):
    with pytest.raises(PlanError, match="layouts"):
        table(model, tmp_path, layouts=("diagonal",))
    with pytest.raises(PlanError, match="max_rank"):
        table(model, tmp_path, max_rank=0)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(8, 12, 3, padding=1),
    nn.Conv2d(8, 16, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), padding_mode="reflect"),
    nn.Conv2d(8, 16, 3, groups=2, padding="same"),
], ids=["plain", "strided-reflect", "grouped-same"])
def test_small_graphs_compute_the_torch_layer(conv, tmp_path):
    spec = ConvSpec.of(conv, (2, 8, 11, 13))
    x = np.random.default_rng(0).standard_normal(spec.input_shape).astype(np.float32)
    for rank, layout in [(None, "branches"), (1, "concat"), *[(2, lay) for lay in LAYOUTS]]:
        want = layer_module(spec, rank, layout, seed=3)(torch.from_numpy(x)).detach().numpy()
        path = tmp_path / f"g{rank}{layout}.onnx"
        path.write_bytes(layer_graph(spec, rank, layout, seed=3))
        got = cpu_session(path).run(None, {"input": x})[0]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    dense = layer_module(spec, None, seed=3)
    block = layer_module(spec, min(spec.out_channels // spec.groups, int(np.prod(spec.kernel_size))), seed=3)
    xt = torch.from_numpy(x)
    torch.testing.assert_close(block(xt), dense(xt), rtol=1e-4, atol=1e-4)  # full rank: the same layer


def test_cli_prints_the_table_and_reuses_it(tmp_path):
    args = ["latency", "tests.conftest:small_net", "--trust-code", "--input-shape", "1,3,16,16",
            "--threads", "1", "--max-rank", "1", "--layouts", "branches", "--cache-dir", tmp_path / "c"]
    first = invoke(*args, "--json")
    assert first.returncode == 0, first.stderr
    data = json.loads(first.stdout)
    assert data["measured"] > 0 and "sequential" in data["protocol"] and data["remainder_ms"] is not None
    second = invoke(*args)
    assert second.returncode == 0 and "0 graphs measured" in second.stdout and "dense ms" in second.stdout
    bad = invoke(*args, "--max-rank", "0")
    assert bad.returncode != 0 and bad.stderr.strip() == "error: --max-rank must be >= 1, got 0"
    bad = invoke(*args, "--layouts", "diagonal")
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error: --layouts must name some of branches")
    cache = next((tmp_path / "c").glob("*.json"))
    cache.write_text("not json")
    broken = invoke(*args)
    assert broken.returncode != 0 and len(broken.stderr.strip().splitlines()) == 1 and "refresh" in broken.stderr
