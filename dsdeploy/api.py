"""The public Python API: one call per pipeline stage, each a thin layer over the library's entry point.

``import dsdeploy`` exposes these lazily (``dsdeploy.convert`` etc.), so importing the package
does not import torch. Every function raises :class:`dsdeploy.errors.DsdeployError` subclasses
with one actionable line for input a user can get wrong.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from dsdeploy.conversion.converted import ConvertedModel
from dsdeploy.conversion.latency_convert import convert_planned
from dsdeploy.conversion.loading import load_model
from dsdeploy.conversion.plan import Policy
from dsdeploy.conversion.saving import load, save
from dsdeploy.conversion.workflow import ModelReport, allocates_on_data, cost_name, inspect_model, measure_costs
from dsdeploy.data.given import batches, finetune_splits
from dsdeploy.data.preprocessing import input_shape_for, resolve
from dsdeploy.errors import DsdeployError
from dsdeploy.export.bundle import DeployReport
from dsdeploy.export.bundle import deploy as build_bundle_folder
from dsdeploy.export.config import DeployConfig, ExportConfig
from dsdeploy.export.onnx_export import ExportReport, export_model, provenance
from dsdeploy.export.onnx_export import export_onnx as run_export
from dsdeploy.models.sources import LoadedModel
from dsdeploy.recover import artifact_steps, reconstruct
from dsdeploy.recover import finetune as finetune_loop
from dsdeploy.recover.blockrec import after_calibration
from dsdeploy.recover.config import CALIB_BATCHES, CalibrationParams, FinetuneConfig, FinetuneResult
from dsdeploy.recover.device import on_device, placed, resolve_device
from dsdeploy.recover.evaluate import EvaluateConfig
from dsdeploy.recover.evaluate import evaluate as run_evaluate
from dsdeploy.recover.reconstruct import CalibrationReport
from dsdeploy.runtime.bench import BenchConfig, run_and_write
from dsdeploy.runtime.bench_report import BenchReport
from dsdeploy.runtime.latency_table import latency_table  # (model, input_shape, provider=, threads=, ...)

__all__ = ["ConvertedModel", "convert", "inspect", "calibrate", "finetune", "evaluate", "export_onnx", "benchmark",
           "deploy", "latency_table", "save", "load"]


def _options(cls: type, given: Any, options: dict[str, Any], what: str) -> Any:
    """``given`` (a ``cls`` instance) updated with ``options``, or ``cls(**options)``; unknown names refused."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise DsdeployError(f"{what} has no option {unknown[0]!r}; options: {', '.join(sorted(names))}")
    return dataclasses.replace(given, **options) if given is not None else cls(**options)


def _load(model: Any, weights: str | None, model_kwargs: dict[str, Any] | None, trust_pickle: bool,
          trust_code: bool) -> LoadedModel:
    """A spec string -> :func:`dsdeploy.conversion.loading.load_model`; a LoadedModel as is; a module wrapped."""
    if isinstance(model, (str, Path)):
        return load_model(str(model), weights=weights, model_kwargs=model_kwargs, trust_pickle=trust_pickle,
                          trust_code=trust_code)
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        return LoadedModel(model, "")
    raise DsdeployError(f"model must be an nn.Module or a spec string, got {type(model).__name__}")


def convert(model: nn.Module | str | LoadedModel, *, policy: Policy | None = None,
            input_shape: Sequence[int] | None = None, example_inputs: torch.Tensor | None = None,
            weights: str | None = None, model_kwargs: dict[str, Any] | None = None,
            preprocess: dict[str, Any] | None = None, data: str | None = None, trust_pickle: bool = False,
            trust_code: bool = False, allocation_options: dict[str, Any] | None = None, refresh: bool = False,
            **options: Any) -> ConvertedModel:
    """Rewrite the convolutions of a COPY of ``model`` into depthwise-separable blocks (the input is untouched).

    Method: per input channel, an SVD of the conv kernel's slice; the top ``rank`` terms give the
    depthwise filters and the pointwise weights (:mod:`dsdeploy.conversion.decompose`); at full rank the
    block reproduces the conv exactly.

    Args:
        model: any ``nn.Module`` taking one image batch, or a spec (``torchvision:NAME``,
            ``sample:NAME``, ``pkg.module:factory``; ``weights``/``model_kwargs``/``trust_pickle``/
            ``trust_code`` as for :func:`dsdeploy.conversion.loading.load_model`), or a LoadedModel.
        policy: a :class:`dsdeploy.conversion.plan.Policy`; ``options`` set its fields by name:
            ``rank`` (int >= 1) | ``energy`` (kept singular-value energy, (0, 1]) | ``mac_budget``
            (fraction of conv MACs, (0, 1]), ``include``/``exclude`` (regex of layer names),
            ``convert_stem``, ``layout`` ("branches" | ...), ``require_gain``; or ``speedup`` | ``target_latency_ms``
            on ``provider``/``batch``/``threads`` (measured; :mod:`.conversion.latency_convert`). Default rank 1.
        input_shape: (N, C, H, W) to trace with; default: ``example_inputs.shape``, the model's own,
            the one ``preprocess`` makes, or 224x224 with the first conv's channel count.
        example_inputs: a tensor whose shape is the input shape (only its shape is used).
        preprocess: preprocessing overrides (``size``, ``resize``, ``mean``, ``std``, ``channels``)
            recorded with the model (:func:`dsdeploy.data.preprocessing.resolve`).
        data: the data the model will see (``"digits"`` without recorded preprocessing means
            digits' mean/std). With a ``mac_budget`` (``allocation`` not "spectral") the budget is
            shared out by each layer's measured effect on the logits on this data
            (:mod:`dsdeploy.recover.sensitivity`); ``allocation_options``: ``seed``,
            ``calib_batches``, ``batch_size``, ``val_split``, ``limit`` of the images calibration uses,
            ``device`` where it runs.
        refresh: re-measure the cached latency table (latency policies) and drop its stored correction.

    Returns:
        A :class:`ConvertedModel`.

    Raises:
        PlanError: an option out of range (names the field); NothingToConvertError: no conv
        converts (lists each conv's reason); ModelError: NaN weights or an uncopyable model;
        InputShapeError: ``input_shape`` disagrees with ``preprocess``.
    """
    policy = _options(Policy, policy, options, "convert")
    policy.validate()
    loaded = _load(model, weights, model_kwargs, trust_pickle, trust_code)
    if loaded.artifact is not None:
        raise DsdeployError(f"{loaded.spec} is already converted; convert its source model instead")
    given = tuple(example_inputs.shape) if example_inputs is not None else input_shape
    pre = resolve(loaded.preprocessing, given or loaded.input_shape, preprocess, data=data, model=loaded.model)
    shape = tuple(input_shape_for(pre, given, loaded.input_shape, bool(preprocess)))
    table = measure_costs(loaded, policy, shape, pre, data, **(allocation_options or {})) \
        if allocates_on_data(policy, data) else None
    res, _ = convert_planned(loaded.model, shape, policy, costs=table.costs() if table is not None else None,
                             cost_name=cost_name(table), name=loaded.spec or "model", refresh=refresh)
    entry = {"stage": "convert", "policy": res.plan.policy, "layout": res.plan.layout,
             "converted": len(res.plan.converted),
             "conv_mac_ratio": round(res.after.conv_macs / max(1, res.before.conv_macs), 4)}
    if table is not None:
        entry["sensitivity"] = {**table.summary(), "data": data}
    return ConvertedModel(res.model.eval(), res.plan, res.before, res.after, loaded.model, shape,
                          spec=loaded.spec or None, model_kwargs=dict(loaded.model_kwargs), weights=loaded.weights,
                          preprocessing=pre.to_dict(), labels=loaded.labels, history=[entry])


def inspect(model: nn.Module | str | LoadedModel, *, policy: Policy | None = None,
            input_shape: Sequence[int] | None = None, weights: str | None = None,
            model_kwargs: dict[str, Any] | None = None, trust_pickle: bool = False, trust_code: bool = False,
            data: str | None = None, calib_batches: int | None = CALIB_BATCHES, seed: int = 0,
            preprocess: dict[str, Any] | None = None, device: str = "auto", **options: Any) -> ModelReport:
    """What :func:`convert` would do, without converting: each conv's decision (rank, relative kernel error,
    MACs before/after, or why it stays) and the model's params/MACs at ``input_shape`` (N, C, H, W).

    ``model``/``policy``/``options`` as for :func:`convert`. Returns a
    :class:`dsdeploy.conversion.workflow.ModelReport` (``render()`` is the CLI's table, ``to_dict()``
    its JSON). Raises PlanError for an option out of range (naming the field). With ``data``
    (``calib_batches``, ``seed``, ``preprocess`` as for calibration) the report carries the per-layer
    sensitivity table and a ``mac_budget`` is planned on it; ``device`` (auto | cpu | cuda | cuda:N | mps)
    runs those forward passes (DeviceError, before any work, for a device this machine lacks).
    """
    policy = _options(Policy, policy, options, "convert")
    if data:
        resolve_device(device, "calibrate.device")  # an absent device: refused before loading model and data
    loaded = _load(model, weights, model_kwargs, trust_pickle, trust_code)
    return inspect_model(loaded, policy, tuple(input_shape) if input_shape else None, calib_data=data,
                         calib_batches=calib_batches, seed=seed, preprocess=preprocess, device=device)


def _require_converted(obj: Any, what: str) -> ConvertedModel:
    if not isinstance(obj, ConvertedModel):
        raise DsdeployError(f"{what} needs the ConvertedModel that dsdeploy.convert returned, got "
                            f"{type(obj).__name__}")
    return obj


def calibrate(converted: ConvertedModel | str | Path, data: str | torch.Tensor | Iterable, *,
              out: str | Path | None = None, params: CalibrationParams | None = None,
              preprocess: dict[str, Any] | None = None, seed: int = 0, val_split: float = 0.2,
              limit: int | None = None, progress: bool = False, trust_code: bool = False,
              **options: Any) -> CalibrationReport:
    """Fit each DS block's factors to the ORIGINAL conv's outputs, IN PLACE, then re-estimate BatchNorm.

    Method: least squares on activations (each block's input inside the partially calibrated network
    against the original conv's output; the pointwise weights, then ``rounds`` alternating depthwise/
    pointwise solves; layer by layer in call order), as in Zhang et al. 2016 "Accelerating very deep
    convolutional networks" (:mod:`dsdeploy.recover.reconstruct`). No labels needed.

    Args:
        converted: what :func:`convert` returned (``converted.model`` is changed in place), or a
            ``.dsd`` path (calibrated against its source model; ``out`` is then required, and
            ``trust_code`` imports a ``pkg.module:factory`` the file records).
        out: a ``.dsd`` to write the calibrated model to (None: in memory only).
        data: ``"digits"`` or a folder of images (its training split; accuracy before/after
            reported on the labelled validation split), a float tensor of model-ready inputs
            (N, C, H, W), or an iterable of such batches (or ``(x, y)`` batches).
        params / options: :class:`dsdeploy.recover.config.CalibrationParams` fields:
            ``ridge``, ``max_batches``, ``batch_size``, ``rounds`` (0: pointwise only), ``cache_mb``, ``eval_images``,
            ``block_reconstruct`` (seconds or ``"90s"``: then fit blocks, :mod:`dsdeploy.recover.blockrec`),
            ``device`` (auto | cpu | cuda | cuda:N | mps; the models go back where they were).
            ``workers`` (DataLoader processes reading a data spec; None: by the CPU count).
        preprocess: preprocessing overrides (``size``, ``mean``, ...) for a data spec.

    Returns:
        A CalibrationReport: per-layer output errors (SVD, fitted, each round, after BN), seconds.

    Raises:
        DataError: empty or unreadable data; DsdeployError: an option out of range (names it).
    """
    p = _options(CalibrationParams, params, options, "calibrate")
    if isinstance(converted, (str, Path)):
        if out is None or not isinstance(data, str):
            raise DsdeployError("calibrating a .dsd file needs out= (the .dsd to write) and a data spec")
        return artifact_steps.calibrate_artifact(str(converted), data, str(out), max_batches=p.max_batches,
                                              batch_size=p.batch_size, seed=seed, ridge=p.ridge, progress=progress,
                                              preprocess=preprocess, val_split=val_split, limit=limit,
                                              trust_code=trust_code, block_reconstruct=p.block_reconstruct,
                                              workers=p.workers, **p.fit())
    cm = _require_converted(converted, "calibrate")
    if isinstance(data, str):
        pre = resolve(cm.preprocessing, cm.input_shape, preprocess, data=data, model=cm.original)
        report = reconstruct.calibrate_data(cm.model, cm.original, cm.plan, data, pre, max_batches=p.max_batches,
                                            seed=seed, batch_size=p.batch_size, ridge=p.ridge, progress=progress,
                                            val_split=val_split, limit=limit, labels=cm.labels,
                                            block_reconstruct=p.block_reconstruct, workers=p.workers, **p.fit())
        cm.preprocessing = pre.to_dict()
        cm.history.append(report.history_entry(data=data, seed=seed))
    else:
        loader = batches(data, p.batch_size)
        report = reconstruct.calibrate(cm.model, cm.original, cm.plan, loader,
                                       max_batches=p.max_batches, ridge=p.ridge, progress=progress, **p.fit())
        with placed(dev := resolve_device(p.device, "calibrate.device"), cm.model, cm.original):
            after_calibration(report, cm.model, cm.original, on_device(loader, dev), p.block_reconstruct,
                              max_batches=p.max_batches)
        cm.history.append(report.history_entry(data="in-memory"))
    if out is not None:
        save(cm, out)
    return report


def finetune(converted: ConvertedModel | str | Path, data: Any, *, out: str | Path | None = None,
             config: FinetuneConfig | None = None, teacher: nn.Module | str | None = None,
             teacher_weights: str | None = None, distill: bool = True, resume: bool = False,
             preprocess: dict[str, Any] | None = None, val_split: float = 0.2, limit: int | None = None,
             trust_code: bool = False, **options: Any) -> FinetuneResult:
    """Train ``converted.model`` IN PLACE by distillation from the original; it ends holding the best weights.

    The input model is scored first and counts as epoch 0: when no trained epoch beats it the
    model is left with its input weights, unchanged (``result.kept_input``, ``result.warning``).
    The best is picked on the validation split (accuracy with labels, else the distillation
    loss); without one, on a fixed subset of the training images (``result.checked_on`` says).
    ``time_budget`` counts from this call's start, data preparation included.

    Method: knowledge distillation (Hinton et al. 2015, soft targets at ``temperature``) plus
    cross-entropy on labels and optional feature matching (:mod:`dsdeploy.recover.distill`), with
    SGD/AdamW and a step/cosine schedule (:mod:`dsdeploy.recover.finetune`).

    Args:
        converted: what :func:`convert` returned, or a ``.dsd`` path (trained against its source
            model or ``teacher``, a spec with ``teacher_weights``; ``out`` is then required and
            ``trust_code`` imports a ``pkg.module:factory`` the files record;
            :func:`dsdeploy.recover.artifact_steps.finetune_artifact`).
        data: ``"digits"`` or a folder of images; a DataSplits; or tensors ``(x, y)`` /
            ``(x, y, x_val, y_val)`` of model-ready inputs (N, C, H, W) and int class labels (N,).
            The best epoch is picked on the validation split when there is one.
        out: a ``.dsd`` to write with the best weights (with ``OUT.ckpt``/``OUT.history.json``
            beside it, so ``resume=True`` continues); None: train in memory only.
        config / options: :class:`dsdeploy.recover.config.FinetuneConfig` fields (``epochs``,
            ``time_budget`` seconds, ``lr``, ``mode``, ``init``, ``reinit``, ``channels_last``, ``device``,
            ``precision`` (fp32 | bf16 | fp16 autocast; the weights and artifact stay fp32), ...).
        teacher: the distillation teacher (default: ``converted.original``); ``distill=False``:
            cross-entropy on labels only.

    Returns:
        A FinetuneResult (before/best scores and epoch, why it stopped, the data/train/evaluation
        seconds, per-epoch history).

    Raises:
        DataError: no training images, or no teacher and no labels; DsdeployError: an option
        out of range (names the field).
    """
    cfg = _options(FinetuneConfig, config, options, "finetune")
    if isinstance(converted, (str, Path)):
        if out is None or not isinstance(data, str) or not distill or isinstance(teacher, nn.Module):
            raise DsdeployError("fine-tuning a .dsd file needs out= (the .dsd to write), a data spec, and a "
                                "teacher spec (or none: its source model)")
        return artifact_steps.finetune_artifact(converted, data, out, cfg, teacher=teacher,
                                               teacher_weights=teacher_weights, resume=resume, limit=limit,
                                               preprocess=preprocess, val_split=val_split, trust_code=trust_code)
    cm = _require_converted(converted, "finetune")
    if isinstance(teacher, str):
        teacher = _load(teacher, teacher_weights, None, False, trust_code).model
    splits = finetune_splits(cm, data, cfg, preprocess, val_split, limit)
    teacher_model = (teacher if teacher is not None else cm.original) if distill else None
    with tempfile.TemporaryDirectory(prefix="dsdeploy-finetune-") as tmp:
        where = Path(out) if out is not None else Path(tmp) / "model.dsd"
        result = finetune_loop.finetune(cm.model, teacher_model, splits, cfg, out_path=where, resume=resume)
    result.split = getattr(splits, "split", None)
    cm.history.append(result.history_entry(cfg, data=data if isinstance(data, str) else "in-memory"))
    if out is not None:
        save(cm, out)
    return result


def _unwrap(model: Any) -> Any:
    return model.loaded() if isinstance(model, ConvertedModel) else model


def evaluate(model: ConvertedModel | nn.Module | str, data: str, *, compare: Any = None,
             config: EvaluateConfig | None = None, **options: Any) -> dict[str, Any]:
    """Top-1/top-5/precision/recall/F1 of ``model`` (and ``compare`` side by side) on labelled ``data``.

    Method: one forward pass per batch in eval mode; metrics by scikit-learn
    (:func:`dsdeploy.recover.metrics.classification_metrics`). ``model``/``compare``: a
    ConvertedModel (its own preprocessing and labels), an ``nn.Module``, a LoadedModel or a
    spec/``.dsd`` path. ``data``: ``"digits"`` or a folder of class folders. ``config``: an
    :class:`dsdeploy.recover.evaluate.EvaluateConfig` (``batch_size``, ``split``, ``limit``, ``device``,
    ``precision``; also
    settable by name in ``options``); other ``options``: those of
    :func:`dsdeploy.recover.evaluate.evaluate` (``val_split``, ``seed``, ``preprocess``, ``weights``,
    ``compare_weights``, ``model_kwargs``, ``trust_pickle``, ``trust_code``, ``input_shape``,
    ``progress``). Returns its JSON-able dict (``models[i].metrics``, fractions in [0, 1];
    with ``compare``: ``delta`` and ``agreement``). Raises DataError for unlabelled data, a
    field out of range (named: ``evaluate.batch_size``) or class names the model does not know.
    """
    own = {k: options.pop(k) for k in [f.name for f in dataclasses.fields(EvaluateConfig)] if k in options}
    cfg = _options(EvaluateConfig, config, own, "evaluate")
    return run_evaluate(_unwrap(model), data, compare=_unwrap(compare) if compare is not None else None,
                        **dataclasses.asdict(cfg), **options)


def export_onnx(model: ConvertedModel | nn.Module | str, path: str | Path, *,
                input_shape: Sequence[int] | None = None, config: ExportConfig | None = None,
                **options: Any) -> ExportReport:
    """Export to ONE ``.onnx`` file, gated by ONNX Runtime parity with torch.

    Method: ``torch.onnx.export`` (dynamo, falling back to TorchScript), then BN folding and onnxsim, each kept
    only when ONNX Runtime's CPU EP still matches torch (:func:`dsdeploy.export.onnx_export.export_onnx`).

    ``model``: a ConvertedModel (its preprocessing and labels go into the ONNX metadata, which
    bundles predict with), a LoadedModel, an ``nn.Module``, or a spec / ``.dsd`` path
    (:func:`dsdeploy.export.onnx_export.export_model`: ``options`` then also take ``weights``,
    ``model_kwargs``, ``trust_pickle``, ``trust_code``, ``preprocess``, and ``data`` as a data spec;
    a ``.dsd``'s original architecture is exported too, for op counts before/after).
    ``input_shape`` (N, C, H, W): default the model's own. ``config``: an
    :class:`dsdeploy.export.config.ExportConfig` (``opset``, ``dynamic_batch``, ``simplify``,
    ``exporter``, ``atol``/``rtol``; also by name in ``options``). Other ``options``: ``data``
    (real inputs, a tensor (N, C, H, W), added to the parity cases), ``seed``, ``metadata``.
    Returns an ExportReport (op counts, conv MACs, parity). Raises ExportError (a field out of
    range is named: ``export.atol``) / ParityError; nothing is written on failure.
    """
    own = {k: options.pop(k) for k in [f.name for f in dataclasses.fields(ExportConfig)] if k in options}
    cfg = dataclasses.asdict(_options(ExportConfig, config, own, "export"))
    shape = tuple(input_shape) if input_shape is not None else None
    if isinstance(model, (str, Path)):
        return export_model(str(model), path, input_shape=shape, **cfg, **options)
    meta = dict(options.pop("metadata", None) or {})
    if isinstance(model, (ConvertedModel, LoadedModel)):
        loaded = _unwrap(model)
        meta = {**provenance(loaded), **meta}
        shape = shape or (model.input_shape if isinstance(model, ConvertedModel) else None)
        model = loaded.model
    if shape is None:
        raise DsdeployError("export_onnx needs input_shape=(N, C, H, W) for a plain nn.Module")
    return run_export(model, path, shape, metadata=meta, **cfg, **options)


def benchmark(models: str | Path | Sequence[str | Path], *, config: BenchConfig | None = None,
              progress: Callable[[str], None] | None = None, json_path: str | None = None,
              csv_path: str | None = None, markdown_path: str | None = None, plot_path: str | None = None,
              **options: Any) -> BenchReport:
    """Latency (ms per batch) of ONNX models on ONNX Runtime execution providers, with output parity.

    Method: ``warmup`` untimed runs, then ``iters`` timed runs (or runs for ``duration`` seconds)
    per model x EP x batch on one session each (:mod:`dsdeploy.runtime.bench`); parity against the
    CPU EP on the same inputs. ``models``: one ``.onnx`` path or several (the first is the baseline
    of the comparisons). ``config`` / ``options``: :class:`dsdeploy.runtime.bench.BenchConfig`
    fields (``providers`` aliases such as "cpu", ``batches``, ``threads``, ``warmup``, ``iters`` |
    ``duration`` seconds, ``data``, ``ep_options``, ...). ``progress``: called with a label per run.
    ``json_path``/``csv_path``/``markdown_path``/``plot_path``: report files to write (atomically). Returns a BenchReport (``.results`` per model x EP x
    batch with mean/p50/p90 ms). Raises ProviderError for an unavailable provider (naming the
    available ones) and InputShapeError for a field out of range (named: ``batches``).
    """
    paths = [str(models)] if isinstance(models, (str, Path)) else [str(m) for m in models]
    report, _ = run_and_write(paths, _options(BenchConfig, config, options, "benchmark"), json_path=json_path,
                              csv_path=csv_path, markdown_path=markdown_path, plot_path=plot_path, progress=progress)
    return report


def deploy(onnx_model: str | Path, out: str | Path, *, config: DeployConfig | None = None,
           calib_data: str | None = None, eval_data: str | None = None, **options: Any) -> DeployReport:
    """Package an exported ONNX model into a bundle folder: model, ``manifest.json``, standalone ``predict.py``.

    Method: optional quantization by ONNX Runtime's tools (static QDQ per-channel INT8 calibrated
    on ``calib_data``, dynamic INT8, or fp16; :mod:`dsdeploy.export.quantize`), top-1 of the bundle
    against the fp32 model on the labelled ``eval_data`` (an accuracy gate in points), and batch-1
    CPU-EP latency (ms) of both (:func:`dsdeploy.export.bundle.deploy`).

    ``out``: a new or empty folder, or a bundle deploy wrote (only with ``overwrite=True``; only its
    files are replaced). ``config``: a :class:`dsdeploy.export.config.DeployConfig` (``quantize``,
    ``max_accuracy_drop``, ``ort_format``, ``latency_iters``, ``threads``, ``reduce_range``,
    ``calib_items``, ``eval_items``; also by name in ``options``). Other ``options``: ``overwrite``,
    ``preprocess`` (overrides of the recorded preprocessing), ``seed``, ``val_split``,
    ``preprocessing``/``labels`` (used when the model's metadata lacks them).
    Returns a DeployReport. Raises DeployError (bad options, naming the field; quantization
    failure; the accuracy gate, with nothing written), OutputError (``out`` not ours), ExportError
    (a missing or corrupt model).
    """
    own = {k: options.pop(k) for k in [f.name for f in dataclasses.fields(DeployConfig)] if k in options}
    cfg = _options(DeployConfig, config, own, "deploy")
    return build_bundle_folder(onnx_model, out, calib_data=calib_data, eval_data=eval_data,
                               **dataclasses.asdict(cfg), **options)
