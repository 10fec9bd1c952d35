"""Datasets for recovery and evaluation: scikit-learn digits or folders of images.

``load_data(spec, preprocess)`` returns train/val splits of ``(FloatTensor[C,H,W], label)``
items. Folders may be an ImageFolder with ``train/`` plus ``test/`` or ``val/``, one
class-folder tree (split by ``val_split``), or a flat folder of images (unlabelled,
label -1). Start-up only lists file names (:mod:`dsdeploy.data.listing`); each image is
decoded when a loader first reads it, into a shared uint8 cache when the listing fits in
it (:mod:`dsdeploy.data.store`), so later epochs and later stages of a run never decode
it again. Non-image files are counted by the listing, unreadable images when read.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dsdeploy.data.decode import UNREADABLE, chw, decode, open_image, recipe, train_transform
from dsdeploy.data.decode import decode as _decode  # noqa: F401 (the bundle's predict.py is tested against it)
from dsdeploy.data.labels import split_record, to_model_labels
from dsdeploy.data.listing import IMAGE_EXTS, class_folders, scan  # noqa: F401 (re-exported)
from dsdeploy.data.loader import first_item, make_loader, readable_images  # noqa: F401 (re-exported)
from dsdeploy.data.preprocessing import (  # noqa: F401 (re-exported)
    DIGITS_PREPROCESS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    announce,
    warn_if_images_small,
)
from dsdeploy.data.store import BAD, DecodedStore, store_for
from dsdeploy.errors import DataError
from dsdeploy.ranges import check_number

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Images with int labels: a tensor (uint8, or float in [0,1]) or listed files, decoded when read.

    Files are opened only when an item is read (never at construction or by ``len``). The
    decoded evaluation-geometry image goes into the listing's :class:`~dsdeploy.data.store.DecodedStore`
    cache when the listing fits in it. A file that cannot be decoded is recorded as unreadable
    and counted in ``skipped``: through a loader (``__getitems__``, what :func:`make_loader` and
    ``DataLoader`` call) its item is ``None`` and the loader's collate drops it, so a bad file
    costs one image of one batch, never the epoch; indexing it directly (``ds[i]``) raises DataError.

    With ``augment`` the training recipe of :func:`dsdeploy.data.decode.recipe` applies; its random
    draws are seeded by (epoch seed, item index) (:meth:`set_epoch_seed`), so an item's augmentation
    does not depend on which process reads it or in what order.
    """

    def __init__(self, labels: Sequence[int], preprocess: Preprocess, *, images: torch.Tensor | None = None,
                 files: Sequence[str | Path] | None = None, augment: bool = False, seed: int = 0, where: str = "",
                 store: DecodedStore | None = None, ids: Sequence[int] | None = None) -> None:
        if (images is None) == (files is None and store is None):
            raise ValueError("give exactly one of images or files")
        self.images = images
        if images is None and store is None:
            store = DecodedStore([str(f) for f in files], preprocess)
        self.store = store
        self.ids = np.asarray(ids if ids is not None else range(len(labels)), dtype=np.int64)
        self._labels = [int(v) for v in labels]
        self.where = where
        self.preprocess, self.augment = preprocess, augment
        c = preprocess.channels
        self._mean = torch.tensor(preprocess.mean).expand(c).reshape(c, 1, 1).clone()
        self._std = torch.tensor(preprocess.std).expand(c).reshape(c, 1, 1).clone()
        self._epoch = torch.tensor([seed], dtype=torch.int64)
        self._recipe = recipe(preprocess) if augment else None
        self._transform = train_transform(preprocess) if augment else None

    @property
    def files(self) -> list[Path] | None:
        """The files of the items (None for a tensor dataset)."""
        return None if self.store is None else [Path(self.store.files[j]) for j in self.ids]

    @property
    def labels(self) -> list[int]:
        """The label of each item (-1: unlabelled)."""
        return self._labels

    @property
    def skipped(self) -> int:
        """Items found unreadable so far (files are checked when read, not before)."""
        if self.store is None:
            return 0
        return int((self.store.status[torch.from_numpy(self.ids)] == BAD).sum())

    def share(self) -> None:
        """Put the decode state in shared memory (DataLoader workers then share it; called by the loaders)."""
        self._epoch.share_memory_()
        if self.store is not None:
            self.store.share()

    def __getstate__(self) -> dict[str, Any]:  # spawned workers: without the loaders kept on the dataset
        return {k: v for k, v in self.__dict__.items() if k != "_dsdeploy_loaders"}

    def set_epoch_seed(self, seed: int) -> None:
        """Seed the augmentation of the next pass (each item's draws derive from this and its index)."""
        self._epoch[0] = int(seed) % (2 ** 63)

    def __len__(self) -> int:
        return len(self._labels)

    def _augmented(self, i: int, source: Any) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((int(self._epoch[0]) * 1_000_003 + i) % (2 ** 63))
            return self._transform(source)

    def _image(self, i: int) -> torch.Tensor | None:
        """Item ``i`` as a uint8 (or [0,1] float) CxHxW tensor, augmented when training; None if unreadable."""
        if self.images is not None:
            img = self.images[i]
            return self._augmented(i, img) if self.augment else img
        st, j = self.store, int(self.ids[i])
        if st.unreadable(j):
            return None
        path = st.files[j]
        if self._recipe == "imagenet":  # RandomResizedCrop wants the whole image: decoded from the file
            try:
                whole = open_image(path, self.preprocess.channels)
            except UNREADABLE:
                st.put(j, None)
                return None
            return self._augmented(i, whole)
        img = st.cached(j)
        if img is None:
            arr = decode(path, self.preprocess)
            img = None if arr is None else chw(arr)
            st.put(j, img)
            if img is None:
                return None
        return self._augmented(i, img) if self.augment else img

    def _item(self, i: int) -> tuple[torch.Tensor, int] | None:
        img = self._image(i)
        if img is None:
            return None
        img = img.float().div_(255) if img.dtype == torch.uint8 else img.float()
        return (img - self._mean) / self._std, self._labels[i]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int] | None]:
        """Items for a loader: None for an unreadable file (counted in ``skipped``; the collate drops it)."""
        return [self._item(int(i)) for i in indices]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item = self._item(i)
        if item is None:
            raise DataError(f"cannot decode image {self.store.files[int(self.ids[i])]}: remove or replace the file")
        return item


@dataclass
class DataSplits:
    """Train/val datasets, class names (None = unlabelled), preprocessing, files skipped."""

    train: ImageDataset | None
    val: ImageDataset | None
    classes: list[str] | None
    preprocess: Preprocess
    scan_skipped: int = 0
    source: str = ""
    split: dict[str, Any] | None = None  # labels.split_record: counts and a digest of the members

    @property
    def skipped(self) -> int:
        """Non-image files found by the scan plus unreadable images found so far (they are found when read)."""
        return self.scan_skipped + sum(getattr(d, "skipped", 0) for d in (self.train, self.val) if d is not None)


def _split(labels: list[int], val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (stratified where possible) train/val index split."""
    idx = np.arange(len(labels))
    if val_split <= 0:
        return idx, idx[:0]
    if not 0 < val_split < 1:
        raise DataError(f"val_split must be in [0, 1), got {val_split}")
    n_val = max(1, round(len(idx) * val_split))
    if n_val >= len(idx):
        raise DataError(f"too few images ({len(idx)}) to hold out val_split={val_split}")
    counts = np.unique(labels, return_counts=True)[1]
    can_stratify = len(counts) > 1 and counts.min() >= 2 and min(n_val, len(idx) - n_val) >= len(counts)
    # sklearn costs about a quarter of torch's import time; only this step needs it
    from sklearn.model_selection import train_test_split

    tr, va = train_test_split(idx, test_size=n_val, random_state=seed,
                              stratify=labels if can_stratify else None)
    return np.sort(tr), np.sort(va)


def _cap(idx: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or len(idx) <= limit:
        return idx
    return np.sort(np.random.default_rng(seed).permutation(idx)[:limit])


def _load_digits(pre: Preprocess | None, val_split: float, seed: int, limit: int | None,
                 model_labels: Sequence[str] | None) -> DataSplits:
    # sklearn costs about a quarter of torch's import time; only this step needs it
    from sklearn.datasets import load_digits

    pre = pre or replace(DIGITS_PREPROCESS)
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=pre.size, mode="bilinear", align_corners=False).clamp_(0, 1)
    if pre.channels > 1:
        x = torch.cat([x.repeat(1, min(3, pre.channels), 1, 1)] + [torch.ones_like(x)] * (pre.channels - 3), 1)
    announce(pre)
    y, classes = d.target.tolist(), [str(i) for i in range(10)]
    tr, va = _split(y, val_split, seed)
    tr, va = _cap(tr, limit, seed), _cap(va, limit, seed + 1)
    if model_labels:
        lookup = to_model_labels(classes, model_labels, where="digits")
        y, classes = [lookup[v] for v in y], list(model_labels)

    def mk(idx: np.ndarray, augment: bool) -> ImageDataset | None:
        return ImageDataset([y[i] for i in idx], pre, images=x[idx], augment=augment, seed=seed) if len(idx) else None

    record = split_record({"train": [str(i) for i in tr], "val": [str(i) for i in va]}, val_split=val_split,
                          seed=seed, limit=limit)
    return DataSplits(mk(tr, pre.augment), mk(va, False), classes, pre, 0, "digits", record)


def load_data(spec: str, preprocess: Preprocess | None = None, *, val_split: float = 0.2, seed: int = 0,
              labelled: bool = True, limit: int | None = None, model_labels: Sequence[str] | None = None
              ) -> DataSplits:
    """Load ``digits`` or a folder of images into train/val splits.

    Folder layouts: ``DIR/train/<class>/*`` with ``DIR/test/`` or ``DIR/val/`` (the held-out
    split becomes ``val``); ``DIR/<class>/*`` split by ``val_split`` (stratified, seeded);
    or images directly in ``DIR`` (unlabelled: label -1, ``classes`` None, split by
    ``val_split``; pass 0 to keep all in ``train``). ``limit`` caps each split (seeded
    subset). Labels follow :mod:`dsdeploy.data.labels`: a class's index is its folder's position among
    all class folders; with ``model_labels`` they are mapped to the model's outputs by name
    (``classes`` becomes ``model_labels``). The same spec, ``val_split``, ``seed`` and ``limit``
    always give the same split (``DataSplits.split`` records it). The preprocessing is logged once
    (``dsdeploy.data.preprocessing.announce``; the CLI prints it). Raises DataError for a
    missing or empty folder, a data class not in ``model_labels``, or, when ``labelled``, a
    folder without class folders or with only one class.
    """
    check_number(seed, "data seed", low=0, integer=True)
    check_number(limit, "data limit (images per split)", low=1, integer=True, optional=True)
    if spec == "digits":
        return _load_digits(preprocess, val_split, seed, limit, model_labels)
    pre = preprocess or Preprocess()
    root = Path(spec).expanduser()
    if not root.exists():
        raise DataError(f"data {spec!r} not found: give 'digits' or a folder of images")
    if not root.is_dir():
        raise DataError(f"data {spec!r} is a file, not a folder of images (or 'digits')")
    files, labels, which, classes, skipped = scan(root)
    if not files:
        raise DataError(f"no images found in {root} (looked for {', '.join(sorted(IMAGE_EXTS))})")
    if labelled and classes is None:
        raise DataError(f"{root} has no class folders; a labelled run needs {root}/<class>/<image> files")
    if labelled and len(classes) < 2:
        raise DataError(f"{root} holds only one class ({classes[0]!r}); a labelled run needs at least two")
    if which[0] is not None:
        tr, va = (np.flatnonzero(np.array(which) == w) for w in ("train", "val"))
    else:
        tr, va = _split(labels, val_split, seed)
    tr, va = _cap(tr, limit, seed), _cap(va, limit, seed + 1)
    announce(pre)
    warn_if_images_small(pre, files)
    if skipped:
        log.warning("skipped %d non-image files in %s", skipped, root)
    if classes is not None and model_labels:
        lookup = to_model_labels(classes, model_labels, set(labels), str(root))
        labels, classes = [lookup[v] for v in labels], list(model_labels)

    store = store_for(str(root.resolve()), files, pre)

    def mk(idx: np.ndarray, what: str, augment: bool) -> ImageDataset | None:
        return ImageDataset([labels[i] for i in idx], pre, store=store, ids=idx, augment=augment,
                            seed=seed, where=f"{root} ({what})") if len(idx) else None

    prefix = len(os.path.join(str(root), ""))
    rel = lambda idx: [files[i][prefix:].replace(os.sep, "/") for i in idx]  # noqa: E731
    record = split_record({"train": rel(tr), "val": rel(va)}, val_split=val_split, seed=seed, limit=limit)
    return DataSplits(mk(tr, "train", pre.augment), mk(va, "val", False), classes, pre, skipped, str(root), record)
