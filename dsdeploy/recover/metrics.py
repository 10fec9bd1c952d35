"""Classification metrics (scikit-learn does the arithmetic) and batched prediction."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from dsdeploy.errors import DataError, DsdeployError, InputShapeError


def classification_metrics(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                           scores: np.ndarray | torch.Tensor | None = None,
                           labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Top-1, top-5 (when ``scores`` has more than 5 classes), macro precision/recall/F1,
    per-class figures and the confusion matrix (rows: true class, columns: predicted).

    ``labels`` names the class indices 0..C-1; without it the classes are the indices
    seen in ``y_true``/``y_pred`` (and ``scores``' columns). Raises DataError for empty
    or unlabelled (-1) ground truth.
    """
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
        top_k_accuracy_score,
    )

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
        "n": int(len(y_true)),
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


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, *, progress: bool = False, desc: str = "predict"
            ) -> tuple[np.ndarray, np.ndarray]:
    """Run ``model`` (in eval mode, no grad) over ``loader``; return (y_true, scores[N, C]).

    The model's train/eval mode is restored afterwards. Raises DsdeployError when the
    model does not return a (N, C) tensor of class scores.
    """
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    ys, outs = [], []
    try:
        for x, y in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
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
            outs.append(out.float().cpu())
            ys.append(torch.as_tensor(y))
    finally:
        model.train(was_training)
    if not outs:
        raise DataError("no samples to predict on (empty dataset)")
    return torch.cat(ys).numpy().astype(np.int64), torch.cat(outs).numpy()
