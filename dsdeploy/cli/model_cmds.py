"""``dsdeploy inspect`` and ``dsdeploy convert``."""

from __future__ import annotations

import click

from dsdeploy.cli import cli, flag_names
from dsdeploy.cli.options import (
    PRECISIONS,
    block_reconstruct_option,
    device_option,
    echo_json,
    model_options,
    parse_kwargs,
    parse_shape,
    preprocess_options,
)
from dsdeploy.recover.config import CALIB_BATCHES, CALIB_CACHE_MB, CALIB_EVAL_IMAGES, CALIB_ROUNDS

# Rule for this module: library modules that import torch or numpy (dsdeploy.api, the stage configs,
# runtime.bench) are imported inside the commands, so `dsdeploy --help` stays torch-free
# (tests/test_layout.py::test_the_cli_help_does_not_import_torch).


def policy_options(func):
    """Rank policy and layer filters shared by inspect and convert."""
    opts = [
        click.option("--rank", type=int, default=None, help="Fixed rank K per converted layer (default 1)."),
        click.option("--energy", type=float, default=None,
                     help="Per layer, the smallest K keeping this fraction of spectral energy (0-1]."),
        click.option("--mac-budget", type=float, default=None,
                     help="Global: converted convs' MACs <= F x original, K chosen greedily by error per MAC."),
        click.option("--include", default=None, metavar="REGEX", help="Only convert convs whose name matches."),
        click.option("--exclude", default=None, metavar="REGEX", help="Never convert convs whose name matches."),
        click.option("--convert-stem", is_flag=True, help="Also convert convs with <= 4 input channels."),
        click.option("--layout", type=click.Choice(["branches", "concat", "multiplier"]), default="branches",
                     show_default=True, help="Graph layout of rank>1 blocks (branches is fastest on ORT CPU)."),
        click.option("--speedup", type=float, default=None,
                     help="Plan ranks and layouts from latency measured on --provider: X times faster than the "
                          "original (verified by measuring the converted model)."),
        click.option("--target-latency", "target_latency_ms", type=float, default=None, metavar="MS",
                     help="As --speedup, for a latency in ms per batch."),
        click.option("--provider", default=None, metavar="EP",
                     help="EP the latencies are measured on (default cpu; with --mac-budget: pick each layer's "
                          "fastest measured layout)."),
        click.option("--batch", type=int, default=1, show_default=True, help="Batch the latencies are measured at."),
        click.option("--threads", type=int, default=None,
                     help="Intra-op threads for latencies (default: physical cores, else 2)."),
        click.option("--precision", type=click.Choice(PRECISIONS), default=None,
                     help="The precision you will deploy in (`deploy --quantize`): latencies are timed on graphs "
                          "quantized so (default fp32). The artifact itself stays fp32."),
        click.option("--allocation", type=click.Choice(["auto", "spectral", "data"]), default="spectral",
                     show_default=True, help="How --mac-budget is shared out: by the kernels' spectral energy, or "
                     "by each layer's measured effect on the logits on --calib-data (data; auto: data when "
                     "--calib-data is given). Data-aware ranks help at tight budgets (x0.17), not at x0.25+."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def _policy(options: dict):
    """The Policy the policy_options flags set (each flag's parameter is the Policy field of its name)."""
    from dsdeploy.conversion.plan import Policy

    return Policy(**options)


@cli.command()
@click.argument("model")
@model_options
@policy_options
@click.option("--calib-data", default=None, metavar="DATA",
              help="Measure each layer's sensitivity (output and logit error per rank) on this data.")
@click.option("--calib-batches", type=int, default=CALIB_BATCHES, show_default=True,
              help="Draw the sensitivity images from at most N batches (as convert's calibration).")
@device_option
@preprocess_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect(model, weights, model_kwargs, trust_pickle, input_shape, calib_data, calib_batches, device, as_json,
            preprocess, trust_code, **policy):
    """Show MODEL's convs: what would convert (and at which rank), why others would not,
    and params/MACs at the input shape; with --calib-data, the per-layer sensitivity table."""
    from dsdeploy import api

    report = api.inspect(model, policy=_policy(policy),
                         input_shape=parse_shape(input_shape), weights=weights, model_kwargs=parse_kwargs(model_kwargs),
                         trust_pickle=trust_pickle, trust_code=trust_code, data=calib_data,
                         calib_batches=calib_batches, preprocess=preprocess, device=device)
    echo_json(report.to_dict()) if as_json else click.echo(flag_names(report.render()))


@cli.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .dsd artifact to write.")
@model_options
@policy_options
@click.option("--calib-data", default=None, metavar="DATA",
              help="Calibrate the DS factors on this data (folder or 'digits') after converting.")
@click.option("--calib-batches", type=int, default=CALIB_BATCHES, show_default=True,
              help="Calibrate on at most N batches.")
@click.option("--calib-rounds", type=int, default=CALIB_ROUNDS, show_default=True,
              help="Alternating depthwise/pointwise least-squares rounds per layer (0: pointwise only).")
@click.option("--calib-cache-mb", default=CALIB_CACHE_MB, show_default=True, metavar="MIB|auto",
              help="MiB of stage inputs cached while calibrating; auto: half the memory available "
                   "(0: rerun the network prefix per layer).")
@click.option("--calib-eval-images", type=int, default=CALIB_EVAL_IMAGES, show_default=True,
              help="Score top-1 before and after calibrating on at most N validation images (0: none).")
@block_reconstruct_option
@device_option
@preprocess_options
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--refresh", is_flag=True,
              help="Re-measure the cached latency table and drop the correction stored with it.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def convert(model, output, weights, model_kwargs, trust_pickle, input_shape, calib_data, calib_batches, calib_rounds,
            calib_cache_mb, calib_eval_images, block_reconstruct, device, seed, refresh, as_json, preprocess,
            trust_code, **policy):
    """Rewrite MODEL's convs into depthwise-separable blocks and write a .dsd artifact.

    Prints params/MACs before and after and the rank of every layer. Exit status 3 when
    nothing converts (the reasons per conv are listed)."""
    from dsdeploy import api
    from dsdeploy.conversion.artifact import check_artifact_output

    check_artifact_output(output, what="--output",
                          inputs=[("model", model), ("--weights file", weights), ("--calib-data", calib_data)])
    cm = api.convert(model, policy=_policy(policy),
                     input_shape=parse_shape(input_shape), weights=weights, model_kwargs=parse_kwargs(model_kwargs),
                     trust_pickle=trust_pickle, trust_code=trust_code, preprocess=preprocess, data=calib_data,
                     allocation_options={"seed": seed, "calib_batches": calib_batches, "device": device},
                     refresh=refresh)
    if calib_data:
        api.calibrate(cm, calib_data, max_batches=calib_batches, seed=seed, progress=True,
                      block_reconstruct=block_reconstruct, rounds=calib_rounds, cache_mb=calib_cache_mb,
                      eval_images=calib_eval_images, device=device)
    api.save(cm, output)
    report = cm.report(output)
    echo_json(report.to_dict()) if as_json else click.echo(flag_names(report.render()))
