"""The staged pipeline: caching by content hash, failure handling, and `dsdeploy run` on the digits recipe."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from dsdeploy.errors import DataError, DsdeployError
from dsdeploy.pipeline.engine import (
    Context,
    Stage,
    StageError,
    StageOutput,
    load_state,
    run_pipeline,
)
from tests.clirun import dsdeploy, dsdeploy_chain, json_out

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "converters" / "digits_cnn.toml"


# ------------------------------------------------------------------------------------------
# the generic pipeline on toy stages
# ------------------------------------------------------------------------------------------

def toy_stages(calls: list[str], fail: str | None = None, exc: type[Exception] = DataError) -> list[Stage]:
    """a writes config["a"] to a.txt; b doubles a.txt's text into b.txt; c is skipped when config["skip_c"]."""

    def run_a(ctx: Context, folder: Path) -> StageOutput:
        calls.append("a")
        if fail == "a":
            raise exc("a broke\nsecond line")
        (folder / "a.txt").write_text(str(ctx.config["a"]))
        return StageOutput({"value": ctx.config["a"]}, {"out": "a.txt"})

    def run_b(ctx: Context, folder: Path) -> StageOutput:
        calls.append("b")
        if fail == "b":
            raise exc("b broke")
        text = ctx.output("a", "out").read_text()
        (folder / "b.txt").write_text(text * 2)
        return StageOutput({"len": len(text * 2), "a": ctx.result("a")}, {"out": "b.txt"})

    def run_c(ctx: Context, folder: Path) -> StageOutput:
        calls.append("c")
        return StageOutput({"b": ctx.result("b")["len"]})

    return [Stage("a", run_a, lambda ctx: {"a": ctx.config["a"]}),
            Stage("b", run_b, lambda ctx: {"b": ctx.config["b"]}, lambda ctx: [ctx.output("a", "out")]),
            Stage("c", run_c, lambda ctx: None, lambda ctx: [ctx.output("b", "out")],
                  lambda ctx: "skip_c is set" if ctx.config.get("skip_c") else None)]


def run(tmp_path: Path, config: dict, calls: list[str], **kw):
    log = io.StringIO()
    res = run_pipeline(toy_stages(calls, **kw), Context(config, tmp_path / "out"), log=log)
    return res, log.getvalue()


def test_reruns_only_what_changed(tmp_path):
    calls: list[str] = []
    res, log = run(tmp_path, {"a": "x", "b": 1}, calls)
    assert calls == ["a", "b", "c"]
    assert [line.split(" ... ")[1] for line in log.splitlines()][0].startswith("done in")
    assert log.splitlines()[1].startswith("[2/3] b ... done in ")
    assert (tmp_path / "out" / "b" / "b.txt").read_text() == "xx"
    rec = json.loads((tmp_path / "out" / "b" / "stage.json").read_text())
    assert rec["result"] == {"len": 2, "a": {"value": "x"}} and rec["status"] == "done"
    assert set(load_state(tmp_path / "out")["stages"]) == {"a", "b", "c"}

    calls.clear()
    res, log = run(tmp_path, {"a": "x", "b": 1}, calls)
    assert calls == []
    assert log.splitlines() == ["[1/3] a ... cached", "[2/3] b ... cached", "[3/3] c ... cached"]
    assert res.records["b"]["result"]["len"] == 2

    calls.clear()  # b's own config changed: b reruns; c's input (b.txt) is byte-identical, so c stays cached
    run(tmp_path, {"a": "x", "b": 2}, calls)
    assert calls == ["b"]

    calls.clear()  # a's config changed: a's output changes, so everything downstream reruns
    run(tmp_path, {"a": "yy", "b": 2}, calls)
    assert calls == ["a", "b", "c"]
    assert (tmp_path / "out" / "b" / "b.txt").read_text() == "yyyy"


def test_deleted_or_edited_outputs_are_rebuilt(tmp_path):
    calls: list[str] = []
    run(tmp_path, {"a": "x", "b": 1}, calls)
    (tmp_path / "out" / "a" / "a.txt").write_text("tampered")
    calls.clear()
    run(tmp_path, {"a": "x", "b": 1}, calls)
    assert calls == ["a"]  # a rebuilt with the same bytes: b and c stay cached
    (tmp_path / "out" / "state.json").write_text("{not json")
    calls.clear()
    run(tmp_path, {"a": "x", "b": 1}, calls)
    assert calls == ["a", "b", "c"]


def test_skipped_stage_is_reported(tmp_path):
    calls: list[str] = []
    res, log = run(tmp_path, {"a": "x", "b": 1, "skip_c": True}, calls)
    assert calls == ["a", "b"]
    assert log.splitlines()[2] == "[3/3] c ... skipped (skip_c is set)"
    assert res.records["c"]["status"] == "skipped"


@pytest.mark.parametrize("exc, code", [(DataError, 2), (ZeroDivisionError, 70)])
def test_failure_names_the_stage_and_keeps_earlier_outputs(tmp_path, exc, code):
    calls: list[str] = []
    run(tmp_path, {"a": "x", "b": 1}, calls)
    calls.clear()
    with pytest.raises(StageError) as err:
        run(tmp_path, {"a": "x", "b": 2}, calls, fail="b", exc=exc)
    msg = str(err.value)
    assert msg.startswith("stage b failed: ") and "b broke" in msg and "\n" not in msg
    assert isinstance(err.value, DsdeployError) and err.value.exit_code == code and err.value.stage == "b"
    assert calls == ["b"]
    # the earlier stage and the failed stage's previous outputs are intact; the failed stage is not cached
    assert (tmp_path / "out" / "a" / "a.txt").read_text() == "x"
    assert (tmp_path / "out" / "b" / "b.txt").read_text() == "xx"
    state = load_state(tmp_path / "out")
    assert "a" in state["stages"] and "b" not in state["stages"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp folders left
    calls.clear()
    run(tmp_path, {"a": "x", "b": 2}, calls)
    assert calls == ["b"]  # b.txt comes out byte-identical, so c stays cached


def test_first_stage_failure_message_is_one_line(tmp_path):
    with pytest.raises(StageError, match=r"^stage a failed: a broke$"):
        run(tmp_path, {"a": "x", "b": 1}, [], fail="a")


# ------------------------------------------------------------------------------------------
# `dsdeploy run` on real recipes
# ------------------------------------------------------------------------------------------

FAST = ["--set", "finetune.epochs=1", "--set", "bench.iters=10", "--set", "bench.warmup=1",
        "--set", "bench.batches=[1]", "--set", "calibrate.batches=4", "--set", "finetune.limit=400"]


def _stage_lines(stderr: str) -> list[str]:
    """The `[i/n] stage ... status` lines of a run's stderr (other lines, e.g. the resolved preprocessing, dropped)."""
    return [l for l in stderr.strip().splitlines() if l.startswith("[")]


def test_digits_recipe_end_to_end(tmp_path):
    """digits_cnn.toml through every stage, then a re-run that is all cached, then a --set that reruns."""
    out = tmp_path / "run"
    proc = dsdeploy("run", DIGITS, "--out", out, "--json", *FAST)
    summary = json_out(proc)
    lines = _stage_lines(proc.stderr)
    assert sum(l.startswith("preprocessing: ") for l in proc.stderr.splitlines()) == 1, proc.stderr
    assert [l.split(" ... ")[0] for l in lines[-8:]] == [
        "[1/8] inspect", "[2/8] convert", "[3/8] finetune", "[4/8] evaluate", "[5/8] export", "[6/8] deploy",
        "[7/8] bench", "[8/8] report"]
    assert all(" ... done in " in l for l in lines[-8:]), proc.stderr
    # before/after numbers
    p, m = summary["params"], summary["conv_macs"]
    assert p[1] < p[0] and m[1] < 0.6 * m[0]
    acc = {a["name"]: a["top1"] for a in summary["accuracy_stages"]}
    assert list(acc) == ["original", "converted", "calibrated", "finetuned", "bundle (none)"]
    # measured 0.997 / 0.114 / 0.911 / 0.911: one short epoch on 400 images barely moves the calibrated model, and
    # how it moves it depends on the CPU's rounding; what is promised is that it stays a working classifier
    assert acc["original"] > 0.95 and acc["calibrated"] > acc["converted"] + 0.5 and acc["finetuned"] > 0.85
    # the fp32 bundle (ONNX Runtime) scores the finetuned model's images: the same accuracy, except where
    # ORT and torch round a borderline image differently (at most two images here)
    images = json.loads((out / "evaluate" / "stage.json").read_text())["result"]["images"]
    assert acc["bundle (none)"] == pytest.approx(acc["finetuned"], abs=2 / images + 1e-9)
    cpu = [r for r in summary["latency"] if r["provider"] == "cpu"]
    assert cpu and cpu[0]["original_ms"] > 0 and cpu[0]["converted_ms"] > 0 and cpu[0]["speedup"] > 0
    assert summary["bundle"] and Path(summary["bundle"]).exists()
    # files of every stage, the fine-tuning history and the report
    for rel in ("convert/converted.dsd", "convert/calibrated.dsd", "finetune/finetuned.dsd", "finetune/history.json",
                "export/original.onnx", "export/model.onnx", "bench/bench.json", "report/report.md",
                "report/report.html", "report/accuracy.png", "report/finetune.png", "report/latency.png",
                "report/layers.png", "state.json"):
        assert (out / rel).is_file(), rel
    assert not (out / "finetune" / "finetune.ckpt").exists()
    md = (out / "report" / "report.md").read_text()
    for heading in ("## Summary", "## Layers", "## Accuracy after each recovery stage", "## Fine-tuning",
                    "## Latency per execution provider", "## Deployment bundle", "## Parity"):
        assert heading in md
    assert (out / "report" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the re-run in a fresh process (the cache is on disk), then the changed setting in that same process
    again, third = dsdeploy_chain(("run", DIGITS, "--out", out, *FAST), ("run", DIGITS, "--out", out, *FAST, "--set",
                                                                         "bench.iters=5"))
    assert again.returncode == 0, again.stderr
    assert all(l.endswith("... cached") for l in _stage_lines(again.stderr)[-8:]), again.stderr
    assert "top-1 accuracy" in again.stdout and "latency cpu b1" in again.stdout

    # a changed bench setting reruns bench and the report only
    assert third.returncode == 0, third.stderr
    status = {l.split(" ... ")[0].split()[1]: l.split(" ... ")[1] for l in _stage_lines(third.stderr)[-8:]}
    assert [n for n, st in status.items() if st != "cached"] == ["bench", "report"], third.stderr


def test_run_rejects_bad_overrides_in_one_line(tmp_path):
    proc = dsdeploy("run", DIGITS, "--out", tmp_path / "o", "--set", "finetune.epochs=two")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {DIGITS}: finetune.epochs must be an integer or unset, "
                                   f"got string 'two'")
    assert not (tmp_path / "o").exists()


def test_stage_failure_from_the_cli_names_the_stage(tmp_path):
    proc = dsdeploy("run", DIGITS, "--out", tmp_path / "o", "--data", tmp_path / "missing", *FAST)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: stage convert failed: ") and "not found" in err[-1]
    assert err[0] == "[1/8] inspect ... done in " + err[0].split("done in ")[1]
    assert (tmp_path / "o" / "inspect" / "inspect.json").is_file()


def test_user_code_factory_from_the_recipe_folder(tmp_path):
    """model.spec = pkg.module:factory with model.pythonpath relative to the recipe's folder."""
    from dsdeploy.pipeline.recipe import load_recipe
    from dsdeploy.pipeline.runner import inspect_recipe

    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "mynet.py").write_text(
        "from torch import nn\n"
        "def build(width=8):\n"
        "    return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.Conv2d(width, 16, 3))\n")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nspec = "mynet:build"\npythonpath = ["code"]\nmodel_kwargs = { width = 12 }\n'
                      'input_shape = [1, 3, 16, 16]\n')
    report = inspect_recipe(load_recipe(recipe))
    assert [d.name for d in report.plan.layers if d.convert] == ["2"]
    assert report.plan.layers[1].in_channels == 12
    import sys

    assert str(tmp_path / "code") not in sys.path


def test_a_stage_warning_is_printed_after_its_line(tmp_path):
    stages = [Stage("a", lambda ctx, folder: StageOutput({"warning": "kept the input"}), lambda ctx: {"a": 1})]
    log = io.StringIO()
    run_pipeline(stages, Context({}, tmp_path / "out"), log=log)
    assert log.getvalue().splitlines()[-1] == "warning: a: kept the input"


def test_a_fine_tune_that_makes_things_worse_is_reported_by_the_run(tmp_path):
    """A destructive learning rate: the run keeps the calibrated model, says so on stderr and in the report."""
    out = tmp_path / "run"
    proc = dsdeploy("run", DIGITS, "--out", out, *FAST, "--set", "finetune.lr=50", "--set", "finetune.warmup_epochs=0",
                    "--set", "export.enabled=false", "--set", "deploy.enabled=false", "--set", "bench.enabled=false")
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning: finetune: ")]
    assert len(warning) == 1, proc.stderr
    md = (out / "report" / "report.md").read_text()
    assert "Warning: " in md and "Time: data " in md
    acc = {a["name"]: a["top1"] for a in json.loads((out / "report" / "summary.json").read_text())["accuracy_stages"]}
    assert acc["finetuned"] == acc["calibrated"]
