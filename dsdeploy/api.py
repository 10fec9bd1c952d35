"""The public Python API: one call per pipeline stage, each a thin layer over the library's entry point.

``import dsdeploy`` exposes these lazily (``dsdeploy.convert`` etc.), so importing the package
does not import torch. Every function raises :class:`dsdeploy.errors.DsdeployError` subclasses
with one actionable line for input a user can get wrong.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from dsdeploy.conversion.artifact import load_artifact, save_artifact, source_record
from dsdeploy.conversion.block import ds_blocks
from dsdeploy.conversion.opcount import Profile
from dsdeploy.conversion.plan import Plan, Policy
from dsdeploy.conversion.rewrite import ConversionResult, verify_rebuild
from dsdeploy.conversion.rewrite import convert as rewrite_convert
from dsdeploy.data.preprocessing import input_shape_for, resolve
from dsdeploy.errors import ArtifactError, DataError, DsdeployError
from dsdeploy.fsutil import atomic_path
from dsdeploy.models.infer import infer_source
from dsdeploy.models.sources import LoadedModel, build_source
from dsdeploy.recover.config import CalibrationParams, FinetuneConfig, FinetuneResult
from dsdeploy.recover.reconstruct import CalibrationReport

__all__ = ["ConvertedModel", "convert", "calibrate", "finetune", "evaluate", "export_onnx", "benchmark", "save",
           "load"]


@dataclass
class ConvertedModel:
    """What :func:`convert` returns: the converted model, its plan, op counts, and what saving needs.

    Attributes:
        model: the converted ``nn.Module`` (eval mode); each converted conv is a ``DSConv``.
        plan: per-conv decisions (rank, full rank, relative kernel error, MACs before/after).
        before, after: op counts (params, MACs) of the original and converted model at ``input_shape``.
        original: the model that was converted (never modified): the teacher of calibrate/finetune.
        input_shape: the shape (N, C, H, W) the model was traced with.
        spec, model_kwargs, weights: the source spec when known (a spec string was converted).
        preprocessing, labels: the model's input preprocessing dict and class names, when known.
        history: one record per stage (convert, calibrate, finetune), saved in the ``.dsd``.
    """

    model: nn.Module
    plan: Plan
    before: Profile
    after: Profile
    original: nn.Module
    input_shape: tuple[int, ...]
    spec: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    preprocessing: dict[str, Any] | None = None
    labels: list[str] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def mac_ratio(self) -> float:
        """Total MACs after / before (< 1 is cheaper)."""
        return self.after.total_macs / max(1, self.before.total_macs)

    def __call__(self, x: torch.Tensor) -> Any:
        """Run the converted model on ``x`` (shape ``input_shape`` with any batch size)."""
        return self.model(x)

    def loaded(self) -> LoadedModel:
        """The converted model as the library's commands see a loaded model."""
        name = f"{self.spec or type(self.original).__name__} (converted)"
        return LoadedModel(self.model, name, dict(self.model_kwargs),
                           input_shape=self.input_shape, preprocessing=self.preprocessing, labels=self.labels)


def _options(cls: type, given: Any, options: dict[str, Any], what: str) -> Any:
    """``given`` (a ``cls`` instance) updated with ``options``, or ``cls(**options)``; unknown names refused."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise DsdeployError(f"{what} has no option {unknown[0]!r}; options: {', '.join(sorted(names))}")
    return dataclasses.replace(given, **options) if given is not None else cls(**options)


def convert(model: nn.Module | str, *, policy: Policy | None = None, input_shape: Sequence[int] | None = None,
            example_inputs: torch.Tensor | None = None, weights: str | None = None,
            model_kwargs: dict[str, Any] | None = None, **options: Any) -> ConvertedModel:
    """Rewrite the convolutions of a COPY of ``model`` into depthwise-separable blocks (the input is untouched).

    Method: per input channel, an SVD of the conv kernel's slice; the top ``rank`` terms give the
    depthwise filters and the pointwise weights (:mod:`dsdeploy.conversion.decompose`); at full rank the
    block reproduces the conv exactly.

    Args:
        model: any ``nn.Module`` taking one image batch, or a spec (``torchvision:NAME``,
            ``sample:NAME``, ``pkg.module:factory``; ``weights``/``model_kwargs`` as for the CLI).
        policy: a :class:`dsdeploy.conversion.plan.Policy`; ``options`` set its fields by name:
            ``rank`` (int >= 1) | ``energy`` (kept singular-value energy, (0, 1]) | ``mac_budget``
            (fraction of conv MACs, (0, 1]), ``include``/``exclude`` (regex of layer names),
            ``convert_stem``, ``layout`` ("branches" | ...), ``require_gain``. Default: rank 1.
        input_shape: (N, C, H, W) to trace with; default: ``example_inputs.shape``, the model's own,
            or 224x224 with the first conv's channel count.
        example_inputs: a tensor whose shape is the input shape (only its shape is used).

    Returns:
        A :class:`ConvertedModel`.

    Raises:
        PlanError: an option out of range (names the field); NothingToConvertError: no conv
        converts (lists each conv's reason); ModelError: NaN weights or an uncopyable model.
    """
    policy = _options(Policy, policy, options, "convert")
    policy.validate()
    if isinstance(model, str):
        from dsdeploy.conversion.loading import load_model

        loaded = load_model(model, weights=weights, model_kwargs=model_kwargs)
        if loaded.artifact is not None:
            raise DsdeployError(f"{model} is already converted; convert its source model instead")
    elif isinstance(model, nn.Module):
        loaded = LoadedModel(model, "")
    else:
        raise DsdeployError(f"model must be an nn.Module or a spec string, got {type(model).__name__}")
    given = tuple(example_inputs.shape) if example_inputs is not None else input_shape
    pre = resolve(loaded.preprocessing, given or loaded.input_shape, model=loaded.model)
    shape = input_shape_for(pre, given, loaded.input_shape, False)
    res: ConversionResult = rewrite_convert(loaded.model, input_shape=tuple(shape), **dataclasses.asdict(policy))
    entry = {"stage": "convert", "policy": res.plan.policy, "layout": res.plan.layout,
             "converted": len(res.plan.converted),
             "conv_mac_ratio": round(res.after.conv_macs / max(1, res.before.conv_macs), 4)}
    return ConvertedModel(res.model.eval(), res.plan, res.before, res.after, loaded.model, tuple(shape),
                          spec=loaded.spec or None, model_kwargs=dict(loaded.model_kwargs), weights=loaded.weights,
                          preprocessing=pre.to_dict(), labels=loaded.labels, history=[entry])


def _require_converted(obj: Any, what: str) -> ConvertedModel:
    if not isinstance(obj, ConvertedModel):
        raise DsdeployError(f"{what} needs the ConvertedModel that dsdeploy.convert returned, got "
                            f"{type(obj).__name__}")
    return obj


def _loader(data: Any, batch_size: int) -> Iterable:
    """A tensor of inputs (N, C, H, W) -> batches of ``batch_size``; any other iterable of batches as is."""
    if isinstance(data, torch.Tensor):
        if data.dim() < 2 or data.shape[0] == 0:
            raise DataError(f"data must be a batch of inputs (N, C, H, W), got shape {tuple(data.shape)}")
        return [data[i:i + batch_size] for i in range(0, data.shape[0], batch_size)]
    return data


def calibrate(converted: ConvertedModel, data: str | torch.Tensor | Iterable, *,
              params: CalibrationParams | None = None, preprocess: dict[str, Any] | None = None, seed: int = 0,
              val_split: float = 0.2, limit: int | None = None, progress: bool = False,
              **options: Any) -> CalibrationReport:
    """Fit each DS block's pointwise weights to the ORIGINAL conv's outputs, IN PLACE, then re-estimate BatchNorm.

    Method: least squares on activations (the depthwise features the block sees inside the
    partially calibrated network against the original conv's output; ridge-regularised normal
    equations, layer by layer in call order), as in Zhang et al. 2016 "Accelerating very deep
    convolutional networks" (:mod:`dsdeploy.recover.reconstruct`). No labels needed.

    Args:
        converted: what :func:`convert` returned (``converted.model`` is changed in place).
        data: ``"digits"`` or a folder of images (its training split; accuracy before/after
            reported on the labelled validation split), a float tensor of model-ready inputs
            (N, C, H, W), or an iterable of such batches (or ``(x, y)`` batches).
        params / options: :class:`dsdeploy.recover.config.CalibrationParams` fields:
            ``ridge`` (>= 0), ``max_batches`` (None = all), ``batch_size``, ``block_reconstruct``
            (seconds or a duration like ``"90s"``: afterwards, fit each converted block to the
            original's activations with Adam for that long, :mod:`dsdeploy.recover.blockrec`; off by default).
        preprocess: preprocessing overrides (``size``, ``mean``, ...) for a data spec.

    Returns:
        A CalibrationReport: per-layer relative output error before/after, batches, seconds.

    Raises:
        DataError: empty or unreadable data; DsdeployError: an option out of range (names it).
    """
    from dsdeploy.recover import reconstruct
    from dsdeploy.recover.blockrec import after_calibration

    cm = _require_converted(converted, "calibrate")
    p = _options(CalibrationParams, params, options, "calibrate")
    if isinstance(data, str):
        pre = resolve(cm.preprocessing, cm.input_shape, preprocess, data=data, model=cm.original)
        report = reconstruct.calibrate_data(cm.model, cm.original, cm.plan, data, pre, max_batches=p.max_batches,
                                            seed=seed, batch_size=p.batch_size, ridge=p.ridge, progress=progress,
                                            val_split=val_split, limit=limit, labels=cm.labels,
                                            block_reconstruct=p.block_reconstruct)
        cm.preprocessing = pre.to_dict()
        cm.history.append(report.history_entry(data=data, seed=seed))
    else:
        loader = _loader(data, p.batch_size)
        report = reconstruct.calibrate(cm.model, cm.original, cm.plan, loader,
                                       max_batches=p.max_batches, ridge=p.ridge, progress=progress)
        after_calibration(report, cm.model, cm.original, loader, p.block_reconstruct, max_batches=p.max_batches,
                          progress=progress)
        cm.history.append(report.history_entry(data="in-memory"))
    return report


def _splits(cm: ConvertedModel, data: Any, cfg: FinetuneConfig, preprocess: dict[str, Any] | None,
            val_split: float, limit: int | None) -> Any:
    """Fine-tuning data as :class:`dsdeploy.data.datasets.DataSplits` (a spec, splits, or (x, y) tensors)."""
    from torch.utils.data import TensorDataset

    from dsdeploy.data.datasets import DataSplits, load_data
    from dsdeploy.data.labels import check_outputs, output_count
    from dsdeploy.data.preprocessing import Preprocess

    if isinstance(data, DataSplits):
        return data
    if isinstance(data, str):
        pre = resolve(cm.preprocessing, cm.input_shape, preprocess, data=data, model=cm.model, augment=cfg.augment)
        splits = load_data(data, pre, seed=cfg.seed, labelled=False, limit=limit, val_split=val_split,
                           model_labels=cm.labels)
        if splits.classes and splits.train is not None and len(splits.train):
            check_outputs(splits.classes, output_count(cm.model, splits.train[0][0][None]), "the converted model")
        cm.preprocessing = pre.to_dict()
        return splits
    pairs = list(data) if isinstance(data, (tuple, list)) else None
    if not pairs or len(pairs) not in (2, 4) or not all(isinstance(t, torch.Tensor) for t in pairs):
        raise DataError("finetune data must be a data spec ('digits', a folder), DataSplits, (x, y) or "
                        "(x, y, x_val, y_val) tensors")
    train = TensorDataset(pairs[0], pairs[1].long())
    val = TensorDataset(pairs[2], pairs[3].long()) if len(pairs) == 4 else None
    n = int(max(int(pairs[1].max()), int(pairs[3].max()) if val is not None else 0)) + 1
    return DataSplits(train, val, [str(i) for i in range(n)], Preprocess.from_dict(cm.preprocessing or {}))


def finetune(converted: ConvertedModel, data: Any, *, out: str | Path | None = None, config: FinetuneConfig | None = None,
             teacher: nn.Module | None = None, distill: bool = True, resume: bool = False,
             preprocess: dict[str, Any] | None = None, val_split: float = 0.2, limit: int | None = None,
             **options: Any) -> FinetuneResult:
    """Train ``converted.model`` IN PLACE by distillation from the original; it ends holding the best weights.

    Method: knowledge distillation (Hinton et al. 2015, soft targets at ``temperature``) plus
    cross-entropy on labels and optional feature matching (:mod:`dsdeploy.recover.distill`), with
    SGD/AdamW and a step/cosine schedule (:mod:`dsdeploy.recover.finetune`).

    Args:
        converted: what :func:`convert` returned.
        data: ``"digits"`` or a folder of images; a DataSplits; or tensors ``(x, y)`` /
            ``(x, y, x_val, y_val)`` of model-ready inputs (N, C, H, W) and int class labels (N,).
            The best epoch is picked on the validation split when there is one.
        out: a ``.dsd`` to write with the best weights (with ``OUT.ckpt``/``OUT.history.json``
            beside it, so ``resume=True`` continues); None: train in memory only.
        config / options: :class:`dsdeploy.recover.config.FinetuneConfig` fields (``epochs``,
            ``time_budget`` seconds, ``lr``, ``mode``, ``init``, ``reinit``, ``channels_last``, ...).
        teacher: the distillation teacher (default: ``converted.original``); ``distill=False``:
            cross-entropy on labels only.

    Returns:
        A FinetuneResult (best validation accuracy and epoch, why it stopped, per-epoch history).

    Raises:
        DataError: no training images, or no teacher and no labels; DsdeployError: an option
        out of range (names the field).
    """
    from dsdeploy.recover import finetune as loop

    cm = _require_converted(converted, "finetune")
    cfg = _options(FinetuneConfig, config, options, "finetune")
    splits = _splits(cm, data, cfg, preprocess, val_split, limit)
    teacher_model = (teacher if teacher is not None else cm.original) if distill else None
    with tempfile.TemporaryDirectory(prefix="dsdeploy-finetune-") as tmp:
        where = Path(out) if out is not None else Path(tmp) / "model.dsd"
        result = loop.finetune(cm.model, teacher_model, splits, cfg, out_path=where, resume=resume)
    result.split = getattr(splits, "split", None)
    cm.history.append(result.history_entry(cfg, data=data if isinstance(data, str) else "in-memory"))
    if out is not None:
        save(cm, out)
    return result


def evaluate(model: ConvertedModel | nn.Module | str, data: str, *, compare: Any = None,
             **options: Any) -> dict[str, Any]:
    """Top-1/top-5/precision/recall/F1 of ``model`` (and ``compare`` side by side) on labelled ``data``.

    ``model``/``compare``: a ConvertedModel (its own preprocessing and labels), an ``nn.Module``
    or a spec/``.dsd`` path. ``data``: ``"digits"`` or a folder of class folders. ``options``:
    those of :func:`dsdeploy.recover.evaluate.evaluate` (``split``, ``val_split``, ``seed``,
    ``limit``, ``batch_size``, ``preprocess``, ``trust_code``). Returns its JSON-able dict
    (``models[i].metrics``; with ``compare``: ``delta`` and ``agreement``). Raises DataError for
    unlabelled data or class names the model does not know.
    """
    from dsdeploy.recover.evaluate import evaluate as run

    unwrap = lambda m: m.loaded() if isinstance(m, ConvertedModel) else m  # noqa: E731
    return run(unwrap(model), data, compare=unwrap(compare) if compare is not None else None, **options)


def export_onnx(model: ConvertedModel | nn.Module, path: str | Path, *, input_shape: Sequence[int] | None = None,
                **options: Any) -> Any:
    """Export to ONE ``.onnx`` file, gated by ONNX Runtime parity with torch (:func:`dsdeploy.export.onnx_export.export_onnx`).

    ``input_shape`` (N, C, H, W): default the ConvertedModel's. A ConvertedModel's preprocessing
    and labels go into the ONNX metadata (bundles predict with them). ``options``: ``opset``,
    ``dynamic_batch``, ``simplify`` (onnxsim), ``exporter`` ("torchscript" | "dynamo"), ``data``
    (real inputs added to the parity cases), ``atol``/``rtol``. Returns an ExportReport (op
    counts, conv MACs, parity). Raises ExportError / ParityError; nothing is written on failure.
    """
    from dsdeploy.export.onnx_export import export_onnx as run
    from dsdeploy.export.onnx_export import provenance

    meta = dict(options.pop("metadata", None) or {})
    if isinstance(model, ConvertedModel):
        meta = {**provenance(model.loaded()), **meta}
        input_shape = input_shape or model.input_shape
        model = model.model
    if input_shape is None:
        raise DsdeployError("export_onnx needs input_shape=(N, C, H, W) for a plain nn.Module")
    return run(model, path, tuple(input_shape), metadata=meta, **options)


def benchmark(models: str | Path | Sequence[str | Path], *, config: Any = None, **options: Any) -> Any:
    """Latency (ms per batch) of ONNX models on ONNX Runtime execution providers, with output parity.

    ``models``: one ``.onnx`` path or several (the first is the baseline of the comparisons).
    ``config`` / ``options``: :class:`dsdeploy.runtime.bench.BenchConfig` fields (``providers``
    aliases such as "cpu", ``batches``, ``threads``, ``warmup``, ``iters`` | ``duration``
    seconds, ``data``). Returns a BenchReport (``.results`` per model x EP x batch with
    mean/p50/p90 ms). Raises ProviderError for an unavailable provider (naming the available ones).
    """
    from dsdeploy.runtime.bench import BenchConfig, bench

    paths = [str(models)] if isinstance(models, (str, Path)) else [str(m) for m in models]
    return bench(paths, _options(BenchConfig, config, options, "benchmark"))


def save(model: ConvertedModel | nn.Module, path: str | Path, *, source: str | None = None,
         model_kwargs: dict[str, Any] | None = None) -> Path:
    """Write a ``.dsd`` artifact (source spec + plan + weights + metadata + history), atomically.

    The source architecture is recorded as a spec, never as code: the converted spec when known;
    else ``source`` (``pkg.module:factory`` with ``model_kwargs``); else inferred
    (:func:`dsdeploy.models.infer.infer_source`: a matching ``torchvision:NAME``, or
    ``module:Class`` for a class that builds without arguments). A model converted from an
    in-memory module also gets its original weights beside it (``PATH.source.pt``, sha256
    recorded): the default teacher of later ``calibrate``/``finetune``. The artifact is rebuilt as
    :func:`load` will and must give the same outputs before anything is written.

    Raises:
        SourceError: no source can be named (the message says to pass ``source=``);
        ModelError: the rebuild differs; ArtifactError: ``path`` does not end in ``.dsd``.
    """
    path = Path(path)
    if path.suffix != ".dsd":
        raise ArtifactError(f"save path must end in .dsd, got {path.name!r}")
    if isinstance(model, ConvertedModel):
        cm = model
    elif isinstance(model, nn.Module):
        if ds_blocks(model):
            raise DsdeployError("this module holds DS blocks but no plan: save the ConvertedModel that "
                                "dsdeploy.convert returned")
        pre = resolve(None, None, model=model)
        cm = ConvertedModel(model, Plan(input_shape=list(pre.input_shape(1))), None, None, model,  # type: ignore
                            pre.input_shape(1), preprocessing=pre.to_dict())
    else:
        raise DsdeployError(f"save needs a ConvertedModel or an nn.Module, got {type(model).__name__}")
    spec, kwargs, weights = cm.spec, dict(cm.model_kwargs), cm.weights
    if source is not None:
        spec, kwargs, weights = source, dict(model_kwargs or {}), None
    elif spec is None:
        spec, kwargs = infer_source(cm.original)
    fresh = build_source(spec, kwargs).model
    verify_rebuild(fresh, cm.plan, cm.model)
    if weights is None and cm.plan.converted and not spec.startswith("sample:"):
        weights = str(path.with_suffix(".source.pt"))
        with atomic_path(weights) as tmp:
            torch.save({k: v.detach().cpu() for k, v in cm.original.state_dict().items()}, tmp)
    meta = {"input_shape": list(cm.input_shape), "preprocessing": cm.preprocessing, "labels": cm.labels}
    if cm.before is not None:
        meta.update(conv_macs_before=cm.before.conv_macs, conv_macs_after=cm.after.conv_macs)
    return save_artifact(path, cm.model, cm.plan, source_record(spec, kwargs, weights), meta, cm.history)


def load(path: str | Path, *, trust_code: bool = False, factory: Callable[..., Any] | None = None) -> nn.Module:
    """The model a ``.dsd`` holds, in eval mode, with outputs identical to the saved one.

    A recorded ``pkg.module:factory`` (including an inferred ``module:Class``) is imported only
    with ``trust_code=True`` or when ``factory`` (the callable that builds it) is given;
    ``torchvision:``/``sample:`` sources always load. Raises ArtifactError for a corrupt or
    crafted file or an untrusted factory.
    """
    return load_artifact(path, trust_code=trust_code, factory=factory).model
