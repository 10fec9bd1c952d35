"""Entry points of ``dsdeploy run`` and ``dsdeploy demo``: load a recipe, run the stages.

The stage adapters live in :mod:`dsdeploy.stages`; caching and records in
:mod:`dsdeploy.pipeline`.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Iterator

from dsdeploy.pipeline import Context, PipelineResult, run_pipeline
from dsdeploy.recipe import Recipe, load_recipe
from dsdeploy.stages import STAGES, recipe_policy, recipe_source

DEMO_RECIPE = "digits_cnn.toml"


@contextlib.contextmanager
def _user_code_path(folders: list[str]) -> Iterator[None]:
    """Make the recipe's ``model.pythonpath`` folders importable for the run (``pkg.module:factory``)."""
    added = [f for f in folders if f not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for f in added:
            if f in sys.path:
                sys.path.remove(f)


def run_recipe(path: str | Path, out: str | Path, *, data: str | None = None, weights: str | None = None,
               overrides: list[str] | tuple[str, ...] = (), progress: bool = False) -> PipelineResult:
    """``dsdeploy run``: load the recipe (``--data``/``--weights``/``--set`` applied), run every stage into ``out``.

    Raises:
        RecipeError: a bad recipe or override; StageError: the first failing stage (by name).
    """
    extra = list(overrides)
    if data is not None:
        extra.append(("data", "spec", data))
    if weights is not None:
        extra.append(("model", "weights", weights))
    recipe = load_recipe(path, extra)
    ctx = Context(recipe, Path(out), progress=progress)
    with _user_code_path(recipe.model.pythonpath):
        return run_pipeline(STAGES, ctx)


def inspect_recipe(recipe: Recipe, *, out: str | Path = ".") -> Any:
    """Plan a recipe's model without converting (``tasks.ModelReport``): the cheap check of a recipe."""
    from dsdeploy.tasks import inspect_model

    ctx = Context(recipe, Path(out))
    with _user_code_path(recipe.model.pythonpath):
        loaded, _, shape = recipe_source(ctx)
        return inspect_model(loaded, recipe_policy(ctx), shape)


def converters_dir() -> Path:
    """The repository's ``converters/`` folder (recipes shipped with dsdeploy)."""
    import dsdeploy

    return Path(dsdeploy.__file__).resolve().parents[1] / "converters"


def demo_recipe() -> Path:
    """The embedded default recipe: the digits sample, end to end."""
    from dsdeploy.errors import RecipeError

    path = converters_dir() / DEMO_RECIPE
    if not path.is_file():
        raise RecipeError(f"the demo recipe {path} is missing; install dsdeploy from a clone (`pip install -e .`)")
    return path


def run_demo(out: str | Path, *, progress: bool = False, overrides: list[str] | tuple[str, ...] = ()
             ) -> PipelineResult:
    """``dsdeploy demo``: the digits recipe end to end, offline."""
    return run_recipe(demo_recipe(), out, overrides=overrides, progress=progress)
