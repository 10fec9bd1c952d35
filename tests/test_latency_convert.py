"""Conversion planned on measured latency: the plan keeps the predicted latency within the target, each
layer's layout survives the artifact, and the CLI's --speedup measures the result (speeds are never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsdeploy.conversion.artifact import load_artifact, read_payload, save_artifact, source_record
from dsdeploy.conversion.block import DSConv
from dsdeploy.conversion.opcount import trace_calls
from dsdeploy.conversion.plan import Policy, make_plan
from dsdeploy.conversion.rewrite import convert
from dsdeploy.errors import ArtifactError, PlanError
from dsdeploy.runtime.latency_table import BlockTiming, LatencyTable, LayerTiming
from tests.clirun import dsdeploy, dsdeploy_chain, invoke
from tests.conftest import small_net

SHAPE = (1, 3, 16, 16)
FACTORY = "tests.conftest:small_net"


def hand_table() -> LatencyTable:
    """SmallNet's convertible convs with hand-set latencies whose fastest layout differs per layer."""
    def blocks(times):
        return [BlockTiming(r, lay, ms) for (r, lay), ms in times.items()]

    conv1 = LayerTiming("conv1", dense_ms=4.0, blocks=blocks({(1, "branches"): 1.0, (1, "concat"): 1.5,
                                                              (2, "branches"): 2.2, (2, "multiplier"): 1.8}))
    grouped = LayerTiming("grouped", dense_ms=1.0, blocks=blocks({(1, "branches"): 1.2, (2, "branches"): 1.4}))
    conv2 = LayerTiming("conv2", dense_ms=5.0, blocks=blocks({(1, "concat"): 1.1, (1, "branches"): 1.3,
                                                              (2, "concat"): 2.0, (2, "branches"): 2.4}))
    stem = LayerTiming("stem", reason="stem")
    env = {"ep": "CPUExecutionProvider", "threads": 1, "batch": 1}
    return LatencyTable("small", list(SHAPE), env, "hand", 12.0, [stem, conv1, grouped, conv2], "none")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("latency-cache")


def predicted(plan, table) -> float:
    return table.remainder_ms + sum(d.block_ms if d.convert else d.dense_ms for d in plan.layers
                                    if d.dense_ms is not None)


@pytest.mark.parametrize("speedup", [1.2, 1.5, 2.0])
def test_the_plan_keeps_the_predicted_latency_within_the_target(speedup):
    model, table = small_net().eval(), hand_table()
    plan = make_plan(model, Policy(speedup=speedup), trace_calls(model, SHAPE), SHAPE, latency=table)
    assert predicted(plan, table) <= 12.0 / speedup + 1e-9
    assert plan.policy["latency"]["predicted_ms"] == pytest.approx(predicted(plan, table), abs=1e-4)
    for d in plan.converted:  # each converted layer takes the fastest measured layout at its rank
        assert d.block_ms == min(b.ms for b in table.layers[[t.name for t in table.layers].index(d.name)].blocks
                                 if b.rank == d.rank)
    grouped = next(d for d in plan.layers if d.name == "grouped")
    assert not grouped.convert and "no DS block is faster" in grouped.reason and grouped.dense_ms == 1.0


def test_data_costs_replace_the_spectral_error():
    model, table = small_net().eval(), hand_table()
    costs = {"conv1": {1: 0.9, 2: 0.01}, "conv2": {1: 0.001, 2: 0.0005}, "grouped": {1: 0.1, 2: 0.05}}
    plan = make_plan(model, Policy(speedup=1.5, allocation="data"), trace_calls(model, SHAPE), SHAPE, costs=costs,
                     cost_name="logit", latency=table)
    assert plan.policy["allocation"] == "data" and plan.policy["cost"] == "logit"
    assert predicted(plan, table) <= 8.0 + 1e-9
    assert sum(d.cost for d in plan.converted) == pytest.approx(min(  # the exhaustive optimum of this instance
        c1 + c2 for c1, t1 in [(0, 4.0), (0.9, 1.0), (0.01, 1.8)] for c2, t2 in [(0, 5.0), (0.001, 1.1), (0.0005, 2.0)]
        if 2.0 + 1.0 + t1 + t2 <= 8.0))


def test_a_target_the_original_already_meets_says_so_for_each_layer_kept_dense():
    model, table = small_net().eval(), hand_table()
    plan = make_plan(model, Policy(target_latency_ms=20.0), trace_calls(model, SHAPE), SHAPE, latency=table)
    timed = [d for d in plan.layers if d.dense_ms is not None]
    assert timed and not plan.converted
    assert all(d.reason.startswith("kept dense: the original already meets the target (12.000 ms measured")
               for d in timed)


def test_a_mac_budget_with_a_provider_takes_each_layers_fastest_layout():
    model, table = small_net().eval(), hand_table()
    plan = make_plan(model, Policy(mac_budget=0.3, provider="cpu"), trace_calls(model, SHAPE), SHAPE, latency=table)
    timings = {lt.name: lt for lt in table.layers}
    assert plan.converted
    for d in plan.converted:
        fastest = timings[d.name].fastest(d.rank)
        assert d.layout == fastest.layout and d.block_ms == fastest.ms
    untimed = make_plan(model, Policy(mac_budget=0.3), trace_calls(model, SHAPE), SHAPE)
    assert all(d.layout is None and d.dense_ms is None for d in untimed.layers)  # table-free by default


def test_a_mac_budget_on_a_provider_converts_through_the_measured_table(tmp_path):
    """`convert --mac-budget B --provider cpu` end to end: the table is measured, each converted layer takes its
    fastest layout, nothing is verified (a MAC budget has no latency target)."""
    from dsdeploy.conversion.latency_convert import convert_planned

    res, record = convert_planned(small_net().eval(), SHAPE, Policy(mac_budget=0.5, provider="cpu", threads=1),
                                  cache_dir=tmp_path)
    assert record["graphs_measured"] > 0 and record["attempts"] == [] and "verified" not in res.plan.policy
    assert res.plan.converted and all(d.layout and d.block_ms is not None for d in res.plan.converted)


def test_per_layer_layouts_round_trip_through_the_artifact(tmp_path):
    model, table = small_net().eval(), hand_table()
    res = convert(model, input_shape=SHAPE, policy=Policy(speedup=2.0), latency=table)
    layouts = {d.name: d.layout for d in res.plan.converted}
    assert len(set(layouts.values())) > 1  # mixed: the test means something
    path = tmp_path / "m.dsd"
    save_artifact(path, res.model, res.plan, source_record(FACTORY, {}, None), {"input_shape": list(SHAPE)})
    art = load_artifact(path, trust_code=True)
    for name, layout in layouts.items():
        block = art.model.get_submodule(name)
        assert isinstance(block, DSConv) and block.layout == layout
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        assert torch.allclose(art.model(x), res.model(x), atol=1e-5)
    assert [d.block_ms for d in art.plan.layers] == [d.block_ms for d in res.plan.layers]
    # an artifact written before per-layer layouts (no layout/latency keys) loads with the plan's layout
    payload = read_payload(path)
    uniform = convert(model, input_shape=SHAPE, rank=1)
    old = uniform.plan.to_dict()
    for layer in old["layers"]:
        for key in ("layout", "dense_ms", "block_ms"):
            layer.pop(key)
    payload.update(plan=old, state_dict=uniform.model.state_dict())
    torch.save(payload, tmp_path / "old.dsd")
    assert all(b.layout == "branches" for b in load_artifact(tmp_path / "old.dsd", trust_code=True).model.modules()
               if isinstance(b, DSConv))
    payload["plan"]["layers"][1]["layout"] = "spiral"
    torch.save(payload, tmp_path / "bad.dsd")
    with pytest.raises(ArtifactError, match="layout"):
        load_artifact(tmp_path / "bad.dsd", trust_code=True)


@pytest.mark.parametrize("fields,match", [
    ({"speedup": 2.0, "rank": 2}, "choose one of"),
    ({"target_latency_ms": 3.0, "mac_budget": 0.5}, "choose one of"),
    ({"speedup": 0.0}, "convert.speedup must be"),
    ({"speedup": 1.0}, r"convert.speedup must be a number > 1 \(times faster"),
    ({"speedup": 0.0}, r"convert.speedup must be a number > 1 \(times faster"),
    ({"speedup": 2.0, "batch": 0}, "convert.batch must be"),
    ({"speedup": 2.0, "threads": 0}, "convert.threads must be"),
    ({"provider": "cpu"}, "convert.provider"),
    ({"rank": 2, "precision": "int8"}, "convert.precision times latencies"),
    ({"speedup": 2.0, "precision": "int4"}, "convert.precision must be one of fp32, int8, int8-dynamic"),
])
def test_bad_latency_options_name_the_field(fields, match):
    with pytest.raises(PlanError, match=match):
        Policy(**fields).validate()


def test_cli_refuses_mutually_exclusive_options_in_one_line():
    proc = invoke("convert", FACTORY, "--speedup", "2", "--rank", "2", "-o", "x.dsd")
    assert proc.returncode != 0 and "--speedup" in proc.stderr and "--rank" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_an_unreachable_speedup_says_the_best_reachable_one(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("DSDEPLOY_CACHE", str(cache))
    proc = invoke("convert", FACTORY, "--input-shape", "1,3,32,32", "--speedup", "1000",  # the table is reused below
                  "--threads", "1", "-o", tmp_path / "x.dsd")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "out of reach" in lines[0]
    assert "a speedup of" in lines[0] and not (tmp_path / "x.dsd").exists()


def test_cli_speedup_end_to_end_prints_predicted_and_measured(cache, tmp_path):
    out = tmp_path / "s.dsd"
    env = {"DSDEPLOY_CACHE": str(cache)}
    proc = dsdeploy("convert", FACTORY, "--input-shape", "1,3,32,32", "--speedup", "1.05", "--provider", "cpu",
                    "--batch", "1", "--threads", "1", "-o", out, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "latency plan: target" in proc.stdout and "measured: original" in proc.stdout
    assert "95 % CI x" in proc.stdout and " rounds)" in proc.stdout
    policy = torch.load(out, weights_only=True)["plan"]["policy"]
    assert isinstance(policy["verified"]["resolved"], bool) and policy["verified"]["rounds"] >= 3
    attempt = policy["verified"]["attempts"][policy["verified"]["chosen"]]  # the model written
    assert attempt["predicted_ms"] > 0 and attempt["measured_ms"] > 0 and attempt["prediction_error"] is not None
    exported, shown, listed = dsdeploy_chain(  # one real process for the three readers (suite time)
        ("export", out, "-o", tmp_path / "s.onnx", "--trust-code", "--json"), ("inspect", out, "--trust-code"),
        ("inspect", out, "--trust-code", "--json"), env=env)
    assert exported.returncode == 0, exported.stderr
    assert attempt["op_counts"] == json.loads(exported.stdout)["op_counts"]  # verified = what export writes
    assert policy["latency"]["predicted_ms"] <= policy["latency"]["target_ms"] + 1e-6
    assert shown.returncode == 0 and "dense ms" in shown.stdout and "block ms" in shown.stdout
    assert "measured: original" in shown.stdout
    layers = json.loads(listed.stdout)["layers"]
    assert any(d["dense_ms"] is not None for d in layers)



def test_a_speedup_with_data_allocation_plans_on_the_measured_costs(cache, tmp_path, monkeypatch):
    """`convert --speedup X --allocation data --calib-data D` plans on the data-aware layer costs
    (it used to refuse: the sensitivity pass ran only for a mac_budget)."""
    import numpy as np
    from PIL import Image

    from dsdeploy import api

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    monkeypatch.setenv("DSDEPLOY_CACHE", str(cache))
    cm = api.convert(small_net().eval(), input_shape=(1, 3, 32, 32), speedup=1.05, provider="cpu", batch=1, threads=1,
                     allocation="data", data=str(tmp_path / "imgs"), allocation_options={"calib_batches": 1})
    assert cm.plan.policy["allocation"] == "data" and "logit_error" in cm.plan.policy["cost"]
    assert "sensitivity" in cm.history[0] and all(d.cost is not None for d in cm.plan.converted)

class Residual(torch.nn.Module):
    """conv-BN-ReLU-conv-BN + identity, ReLU: BatchNorm after summed DS branches, as in a ResNet block."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.b1 = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16)
        self.c2, self.b2 = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


def test_the_verification_times_the_graph_export_writes(tmp_path, monkeypatch):
    """measure_pair and the table's whole model time export_bytes: the very graph `export` writes
    (dynamo, BatchNorm folded into the summed branches, simplified, dynamic batch)."""
    import onnx

    monkeypatch.delenv("DSDEPLOY_EXPORTER", raising=False)  # "auto" as users get it (the suite pins torchscript)

    from dsdeploy.export.config import ExportConfig
    from dsdeploy.export.onnx_export import export_bytes, export_onnx

    shape = (1, 16, 12, 12)
    conv = convert(Residual().eval(), input_shape=shape, policy=Policy(rank=2, layout="branches")).model.eval()
    cfg = ExportConfig()  # what `dsdeploy export` writes by default
    report = export_onnx(conv, tmp_path / "m.onnx", shape, opset=cfg.opset, dynamic_batch=cfg.dynamic_batch,
                         simplify=cfg.simplify, exporter=cfg.exporter)
    written, timed = onnx.load(tmp_path / "m.onnx").graph, onnx.load_from_string(export_bytes(conv, shape)).graph
    assert report.exporter == "dynamo" and "BatchNormalization" not in report.op_counts
    assert [n.op_type for n in timed.node] == [n.op_type for n in written.node]
    assert sorted(i.name for i in timed.initializer) == sorted(i.name for i in written.initializer)
    assert timed.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch, as exported


def test_the_corrected_table_reproduces_both_measurements_and_replans_within_the_target():
    from dsdeploy.conversion.latency_convert import corrected_table
    from dsdeploy.conversion.latency_plan import plan_for_latency

    model, table = small_net().eval(), hand_table()
    plan = make_plan(model, Policy(speedup=1.5), trace_calls(model, SHAPE), SHAPE, latency=table)
    kept = sum(d.dense_ms for d in plan.layers if d.dense_ms is not None and not d.convert)
    blocks = sum(d.block_ms for d in plan.layers if d.dense_ms is not None and d.convert)
    original, measured = 13.2, 1.1 * (table.remainder_ms + kept) + 2.0 * blocks  # blocks cost 2x in-graph
    fixed, a, b = corrected_table(table, plan, original, measured)
    assert a == pytest.approx(1.1) and b == pytest.approx(2.0)
    assert fixed.model_ms == pytest.approx(original) and fixed.remainder_ms == pytest.approx(1.1 * table.remainder_ms)
    assert predicted(plan, fixed) != pytest.approx(measured)  # plan's block_ms still hold the old table
    again = make_plan(model, Policy(speedup=1.5), trace_calls(model, SHAPE), SHAPE, latency=fixed)
    assert predicted(again, fixed) <= original / 1.5 + 1e-9
    # the corrected table predicts the first plan's measured latency exactly
    chosen = {d.name: d for d in plan.layers}
    by = {lt.name: lt for lt in fixed.candidates}
    first = fixed.remainder_ms + sum(by[n].block(chosen[n].rank, plan.layout_of(chosen[n])).ms if chosen[n].convert
                                     else by[n].dense_ms for n in by)
    assert first == pytest.approx(measured)
    assert plan_for_latency(fixed, {}, speedup=1.0).predicted_ms == pytest.approx(original)


def three_convs(channels: int = 64) -> torch.nn.Module:
    """Three identical 3x3 convs (one layer shape in the table), each followed by a ReLU."""
    torch.manual_seed(0)
    return torch.nn.Sequential(*[m for _ in range(3) for m in (torch.nn.Conv2d(channels, channels, 3, padding=1),
                                                                 torch.nn.ReLU())]).eval()


def test_the_verified_record_has_an_interval_and_its_correction_is_kept(tmp_path):
    """The verification reports its 95 % interval, rounds and whether it is resolved; the correction it
    measured is stored with the cached table and applied by the next conversion before its first plan
    (no table re-measured); a refresh drops it; another batch's table has none."""
    from dsdeploy.conversion.latency_convert import convert_planned
    from dsdeploy.conversion.latency_verify import MAX_ROUNDS, MIN_ROUNDS
    from dsdeploy.runtime.latency_cache import LatencyCache

    model, shape, policy = three_convs(), (1, 64, 16, 16), Policy(speedup=1.3, threads=1)
    _, record = convert_planned(model, shape, policy, cache_dir=tmp_path)
    assert record["graphs_measured"] > 0 and "correction" not in record
    for a in record["attempts"]:
        assert a["ci95"][0] <= a["measured_speedup"] <= a["ci95"][1]
        assert a["ci95_ms"][0] <= a["measured_ms"] <= a["ci95_ms"][1]
        assert MIN_ROUNDS <= a["rounds"] <= MAX_ROUNDS and isinstance(a["resolved"], bool)
        assert a["interval"] in ("met", "missed", "undecided")
    chosen = record["attempts"][record["chosen"]]
    assert record["ci95"] == chosen["ci95"] and record["rounds"] == chosen["rounds"]
    assert isinstance(record["met"], bool) and isinstance(record["resolved"], bool)
    data = json.loads(Path(record["cache_file"]).read_text())
    (key, stored), = data["corrections"].items()
    assert stored["dense_factor"] > 0 and stored["block_factor"] > 0 and stored["rounds"] >= MIN_ROUNDS
    assert stored["ci95"][0] <= stored["measured_speedup"] <= stored["ci95"][1]

    res, again = convert_planned(model, shape, policy, cache_dir=tmp_path, verify=False)
    assert again["graphs_measured"] == 0 and again["correction"]["source"] == "cache"
    assert again["correction"]["block_factor"] == stored["block_factor"]
    planned = res.plan.policy["latency"]["model_ms"]  # the plan saw the corrected whole model
    assert planned == pytest.approx(again["table_model_ms"] * stored["dense_factor"], rel=1e-3)
    assert LatencyCache({**data["env"], "batch": 2}, tmp_path).correction(key) is None  # another batch: none

    LatencyCache(data["env"], tmp_path, refresh=True).flush()  # what refresh does before re-measuring
    assert "corrections" not in json.loads(Path(record["cache_file"]).read_text())
    assert json.loads(Path(record["cache_file"]).read_text())["entries"] == data["entries"]


def test_a_forced_miss_triggers_the_replan_and_is_recorded(tmp_path):
    """Blocks the cache claims 1000x faster than they are: the measured model misses the target, the
    table is corrected from the measurement, and the re-plan is recorded (or refused as out of reach)."""
    from dsdeploy.conversion.latency_convert import convert_planned, measure_table

    model, shape = three_convs(), (1, 64, 16, 16)
    table = measure_table(model, Policy(speedup=2.0, threads=1), shape, cache_dir=tmp_path)
    data = json.loads(Path(table.cache_file).read_text())
    for key, entry in data["entries"].items():  # a false table: whole 10 ms, dense convs 3.3 ms, blocks ~free
        ms = 10.0 if key.startswith("model") else 3.3 if key.startswith("dense:") else 0.001
        entry["ms"] = entry["min_ms"] = ms
    Path(table.cache_file).write_text(json.dumps(data))
    speedup = 20.0  # reachable on the false table (x97), beyond any DS conversion of 3x3 convs (MACs x0.13)
    try:
        res, record = convert_planned(model, shape, Policy(speedup=speedup, threads=1), cache_dir=tmp_path)
    except PlanError as exc:  # the corrected table says the target is out of reach, naming the measurement
        assert "measured x" in str(exc) and "corrected" in str(exc) and "out of reach" in str(exc)
        record = None
    stored = json.loads(Path(table.cache_file).read_text())["corrections"][table.model_key]
    assert stored["block_factor"] > 1 and stored["rounds"] >= 1  # what was measured is kept, even on the error
    if record is None:
        return
    from dsdeploy.conversion.latency_convert import MAX_REPLANS

    assert 2 <= len(record["attempts"]) <= 1 + MAX_REPLANS
    first, second = record["attempts"][:2]
    assert first["measured_speedup"] < speedup / 1.05 and first["prediction_error"] < -0.05
    assert second["block_factor"] > 1 and second["dense_factor"] > 0
    assert res.plan.policy["verified"] is record and record["met"] is False  # x20 stays out of reach


def test_of_two_measured_attempts_the_slowest_that_meets_the_target_is_kept():
    """A re-plan also follows a model faster than asked (it gave accuracy away); of the attempts, the one
    closest to the target from the fast side (within the tolerance) is kept, else the fastest."""
    from dsdeploy.conversion.latency_attempts import TOLERANCE, choose

    pol = Policy(speedup=3.0)
    fast, close, slow = "fast", "close", "slow"  # stand-ins for ConversionResults: choose only carries them
    assert choose([(fast, 18.0, 4.7), (close, 18.0, 6.1)], pol) == (close, 18.0, 6.1, 1)  # 6.1 <= 6 x 1.05
    assert choose([(fast, 18.0, 4.7), (slow, 18.0, 6.0 * (1 + 2 * TOLERANCE))], pol)[3] == 0
    assert choose([(slow, 18.0, 7.0), (slow, 18.0, 6.9)], pol)[3] == 1  # none meets: the fastest
    assert choose([(close, 0.0, 9.0)], Policy(target_latency_ms=10.0))[3] == 0
    # a hit inside a wide interval loses to an attempt whose whole interval meets the target
    pol = Policy(speedup=1.1)
    assert choose([(fast, 18.0, 12.8), (close, 18.0, 16.8)], pol, [True, False])[3] == 0
    assert choose([(fast, 18.0, 12.8), (close, 18.0, 16.8)], pol, [True, True])[3] == 1
    assert choose([(fast, 18.0, 12.8), (close, 18.0, 16.8)], pol, [False, False])[3] == 1


def test_a_replan_between_a_too_fast_and_a_too_slow_attempt_takes_the_factors_between():
    """Attempts that bracket the target (one faster than asked, one slower) send the next re-plan between
    them (geometric mean of their learned factors); otherwise the last attempt's factors are used."""
    from dsdeploy.conversion.latency_convert import _next_factors
    from dsdeploy.conversion.latency_verify import Estimate, Verification

    def tried(speedup: float):
        est = Estimate(18.0, 18.0 / speedup, speedup, (speedup * 0.99, speedup * 1.01), (1.0, 1.0), 3)
        return None, Verification(est, True, "")

    learned = [{"dense_factor": 1.0, "block_factor": 0.5}, {"dense_factor": 1.0, "block_factor": 2.0}]
    pol = Policy(speedup=3.0)
    a, b = _next_factors([tried(3.4), tried(2.6)], learned, pol)  # too fast, then too slow
    assert a == pytest.approx(1.0) and b == pytest.approx(1.0)  # sqrt(0.5 x 2.0)
    assert _next_factors([tried(2.5), tried(2.6)], learned, pol) == (1.0, 2.0)  # both slow: the last one's


@pytest.mark.parametrize("interval,says", [("undecided", "neither confirmed nor refuted"),
                                            ("missed", "the whole interval misses"), ("met", "the whole interval meets")])
def test_an_unresolved_verification_says_so_in_one_line(interval, says):
    from dsdeploy.conversion.workflow import latency_lines

    attempt = {"target_ms": 6.0, "predicted_ms": 5.9, "predicted_speedup": 3.05, "original_ms": 18.0,
               "measured_ms": 6.2, "measured_speedup": 2.91, "ci95": [2.71, 3.12], "rounds": 12, "resolved": False,
               "interval": interval, "prediction_error": -0.05}
    verified = {"attempts": [attempt], "chosen": 0, "met": True, "correction": {
        "source": "cache", "dense_factor": 1.02, "block_factor": 0.9, "rounds": 5}}
    lines = latency_lines({"verified": verified})
    noise = [line for line in lines if "noise" in line]
    assert len(noise) == 1 and says in noise[0] and "x2.71-x3.12 over 12 rounds" in noise[0]
    assert any("stored measurement" in line and "x0.90" in line for line in lines)
    resolved = latency_lines({"verified": {**verified, "attempts": [{**attempt, "resolved": True}]}})
    assert not any("noise" in line for line in resolved)


def test_an_int8_target_times_quantized_graphs_end_to_end(tmp_path):
    """precision int8: the table's graphs and both verified graphs are the INT8 (QDQ) ones `deploy --quantize
    int8` would write, in their own cache file; the report says so."""
    from dsdeploy.conversion.latency_convert import convert_planned
    from dsdeploy.conversion.workflow import latency_lines

    model, shape = three_convs(32), (1, 32, 12, 12)
    res, record = convert_planned(model, shape, Policy(speedup=1.2, threads=1, precision="int8"), cache_dir=tmp_path)
    assert "-int8-" in Path(record["cache_file"]).name and record["precision"] == "int8"
    attempt = record["attempts"][record["chosen"]]
    assert attempt["op_counts"].get("QuantizeLinear", 0) > 0 and attempt["op_counts"].get("DequantizeLinear", 0) > 0
    assert "quantized int8" in record["protocol"]
    lines = latency_lines(res.plan.policy)
    assert any("graphs quantized int8" in line for line in lines)
    assert any("the plan is searched by measuring whole quantized models" in line for line in lines)
    _, fp32 = convert_planned(model, shape, Policy(speedup=1.2, threads=1), cache_dir=tmp_path, verify=False)
    assert fp32["cache_file"] != record["cache_file"] and fp32["graphs_measured"] > 0  # not the int8 entries
    assert record["search"] == "measured" and all("planned_ms" in a for a in record["attempts"])
    assert json.loads(Path(record["cache_file"]).read_text()).get("corrections", {}) == {}  # none stored in int8
    # out of reach by the prediction: the fastest plan is measured, then refused with its measured speedup
    with pytest.raises(PlanError, match=r"^measured x.* for the fastest plan, whole and int8-quantized: a 50x "
                                        r"speedup in int8 is out of reach here"):
        convert_planned(model, shape, Policy(speedup=50.0, threads=1, precision="int8"), cache_dir=tmp_path)


def test_a_quantized_target_predicted_out_of_reach_measures_the_fastest_plan(tmp_path):
    """A table that predicts the target out of reach (every DS block claimed 1 % faster than its dense conv) does
    not refuse in int8: its fastest plan (all converted) is measured, recorded with the user's target, and kept
    when it meets it, else refused with its measured speedup."""
    from dsdeploy.conversion.latency_convert import convert_planned, measure_table
    from dsdeploy.conversion.workflow import latency_lines

    model, shape = three_convs(32), (1, 32, 12, 12)
    policy = Policy(speedup=1.05, threads=1, precision="int8")
    table = measure_table(model, policy, shape, cache_dir=tmp_path)
    data = json.loads(Path(table.cache_file).read_text())
    entries = data["entries"]
    for key, entry in entries.items():
        if key.startswith("ds:"):
            entry["ms"] = entry["min_ms"] = 0.99 * entries["dense:" + key.split(":")[1]]["ms"]
    Path(table.cache_file).write_text(json.dumps(data))
    try:
        res, record = convert_planned(model, shape, policy, cache_dir=tmp_path)
    except PlanError as exc:  # the fastest plan measured short of the target: refused with what it measured
        assert str(exc).startswith("measured x") and "in int8 is out of reach" in str(exc)
        return
    assert "out of reach" in record["fastest_instead"] and record["attempts"]
    assert res.plan.policy["speedup"] == 1.05 and "target_latency_ms" not in res.plan.policy
    assert res.plan.policy["latency"]["target_ms"] == pytest.approx(table.model_ms / 1.05, rel=1e-3)
    assert any("the fastest plan was measured instead" in line for line in latency_lines(res.plan.policy))
