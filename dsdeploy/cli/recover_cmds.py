"""``dsdeploy calibrate``, ``dsdeploy finetune`` and ``dsdeploy evaluate``."""

from __future__ import annotations

import click

from dsdeploy.cli import cli
from dsdeploy.cli.options import (
    block_reconstruct_option,
    device_option,
    echo_json,
    parse_kwargs,
    parse_shape,
    precision_option,
    preprocess_options,
    trust_code_option,
    workers_option,
)
from dsdeploy.fsutil import show
from dsdeploy.outputs import check_distinct, check_output
from dsdeploy.ranges import parse_duration
from dsdeploy.recover.config import (
    CALIB_BATCHES,
    CALIB_CACHE_MB,
    CALIB_EVAL_IMAGES,
    CALIB_ROUNDS,
    WARMUP_EPOCHS,
    CalibrationParams,
    FinetuneConfig,
)
from dsdeploy.tables import format_table

# Rule for this module: library modules that import torch or numpy (dsdeploy.api, the stage configs,
# runtime.bench) are imported inside the commands, so `dsdeploy --help` stays torch-free
# (tests/test_layout.py::test_the_cli_help_does_not_import_torch).


@cli.command()
@click.argument("model")
@click.option("--data", required=True, help="'digits' or a folder of labelled images (class folders).")
@click.option("--compare", default=None, metavar="MODEL2", help="A second model evaluated side by side.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="Checkpoint for MODEL.")
@click.option("--compare-weights", type=click.Path(dir_okay=False), default=None, help="Checkpoint for MODEL2.")
@click.option("--model-kwargs", default=None, metavar="JSON", help="Keyword arguments for the model builder(s).")
@click.option("--trust-pickle", is_flag=True, help="Allow checkpoints that are whole pickled models.")
@trust_code_option
@click.option("--input-shape", default=None, metavar="N,C,H,W",
              help="The model's input shape when it records none (sizes the preprocessing; default 224x224).")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--split", type=click.Choice(["val", "train"]), default="val", show_default=True,
              help="Which split to score (val = test/ or val/ folder, or the held-out part).")
@click.option("--val-split", type=float, default=0.2, show_default=True,
              help="Held-out fraction when the data has no test/ or val/ folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the train/val split.")
@click.option("--limit", type=int, default=None, help="Score at most this many images (seeded subset).")
@device_option
@precision_option
@workers_option
@preprocess_options
@click.option("--json", "as_json", is_flag=True, help="Print the full result (with confusion matrices) as JSON.")
def evaluate(model, data, compare, weights, compare_weights, model_kwargs, trust_pickle, input_shape, batch_size,
             split, val_split, seed, limit, device, precision, workers, as_json, preprocess, trust_code):
    """Accuracy of MODEL (top-1/top-5, macro precision/recall/F1) on labelled DATA,
    side by side with MODEL2 when --compare is given."""
    from dsdeploy import api
    from dsdeploy.recover.evaluate import EvaluateConfig, summary_rows

    config = EvaluateConfig(batch_size=batch_size, split=split, limit=limit, device=device, precision=precision,
                            workers=workers)
    result = api.evaluate(model, data, compare=compare, config=config, weights=weights,
                          compare_weights=compare_weights, model_kwargs=parse_kwargs(model_kwargs),
                          trust_pickle=trust_pickle, val_split=val_split, seed=seed, progress=not as_json,
                          preprocess=preprocess, trust_code=trust_code, input_shape=parse_shape(input_shape))
    if as_json:
        echo_json(result)
        return
    skipped = f", {result['skipped']} files skipped" if result["skipped"] else ""
    click.echo(f"{result['data']} ({result['split']}): {result['images']} images, "
               f"{len(result['classes'])} classes{skipped}")
    click.echo(format_table(*summary_rows(result)))
    if "agreement" in result and result["agreement"] is not None:
        click.echo(f"prediction agreement: {result['agreement']:.4f}")


# ---------------------------------------------------------------------------------------------
# calibrate / finetune
# ---------------------------------------------------------------------------------------------

@cli.command()
@click.argument("artifact", metavar="IN.dsd")
@click.option("--data", required=True, help="'digits' or a folder of images (labels optional).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The calibrated .dsd to write.")
@click.option("--max-batches", type=int, default=CALIB_BATCHES, show_default=True,
              help="Calibrate on at most N batches (a seeded subset).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--ridge", type=float, default=1e-6, show_default=True, help="Relative ridge of the least squares.")
@click.option("--rounds", type=int, default=CALIB_ROUNDS, show_default=True,
              help="Alternating depthwise/pointwise least-squares rounds per layer (0: pointwise only).")
@click.option("--cache-mb", default=CALIB_CACHE_MB, show_default=True, metavar="MIB|auto",
              help="MiB of stage inputs cached; auto: half the memory available when calibration starts "
                   "(0: rerun the network prefix per layer; same result, slower).")
@click.option("--eval-images", type=int, default=CALIB_EVAL_IMAGES, show_default=True,
              help="Score top-1 before and after on at most N validation images (0: no scoring).")
@block_reconstruct_option
@device_option
@workers_option
@click.option("--seed", type=int, default=0, show_default=True)
@preprocess_options
@trust_code_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def calibrate(artifact, data, output, max_batches, batch_size, ridge, rounds, cache_mb, eval_images, block_reconstruct,
              device, workers, seed, as_json, preprocess, trust_code):
    """Fit each converted layer's pointwise (and, alternating, depthwise) weights by least squares
    against the original model's convs on DATA (training-free), then re-estimate BatchNorm statistics."""
    from dsdeploy import api
    from dsdeploy.conversion.artifact import check_artifact_output

    check_artifact_output(output, what="--output",
                          inputs=[("artifact", artifact), ("--data", data)])
    params = CalibrationParams(ridge=ridge, max_batches=max_batches, batch_size=batch_size, rounds=rounds,
                               cache_mb=cache_mb, block_reconstruct=block_reconstruct, eval_images=eval_images,
                               device=device, workers=workers)
    report = api.calibrate(artifact, data, out=output, params=params, seed=seed, progress=not as_json,
                           preprocess=preprocess, trust_code=trust_code)
    if as_json:
        echo_json(report.to_dict())
    else:
        click.echo(report.render())
        click.echo(f"wrote {show(output)}")


@cli.command()
@click.argument("artifact", metavar="STUDENT.dsd")
@click.option("--data", required=True, help="'digits' or a folder of images (labels optional with a teacher).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The fine-tuned .dsd (best weights).")
@click.option("--teacher", default=None, metavar="MODEL", help="Teacher spec (default: the artifact's source model).")
@click.option("--teacher-weights", type=click.Path(dir_okay=False), default=None, help="Checkpoint for --teacher.")
@click.option("--mode", type=click.Choice(["none", "partial", "full"]), default="full", show_default=True,
              help="Train nothing, only the DS blocks and their norms, or everything.")
@click.option("--epochs", type=int, default=None, help="Epochs to train (default 10 without --time-budget).")
@click.option("--time-budget", default=None, metavar="DURATION",
              help="End within e.g. 10m of wall time (loading and decoding the data included; the "
                   "schedule is sized from the training steps' pace and re-checked while training).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--lr", type=float, default=0.01, show_default=True)
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--schedule", type=click.Choice(["step", "cosine", "cosine-restarts", "constant"]), default="cosine",
              show_default=True)
@click.option("--warmup-epochs", type=float, default=WARMUP_EPOCHS, show_default=True,
              help="Linear LR warmup from lr/10, in epochs (at most a tenth of the run; 0: none).")
@click.option("--kd-weight", type=float, default=1.0, show_default=True, help="Weight of the logit KL loss.")
@click.option("--feature-weight", type=float, default=0.0, show_default=True,
              help="Weight of the relative MSE between replaced blocks' outputs and the original convs'.")
@click.option("--ce-weight", type=float, default=0.5, show_default=True,
              help="Weight of cross-entropy (labelled items).")
@click.option("--temperature", type=float, default=4.0, show_default=True)
@click.option("--clip-grad", type=float, default=5.0, show_default=True, help="Max gradient norm (0 disables).")
@click.option("--init", "init", type=click.Choice(["he", "xavier", "none"]), default="he", show_default=True,
              help="Init of parameters not taken from the original model.")
@click.option("--reinit", default=None, metavar="REGEX", help="Also re-initialise modules whose name matches.")
@click.option("--patience", type=int, default=None, help="Stop after N epochs without val improvement.")
@click.option("--augment", is_flag=True, help="Augment the training split: RandomResizedCrop + flip for inputs of 96 px "
              "and more, pad + random crop + flip for smaller ones.")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="Train in NHWC memory format (about 2x faster convs on CPU).")
@device_option
@precision_option
@click.option("--limit", type=int, default=None, help="Use at most N images per split (seeded subset).")
@workers_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--nproc", type=int, default=1, show_default=True,
              help="Train data-parallel in N processes on this machine (as torchrun --nproc-per-node N; "
                   "--batch-size is split over them). Under torchrun, leave it at 1.")
@preprocess_options
@trust_code_option
@click.option("--resume", is_flag=True, help="Continue from OUT.ckpt after an interruption.")
@click.option("--history", "history", type=click.Path(dir_okay=False), default=None,
              help="Per-epoch history JSON (default OUT.history.json).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def finetune(artifact, data, output, teacher, teacher_weights, mode, epochs, time_budget, batch_size, optimizer, lr,
             momentum, weight_decay, schedule, warmup_epochs, kd_weight, feature_weight, ce_weight, temperature,
             clip_grad, init, reinit, patience, augment, channels_last, device, precision, limit, workers, seed,
             nproc, resume, history, as_json, preprocess, trust_code):
    """Recover accuracy by distillation from the original model (logits, optionally the
    replaced blocks' outputs, plus labels when DATA has them). Under torchrun (or --nproc N)
    it trains data-parallel; only rank 0 writes files and prints."""
    from dsdeploy import api
    from dsdeploy.conversion.artifact import check_artifact_output
    from dsdeploy.recover.distributed import env_rank

    inputs = [("artifact", artifact), ("--data", data), ("--teacher", teacher), ("--teacher-weights", teacher_weights)]
    check_artifact_output(output, what="--output", inputs=inputs)
    if history is not None:
        check_output(history, kind="text", suffixes=(".json",), what="--history", inputs=inputs)
        check_distinct([("--output", output), ("--history", history)])
    budget = parse_duration(time_budget, "time budget") if time_budget else None
    config = FinetuneConfig(mode=mode, epochs=epochs if epochs is not None else (None if budget else 10),
                            time_budget=budget, batch_size=batch_size, optimizer=optimizer, lr=lr, momentum=momentum,
                            weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs,
                            kd_weight=kd_weight, feature_weight=feature_weight, ce_weight=ce_weight,
                            temperature=temperature, clip_grad=clip_grad or None, init=init, reinit=reinit,
                            patience=patience, augment=augment, channels_last=channels_last, device=device,
                            precision=precision, seed=seed, progress=not as_json, history_path=history,
                            nproc=nproc, workers=workers)
    result = api.finetune(artifact, data, out=output, config=config, teacher=teacher, teacher_weights=teacher_weights,
                          resume=resume, limit=limit, preprocess=preprocess, trust_code=trust_code)
    if env_rank() != 0:  # one report, from rank 0
        return
    if result.warning:
        click.echo(f"warning: {result.warning}", err=True)
    if as_json:
        echo_json(result.to_dict())
        return
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    click.echo(f"teacher {pct(result.teacher_accuracy)}, before {pct(result.accuracy_before)}, best "
               f"{pct(result.best_accuracy)} (epoch {result.best_epoch}{', the input' if result.kept_input else ''}); "
               f"{result.epochs} epochs, {result.steps} steps, {result.stopped}")
    click.echo(f"time {result.seconds:.1f}s: data {result.decode_seconds:.1f}s, training {result.train_seconds:.1f}s, "
               f"evaluation {result.eval_seconds:.1f}s (checked on {result.checked_on})")
    click.echo(f"wrote {show(output)} (history {show(result.history_file)})")
