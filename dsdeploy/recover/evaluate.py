"""Accuracy of one model, or two side by side, on a labelled dataset.

``evaluate(model, data)`` loads the model (a spec or a loaded model), builds the data
with the model's own preprocessing, predicts, and returns a JSON-able dict of metrics
(``dsdeploy.recover.metrics.classification_metrics``) per model, plus deltas and prediction
agreement when a second model is compared.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Sequence

import torch
from torch import nn

from dsdeploy.conversion.loading import load_model
from dsdeploy.data.datasets import DataSplits, Preprocess, load_data, make_loader
from dsdeploy.data.labels import check_outputs
from dsdeploy.data.preprocessing import resolve
from dsdeploy.errors import DataError
from dsdeploy.ranges import check_number
from dsdeploy.recover.config import check_device_name, check_precision_name
from dsdeploy.recover.device import check_precision, placed, resolve_device
from dsdeploy.recover.metrics import classification_metrics, predict

log = logging.getLogger(__name__)

METRIC_KEYS = ("top1", "top5", "precision", "recall", "f1")


@dataclass
class EvaluateConfig:
    """How :func:`evaluate` scores (the recipe's [evaluate]; the CLI's --batch-size/--split/--limit).

    Attributes:
        batch_size: images per forward pass (>= 1).
        split: "val" (the test/ or val/ folder, or the held-out part) or "train".
        limit: score at most this many images (a seeded subset; >= 1), None: all.
        device: where the models run: auto (CUDA when present, else CPU), cpu, cuda, cuda:N, mps.
        precision: autocast of the forward passes: fp32, bf16 or fp16.
        workers: DataLoader worker processes (>= 0; None: ``dsdeploy.data.loader.default_workers``).
    """

    batch_size: int = 256
    split: str = "val"
    limit: int | None = None
    device: str = "auto"
    precision: str = "fp32"
    workers: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise DataError (a choice) or ConfigError (a number) naming the field (``evaluate.batch_size``)."""
        if self.split not in ("train", "val"):
            raise DataError(f"evaluate.split must be 'train' or 'val', got {self.split!r}")
        check_number(self.batch_size, "evaluate.batch_size", low=1, integer=True)
        check_number(self.limit, "evaluate.limit", low=1, integer=True, optional=True)
        check_device_name(self.device, "evaluate.device")
        check_precision_name(self.precision, "evaluate.precision")
        check_number(self.workers, "evaluate.workers", low=0, integer=True, optional=True)


def _loaded(model: Any, weights: str | None, model_kwargs: dict | None, trust_pickle: bool,
            trust_code: bool = False) -> Any:
    """A spec string -> ``convert.loading.load_model``; anything with ``.model`` is used as is; a bare module is wrapped."""
    if isinstance(model, str):
        return load_model(model, weights=weights, model_kwargs=model_kwargs, trust_pickle=trust_pickle,
                          trust_code=trust_code)
    if isinstance(model, nn.Module):
        return SimpleNamespace(model=model, spec=type(model).__name__, preprocessing=None, labels=None,
                               input_shape=None)
    return model


def preprocess_for(loaded: Any, data: str, override: Preprocess | dict | None = None,
                   input_shape: Sequence[int] | None = None) -> Preprocess:
    """The preprocessing to evaluate ``loaded`` with (:func:`dsdeploy.data.preprocessing.resolve`):
    a whole ``Preprocess`` override is used as is; a dict overrides the keys it gives;
    ``input_shape`` (N, C, H, W) replaces the model's own input shape."""
    if isinstance(override, Preprocess):
        return override
    return resolve(getattr(loaded, "preprocessing", None), input_shape or getattr(loaded, "input_shape", None),
                   override, data=data, model=getattr(loaded, "model", None))


def _score(loaded: Any, splits: DataSplits, split: str, batch_size: int, progress: bool,
           device: torch.device, precision: str, workers: int | None = None) -> dict[str, Any]:
    dataset = getattr(splits, split)
    if dataset is None:
        raise DataError(f"the data has no {split!r} split; use evaluate.split train/val or set a val_split > 0")
    if splits.classes is None:
        raise DataError("evaluation needs labelled data (class folders or 'digits'), got unlabelled images")
    t0 = time.perf_counter()
    with placed(device, loaded.model):
        loader = make_loader(dataset, batch_size, shuffle=False, workers=workers)
        y_true, scores = predict(loaded.model, loader, progress=progress, desc=f"evaluate {loaded.spec}",
                                 precision=precision)
    seconds = time.perf_counter() - t0
    n_out = scores.shape[1]
    check_outputs(splits.classes, n_out, f"model {loaded.spec}")
    names = list(loaded.labels) if getattr(loaded, "labels", None) and len(loaded.labels) == n_out else (
        splits.classes if len(splits.classes) == n_out else None)
    metrics = classification_metrics(y_true, scores.argmax(1), scores, labels=names)
    return {"model": loaded.spec, "metrics": metrics, "seconds": round(seconds, 3),
            "preprocessing": splits.preprocess.to_dict(), "_pred": scores.argmax(1)}


def evaluate(model: Any, data: str, *, compare: Any = None, weights: str | None = None,
             compare_weights: str | None = None, model_kwargs: dict | None = None, trust_pickle: bool = False,
             batch_size: int = 256, split: str = "val", val_split: float = 0.2, seed: int = 0,
             limit: int | None = None, preprocess: Preprocess | dict | None = None, progress: bool = False,
             trust_code: bool = False, input_shape: Sequence[int] | None = None, device: str = "auto",
             precision: str = "fp32", workers: int | None = None) -> dict[str, Any]:
    """Evaluate ``model`` (and ``compare``, side by side) on ``data``; return a JSON-able dict.

    ``model``/``compare``: a spec for ``convert.loading.load_model``, a ``LoadedModel``-like object
    (``.model``, ``.spec``, ``.preprocessing``, ``.labels``) or a bare ``nn.Module``.
    Each model sees the data through its own preprocessing (:mod:`dsdeploy.data.preprocessing`;
    ``preprocess`` overrides: a whole ``Preprocess`` or a dict of keys) and its own labels
    (data classes mapped to the model's labels by name, :mod:`dsdeploy.data.labels`).
    Result: ``{"data", "split", "images", "skipped", "classes", "models": [{"model",
    "metrics", "seconds", "preprocessing"}, ...]}`` plus, with ``compare``, ``"delta"``
    (compare minus model, per metric) and ``"agreement"`` (fraction of equal predictions).
    ``trust_code``: import the ``pkg.module:factory`` a ``.dsd`` spec records (:mod:`dsdeploy.models.trust`).
    ``input_shape``: (N, C, H, W) for models that record none (a factory's 32x32 CIFAR net); it
    sizes the preprocessing of every model evaluated, like the models' own recorded shape would.
    ``device``/``precision``: where and in what autocast precision the models run
    (:mod:`dsdeploy.recover.device`; a model given as a module is put back where it was).
    ``workers``: DataLoader worker processes (None: ``dsdeploy.data.loader.default_workers``).
    """
    EvaluateConfig(batch_size=batch_size, split=split, limit=limit, device=device, precision=precision, workers=workers)
    dev = resolve_device(device, "evaluate.device")
    check_precision(precision, dev, "evaluate.precision")
    entries = [_loaded(model, weights, model_kwargs, trust_pickle, trust_code)]
    if compare is not None:
        entries.append(_loaded(compare, compare_weights, model_kwargs, trust_pickle, trust_code))
    cache: dict[str, DataSplits] = {}
    results = []
    for loaded in entries:
        pre = preprocess_for(loaded, data, preprocess, input_shape)
        labels = list(loaded.labels) if getattr(loaded, "labels", None) else None
        key = repr((pre.to_dict(), labels))
        if key not in cache:
            cache[key] = load_data(data, pre, val_split=val_split, seed=seed, labelled=True, limit=limit,
                                   model_labels=labels)
        results.append(_score(loaded, cache[key], split, batch_size, progress, dev, precision, workers))
    splits = next(iter(cache.values()))
    out: dict[str, Any] = {"data": data, "split": split, "images": int(results[0]["metrics"]["n"]),
                           "skipped": splits.skipped, "classes": splits.classes, "models": results,
                           "data_split": splits.split}
    if compare is not None:
        a, b = results[0]["metrics"], results[1]["metrics"]
        out["delta"] = {k: (b[k] - a[k]) if a[k] is not None and b[k] is not None else None for k in METRIC_KEYS}
        pa, pb = results[0]["_pred"], results[1]["_pred"]
        out["agreement"] = float((pa == pb).mean()) if len(pa) == len(pb) else None
    for r in results:
        del r["_pred"]
    return out


def summary_rows(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows for a per-model table of ``evaluate``'s result."""
    headers = ["model", *METRIC_KEYS, "images", "seconds"]
    rows = [[r["model"], *(r["metrics"][k] for k in METRIC_KEYS), r["metrics"]["n"], r["seconds"]]
            for r in result["models"]]
    if "delta" in result:
        rows.append(["delta", *(result["delta"][k] for k in METRIC_KEYS), None, None])
    return headers, rows
