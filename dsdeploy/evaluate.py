"""Accuracy of one model, or two side by side, on a labelled dataset.

``evaluate(model, data)`` loads the model (a spec or a loaded model), builds the data
with the model's own preprocessing, predicts, and returns a JSON-able dict of metrics
(``dsdeploy.metrics.classification_metrics``) per model, plus deltas and prediction
agreement when a second model is compared.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np
from torch import nn

from dsdeploy.data import DIGITS_PREPROCESS, DataSplits, Preprocess, load_data, make_loader
from dsdeploy.errors import DataError
from dsdeploy.metrics import classification_metrics, predict

log = logging.getLogger(__name__)

METRIC_KEYS = ("top1", "top5", "precision", "recall", "f1")


def _loaded(model: Any, weights: str | None, model_kwargs: dict | None, trust_pickle: bool,
            trust_code: bool = False) -> Any:
    """A spec string -> ``sources.load_model``; anything with ``.model`` is used as is; a bare module is wrapped."""
    if isinstance(model, str):
        from dsdeploy.sources import load_model

        return load_model(model, weights=weights, model_kwargs=model_kwargs, trust_pickle=trust_pickle,
                          trust_code=trust_code)
    if isinstance(model, nn.Module):
        from types import SimpleNamespace

        return SimpleNamespace(model=model, spec=type(model).__name__, preprocessing=None, labels=None,
                               input_shape=None)
    return model


def preprocess_for(loaded: Any, data: str, override: Preprocess | None = None) -> Preprocess:
    """The preprocessing to evaluate ``loaded`` with: explicit override, the model's own,
    digits defaults for ``digits``, else derived from the model's input shape."""
    if override is not None:
        return override
    if getattr(loaded, "preprocessing", None):
        return Preprocess.from_dict(loaded.preprocessing)
    shape = getattr(loaded, "input_shape", None)
    if data == "digits":
        pre = replace(DIGITS_PREPROCESS)
        if shape and len(shape) == 4:
            pre = Preprocess(size=(shape[2], shape[3]), resize=None, mean=pre.mean, std=pre.std, channels=shape[1])
        return pre
    if shape and len(shape) == 4 and shape[1] in (1, 3):
        h, w = shape[2], shape[3]
        base = Preprocess()
        return Preprocess(size=(h, w), resize=round(min(h, w) * 256 / 224) if min(h, w) >= 128 else None,
                          mean=base.mean[: shape[1]] if shape[1] == 3 else (0.5,),
                          std=base.std[: shape[1]] if shape[1] == 3 else (0.5,), channels=shape[1])
    return Preprocess()


def _label_map(classes: list[str], model_labels: list[str] | None) -> list[int] | None:
    """Data class index -> model output index when the model names its classes differently ordered."""
    if not model_labels or list(model_labels) == list(classes):
        return None
    if set(classes) <= set(model_labels):
        return [list(model_labels).index(c) for c in classes]
    log.warning("data classes %s do not match the model's labels; assuming the same index order", classes[:5])
    return None


def _score(loaded: Any, splits: DataSplits, split: str, batch_size: int, progress: bool) -> dict[str, Any]:
    dataset = getattr(splits, split)
    if dataset is None:
        raise DataError(f"the data has no {split!r} split; use --split train/val or set a val_split > 0")
    if splits.classes is None:
        raise DataError("evaluation needs labelled data (class folders or 'digits'), got unlabelled images")
    t0 = time.perf_counter()
    y_true, scores = predict(loaded.model, make_loader(dataset, batch_size, shuffle=False), progress=progress,
                             desc=f"evaluate {loaded.spec}")
    seconds = time.perf_counter() - t0
    mapping = _label_map(splits.classes, getattr(loaded, "labels", None))
    if mapping is not None:
        y_true = np.asarray(mapping)[y_true]
    n_out = scores.shape[1]
    if int(y_true.max()) >= n_out:
        raise DataError(f"model {loaded.spec} outputs {n_out} classes but the data has {len(splits.classes)} "
                        f"({', '.join(splits.classes[:5])}{', ...' if len(splits.classes) > 5 else ''})")
    names = list(loaded.labels) if getattr(loaded, "labels", None) and len(loaded.labels) == n_out else (
        splits.classes if len(splits.classes) == n_out else None)
    metrics = classification_metrics(y_true, scores.argmax(1), scores, labels=names)
    return {"model": loaded.spec, "metrics": metrics, "seconds": round(seconds, 3),
            "preprocessing": splits.preprocess.to_dict(), "_pred": scores.argmax(1)}


def evaluate(model: Any, data: str, *, compare: Any = None, weights: str | None = None,
             compare_weights: str | None = None, model_kwargs: dict | None = None, trust_pickle: bool = False,
             batch_size: int = 256, split: str = "val", val_split: float = 0.2, seed: int = 0,
             limit: int | None = None, preprocess: Preprocess | None = None, progress: bool = False,
             trust_code: bool = False) -> dict[str, Any]:
    """Evaluate ``model`` (and ``compare``, side by side) on ``data``; return a JSON-able dict.

    ``model``/``compare``: a spec for ``sources.load_model``, a ``LoadedModel``-like object
    (``.model``, ``.spec``, ``.preprocessing``, ``.labels``) or a bare ``nn.Module``.
    Each model sees the data through its own preprocessing (``preprocess`` overrides).
    Result: ``{"data", "split", "images", "skipped", "classes", "models": [{"model",
    "metrics", "seconds", "preprocessing"}, ...]}`` plus, with ``compare``, ``"delta"``
    (compare minus model, per metric) and ``"agreement"`` (fraction of equal predictions).
    ``trust_code``: import the ``pkg.module:factory`` a ``.dsd`` spec records (:mod:`dsdeploy.trust`).
    """
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    entries = [_loaded(model, weights, model_kwargs, trust_pickle, trust_code)]
    if compare is not None:
        entries.append(_loaded(compare, compare_weights, model_kwargs, trust_pickle, trust_code))
    cache: dict[str, DataSplits] = {}
    results = []
    for loaded in entries:
        pre = preprocess_for(loaded, data, preprocess)
        key = repr(pre.to_dict())
        if key not in cache:
            cache[key] = load_data(data, pre, val_split=val_split, seed=seed, labelled=True, limit=limit)
        results.append(_score(loaded, cache[key], split, batch_size, progress))
    splits = next(iter(cache.values()))
    out: dict[str, Any] = {"data": data, "split": split, "images": int(results[0]["metrics"]["n"]),
                           "skipped": splits.skipped, "classes": splits.classes, "models": results}
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
