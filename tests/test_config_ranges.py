"""Numbers that cannot be right are refused where they enter, naming the field (library, CLI, recipe)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsdeploy.errors import ConfigError, DsdeployError
from dsdeploy.recover.config import CalibrationParams, FinetuneConfig
from dsdeploy.recover.schedule import Schedule
from tests.clirun import invoke

NAN, INF = float("nan"), float("inf")

# field -> values that must be refused (nan/inf always; 0 and negatives where they make no sense)
FINETUNE_BAD = {
    "lr": [NAN, INF, -INF, 0.0, -0.1],
    "momentum": [NAN, INF, -0.1, 1.0, 2.0],
    "weight_decay": [NAN, INF, -1e-4],
    "warmup_epochs": [NAN, INF, -1.0],
    "kd_weight": [NAN, INF, -1.0],
    "feature_weight": [NAN, INF, -1.0],
    "ce_weight": [NAN, INF, -1.0],
    "temperature": [NAN, INF, 0.0, -1.0],
    "clip_grad": [NAN, INF, -1.0],
    "time_budget": [NAN, INF, 0.0, -5.0],
    "batch_size": [0, -1, 2.5],
    "epochs": [-1, 1.5],
    "patience": [-1],
    "seed": [-1, 0.5],
    "nproc": [0, -1, 1.5],
}
SCHEDULE_BAD = {
    "lr": [NAN, INF, 0.0, -1.0],
    "total_steps": [0, -3],
    "warmup_steps": [-1],
    "warmup_start": [NAN, -0.1, 1.5],
    "min_lr_ratio": [NAN, -0.1, 1.5],
    "gamma": [NAN, INF, 0.0, -0.5],
    "cycles": [0, -1],
    "cycle_mult": [NAN, INF, 0.5],
}
CALIB_BAD = {"ridge": [NAN, INF, -1.0], "max_batches": [0, -2], "batch_size": [0, -64]}


def _cases(table):
    return [(k, v) for k, vs in table.items() for v in vs]


def _one_line_naming(exc: BaseException, field: str) -> None:
    text = str(exc)
    assert field in text and "\n" not in text, text


@pytest.mark.parametrize("field,value", _cases(FINETUNE_BAD))
def test_finetune_config_refuses_bad_numbers(field, value):
    with pytest.raises(ConfigError) as err:
        FinetuneConfig(**{field: value})
    _one_line_naming(err.value, field)


@pytest.mark.parametrize("field,value", _cases(SCHEDULE_BAD))
def test_schedule_refuses_bad_numbers(field, value):
    with pytest.raises(ConfigError) as err:
        Schedule(**{field: value})
    _one_line_naming(err.value, field)


@pytest.mark.parametrize("field,value", _cases(CALIB_BAD))
def test_calibration_params_refuse_bad_numbers(field, value):
    with pytest.raises(ConfigError) as err:
        CalibrationParams(**{field: value})
    _one_line_naming(err.value, field)


FLOAT_FIELDS = ["lr", "momentum", "weight_decay", "warmup_epochs", "kd_weight", "feature_weight", "ce_weight",
                "temperature", "clip_grad", "time_budget"]


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(FLOAT_FIELDS),
       value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, -1e-9, NAN])))
def test_finetune_float_fields_accept_exactly_finite_in_range(field, value):
    limits = {"lr": (0, None, True), "temperature": (0, None, True), "time_budget": (0, None, True),
              "momentum": (0, 1, False)}
    low, high, low_open = limits.get(field, (0, None, False))
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and (high is None or value < high)
    try:
        FinetuneConfig(**{field: value})
    except ConfigError as exc:
        assert not ok, f"{field}={value!r} refused: {exc}"
        _one_line_naming(exc, field)
    else:
        assert ok, f"{field}={value!r} accepted"


def test_defaults_and_sensible_values_are_accepted():
    FinetuneConfig()
    FinetuneConfig(clip_grad=None, patience=0, epochs=0, mode="none", warmup_epochs=0.5, time_budget=30.0)
    Schedule("step", lr=0.1, total_steps=10, warmup_steps=2, milestones=[0.0, 1.0])
    CalibrationParams(ridge=0.0, max_batches=None, batch_size=1)
    with pytest.raises(DsdeployError, match="all 0"):
        FinetuneConfig(kd_weight=0.0, ce_weight=0.0, feature_weight=0.0)


@pytest.mark.parametrize("args,field", [
    (["--lr", "nan"], "lr"), (["--temperature", "0"], "temperature"), (["--clip-grad", "nan"], "clip_grad"),
    (["--warmup-epochs", "-1"], "warmup_epochs"), (["--momentum", "inf"], "momentum"),
])
def test_cli_finetune_bad_numbers_are_one_line_before_any_work(tmp_path, args, field):
    res = invoke("finetune", tmp_path / "missing.dsd", "--data", "digits", "-o", tmp_path / "o.dsd", *args)
    shown = args[0] if "_" in field else field  # the CLI shows its flag for a field the library names
    assert res.returncode == 2 and res.stderr.startswith("error:") and shown in res.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args,field", [(["--ridge", "nan"], "ridge"), (["--ridge", "-1"], "ridge"),
                                        (["--max-batches", "-1"], "max_batches"),
                                        (["--batch-size", "0"], "batch_size")])
def test_cli_calibrate_bad_numbers_are_one_line_before_any_work(tmp_path, args, field):
    res = invoke("calibrate", tmp_path / "missing.dsd", "--data", "digits", "-o", tmp_path / "o.dsd", *args)
    shown = args[0] if "_" in field else field  # the CLI shows its flag for a field the library names
    assert res.returncode == 2 and res.stderr.startswith("error:") and shown in res.stderr
    assert not list(tmp_path.iterdir())


RECIPE_BAD = [("calibrate", "ridge", NAN, "calibrate ridge"), ("calibrate", "ridge", -1.0, "calibrate ridge"),
              ("calibrate", "batches", -1, "calibrate.batches"), ("finetune", "lr", NAN, "finetune.lr"),
              ("finetune", "temperature", 0.0, "finetune.temperature"),
              ("finetune", "warmup_epochs", -1.0, "finetune.warmup_epochs"),
              ("finetune", "clip_grad", NAN, "finetune.clip_grad")]


@pytest.mark.parametrize("section,key,value,named", RECIPE_BAD)
def test_recipe_bad_numbers_are_refused_on_load(section, key, value, named):
    from dsdeploy.errors import RecipeError
    from dsdeploy.pipeline.recipe import recipe_from_dict

    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"model": {"spec": "sample:digits_cnn"}, section: {key: value}}, "r.toml")
    assert str(err.value).startswith("r.toml:") and named in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, field", [
    ({"seed": -1}, "data seed"), ({"limit": -1}, "data limit"), ({"limit": 0}, "data limit"),
    ({"limit": -300}, "data limit"),
])
def test_load_data_refuses_negative_seed_and_limit(kwargs, field):
    from dsdeploy.data.datasets import load_data
    with pytest.raises(ConfigError, match=field):
        load_data("digits", **kwargs)


def test_make_loader_refuses_batch_size_zero():
    import torch

    from dsdeploy.data.datasets import make_loader
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        make_loader(torch.utils.data.TensorDataset(torch.zeros(2)), 0, shuffle=False)


def test_finetune_reinit_must_be_a_regex():
    with pytest.raises(DsdeployError, match="finetune.reinit is not a valid regular expression"):
        FinetuneConfig(reinit="(")


@pytest.mark.parametrize("kwargs, words", [
    ({"atol": NAN}, "export.atol must be a finite"), ({"rtol": -1.0}, "export.rtol must be >= 0"),
])
def test_export_tolerances_are_checked_before_exporting(tmp_path, kwargs, words):
    from torch import nn

    from dsdeploy.export.onnx_export import export_onnx
    with pytest.raises(ConfigError, match=words):
        export_onnx(nn.Conv2d(1, 2, 3), tmp_path / "m.onnx", (1, 1, 8, 8), **kwargs)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kwargs, words", [
    ({"max_accuracy_drop": NAN, "eval_data": "digits"}, "max_accuracy_drop .* finite"),
    ({"max_accuracy_drop": -1.0, "eval_data": "digits"}, "max_accuracy_drop .* >= 0"),
    ({"threads": 0}, "threads must be >= 1"),
])
def test_deploy_refuses_gate_and_threads_out_of_range(tmp_path, kwargs, words):
    from dsdeploy.export.bundle import deploy
    with pytest.raises(ConfigError, match=words):
        deploy(tmp_path / "missing.onnx", tmp_path / "b", **kwargs)
    assert not (tmp_path / "b").exists()


def test_bench_iters_zero_is_refused_not_replaced():
    from dsdeploy.runtime.bench import BenchConfig
    with pytest.raises(DsdeployError, match="iters"):
        BenchConfig(providers=["cpu"], batches=[1], iters=0).validate()


@pytest.mark.parametrize("text, words", [
    ("seed = -1\n", "seed must be >= 0"), ("[export]\natol = nan\n", "export.atol must be a finite"),
    ("[export]\nrtol = -1.0\n", "export.rtol must be >= 0"),
])
def test_recipe_seed_and_export_tolerances(tmp_path, text, words):
    from dsdeploy.errors import RecipeError
    from dsdeploy.pipeline.recipe import load_recipe
    top, _, table = text.rpartition("[") if text.startswith("[") else (text, "", "")
    (tmp_path / "r.toml").write_text(f'{top}[model]\nspec = "sample:digits_cnn"\n' + (f"[{table}" if table else ""))
    with pytest.raises(RecipeError, match=words):
        load_recipe(tmp_path / "r.toml")


def test_torchvision_kwargs_that_break_the_builder_are_one_source_error():
    from dsdeploy.errors import SourceError
    from dsdeploy.models.sources import build_source
    with pytest.raises(SourceError, match="cannot be built"):
        build_source("torchvision:resnet18", {"num_classes": -5})
