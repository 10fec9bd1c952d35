"""``dsdeploy export`` and ``dsdeploy deploy``: parse options, call one library function, print."""

from __future__ import annotations

import click

from dsdeploy.cli import cli
from dsdeploy.cli.options import (
    echo_json,
    model_options,
    parse_kwargs,
    parse_shape,
    preprocess_options,
)
from dsdeploy.fsutil import show
from dsdeploy.outputs import check_output

# Rule for this module: library modules that import torch or numpy (dsdeploy.api, the stage configs,
# runtime.bench) are imported inside the commands, so `dsdeploy --help` stays torch-free
# (tests/test_layout.py::test_the_cli_help_does_not_import_torch).


def _worst(parity: list) -> str:
    if not parity:
        return "-"
    w = max(parity, key=lambda p: p.max_abs_diff)
    return f"max abs {w.max_abs_diff:.2e}, rel {w.max_rel_diff:.2e}, min cosine {min(p.cosine for p in parity):.6f}"


@cli.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="ONNX file to write.")
@model_options
@click.option("--opset", type=int, default=18, show_default=True,
              help="ONNX opset (dynamo writes at least 18; auto uses torchscript below 18).")
@click.option("--dynamic-batch/--static-batch", default=True, show_default=True,
              help="Dynamic axis 0 (verified at two batch sizes) or the fixed --input-shape batch.")
@click.option("--simplify/--no-simplify", default=True, show_default=True,
              help="Run onnxsim; a result that breaks parity is discarded with a warning.")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True,
              help="torch.onnx exporter: auto = dynamo (torch.export), falling back to torchscript when it fails "
                   "(the reason is warned and recorded in the ONNX metadata); dynamo/torchscript = only that one.")
@click.option("--data", default=None, metavar="DATA", help="Also check parity on real images: 'digits' or a folder.")
@preprocess_options
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Parity: absolute tolerance.")
@click.option("--rtol", type=float, default=1e-4, show_default=True,
              help="Parity: tolerance relative to the output's max |value|.")
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON.")
def export(model: str, output: str, weights: str | None, model_kwargs: str | None, trust_pickle: bool,
           input_shape: str | None, opset: int, dynamic_batch: bool, simplify: bool, exporter: str,
           data: str | None, atol: float, rtol: float, as_json: bool, preprocess: dict | None,
           trust_code: bool) -> None:
    """Export MODEL to ONNX, gated by parity against torch on ONNX Runtime (CPU EP)."""
    from dsdeploy import api
    from dsdeploy.export.config import ExportConfig

    check_output(output, kind="onnx", suffixes=(".onnx",), what="--output",
                 inputs=[("model", model), ("--weights file", weights), ("--data", data)])
    config = ExportConfig(opset=opset, dynamic_batch=dynamic_batch, simplify=simplify, exporter=exporter, atol=atol,
                          rtol=rtol)
    rep = api.export_onnx(model, output, input_shape=parse_shape(input_shape), config=config, weights=weights,
                          model_kwargs=parse_kwargs(model_kwargs), trust_pickle=trust_pickle, data=data,
                          preprocess=preprocess, trust_code=trust_code)
    if as_json:
        echo_json(rep.to_dict())
        return
    click.echo(f"wrote {show(rep.path)} ({rep.exporter} exporter, opset {rep.opset}, "
               f"{'dynamic' if rep.dynamic_batch else 'static'} batch, "
               f"{'simplified' if rep.simplified else 'not simplified'})")
    click.echo(f"parity vs torch: {_worst(rep.parity)} over {len(rep.parity)} checks")
    click.echo(f"ops: {rep.op_counts}; conv MACs/item: {rep.conv_macs}")
    if rep.original:
        click.echo(f"original model ops: {rep.original['op_counts']}; conv MACs/item: {rep.original['conv_macs']}")
    if rep.ds_problems is not None:
        click.echo("DS structure: " + ("ok" if not rep.ds_problems else "; ".join(rep.ds_problems)))
    for w in rep.warnings:
        click.echo(f"warning: {w}", err=True)


@cli.command()
@click.argument("onnx_model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Bundle folder: new, empty, or an earlier bundle (with --overwrite); other files are never touched.")
@click.option("--quantize", type=click.Choice(["none", "int8", "int8-dynamic", "fp16"]), default="none",
              show_default=True, help="int8 = static QDQ per-channel (needs --calib-data).")
@click.option("--calib-data", default=None, metavar="DATA", help="Images to calibrate INT8 on: 'digits' or a folder.")
@click.option("--eval-data", default=None, metavar="DATA", help="Labelled images: record accuracy vs the fp32 model.")
@preprocess_options
@click.option("--max-accuracy-drop", type=float, default=None, metavar="PTS",
              help="Fail (nothing written) when top-1 drops more than PTS points.")
@click.option("--ort-format", is_flag=True, help="Also write model.ort for ONNX Runtime Mobile.")
@click.option("--reduce-range/--full-range", default=None,
              help="INT8 weights in 7 bits (default: when this CPU lacks VNNI/AMX, whose absence makes "
                   "8-bit weights saturate).")
@click.option("--threads", type=int, default=None, help="CPU EP threads for the latency measurement.")
@click.option("--latency-iters", type=int, default=30, show_default=True,
              help="Timed batch-1 runs per model for the latency check (0 skips it).")
@click.option("--calib-items", type=int, default=256, show_default=True, help="Images INT8 calibration reads.")
@click.option("--eval-items", type=int, default=None, help="Score at most N images (default: the whole val split).")
@click.option("--overwrite", is_flag=True,
              help="Replace the files of a bundle deploy wrote earlier in --output (other files there are kept).")
@click.option("--json", "as_json", is_flag=True, help="Print the deploy report as JSON.")
def deploy(onnx_model: str, output: str, quantize: str, calib_data: str | None, eval_data: str | None,
           max_accuracy_drop: float | None, ort_format: bool, reduce_range: bool | None, threads: int | None,
           latency_iters: int, calib_items: int, eval_items: int | None, overwrite: bool, as_json: bool,
           preprocess: dict | None) -> None:
    """Package ONNX_MODEL into a bundle: model, manifest.json, standalone predict.py."""
    from dsdeploy import api
    from dsdeploy.export.config import DeployConfig

    config = DeployConfig(quantize=quantize, ort_format=ort_format, max_accuracy_drop=max_accuracy_drop,
                          latency_iters=latency_iters, threads=threads, reduce_range=reduce_range,
                          calib_items=calib_items, eval_items=eval_items)
    rep = api.deploy(onnx_model, output, config=config, calib_data=calib_data, eval_data=eval_data,
                     overwrite=overwrite, preprocess=preprocess)
    if as_json:
        echo_json(rep.to_dict())
        return
    click.echo(f"wrote bundle {show(rep.bundle)}: {', '.join(rep.files)} + manifest.json ({quantize})")
    if rep.accuracy:
        a = rep.accuracy
        click.echo(f"top-1 on {a['data']} ({a['images']} images): fp32 {a['fp32_top1']:.2f}% -> "
                   f"bundle {a['bundle_top1']:.2f}% (drop {a['drop_pts']:.2f} pts)")
    if rep.latency_ms:
        lat = rep.latency_ms
        click.echo(f"CPU EP latency, batch {lat['batch']}: fp32 {lat['fp32']['p50']:.3f} ms -> "
                   f"bundle {lat['bundle']['p50']:.3f} ms (median of {lat['iters']})")
    for w in rep.warnings:
        click.echo(f"warning: {w}", err=True)
