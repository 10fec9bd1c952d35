"""``dsdeploy bench`` and ``dsdeploy providers``."""

from __future__ import annotations

import click

from dsdeploy.cli import cli
from dsdeploy.cli.options import echo_json, preprocess_options
from dsdeploy.errors import ConfigError, ProviderError
from dsdeploy.fsutil import show
from dsdeploy.outputs import check_distinct, check_output
from dsdeploy.progress import bar as progress_bar
from dsdeploy.ranges import parse_duration as seconds
from dsdeploy.runtime.providers import list_providers, parse_ep_options
from dsdeploy.tables import format_table

# Rule for this module: library modules that import torch or numpy (dsdeploy.api, the stage configs,
# runtime.bench) are imported inside the commands, so `dsdeploy --help` stays torch-free
# (tests/test_layout.py::test_the_cli_help_does_not_import_torch).


def parse_list(text: str, what: str) -> list[str]:
    """``"cpu, openvino"`` -> ``["cpu", "openvino"]``."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise click.BadParameter("give at least one value", param_hint=what)
    return items


def parse_ints(text: str, what: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]`` (positive integers)."""
    try:
        values = [int(t) for t in parse_list(text, what)]
    except ValueError:
        raise click.BadParameter(f"must be comma-separated integers, got {text!r}", param_hint=what) from None
    if any(v <= 0 for v in values):
        raise click.BadParameter(f"must be positive, got {text!r}", param_hint=what)
    return values


def parse_duration(text: str | None) -> float | None:
    """``--duration`` text -> seconds by the library's one grammar (:func:`dsdeploy.ranges.parse_duration`)."""
    try:
        return None if text is None else seconds(text)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--duration") from None


def check_report_paths(models, data: str | None, **paths: str | None) -> None:
    """Refuse report paths that are a benchmarked model, the data, each other, lack their format's suffix
    (.json, .csv, .md, .png), or name an existing file dsdeploy did not write."""
    flags = {"json_path": "--json", "csv_path": "--csv", "markdown_path": "--markdown", "plot_path": "--plot"}
    inputs = [("model", m) for m in models] + [("--data", data)]
    suffixes = {"json_path": ".json", "csv_path": ".csv", "markdown_path": ".md", "plot_path": ".png"}
    check_distinct((flags[k], v) for k, v in paths.items())
    for key, path in paths.items():
        if path is not None:
            check_output(path, kind="png" if key == "plot_path" else "text", suffixes=(suffixes[key],),
                         inputs=inputs, what=flags[key])


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False), metavar="MODEL.onnx...")
@click.option("--providers", default="cpu", show_default=True, metavar="EP,...",
              help="EP aliases or names: cpu, openvino, cuda, tensorrt, dml, coreml, ...")
@click.option("--batch", default="1", show_default=True, metavar="N,...", help="Batch sizes (dynamic axis 0).")
@click.option("--threads", type=int, default=None, help="Intra-op threads (default: ONNX Runtime's choice).")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed runs before timing.")
@click.option("--iters", type=int, default=None, help="Timed runs (default 50 unless --duration).")
@click.option("--duration", default=None, metavar="10s", help="Time runs for this long instead of --iters.")
@click.option("--data", default=None, metavar="DATA",
              help="'digits' or an image folder: real inputs, and top-1 agreement with the CPU EP.")
@preprocess_options
@click.option("--ep-option", "ep_options", multiple=True, metavar="EP:KEY=VALUE",
              help="Provider option, repeatable: openvino:precision=bf16, tensorrt:trt_fp16_enable=1, ...")
@click.option("--skip-unavailable", is_flag=True, help="Skip requested EPs that are not available instead of failing.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of generated inputs and data subsets.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the full results (with raw samples).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None, help="Write one CSV row per result.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None, help="Write a Markdown report.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Write a PNG latency plot.")
def bench(models, providers, batch, threads, warmup, iters, duration, data, ep_options, skip_unavailable, seed,
          json_path, csv_path, markdown_path, plot_path, preprocess):
    """Latency of ONNX MODELs on ONNX Runtime EPs, with parity against the CPU EP.

    With two or more models the first is the baseline: the table shows each model's
    speedup per EP and batch next to its conv-MAC reduction."""
    from dsdeploy import api
    from dsdeploy.runtime.bench import BenchConfig
    from dsdeploy.runtime.bench_report import render_text

    check_report_paths(models, data, json_path=json_path, csv_path=csv_path, markdown_path=markdown_path,
                       plot_path=plot_path)
    secs = parse_duration(duration)
    if secs is not None and iters is not None:
        raise click.BadParameter("give --iters or --duration, not both", param_hint="--duration")
    cfg = BenchConfig(providers=parse_list(providers, "--providers"), batches=parse_ints(batch, "--batch"),
                      threads=threads, warmup=warmup, iters=None if secs else (50 if iters is None else iters), duration=secs,
                      data=data, ep_options=parse_ep_options(ep_options), skip_unavailable=skip_unavailable,
                      seed=seed, preprocess=preprocess)
    total = len(models) * len(cfg.batches) * len(cfg.providers)
    bars: list = []  # opened on the first run, so input errors print one line and no bar

    def progress(what: str) -> None:
        if not bars:
            bars.append(progress_bar(total=total, unit="run"))
        bars[0].set_description(what)
        bars[0].update(1)

    try:
        report = api.benchmark(list(models), config=cfg, json_path=json_path, csv_path=csv_path,
                               markdown_path=markdown_path, plot_path=plot_path, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    click.echo(render_text(report))
    for path in (p for p in (json_path, csv_path, markdown_path, plot_path) if p):
        click.echo(f"wrote {show(path)}", err=True)
    failed = [r for r in report.results if r.status == "error"]
    if failed:
        raise ProviderError(f"{len(failed)} of {len(report.results)} runs failed: " + "; ".join(
            f"{r.model} on {r.alias} batch {r.batch}: {r.note}" for r in failed[:3]))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def providers(as_json):
    """ONNX Runtime execution providers here (built-in and plugin), their devices and versions."""
    infos = list_providers()
    if as_json:
        echo_json([p.to_dict() for p in infos])
        return
    rows = [[p.alias or "-", p.name, p.kind, "yes" if p.available else "no", ", ".join(p.devices) or "-",
             p.version or "-", p.note or ""] for p in infos]
    click.echo(format_table(["alias", "EP", "kind", "available", "devices", "version", "note"], rows))
