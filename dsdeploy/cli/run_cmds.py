"""``dsdeploy run`` and ``dsdeploy demo``."""

from __future__ import annotations

import json
import sys

import click

from dsdeploy.cli import cli
from dsdeploy.cli.options import echo_json, print_preprocessing, trust_code_option
from dsdeploy.pipeline.report import summarize, summary_rows
from dsdeploy.tables import format_table

# Rule for this module: library modules that import torch or numpy (dsdeploy.api, the stage configs,
# runtime.bench) are imported inside the commands, so `dsdeploy --help` stays torch-free
# (tests/test_layout.py::test_the_cli_help_does_not_import_torch).


def _print_summary(result, as_json: bool) -> None:
    if not result.main:  # a rank > 0 under torchrun: it joined the fine-tune; rank 0 reports
        return
    summary = (result.records.get("report") or {}).get("result", {}).get("summary") or summarize(result.records,
                                                                                                  result.out)
    if as_json:
        echo_json({**summary, "out": str(result.out), "seconds": result.seconds})
        return
    click.echo(format_table(*summary_rows(summary)))
    if summary.get("bundle"):
        click.echo(f"bundle: {summary['bundle']}")
    if summary.get("report"):
        click.echo(f"report: {summary['report']}")
    click.echo(f"done in {result.seconds:.1f}s (outputs in {result.out})")


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--data", default=None, help="Data for the recipe: 'digits' or a folder of images (overrides data.spec).")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="Checkpoint (overrides model.weights).")
@click.option("-o", "--out", default="dsdeploy-out", show_default=True, type=click.Path(file_okay=False),
              help="Output folder: new, empty or an earlier run's (one subfolder per stage, state.json for "
                   "caching; locked while a run uses it).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set finetune.epochs=2 (TOML value; repeatable).")
@click.option("--device", default=None, metavar="DEVICE",
              help="auto, cpu, cuda, cuda:N or mps for every stage that runs the model on data (sets "
                   "calibrate/finetune/evaluate.device; --set wins).")
@trust_code_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def run(recipe, data, weights, out, overrides, device, as_json, trust_code):
    """Run RECIPE.toml end to end: inspect, convert (+ calibrate), finetune, evaluate,
    export (+ parity), deploy, bench, report. Stages whose inputs did not change are
    reported "cached" and skipped; an interrupted fine-tuning continues from its checkpoint.
    A recipe is code you chose: its model.spec factory is imported (model.pythonpath is
    searched after installed packages); only model factories are called."""
    from dsdeploy.pipeline.runner import run_recipe

    if device is not None:
        overrides = [f"{stage}.device={json.dumps(device)}" for stage in ("calibrate", "finetune", "evaluate")] + \
            list(overrides)
    with print_preprocessing():
        result = run_recipe(recipe, out, data=data, weights=weights, overrides=list(overrides),
                            progress=sys.stderr.isatty() and not as_json, trust_code=trust_code)
    _print_summary(result, as_json)


@cli.command()
@click.option("-o", "--out", default="dsdeploy-demo", show_default=True, type=click.Path(file_okay=False),
              help="Output folder.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a value of the demo recipe.")
@trust_code_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def demo(out, overrides, as_json, trust_code):
    """Run the built-in digits recipe end to end, offline (a few minutes on 2 CPU cores), and
    print the before/after table: params, MACs, accuracy, latency per execution provider."""
    from dsdeploy.pipeline.runner import run_demo

    result = run_demo(out, overrides=list(overrides), progress=sys.stderr.isatty() and not as_json,
                      trust_code=trust_code)
    _print_summary(result, as_json)
