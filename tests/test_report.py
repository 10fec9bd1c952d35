"""The run report: summary numbers, Markdown/HTML content, plots, partial runs."""

from __future__ import annotations

import io
import json

import pytest

from dsdeploy.pipeline.recipe import recipe_from_dict
from dsdeploy.pipeline.report import (
    latency_rows,
    render_html,
    summarize,
    summary_rows,
    write_report,
)

RECIPE = recipe_from_dict({"name": "toy <b>", "model": {"spec": "sample:digits_cnn"}})


def layer(name, convert, macs, macs_after=None, rank=None, error=None, reason="converted"):
    return {"name": name, "type": "Conv2d", "in_channels": 16, "out_channels": 32, "kernel_size": [3, 3],
            "groups": 1, "convert": convert, "reason": reason, "rank": rank, "full_rank": 9, "energy": None,
            "error": error, "macs": macs, "macs_after": macs_after, "params": 10, "params_after": None}


def done(result, outputs=None):
    return {"status": "done", "result": result, "outputs": outputs or {}, "seconds": 1.5}


def full_records(tmp_path):
    (tmp_path / "finetune").mkdir()
    history = [{"epoch": 1, "train_loss": 0.9, "train_acc": 0.8, "val_acc": 0.9, "lr": 0.01, "seconds": 2.0},
               {"epoch": 2, "train_loss": 0.5, "train_acc": 0.9, "val_acc": 0.95, "lr": 0.0, "seconds": 4.0}]
    (tmp_path / "finetune" / "history.json").write_text(json.dumps(history))
    bench = [{"model": m, "provider": ep, "batch": 1, "latency_ms": ms, "precision": "fp32", "status": "ok",
              "parity_max_abs": 1e-6 if m == "converted" else 0.0, "top1_agreement": 1.0}
             for m, ep, ms in (("original", "cpu", 2.0), ("converted", "cpu", 0.5),
                               ("original", "openvino", 1.0), ("converted", "openvino", 0.4))]
    bench += [{"model": m, "provider": "cuda", "batch": 1, "latency_ms": None, "precision": None,
               "status": "unavailable"} for m in ("original", "converted")]
    return {
        "inspect": done({"summary": {"params": 1000, "macs": 5000}}),
        "convert": done({"summary": {"params": 1000, "params_after": 400, "macs": 5000, "macs_after": 1500,
                                     "conv_macs": 4800, "conv_macs_after": 1300, "converted": 1, "convs": 2},
                         "layers": [layer("stem", False, 800, reason="stem (1 input channels)"),
                                    layer("features.3", True, 4000, 500, 2, 0.31)],
                         "calibration": {"layers": [{"name": "features.3", "error_before": 0.4, "error_after": 0.05,
                                                     "rows": 10}], "accuracy_before": 0.2, "accuracy_after": 0.9}}),
        "finetune": done({"best_accuracy": 0.95, "teacher_accuracy": 0.99, "history": history},
                         {"history": "history.json", "artifact": "finetuned.dsd"}),
        "evaluate": done({"models": [{"name": "original", "top1": 0.99, "top5": 1.0},
                                     {"name": "converted", "top1": 0.2, "top5": 0.6},
                                     {"name": "calibrated", "top1": 0.9, "top5": 1.0},
                                     {"name": "finetuned", "top1": 0.95, "top5": 1.0}]}),
        "export": done({"original": {"parity": {"max_abs_diff": 1e-6, "ok": True}},
                        "converted": {"parity": {"max_abs_diff": 2e-6, "ok": True}}}),
        "deploy": done({"bundle": "bundle", "quantize": "int8", "files": {"model.onnx": "ab12"}, "notes": [],
                        "warnings": [], "accuracy": {"fp32_top1": 95.0, "bundle_top1": 94.5, "drop_pts": 0.5,
                                                     "agreement": 99.0}}),
        "bench": done({"rows": bench}),
    }


def test_summary_numbers(tmp_path):
    s = summarize(full_records(tmp_path), tmp_path)
    assert s["params"] == [1000, 400] and s["conv_macs"] == [4800, 1300]
    assert s["accuracy"] == [0.99, 0.945]
    assert [a["name"] for a in s["accuracy_stages"]] == ["original", "converted", "calibrated", "finetuned",
                                                         "bundle (int8)"]
    lat = {r["provider"]: r for r in s["latency"]}
    assert lat["cpu"]["speedup"] == 4.0 and lat["openvino"]["speedup"] == 2.5
    assert lat["cpu"]["parity_max_abs"] == 1e-6
    assert lat["cuda"]["status"] == "unavailable" and lat["cuda"]["speedup"] is None
    assert s["bundle"] == str(tmp_path / "deploy" / "bundle")
    headers, rows = summary_rows(s)
    table = {r[0]: r[1:] for r in rows}
    assert headers == ["", "original", "converted", "change"]
    assert table["params"] == ["1.00k", "400", "x0.400"]
    assert table["top-1 accuracy"] == ["99.00%", "94.50%", "-4.50 pts"]
    assert table["latency cpu b1 (fp32)"] == ["2.000 ms", "0.500 ms", "4.00x faster"]
    assert table["latency cuda b1"] == ["-", "-", "unavailable"]


def test_write_report_files_and_content(tmp_path):
    folder = tmp_path / "report"
    folder.mkdir()
    files, summary = write_report(full_records(tmp_path), RECIPE, tmp_path, folder)
    assert set(files) == {"report.md", "report.html", "summary.json", "layers.png", "accuracy.png", "finetune.png",
                          "latency.png"}
    for f in files:
        assert (folder / f).is_file()
    for png in [f for f in files if f.endswith(".png")]:
        assert (folder / png).read_bytes()[:4] == b"\x89PNG"
    md = (folder / "report.md").read_text()
    assert "| features.3 | 16->32 | 3x3 | 2 | 4.00k | 500 | 0.310 | 0.400 -> 0.050 | converted |" in md
    assert "| stem | 16->32 | 3x3 | - | 800 | - | - | - | stem (1 input channels) |" in md
    assert "| calibrated | 90.00% | 100.00% |" in md
    assert "| 2 | 0.5 | 90.00% | 95.00% | 0 | 4 |" in md
    assert "| openvino | 1 | fp32 | 1.000 ms | 0.400 ms | 2.50x | 1.00e-06 | 1 | ok |" in md
    assert "![fine-tuning curve](finetune.png)" in md
    assert "| converted | 2e-06 | True |" in md
    html = (folder / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<img src='latency.png'" in html
    assert "toy &lt;b&gt;" in html and "toy <b>" not in html
    assert json.loads((folder / "summary.json").read_text())["accuracy"] == [0.99, 0.945]
    assert "## Deployment bundle" in md and "top-1 of the fp32 ONNX model 95.0% -> bundle 94.5%" in md
    assert "| model.onnx | ab12 |" in md
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_partial_run_without_data_or_bench(tmp_path):
    records = full_records(tmp_path)
    for name in ("finetune", "evaluate", "bench", "deploy"):
        records[name] = {"status": "skipped", "reason": "no data", "result": {}, "outputs": {}}
    records["convert"]["result"]["calibration"] = None
    folder = tmp_path / "r"
    files, summary = write_report(records, RECIPE, tmp_path, folder)
    assert set(files) == {"report.md", "report.html", "summary.json", "layers.png"}
    assert summary["accuracy"] is None and summary["latency"] == [] and summary["bundle"] is None
    md = (folder / "report.md").read_text()
    assert "| finetune | skipped | - | no data |" in md and "## Latency" not in md
    headers, rows = summary_rows(summary)
    assert [r[0] for r in rows] == ["params", "MACs", "conv MACs"]


def test_accuracy_falls_back_to_the_recovery_stages_own_figures(tmp_path):
    records = full_records(tmp_path)
    records["evaluate"] = {"status": "skipped", "reason": "x", "result": {}, "outputs": {}}
    acc = summarize(records)["accuracy_stages"]
    assert [(a["name"], a["top1"]) for a in acc] == [("original", 0.99), ("converted", 0.2), ("calibrated", 0.9),
                                                     ("finetuned", 0.95), ("bundle (int8)", 0.945)]


def test_latency_rows_empty_without_bench():
    assert latency_rows({}) == []


@pytest.mark.parametrize("value, text", [(None, "-"), (0.123456, "0.1235"), ("<x>", "&lt;x&gt;")])
def test_html_cells_escape(value, text):
    page = render_html([("table", ["h"], [[value]])], "t")
    assert f"<td>{text}</td>" in page


def _key_paths(value, prefix=""):
    """Every dict key path in ``value`` (list items merged under ``[]``), e.g. ``summary.macs``, ``layers[].rank``."""
    paths = set()
    if isinstance(value, dict):
        for k, v in value.items():
            paths.add(f"{prefix}{k}")
            paths |= _key_paths(v, f"{prefix}{k}.")
    elif isinstance(value, list):
        for item in value:
            paths |= _key_paths(item, f"{prefix[:-1]}[].")
    return paths


@pytest.fixture(scope="module")
def real_records(tmp_path_factory):
    """The records pipeline/stages.py really writes for inspect and convert (+ calibrate) on the digits sample."""
    from dsdeploy.pipeline.engine import Context, run_pipeline
    from dsdeploy.pipeline.recipe import load_recipe
    from dsdeploy.pipeline.runner import converters_dir
    from dsdeploy.pipeline.stages import STAGES

    recipe = load_recipe(converters_dir() / "digits_cnn.toml", [("calibrate", "batches", 2)])
    ctx = Context(recipe, tmp_path_factory.mktemp("run") / "run")
    stages = [s for s in STAGES if s.name in ("inspect", "convert")]
    result = run_pipeline(stages, ctx, log=io.StringIO())
    return result.records


def test_hand_built_records_have_the_shape_the_stages_write(tmp_path, real_records):
    """The hand-built records above stand in for stages that take minutes; they may only use keys
    that pipeline/stages.py really writes, or these report tests would pass on records no run makes."""
    hand = full_records(tmp_path)
    for stage in ("inspect", "convert"):
        assert real_records[stage]["status"] == "done"
        missing = _key_paths(hand[stage]["result"]) - _key_paths(real_records[stage]["result"])
        assert not missing, f"{stage}: the report tests use keys the stage does not write: {sorted(missing)}"


def test_summary_of_real_stage_records(real_records, tmp_path):
    s = summarize(real_records)
    conv = real_records["convert"]["result"]["summary"]
    assert s["params"] == [conv["params"], conv["params_after"]]
    assert s["conv_macs"] == [conv["conv_macs"], conv["conv_macs_after"]]
    assert s["conv_macs"][1] < s["conv_macs"][0]
