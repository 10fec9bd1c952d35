"""A deployed model measured against its fp32 source: its preprocessing, evaluation images, top-1 and agreement, CPU latency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dsdeploy.data.datasets import load_data
from dsdeploy.data.labels import check_outputs
from dsdeploy.data.preprocessing import resolve
from dsdeploy.errors import DataError, DeployError, DsdeployError, ExportError
from dsdeploy.export.graph import META_PREPROCESSING
from dsdeploy.recover.metrics import top1
from dsdeploy.runtime.sessions import cpu_session
from dsdeploy.runtime.timing import Protocol, measure


def model_preprocess(meta_pre: dict[str, Any] | None, dims: list[Any], spec: str | None,
                overrides: dict[str, Any] | None = None):
    """The model's Preprocess (:func:`dsdeploy.data.preprocessing.resolve`: overrides > its metadata >
    derived from a fixed input shape); DeployError when nothing gives the image size."""
    fixed = all(isinstance(d, int) and d > 0 for d in dims[1:])
    if not meta_pre and not fixed and not (overrides or {}).get("size"):
        raise DeployError(f"the model has no {META_PREPROCESSING} metadata and a dynamic image size; export it "
                          f"with dsdeploy export so its preprocessing is recorded, or give the image size (size)")
    return resolve(meta_pre, dims, overrides, data=spec)


def eval_images(spec: str, pre, *, split: str, limit: int | None, seed: int, labelled: bool,
            labels: list[str] | None = None, val_split: float = 0.2):
    """(images float32 NCHW, labels, classes) from ``spec``'s split (falls back to the other split);
    labels mapped to the model's ``labels`` by name (dsdeploy.data.labels)."""
    splits = load_data(spec, pre, seed=seed, labelled=labelled, limit=limit, model_labels=labels if labelled else None,
                       val_split=val_split)
    ds = getattr(splits, split)
    if ds is None or not len(ds):
        ds = splits.val if split == "train" else splits.train
    if ds is None or not len(ds):
        raise DataError(f"no images in {spec}")
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return np.stack([x.numpy() for x in xs]).astype(np.float32), np.asarray(ys), splits.classes


def deployed_session(path: Path):
    """A CPU session of a deployed model; a model ORT cannot load -> DeployError."""
    try:
        return cpu_session(path)
    except ExportError as exc:
        raise DeployError(f"the deployed model does not load in ONNX Runtime: {exc}") from None


def _run(sess, name: str, images: np.ndarray, fixed_batch: int | None, batch: int = 64) -> np.ndarray:
    step = fixed_batch or batch
    outs = []
    for i in range(0, len(images), step):
        x = images[i:i + step]
        n = len(x)
        if fixed_batch and n < fixed_batch:
            x = np.concatenate([x, np.zeros((fixed_batch - n, *x.shape[1:]), np.float32)])
        outs.append(np.asarray(sess.run(None, {name: x})[0])[:n].reshape(n, -1))
    return np.concatenate(outs)


def accuracy(fp32: Path, bundle: Path, images: np.ndarray, y: np.ndarray, name: str,
             fixed_batch: int | None, classes: list[str] | None = None) -> dict[str, Any]:
    """Top-1 (%) of the fp32 and deployed models on the same labelled images (:func:`dsdeploy.recover.metrics.top1`),
    and their agreement (DataError when the data has more ``classes`` than the model has outputs)."""
    s32 = _run(deployed_session(fp32), name, images, fixed_batch)
    check_outputs(classes, s32.shape[1], "the model")
    p32 = s32.argmax(1)
    pb = _run(deployed_session(bundle), name, images, fixed_batch).argmax(1)
    (c32, n), (cb, _) = top1(y, p32), top1(y, pb)
    if not n:
        raise DataError("no labelled images to measure accuracy on")
    a32, ab = 100 * c32 / n, 100 * cb / n
    return {"fp32_top1": round(a32, 3), "bundle_top1": round(ab, 3), "drop_pts": round(a32 - ab, 3),
            "agreement": round(float((p32 == pb).mean() * 100), 3), "images": int(len(y))}


def latency(path: Path, name: str, shape: tuple[int, ...], *, warmup: int = 5, iters: int = 30,
            threads: int | None = None) -> dict[str, float]:
    """Median and p90 latency (ms) of one CPU-EP run on a random batch of ``shape``, and the
    protocol that measured them (:mod:`dsdeploy.runtime.timing`); DeployError when ORT cannot load it."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    proto = Protocol(warmup=warmup, iters=iters)
    try:
        stats = measure(str(path), {name: x}, threads=threads, protocol=proto)
    except DsdeployError as exc:
        raise DeployError(f"the deployed model does not load in ONNX Runtime: {exc}") from None
    return {"p50": round(stats.p50_ms, 4), "p90": round(stats.p90_ms, 4), "protocol": proto.describe()}
