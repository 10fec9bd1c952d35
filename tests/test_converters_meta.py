"""Every recipe in converters/ is listed here, loads, validates, and is exercised.

The digits recipe runs end to end in tests/test_pipeline.py; every other recipe is planned
(inspect) on its real architecture at a small input shape, without weights (weights are
the user's). A new converters/*.toml fails ``test_every_recipe_is_listed`` until it is
added to RECIPES with a check.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from dsdeploy.models.samples import SAMPLES
from dsdeploy.pipeline.recipe import load_recipe
from dsdeploy.pipeline.runner import converters_dir, inspect_recipe

CONVERTERS = converters_dir()
E2E = "end-to-end"

# recipe file -> how it is exercised: E2E, or the input shape to plan it at.
RECIPES: dict[str, str | list[int]] = {
    "digits_cnn.toml": E2E,
    "cifar_resnet.toml": [1, 3, 32, 32],
    "cifar10_resnet_pretrained.toml": [1, 3, 32, 32],  # with the real checkpoint: tests/test_pretrained.py
    "torchvision_resnet18.toml": [1, 3, 64, 64],
    "torchvision_resnet50.toml": [1, 3, 64, 64],
    "torchvision_mobilenet_v2.toml": [1, 3, 64, 64],
    "torchvision_vgg16.toml": [1, 3, 64, 64],
    "torchvision_fasterrcnn_mobilenet_fpn.toml": [1, 3, 128, 128],
    "timm_resnet.toml": [1, 3, 64, 64],
}
PLANNED = [name for name, how in RECIPES.items() if how != E2E]


def test_every_recipe_is_listed():
    found = sorted(p.name for p in CONVERTERS.glob("*.toml"))
    assert found, f"no recipes in {CONVERTERS}"
    assert found == sorted(RECIPES), "each converters/*.toml needs an entry in RECIPES (and a check)"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_loads_and_validates(name):
    r = load_recipe(CONVERTERS / name)
    assert r.name == Path(name).stem
    assert r.description and r.model.spec
    assert r.bench.providers[0] == "cpu"


def _recipes_run_by(module) -> set[str]:
    """File names of the recipes that ``module``'s test functions pass to ``dsdeploy run`` (``dsdeploy("run", X, ...)``)."""
    found: set[str] = set()
    for fn in ast.walk(ast.parse(inspect.getsource(module))):
        if not (isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_")):
            continue
        for call in ast.walk(fn):
            if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "dsdeploy"
                    and len(call.args) >= 2 and isinstance(call.args[0], ast.Constant) and call.args[0].value == "run"):
                arg = call.args[1]
                value = getattr(module, arg.id, None) if isinstance(arg, ast.Name) else getattr(arg, "value", None)
                if isinstance(value, (str, Path)):
                    found.add(Path(value).name)
    return found


def test_end_to_end_recipes_have_their_test():
    from tests import test_pipeline

    run = _recipes_run_by(test_pipeline)
    missing = [name for name, how in RECIPES.items() if how == E2E and name not in run]
    assert not missing, f"not run end to end by a test in tests/test_pipeline.py: {missing}"


def _without_weights(name: str, shape: list[int]):
    """The recipe with its model built at random init at ``shape`` (samples via their architecture factory)."""
    overrides: list = [("model", "input_shape", shape)]
    if load_recipe(CONVERTERS / name).preprocess.size:  # a smaller input needs its preprocessing to match
        overrides.append(("preprocess", "size", shape[2:]))
    spec = load_recipe(CONVERTERS / name).model.spec
    if spec.startswith("sample:"):
        build = SAMPLES[spec.split(":", 1)[1]].build
        overrides.append(("model", "spec", f"{build.__module__}:{build.__name__}"))
    return load_recipe(CONVERTERS / name, overrides)


@pytest.mark.parametrize("name", PLANNED)
def test_recipe_plans_its_model(name):
    recipe = _without_weights(name, RECIPES[name])
    report = inspect_recipe(recipe)
    converted = [d for d in report.plan.layers if d.convert]
    assert converted, f"{name} converts nothing"
    assert report.input_shape == RECIPES[name]
    c = recipe.convert
    for d in converted:
        if c.include:
            assert re.search(c.include, d.name)
        if c.exclude:
            assert not re.search(c.exclude, d.name)
        if c.rank:
            assert d.rank == min(c.rank, d.full_rank)
    if c.mac_budget:
        assert sum(d.macs_after for d in converted) <= c.mac_budget * sum(d.macs for d in converted) * 1.001
    if name == "torchvision_mobilenet_v2.toml":  # only the stem is a standard conv
        assert [d.name for d in converted] == ["features.0.0"]
    if name == "torchvision_vgg16.toml":
        assert {d.name for d in report.plan.layers if not d.convert} == {"features.0", "features.2"}
