"""Classification metrics (scikit-learn does the arithmetic) and the one loop that scores a model over a loader."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from dsdeploy.errors import DataError, DsdeployError, InputShapeError
from dsdeploy.progress import bar as progress_bar
from dsdeploy.recover.device import autocast, module_device, to_device


def classification_metrics(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                           scores: np.ndarray | torch.Tensor | None = None,
                           labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Top-1, top-5 (when ``scores`` has more than 5 classes), macro precision/recall/F1,
    per-class figures and the confusion matrix (rows: true class, columns: predicted).

    ``labels`` names the class indices 0..C-1; without it the classes are the indices
    seen in ``y_true``/``y_pred`` (and ``scores``' columns). Raises DataError for empty
    or unlabelled (-1) ground truth.
    """
    # sklearn.metrics costs about a quarter of torch's import time; only this report needs it, not evaluate()
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score

    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be equal-length vectors")
    if len(y_true) == 0:
        raise DataError("no samples to score")
    if (y_true < 0).any():
        raise DataError("ground truth holds unlabelled samples (-1); accuracy needs a labelled dataset")
    if scores is not None:
        scores = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    n_cls = max(len(labels) if labels is not None else 0, scores.shape[1] if scores is not None else 0,
                int(max(y_true.max(), y_pred.max())) + 1)
    idx = list(range(n_cls)) if labels is not None or scores is not None else sorted(set(y_true) | set(y_pred))
    names = [str(labels[i]) if labels is not None and i < len(labels) else str(i) for i in idx]
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=idx, zero_division=0)
    present = s > 0  # macro averages over the classes that occur in the ground truth
    out: dict[str, Any] = {
        "n": len(y_true),
        "top1": float(accuracy_score(y_true, y_pred)),
        "top5": None,
        "precision": float(p[present].mean()),
        "recall": float(r[present].mean()),
        "f1": float(f[present].mean()),
        "labels": names,
        "per_class": [{"label": nm, "precision": float(pi), "recall": float(ri), "f1": float(fi), "support": int(si)}
                      for nm, pi, ri, fi, si in zip(names, p, r, f, s)],
        "confusion": confusion_matrix(y_true, y_pred, labels=idx).tolist(),
    }
    if scores is not None and scores.ndim == 2 and scores.shape[1] > 5:
        out["top5"] = float(top_k_accuracy_score(y_true, scores, k=5, labels=np.arange(scores.shape[1])))
    return out


def _scores(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` as a (batch, classes) float tensor; InputShapeError when the model cannot take ``x``,
    DsdeployError when it does not return class scores."""
    try:
        out = model(x)
    except (RuntimeError, ValueError) as exc:  # the model cannot take these images (size, channels)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputShapeError(f"the model cannot run on the preprocessed images, shape "
                              f"{','.join(map(str, x.shape))} (check size/channels): {first}") from exc
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        kind = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DsdeployError(f"model output {kind} is not (batch, classes) scores; "
                            f"evaluation supports classifiers only")
    return out.float()


@torch.no_grad()  # on a generator: grad is off while it runs, back on while the caller holds a batch
def scored_batches(model: nn.Module, loader: Iterable, *, max_batches: int | None = None,
                   channels_last: bool = False, progress: bool = False, desc: str = "predict",
                   precision: str = "fp32") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The one evaluation loop: yield (labels[B], scores[B, C]) per batch of ``loader`` (``(x, y)`` pairs).

    ``model`` runs in eval mode without gradients (its mode is restored when the loop ends or
    is abandoned) on the device it is on (the batches are moved there; the scores come back
    float32 on the CPU), under autocast of ``precision`` (fp32 | bf16 | fp16); at most
    ``max_batches`` batches; ``channels_last`` feeds 4-D batches in NHWC memory format (for a
    model converted to it). Errors as :func:`_scores`.
    """
    was_training = model.training
    device = module_device(model)
    model.eval()
    try:
        for i, (x, y) in enumerate(progress_bar(loader, desc=desc, unit="batch", show=progress)):
            if max_batches is not None and i >= max_batches:
                break
            x = to_device(x, device)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                out = _scores(model, x)
            yield torch.as_tensor(y).cpu(), out.float().cpu()
    finally:
        model.train(was_training)


def predict(model: nn.Module, loader: Iterable, *, progress: bool = False, desc: str = "predict",
            precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """Run ``model`` (in eval mode, no grad, on its device, autocast ``precision``) over ``loader``;
    return (y_true, scores[N, C]).

    The model's train/eval mode is restored afterwards. Raises DsdeployError when the
    model does not return a (N, C) tensor of class scores, DataError for an empty loader.
    """
    ys, outs = [], []
    for y, out in scored_batches(model, loader, progress=progress, desc=desc, precision=precision):
        ys.append(y)
        outs.append(out.cpu())
    if not outs:
        raise DataError("no samples to predict on (empty dataset)")
    return torch.cat(ys).numpy().astype(np.int64), torch.cat(outs).numpy()


def top1(y_true: np.ndarray | torch.Tensor, y_pred: np.ndarray | torch.Tensor) -> tuple[int, int]:
    """(correct, labelled): how many labelled items (label >= 0) ``y_pred`` gets right, and how many there are."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    mask = y_true >= 0
    return int((y_pred[mask] == y_true[mask]).sum()), int(mask.sum())


def evaluate(model: nn.Module, loader: Iterable, max_batches: int | None = None,
             channels_last: bool = False, precision: str = "fp32") -> float | None:
    """Top-1 accuracy (0-1) of ``model`` on the labelled items of ``loader``; None without labels.

    ``channels_last`` feeds 4-D batches in NHWC memory format (for a model converted to it);
    ``precision``: autocast of the forward pass (:func:`scored_batches`).
    Only the counts are kept, not the scores (a cheap check inside training loops).
    """
    correct = total = 0
    for y, out in scored_batches(model, loader, max_batches=max_batches, channels_last=channels_last,
                                 precision=precision):
        c, n = top1(y, out.argmax(1))
        correct, total = correct + c, total + n
    return correct / total if total else None
