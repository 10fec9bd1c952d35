"""Data handed to the Python API (a data spec, tensors or batches) as the loaders and splits the library uses."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch.utils.data import Subset, TensorDataset

from dsdeploy.data.datasets import DataSplits, first_item, load_data
from dsdeploy.data.labels import check_outputs, output_count
from dsdeploy.data.preprocessing import Preprocess, resolve
from dsdeploy.errors import DataError

if TYPE_CHECKING:  # a type hint only: data/ does not depend on recover/
    from dsdeploy.recover.config import FinetuneConfig


def batches(data: Any, batch_size: int) -> Iterable:
    """A tensor of inputs (N, C, H, W) -> batches of ``batch_size``; any other iterable of batches as is."""
    if isinstance(data, torch.Tensor):
        if data.dim() < 2 or data.shape[0] == 0:
            raise DataError(f"data must be a batch of inputs (N, C, H, W), got shape {tuple(data.shape)}")
        return [data[i:i + batch_size] for i in range(0, data.shape[0], batch_size)]
    return data


def finetune_splits(cm: Any, data: Any, cfg: FinetuneConfig, preprocess: dict[str, Any] | None,
            val_split: float, limit: int | None) -> Any:
    """Fine-tuning data as :class:`dsdeploy.data.datasets.DataSplits` (a spec, splits, or (x, y) tensors)."""
    if isinstance(data, DataSplits):
        return data
    if isinstance(data, str):
        pre = resolve(cm.preprocessing, cm.input_shape, preprocess, data=data, model=cm.model, augment=cfg.augment)
        splits = load_data(data, pre, seed=cfg.seed, labelled=False, limit=limit, val_split=val_split,
                           model_labels=cm.labels)
        if splits.classes and splits.train is not None and len(splits.train):
            check_outputs(splits.classes, output_count(cm.model, first_item(splits.train)[0][None]), "the converted model")
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


def calibration_images(data: str, pre: Preprocess, *, max_batches: int | None, batch_size: int, seed: int,
                       val_split: float, limit: int | None, labels: list[str] | None) -> tuple[DataSplits, Any]:
    """The splits of a data spec and the images calibration (and the sensitivity pass) use, in a fixed order.

    The calibration images are the training split of ``load_data(data, pre, val_split=, seed=,
    limit=)`` (no augmentation; the validation split when there is no training split), reduced to
    a seeded random subset of ``max_batches * batch_size`` images when that is fewer (None: all).
    Returns ``(splits, images)``. Raises DataError when there is no image to calibrate on.
    """
    splits = load_data(data, pre, seed=seed, labelled=False, val_split=val_split, limit=limit, model_labels=labels)
    calib = splits.train if splits.train is not None else splits.val
    if calib is None or len(calib) == 0:
        raise DataError(f"no calibration images in {data}")
    if max_batches is not None and max_batches * batch_size < len(calib):
        perm = torch.randperm(len(calib), generator=torch.Generator().manual_seed(seed))
        calib = Subset(calib, perm[:max_batches * batch_size].sort().values.tolist())
    return splits, calib
