"""One schema per stage: every field of a stage's library config is settable from a recipe and the CLI.

Adding a field to ``Policy`` / ``FinetuneConfig`` / ``CalibrationParams`` without a CLI flag (or
an entry, with its reason, in the exclusions below) fails here; the recipe sections ARE those
dataclasses, so they expose a new field by themselves.
"""

from __future__ import annotations

import dataclasses

import pytest

from dsdeploy.cli import load_commands
from dsdeploy.conversion.plan import Policy
from dsdeploy.errors import RecipeError
from dsdeploy.export.config import DeployConfig, ExportConfig
from dsdeploy.pipeline.recipe import Recipe, recipe_from_dict
from dsdeploy.recover.config import CalibrationParams, FinetuneConfig
from dsdeploy.recover.evaluate import EvaluateConfig
from dsdeploy.runtime.bench import BenchConfig

# config field -> CLI parameter name, where they differ
CLI_NAMES = {"history_path": "history", "batches": "batch"}
RECIPE_NAMES = {("calibrate", "max_batches"): "batches"}

# fields deliberately NOT given a CLI flag, and why
CLI_EXCLUDED = {
    ("convert", "require_gain"): "library/test knob: convert where a DS block costs more (exactness checks)",
    ("finetune", "progress"): "the CLI shows progress unless --json",
    ("finetune", "checkpoint_path"): "the CLI keeps the resume checkpoint at OUT.ckpt",
    ("bench", "preprocess"): "one dict built from --size/--resize/--mean/--std/--channels (preprocess_options)",
    ("bench", "parity_items"): "library knob: how many items the CPU-EP parity compares (64 is plenty)",
}

STAGES = [("convert", Policy, ("convert", "inspect")), ("finetune", FinetuneConfig, ("finetune",)),
          ("calibrate", CalibrationParams, ("calibrate",)), ("evaluate", EvaluateConfig, ("evaluate",)),
          ("export", ExportConfig, ("export",)), ("deploy", DeployConfig, ("deploy",)),
          ("bench", BenchConfig, ("bench",))]


@pytest.mark.parametrize("section,config,commands", STAGES, ids=[s[0] for s in STAGES])
def test_every_config_field_has_a_cli_flag(section, config, commands):
    cli = load_commands()
    for command in commands:
        params = {p.name for p in cli.commands[command].params}
        missing = [f.name for f in dataclasses.fields(config) if (section, f.name) not in CLI_EXCLUDED
                   and CLI_NAMES.get(f.name, f.name) not in params]
        assert missing == [], f"`dsdeploy {command}` has no flag for {section} fields {missing}"


@pytest.mark.parametrize("section,config,commands", STAGES, ids=[s[0] for s in STAGES])
def test_every_config_field_is_a_recipe_key(section, config, commands):
    section_cls = type(getattr(Recipe(), section))
    keys = {f.name for f in dataclasses.fields(section_cls)}
    excluded = getattr(section_cls, "RECIPE_EXCLUDED", {})
    missing = [f.name for f in dataclasses.fields(config) if f.name not in excluded
               and RECIPE_NAMES.get((section, f.name), f.name) not in keys]
    assert missing == [], f"[{section}] has no key for {missing}"
    for name, reason in excluded.items():  # each exclusion is a real field, refused with its reason
        assert name in {f.name for f in dataclasses.fields(config)} and reason
        with pytest.raises(RecipeError, match=f"{section}.{name} cannot be set"):
            recipe_from_dict({"model": {"spec": "sample:digits_cnn"}, section: {name: None}}, "r.toml")


def test_the_recipe_sections_are_the_library_configs():
    r = Recipe()
    assert isinstance(r.convert, Policy) and isinstance(r.finetune, FinetuneConfig)
    assert isinstance(r.evaluate, EvaluateConfig) and isinstance(r.export, ExportConfig)
    assert isinstance(r.deploy, DeployConfig) and isinstance(r.bench, BenchConfig)
    assert type(r.bench.config()) is BenchConfig and type(r.deploy.config()) is DeployConfig


def test_recipe_sets_the_options_that_had_drifted():
    r = recipe_from_dict({"model": {"spec": "sample:digits_cnn"},
                          "convert": {"rank": 2, "require_gain": False},
                          "finetune": {"init": "xavier", "reinit": "^head", "channels_last": False,
                                       "time_budget": "90s"}}, "r.toml")
    cfg = r.finetune.config(seed=r.seed, progress=False)
    assert type(cfg) is FinetuneConfig
    assert (cfg.init, cfg.reinit, cfg.channels_last, cfg.time_budget, cfg.epochs) == ("xavier", "^head", False,
                                                                                    90.0, None)
    assert r.convert.rank == 2 and r.convert.require_gain is False


@pytest.mark.parametrize("section,table,named", [
    ("convert", {"rank": 0}, "convert.rank must be >= 1"),
    ("convert", {"rank": 1, "energy": 0.5}, "choose one of rank, energy, mac_budget"),
    ("convert", {"include": "("}, "convert.include is not a valid regular expression"),
    ("finetune", {"init": "zeros"}, "finetune.init must be one of"),
    ("finetune", {"time_budget": "soon"}, "finetune.time_budget"),
    ("deploy", {"max_accuracy_drop": -1}, "deploy.max_accuracy_drop"),
    ("deploy", {"quantize": "int4"}, "deploy.quantize must be one of"),
    ("export", {"atol": -1.0}, "export.atol"),
    ("export", {"exporter": "jit"}, "export.exporter must be one of"),
    ("evaluate", {"batch_size": 0}, "evaluate.batch_size"),
    ("bench", {"batches": [0]}, "bench.batches"),
])
def test_one_validation_names_the_field(section, table, named):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"model": {"spec": "sample:digits_cnn"}, section: table}, "r.toml")
    assert str(err.value).startswith("r.toml: ") and named in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("args,flag", [
    (["deploy", "m.onnx", "-o", "b", "--max-accuracy-drop", "-1"], "--max-accuracy-drop"),
    (["export", "sample:digits_cnn", "-o", "m.onnx", "--atol", "-1"], "--atol"),
    (["evaluate", "sample:digits_cnn", "--data", "digits", "--batch-size", "0"], "--batch-size"),
])
def test_the_cli_shows_its_flag_for_the_field_the_library_names(args, flag, tmp_path, monkeypatch):
    """The library's message names ``section.field``; the CLI prints the flag it maps that field from."""
    from click.testing import CliRunner

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.onnx").write_bytes(b"")
    result = CliRunner().invoke(load_commands(), args)
    assert result.exit_code != 0 and f"error: {flag}" in result.output, result.output
    assert "." + flag.lstrip("-").replace("-", "_") not in result.output
