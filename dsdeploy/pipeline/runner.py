"""Entry points of ``dsdeploy run`` and ``dsdeploy demo``: load a recipe, run the stages.

The stage adapters live in :mod:`dsdeploy.pipeline.stages`; caching and records in
:mod:`dsdeploy.pipeline.engine`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dsdeploy.conversion.workflow import inspect_model
from dsdeploy.data.store import keep_decoded
from dsdeploy.errors import DsdeployError, RecipeError
from dsdeploy.models.trust import user_scope
from dsdeploy.pipeline.engine import Context, PipelineResult, run_pipeline
from dsdeploy.pipeline.ranks import Followed, ranked
from dsdeploy.pipeline.recipe import Recipe, load_recipe
from dsdeploy.pipeline.stages import STAGES, recipe_policy, recipe_source

DEMO_RECIPE = "digits_cnn.toml"


def _user_code(recipe: Recipe, trust_code: bool):
    """The run's trust scope: the recipe is code the person chose, so its ``model.spec`` is
    named by them (the run's own artifacts recording it reload without opt-in); its
    ``model.pythonpath`` folders resolve only that factory's modules, searched AFTER the
    installed packages (a file named like a dependency never shadows it); a ``.dsd`` the
    recipe names has its recorded factory imported only with ``trust_code``."""
    return user_scope(trust_code=trust_code, named=[recipe.model.spec], pythonpath=recipe.model.pythonpath)


def run_recipe(path: str | Path, out: str | Path, *, data: str | None = None, weights: str | None = None,
               overrides: list[str] | tuple[str, ...] = (), progress: bool = False,
               trust_code: bool = False) -> PipelineResult:
    """``dsdeploy run``: load the recipe (``--data``/``--weights``/``--set`` applied), run every stage into ``out``.

    ``trust_code``: import the ``pkg.module:factory`` recorded in a ``.dsd`` the recipe names.
    Under a multi-process launcher (``torchrun --nproc-per-node N``) rank 0 runs every stage and
    the other ranks only join its fine-tune (:mod:`dsdeploy.pipeline.ranks`); they return a result
    with ``main`` False and no records.

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
    t0 = time.perf_counter()
    with _user_code(recipe, trust_code), keep_decoded():  # calibrate, finetune, evaluate decode each image once
        try:
            with ranked(ctx.out) as lead:  # under torchrun: rank 0 runs the stages, the others join its fine-tune
                if lead is not None:
                    ctx.hooks["finetune"] = lead.finetune
                return run_pipeline(STAGES, ctx)
        except Followed as followed:
            if not followed.ok:
                raise DsdeployError("rank 0's run failed (its error is above); this rank stops too") from None
            return PipelineResult(ctx.out, {}, round(time.perf_counter() - t0, 2), main=False)


def inspect_recipe(recipe: Recipe, *, out: str | Path = ".", trust_code: bool = False) -> Any:
    """Plan a recipe's model without converting (``tasks.ModelReport``): the cheap check of a recipe."""
    ctx = Context(recipe, Path(out))
    with _user_code(recipe, trust_code):
        loaded, _, shape = recipe_source(ctx)
        return inspect_model(loaded, recipe_policy(ctx), shape)


def converters_dir() -> Path:
    """The repository's ``converters/`` folder (recipes shipped with dsdeploy)."""
    return Path(__file__).resolve().parents[2] / "converters"


def demo_recipe() -> Path:
    """The embedded default recipe: the digits sample, end to end."""
    path = converters_dir() / DEMO_RECIPE
    if not path.is_file():
        raise RecipeError(f"the demo recipe {path} is missing; install dsdeploy from a clone (`pip install -e .`)")
    return path


def run_demo(out: str | Path, *, progress: bool = False, overrides: list[str] | tuple[str, ...] = (),
             trust_code: bool = False) -> PipelineResult:
    """``dsdeploy demo``: the digits recipe end to end, offline."""
    return run_recipe(demo_recipe(), out, overrides=overrides, progress=progress, trust_code=trust_code)
