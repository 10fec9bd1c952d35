"""Recipe loading and validation: schema, types, unknown keys, overrides, path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsdeploy.errors import RecipeError
from dsdeploy.pipeline.recipe import (
    Recipe,
    load_recipe,
    parse_override,
    recipe_from_dict,
)

MINIMAL = '[model]\nspec = "sample:digits_cnn"\n'


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_minimal_recipe_gets_defaults(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL))
    assert isinstance(r, Recipe)
    assert r.model.spec == "sample:digits_cnn"
    assert r.convert.layout == "branches" and r.convert.rank is None
    assert r.bench.providers == ["cpu", "openvino"] and r.bench.batches == [1]
    assert r.data.spec is None and r.finetune.mode == "full"
    assert r.path == str((tmp_path / "r.toml").resolve())


def test_full_recipe_types_are_coerced(tmp_path):
    text = MINIMAL + """model_kwargs = { num_classes = 10 }
input_shape = [1, 1, 16, 16]
[preprocess]
size = [16, 16]
mean = [0]
std = [1]
channels = 1
[convert]
energy = 1
include = 'features\\.'
[finetune]
epochs = 2
time_budget = "10m"
lr = 1
[bench]
batches = [1, 8]
"""
    r = load_recipe(write(tmp_path, text))
    assert r.model.model_kwargs == {"num_classes": 10}
    assert r.convert.energy == 1.0 and isinstance(r.convert.energy, float)
    assert isinstance(r.finetune.lr, float) and r.preprocess.mean == [0.0]
    assert r.finetune.time_budget == 600.0 and r.bench.batches == [1, 8]  # a duration, kept in seconds
    assert r.convert.include == "features\\."


@pytest.mark.parametrize("text, needle", [
    (MINIMAL + "[convert]\nrnak = 2\n", "unknown key in [convert] 'rnak'; did you mean 'rank'?"),
    (MINIMAL + "[convrt]\nrank = 2\n", "unknown key 'convrt'; did you mean 'convert'?"),
    (MINIMAL + "[finetune]\nepochs = \"two\"\n", "finetune.epochs must be an integer or unset, got string 'two'"),
    (MINIMAL + "[finetune]\nepochs = 2.5\n", "finetune.epochs must be an integer"),
    (MINIMAL + "[convert]\nconvert_stem = 1\n", "convert.convert_stem must be true/false, got integer 1"),
    (MINIMAL + "[bench]\nbatches = [1, \"8\"]\n", "bench.batches must be a list of an integer"),
    (MINIMAL + "[bench]\nbatches = 1\n", "bench.batches must be a list of an integer"),
    ("seed = true\n" + MINIMAL, "seed must be an integer, got boolean True"),
    ('model = "x"\n', "[model] must be a table"),
    ("[data]\nspec = 'digits'\n", "model.spec is required"),
    (MINIMAL + "[convert]\nrank = 2\nenergy = 0.5\n",
     "one of rank, energy, mac_budget, speedup, target_latency_ms (got convert.rank, convert.energy)"),
    (MINIMAL + "[convert]\nenergy = 1.5\n", "convert.energy must be in (0, 1]"),
    (MINIMAL + "[convert]\nlayout = \"fancy\"\n", "convert.layout must be one of branches, concat, multiplier"),
    (MINIMAL + "[finetune]\nmode = \"most\"\n", "finetune.mode must be one of none, partial, full"),
    (MINIMAL + "[finetune]\ntime_budget = \"ten minutes\"\n", "finetune.time_budget"),
    (MINIMAL + "[finetune]\nepochs = 0\n", "finetune.epochs must be >= 1 unless finetune.time_budget is set, got 0"),
    (MINIMAL + "[deploy]\nquantize = \"int4\"\n", "deploy.quantize must be one of"),
    (MINIMAL + "[data]\nval_split = 1.0\n", "data.val_split must be in [0, 1)"),
    (MINIMAL + "[bench]\nbatches = []\n", "bench.batches must be a non-empty list"),
    (MINIMAL + "[bench]\nthreads = -1\n", "bench.threads must be >= 1, got -1"),
    (MINIMAL + "[bench]\nwarmup = -1\n", "bench.warmup must be >= 0, got -1"),
    (MINIMAL + "[bench]\niters = 0\n", "bench.iters must be >= 1, got 0"),
    (MINIMAL + "[bench]\nbatches = [1, 0]\n", "bench.batches must be >= 1, got 0"),
    (MINIMAL + "[bench]\nproviders = []\n", "bench.providers must name at least one provider"),
    (MINIMAL + "[model]\n", "not valid TOML"),
])
def test_bad_recipes_name_the_key_and_the_file(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert needle in msg
    assert str(path) in msg
    assert "\n" not in msg


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.toml")


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    sub = tmp_path / "recipes"
    sub.mkdir()
    path = write(sub, MINIMAL + 'weights = "w/model.pt"\npythonpath = ["src"]\n[data]\nspec = "../imgs"\n')
    monkeypatch.chdir(tmp_path)  # the current folder must not matter
    r = load_recipe(path)
    assert r.model.weights == str((sub / "w" / "model.pt").resolve())
    assert r.model.pythonpath == [str((sub / "src").resolve())]
    assert r.data.spec == str((tmp_path / "imgs").resolve())
    assert load_recipe(write(sub, MINIMAL + '[data]\nspec = "digits"\n', "d.toml")).data.spec == "digits"
    # specs that are not paths stay as they are
    assert load_recipe(write(sub, '[model]\nspec = "pkg.mod:factory"\n', "f.toml")).model.spec == "pkg.mod:factory"
    art = load_recipe(write(sub, '[model]\nspec = "m.dsd"\n', "a.toml"))
    assert art.model.spec == str((sub / "m.dsd").resolve())


def test_zero_epochs_with_a_time_budget_is_accepted_as_on_the_command_line(tmp_path):
    """``--epochs 0 --time-budget 5s`` works in ``finetune``; the recipe takes the same pair."""
    r = load_recipe(write(tmp_path, MINIMAL + "[finetune]\nepochs = 0\ntime_budget = \"5s\"\n"))
    assert (r.finetune.epochs, r.finetune.time_budget) == (0, 5.0)
    assert load_recipe(write(tmp_path, MINIMAL), ["finetune.epochs=0", 'finetune.time_budget="5s"']).finetune.epochs == 0


def test_overrides_are_toml_values_validated_like_the_file(tmp_path):
    path = write(tmp_path, MINIMAL + "[finetune]\nepochs = 5\n")
    r = load_recipe(path, ["finetune.epochs=2", "bench.batches=[1, 4]", "convert.convert_stem=true",
                           "data.spec=digits", "seed=3", 'convert.include="^a"'])
    assert (r.finetune.epochs, r.bench.batches, r.convert.convert_stem, r.data.spec, r.seed) == (2, [1, 4], True,
                                                                                                "digits", 3)
    assert r.convert.include == "^a"
    with pytest.raises(RecipeError, match="finetune.epochs must be an integer or unset, got string 'two'"):
        load_recipe(path, ["finetune.epochs=two"])
    with pytest.raises(RecipeError, match="unknown key in \\[finetune\\] 'epoch'"):
        load_recipe(path, ["finetune.epoch=2"])
    with pytest.raises(RecipeError, match="bench.threads must be >= 1, got -1"):  # at load, not at stage 7
        load_recipe(path, ["bench.threads=-1"])
    with pytest.raises(RecipeError, match="use section.key=value"):
        load_recipe(path, ["finetune.epochs"])


def test_override_paths_resolve_against_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    path = write(tmp_path / "recipes", MINIMAL)
    monkeypatch.chdir(tmp_path)
    r = load_recipe(path, ["data.spec=imgs", ("model", "weights", "w.pt")])
    assert r.data.spec == str((tmp_path / "imgs").resolve())
    assert r.model.weights == str((tmp_path / "w.pt").resolve())


def test_parse_override():
    assert parse_override("finetune.lr=1e-3") == (["finetune", "lr"], 1e-3)
    assert parse_override("data.spec=/data/x y") == (["data", "spec"], "/data/x y")
    assert parse_override('model.model_kwargs={ num_classes = 3 }') == (["model", "model_kwargs"],
                                                                        {"num_classes": 3})


def test_nothing_in_a_recipe_runs_in_a_shell(tmp_path):
    """A spec or path full of shell syntax is only ever a name: it fails to resolve, nothing runs."""
    from dsdeploy.errors import SourceError
    from dsdeploy.pipeline.engine import Context
    from dsdeploy.pipeline.stages import run_inspect

    marker = tmp_path / "pwned"
    path = write(tmp_path, f'[model]\nspec = "$(touch {marker}):x"\nweights = "`touch {marker}`"\n')
    r = load_recipe(path)
    with pytest.raises(SourceError):
        run_inspect(Context(r, tmp_path / "out"), tmp_path)
    assert not marker.exists()


def test_recipe_from_dict_round_trip():
    r = recipe_from_dict({"model": {"spec": "torchvision:resnet18"}, "convert": {"rank": 2}})
    again = recipe_from_dict(r.to_dict())
    assert again == r
    assert r.section("convert")["rank"] == 2 and r.section("seed") == 0


@pytest.mark.parametrize("convert,deploy,planned", [
    ({"speedup": 2.0}, {"quantize": "int8"}, "int8"),  # a latency target plans in the precision it deploys in
    ({"speedup": 2.0}, {"quantize": "int8-dynamic"}, "int8-dynamic"),
    ({"speedup": 2.0, "precision": "fp32"}, {"quantize": "int8"}, "fp32"),  # said explicitly: kept
    ({"speedup": 2.0}, {"quantize": "int8", "enabled": False}, None),  # no deploy stage: fp32
    ({"speedup": 2.0}, {"quantize": "fp16"}, None),
    ({"rank": 2}, {"quantize": "int8"}, None),  # no latency target: nothing is timed
])
def test_a_latency_target_plans_in_the_precision_the_recipe_deploys_in(tmp_path, convert, deploy, planned):
    from dsdeploy.pipeline.engine import Context
    from dsdeploy.pipeline.stages import STAGES, recipe_policy

    r = recipe_from_dict({"model": {"spec": "sample:digits_cnn"}, "convert": convert, "deploy": deploy})
    ctx = Context(r, tmp_path)
    assert recipe_policy(ctx).precision == planned
    stage = next(s for s in STAGES if s.name == "convert")
    other = recipe_from_dict({**r.to_dict(), "deploy": {**deploy, "quantize": "none"}})
    same_key = stage.sections(ctx) == stage.sections(Context(other, tmp_path))
    assert same_key == (planned == convert.get("precision"))  # the convert stage re-runs when its precision changes
