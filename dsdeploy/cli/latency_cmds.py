"""``dsdeploy latency``: per-layer dense vs DS-block latency measured on an EP (cached)."""

from __future__ import annotations

import dataclasses

import click

from dsdeploy.cli import cli, flag_names
from dsdeploy.cli.options import PRECISIONS, echo_json, model_options, parse_kwargs, parse_shape
from dsdeploy.errors import InputShapeError, PlanError
from dsdeploy.progress import bar as progress_bar

# Rule for this module: library modules that import torch or numpy (dsdeploy.api, the stage configs,
# runtime.bench) are imported inside the commands, so `dsdeploy --help` stays torch-free
# (tests/test_layout.py::test_the_cli_help_does_not_import_torch).


@cli.command("latency")
@click.argument("model")
@model_options
@click.option("--provider", default="cpu", show_default=True, metavar="EP", help="EP alias or name to measure on.")
@click.option("--batch", type=int, default=None, help="Batch size (default: the input shape's).")
@click.option("--threads", type=int, default=None, help="Intra-op threads (default: ONNX Runtime's choice).")
@click.option("--max-rank", type=int, default=None, help="Time ranks up to K (default: every rank that saves MACs).")
@click.option("--layouts", default="branches,concat,multiplier", show_default=True, metavar="L,...",
              help="DS layouts to time.")
@click.option("--convert-stem", is_flag=True, help="Also time convs with <= 4 input channels.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Latency cache folder (default $DSDEPLOY_CACHE/latency or ~/.cache/dsdeploy/latency).")
@click.option("--statistic", type=click.Choice(["median", "min"]), default="median", show_default=True,
              help="Figure per graph: the median of the timed runs, or the min (the undisturbed time on a "
                   "machine other processes load); the cache keeps both.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="Time every graph quantized as `deploy --quantize` would (INT8 depthwise convs run differently).")
@click.option("--refresh", is_flag=True, help="Re-measure everything, replacing the cached entries and dropping the stored corrections.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def latency_table(model, weights, model_kwargs, trust_pickle, input_shape, trust_code, provider, batch, threads,
                  max_rank, layouts, convert_stem, cache_dir, statistic, precision, refresh, as_json):
    """Measure MODEL's latency table: per convertible conv, dense ms vs each rank x layout ms.

    Every graph is timed alone by the benchmark protocol (stated in the output); results are
    cached per EP, CPU/device, ONNX Runtime version, threads, batch and layer shape, and
    reused on the next run."""
    from dsdeploy import api
    from dsdeploy.conversion.block import LAYOUTS
    from dsdeploy.conversion.loading import load_model
    from dsdeploy.conversion.plan import Policy
    from dsdeploy.runtime.latency_table import TABLE_PROTOCOL

    if batch is not None and batch < 1:
        raise InputShapeError(f"--batch must be >= 1, got {batch}")
    names = tuple(t.strip() for t in layouts.split(",") if t.strip())
    if not names or set(names) - set(LAYOUTS):
        raise PlanError(f"--layouts must name some of {', '.join(LAYOUTS)}, got {layouts!r}")
    bars: list = []

    def progress(what: str) -> None:
        if not bars:
            bars.append(progress_bar(unit="graph"))
        bars[0].set_description(what)
        bars[0].update(1)

    try:
        loaded = load_model(model, weights, parse_kwargs(model_kwargs), trust_pickle, trust_code=trust_code)
        shape = loaded.shape_or_default(parse_shape(input_shape))
        table = api.latency_table(loaded.model, (batch, *shape[1:]) if batch else shape, provider=provider,
                                  threads=threads, layouts=names, max_rank=max_rank,
                                  policy=Policy(convert_stem=convert_stem), refresh=refresh, cache_dir=cache_dir,
                                  protocol=dataclasses.replace(TABLE_PROTOCOL, statistic=statistic), name=model,
                                  progress=progress, precision=precision)
    finally:
        for bar in bars:
            bar.close()
    echo_json(table.to_dict()) if as_json else click.echo(flag_names(table.render()))
