"""The stages of ``dsdeploy run``: one small adapter per stage over the library.

inspect -> convert (+ calibrate) -> finetune -> evaluate -> export (+ parity) -> deploy ->
bench -> report. Each adapter reads its recipe section(s), calls the library module that
owns the work, and returns a :class:`dsdeploy.pipeline.engine.StageOutput`. The pipeline itself
(caching, records, errors) lives in :mod:`dsdeploy.pipeline.engine`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dsdeploy import api
from dsdeploy.conversion.loading import load_model
from dsdeploy.data.preprocessing import input_shape_for, resolve
from dsdeploy.errors import CheckpointError, DeployError, InputShapeError, RecipeError, TrainingInterrupted
from dsdeploy.export.onnx_export import data_samples
from dsdeploy.fsutil import atomic_path, write_json, write_text
from dsdeploy.models.samples import samples_dir
from dsdeploy.pipeline.engine import Context, Stage, StageOutput
from dsdeploy.pipeline.recipe import Recipe
from dsdeploy.pipeline.report import write_report
from dsdeploy.runtime.bench_report import render_markdown
from dsdeploy.runtime.providers import SHORT

# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------

def _r(ctx: Context) -> Recipe:
    return ctx.config


def _data(ctx: Context) -> str | None:
    return _r(ctx).data.spec


def recipe_source(ctx: Context) -> tuple[Any, Any, tuple[int, ...]]:
    """(LoadedModel with the resolved preprocessing attached, Preprocess, input shape).

    The preprocessing is :func:`dsdeploy.data.preprocessing.resolve` with the recipe's ``[preprocess]``
    as overrides (``size`` without ``resize`` derives ``resize`` from the size); a
    ``model.input_shape`` the preprocessing does not produce is one RecipeError line.
    """
    r = _r(ctx)
    m = r.model
    loaded = load_model(m.spec, m.weights, m.model_kwargs, m.trust_pickle)
    given = {k: v for k, v in asdict(r.preprocess).items() if v is not None}
    pre = resolve(loaded.preprocessing, m.input_shape or loaded.input_shape, given, data=_data(ctx),
                  model=loaded.model)
    try:
        shape = input_shape_for(pre, m.input_shape, loaded.input_shape, bool(given))
    except InputShapeError as exc:
        raise RecipeError(f"[preprocess] disagrees with model.input_shape: {exc}") from None
    loaded.preprocessing = pre.to_dict()
    return loaded, pre, shape


def data_split(ctx: Context) -> dict[str, Any]:
    """The run's ONE split (``data.val_split``, ``data.limit``, ``seed``): keyword arguments for every stage
    that reads the data, so calibration and fine-tuning never see an image evaluation holds out."""
    r = _r(ctx)
    return {"val_split": r.data.val_split, "limit": r.data.limit}


def _cap(stage_limit: int | None, ctx: Context) -> int | None:
    """A stage's own limit within the run's split (a seeded subset of the same split)."""
    limits = [v for v in (stage_limit, _r(ctx).data.limit) if v is not None]
    return min(limits) if limits else None


def recipe_policy(ctx: Context):
    """The recipe's [convert] section, which is a :class:`dsdeploy.conversion.plan.Policy` (a copy: validate fills
    it in). A latency target with no ``convert.precision`` plans in the precision the run deploys in: an enabled
    [deploy] with ``quantize`` int8 or int8-dynamic times the latencies quantized so."""
    r = _r(ctx)
    policy = dataclasses.replace(r.convert)
    if (policy.precision is None and policy.latency_target and r.deploy.enabled
            and r.deploy.quantize in ("int8", "int8-dynamic")):
        policy.precision = r.deploy.quantize
    return policy


def _final_artifact(ctx: Context) -> Path | None:
    return ctx.output("finetune", "artifact") or ctx.output("convert", "artifact")


def _sections(*names: str):
    return lambda ctx: {n: _r(ctx).section(n) for n in names}


def _planned(*names: str):
    """:func:`_sections` plus the precision latencies are planned in when [deploy] supplies it (recipe_policy)."""
    base = _sections(*names)

    def key(ctx: Context) -> dict[str, Any]:
        precision = recipe_policy(ctx).precision
        return {**base(ctx), **({"planned_precision": precision} if precision != _r(ctx).convert.precision else {})}
    return key


def _model_inputs(ctx: Context) -> list[Any]:
    """The files a model spec reads: its weights, a sample's shipped weights, or the .dsd artifact."""
    m = _r(ctx).model
    files: list[Any] = [m.weights]
    if m.spec.startswith("sample:"):
        files.append(samples_dir() / f"{m.spec.split(':', 1)[1]}.pt")
    elif m.spec.endswith(".dsd"):
        files.append(m.spec)
    return files


def _data_input(ctx: Context) -> list[Any]:
    d = _data(ctx)
    return [d] if d and d != "digits" else []


# ----------------------------------------------------------------------------------------------
# inspect, convert (+ calibrate), finetune, evaluate
# ----------------------------------------------------------------------------------------------

def run_inspect(ctx: Context, folder: Path) -> StageOutput:
    """:func:`dsdeploy.api.inspect`: the plan and profile without converting."""
    loaded, pre, shape = recipe_source(ctx)
    report = api.inspect(loaded, policy=recipe_policy(ctx), input_shape=shape)
    write_json(folder / "inspect.json", report.to_dict())
    return StageOutput({"spec": loaded.spec, "input_shape": list(shape), "preprocess": pre.to_dict(),
                        "summary": report.summary()}, {"report": "inspect.json"})


def run_convert(ctx: Context, folder: Path) -> StageOutput:
    """:func:`dsdeploy.api.convert` + :func:`~dsdeploy.api.save`, then, with data, :func:`~dsdeploy.api.calibrate`
    + :func:`~dsdeploy.api.save` of the calibrated model."""
    r = _r(ctx)
    loaded, pre, shape = recipe_source(ctx)
    c = r.calibrate
    with_data = _data(ctx) if c.enabled else None  # a mac_budget is then shared out on the data (allocation)
    cm = api.convert(loaded, policy=recipe_policy(ctx), input_shape=shape, data=with_data,
                     allocation_options={"seed": r.seed, "calib_batches": c.batches, "batch_size": c.batch_size,
                                         "device": c.device,
                                         **data_split(ctx)})
    api.save(cm, folder / "converted.dsd")
    report = cm.report(folder / "converted.dsd")
    write_json(folder / "plan.json", report.to_dict())
    result = {"summary": report.summary(), "input_shape": list(shape),
              "layers": [asdict(d) for d in report.plan.layers], "calibration": None}
    outputs = {"converted": "converted.dsd", "artifact": "converted.dsd", "plan": "plan.json"}
    if r.calibrate.enabled and _data(ctx):
        cal = api.calibrate(cm, _data(ctx), out=folder / "calibrated.dsd", max_batches=c.batches,
                            batch_size=c.batch_size, ridge=c.ridge, rounds=c.rounds, cache_mb=c.cache_mb,
                            eval_images=c.eval_images, device=c.device, workers=c.workers,
                            seed=r.seed, progress=ctx.progress,
                            block_reconstruct=c.block_reconstruct, **data_split(ctx))
        result["calibration"] = cal.to_dict()
        outputs.update(calibrated="calibrated.dsd", artifact="calibrated.dsd")
    return StageOutput(result, outputs)


def _finetune_skip(ctx: Context) -> str | None:
    if _r(ctx).finetune.mode == "none":
        return "finetune.mode = none"
    return None if _data(ctx) else "no data (give --data or data.spec)"


def run_finetune(ctx: Context, folder: Path) -> StageOutput:
    """``artifact_steps.finetune_artifact`` on the converted (calibrated) artifact, resumable.

    The checkpoint lives at ``OUT/resume/finetune.ckpt`` (outside the stage's temporary
    folder), so a run interrupted or killed mid-training continues from its last completed
    epoch when the same run is started again; a checkpoint of another configuration or
    other inputs is discarded (the tool wrote it) and training starts afresh. It is removed
    when the stage succeeds.
    """
    r = _r(ctx)
    f = r.finetune
    ckpt = ctx.resume_path("finetune", "ckpt")
    config = f.config(seed=r.seed, progress=ctx.progress, history_path=str(folder / "history.json"),
                      checkpoint_path=str(ckpt))
    args = (ctx.output("convert", "artifact"), _data(ctx))
    opts = dict(out=folder / "finetuned.dsd", config=config, val_split=r.data.val_split, limit=_cap(f.limit, ctx))
    notes = []
    run = ctx.hooks.get("finetune", api.finetune)  # under a launcher: the other ranks join (pipeline.ranks)
    try:
        res = run(*args, **opts, resume=ckpt.is_file())
    except CheckpointError as exc:  # our own checkpoint, from another configuration: start afresh
        ckpt.unlink(missing_ok=True)
        notes.append(f"earlier checkpoint not resumed ({exc})")
        res = run(*args, **opts, resume=False)
    except TrainingInterrupted as exc:
        raise TrainingInterrupted(str(exc).split(";")[0] + (
            "; rerun with the same output folder to continue from the last completed epoch" if ckpt.is_file()
            else "; nothing was saved")) from None
    write_json(folder / "history.json", res.history)
    ckpt.unlink(missing_ok=True)  # only needed to resume an interrupted run
    with contextlib.suppress(OSError):
        ckpt.parent.rmdir()  # when no other stage keeps resume state there
    result = {k: v for k, v in res.to_dict().items() if k not in ("checkpoint", "history_file")}
    result["notes"] = notes
    return StageOutput(result, {"artifact": "finetuned.dsd", "history": "history.json"})


def _evaluate_skip(ctx: Context) -> str | None:
    if not _r(ctx).evaluate.enabled:
        return "evaluate.enabled = false"
    return None if _data(ctx) else "no data (give --data or data.spec)"


def run_evaluate(ctx: Context, folder: Path) -> StageOutput:
    """:func:`dsdeploy.api.evaluate`: the original next to the model after each recovery stage."""
    r = _r(ctx)
    loaded, pre, _ = recipe_source(ctx)
    config = r.evaluate.config(limit=_cap(r.evaluate.limit, ctx))
    opts = dict(config=config, preprocess=pre, val_split=r.data.val_split, seed=r.seed, progress=ctx.progress)
    candidates = [("converted", ctx.output("convert", "converted")), ("calibrated", ctx.output("convert", "calibrated")),
                  ("finetuned", ctx.output("finetune", "artifact"))]
    stages = [(name, path) for name, path in candidates if path is not None]
    full = api.evaluate(loaded, _data(ctx), compare=str(stages[-1][1]), **opts)
    models = [{"name": "original", **_metrics(full["models"][0])}]
    for name, path in stages[:-1]:
        models.append({"name": name, **_metrics(api.evaluate(str(path), _data(ctx), **opts)["models"][0])})
    models.append({"name": stages[-1][0], **_metrics(full["models"][1])})
    write_json(folder / "evaluate.json", full)
    return StageOutput({"data": _data(ctx), "split": full["split"], "images": full["images"], "models": models,
                        "agreement": full.get("agreement"), "delta": full.get("delta"),
                        "data_split": full.get("data_split")},
                       {"report": "evaluate.json"})


def _metrics(entry: dict[str, Any]) -> dict[str, Any]:
    m = entry["metrics"]
    return {k: m.get(k) for k in ("top1", "top5", "precision", "recall", "f1")}


# ----------------------------------------------------------------------------------------------
# export (+ parity), deploy, bench: thin adapters over the export and runtime modules
# ----------------------------------------------------------------------------------------------

def _export_one(loaded: Any, path: Path, shape: tuple[int, ...], ctx: Context) -> dict[str, Any]:
    """Adapter: :func:`dsdeploy.api.export_onnx` (parity-gated against torch; real samples when there is data)."""
    r = _r(ctx)
    samples = data_samples(_data(ctx), loaded.preprocessing, shape, seed=r.seed) if _data(ctx) else None
    rep = api.export_onnx(loaded, path, input_shape=shape, config=r.export.config(), data=samples,
                          seed=r.seed).to_dict()
    checks = rep.pop("parity")
    rep["parity"] = {"checks": len(checks), "max_abs_diff": max(c["max_abs_diff"] for c in checks),
                     "max_rel_diff": max(c["max_rel_diff"] for c in checks),
                     "min_cosine": min(c["cosine"] for c in checks), "ok": all(c["ok"] for c in checks)}
    rep["parity_checks"] = checks
    rep.pop("path", None)
    return rep


def run_export(ctx: Context, folder: Path) -> StageOutput:
    """ONNX for the original and the final converted model, each with its parity figures against torch."""
    loaded, _, shape = recipe_source(ctx)
    final = load_model(str(_final_artifact(ctx)))
    result = {"input_shape": list(shape), "original": _export_one(loaded, folder / "original.onnx", shape, ctx),
              "converted": _export_one(final, folder / "model.onnx", shape, ctx)}
    return StageOutput(result, {"original": "original.onnx", "model": "model.onnx"})


def _export_skip(ctx: Context) -> str | None:
    return None if _r(ctx).export.enabled else "export.enabled = false"


def _skip_without_onnx(section: str):
    """Skip rule of the stages that consume the exported model (deploy, bench)."""

    def skip(ctx: Context) -> str | None:
        if not getattr(_r(ctx), section).enabled:
            return f"{section}.enabled = false"
        return None if ctx.output("export", "model") else "no ONNX model (export skipped)"

    return skip


def run_deploy(ctx: Context, folder: Path) -> StageOutput:
    """:func:`dsdeploy.api.deploy`: the bundle from the exported converted model (quantized, accuracy-gated with data)."""
    r = _r(ctx)
    d = r.deploy
    data = _data(ctx)
    if d.quantize == "int8" and not data:
        raise DeployError("deploy.quantize = int8 calibrates on real images: give --data (or data.spec), or set "
                          "deploy.quantize to int8-dynamic or none")
    notes = [] if data or d.max_accuracy_drop is None else ["accuracy gate not checked: no data"]
    config = d.config(threads=r.bench.threads, max_accuracy_drop=d.max_accuracy_drop if data else None)
    rep = api.deploy(ctx.output("export", "model"), folder / "bundle", config=config,
                     calib_data=data if d.quantize == "int8" else None, eval_data=data, seed=r.seed,
                     val_split=r.data.val_split).to_dict()
    files = [str(p.relative_to(folder)) for p in sorted((folder / "bundle").rglob("*")) if p.is_file()]
    return StageOutput({**rep, "bundle": "bundle", "notes": notes}, {name: name for name in files})


def run_bench(ctx: Context, folder: Path) -> StageOutput:
    """``bench.bench`` of original.onnx and model.onnx on each provider and batch (unavailable EPs noted)."""
    r = _r(ctx)
    b = r.bench
    names = {"original": "original", "model": "converted"}  # ONNX file stem -> report label
    cfg = b.config(data=_data(ctx), skip_unavailable=True, seed=r.seed)
    paths = [str(ctx.output("export", "original")), str(ctx.output("export", "model"))]
    if r.deploy.quantize != "none" and ctx.output("deploy", "bundle/model.onnx"):
        bundle = folder / "bundle.onnx"  # a distinct file stem: bench names models by stem
        with atomic_path(bundle) as tmp:
            shutil.copyfile(ctx.output("deploy", "bundle/model.onnx"), tmp)
        paths.append(str(bundle))
        names["bundle"] = "bundle"
    report = api.benchmark(paths, config=cfg)
    write_json(folder / "bench.json", report.to_dict())
    write_text(folder / "bench.md", render_markdown(report, f"Benchmark: {r.name or r.model.spec}"))
    rows = [{"model": names.get(x.model, x.model), "provider": x.alias, "batch": x.batch,
             "latency_ms": x.stats.p50_ms if x.stats else None, "precision": x.precision,
             "status": "ok" if x.status == "ok" else f"{x.status}: {x.note}",
             "parity_max_abs": (x.parity or {}).get("max_abs_diff"),
             "top1_agreement": (x.parity or {}).get("top1_agreement")} for x in report.results]
    for s in report.skipped_providers:
        rows += [{"model": m, "provider": SHORT.get(s["ep"], s["ep"]), "batch": bt, "latency_ms": None,
                  "precision": None, "status": "unavailable"} for m in names.values() for bt in b.batches]
    return StageOutput({"rows": rows, "skipped_providers": report.skipped_providers},
                       {"report": "bench.json", "markdown": "bench.md"})


# ----------------------------------------------------------------------------------------------
# report and the stage list (entry points: dsdeploy.pipeline.runner)
# ----------------------------------------------------------------------------------------------

def run_report(ctx: Context, folder: Path) -> StageOutput:
    """``report.write_report`` over every earlier stage's record."""
    files, summary = write_report(ctx.records, _r(ctx), ctx.out, folder)
    return StageOutput({"summary": summary}, {name: name for name in files})


def _report_inputs(ctx: Context) -> list[Any]:
    return [ctx.out / name / "stage.json" for name, rec in ctx.records.items() if rec["status"] != "skipped"]


STAGES: list[Stage] = [
    Stage("inspect", run_inspect, _planned("model", "preprocess", "convert", "data"), _model_inputs),
    Stage("convert", run_convert, _planned("model", "preprocess", "convert", "calibrate", "data", "seed"),
          lambda ctx: _model_inputs(ctx) + _data_input(ctx)),
    Stage("finetune", run_finetune, _sections("finetune", "data", "seed"),
          lambda ctx: [ctx.output("convert", "artifact")] + _data_input(ctx), _finetune_skip),
    Stage("evaluate", run_evaluate, _sections("model", "preprocess", "evaluate", "data", "seed"),
          lambda ctx: _model_inputs(ctx) + _data_input(ctx) + [ctx.output("convert", "converted"),
                                                              ctx.output("convert", "calibrated"),
                                                              ctx.output("finetune", "artifact")], _evaluate_skip),
    Stage("export", run_export, _sections("model", "preprocess", "export", "data", "seed"),
          lambda ctx: _model_inputs(ctx) + _data_input(ctx) + [_final_artifact(ctx)], _export_skip),
    Stage("deploy", run_deploy, _sections("deploy", "data", "preprocess", "seed"),
          lambda ctx: [ctx.output("export", "model"), _final_artifact(ctx)] + _data_input(ctx),
          _skip_without_onnx("deploy")),
    Stage("bench", run_bench, _sections("bench", "data", "seed"),
          lambda ctx: [ctx.output("export", "original"), ctx.output("export", "model"),
                       ctx.output("deploy", "bundle/model.onnx")] + _data_input(ctx),
          _skip_without_onnx("bench")),
    Stage("report", run_report, lambda ctx: {"version": 1}, _report_inputs),
]
