"""Datasets for recovery and evaluation: scikit-learn digits or folders of images.

``load_data(spec, preprocess)`` returns train/val splits of ``(FloatTensor[C,H,W], label)``
items. Folders may be an ImageFolder with ``train/`` plus ``test/`` or ``val/``, one
class-folder tree (split by ``val_split``), or a flat folder of images (unlabelled,
label -1). Corrupt and non-image files are skipped and counted. A split is decoded on first
use into an in-memory uint8 cache (when it fits), so epochs never re-decode JPEGs and a
split nobody uses is never decoded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dsdeploy.data.labels import split_record, to_model_labels
from dsdeploy.data.preprocessing import (  # noqa: F401 (re-exported)
    DIGITS_PREPROCESS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    announce,
    warn_if_images_small,
)
from dsdeploy.errors import DataError
from dsdeploy.ranges import check_number

log = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
CACHE_BYTES = 2 << 30  # decode a split into memory when its uint8 images fit in this many bytes
class ImageDataset(Dataset):
    """Images with int labels: a tensor (uint8, or float in [0,1]) or files.

    Files are checked on first use (``len`` or an item): small splits are decoded once into
    a uint8 cache, large ones verified and decoded per item. Unreadable files are dropped
    then and counted in ``skipped``, so a split nobody touches is never decoded.
    """

    def __init__(self, labels: Sequence[int], preprocess: Preprocess, *, images: torch.Tensor | None = None,
                 files: Sequence[Path] | None = None, augment: bool = False, seed: int = 0, where: str = "") -> None:
        if (images is None) == (files is None):
            raise ValueError("give exactly one of images or files")
        self.images, self.files = images, list(files) if files is not None else None
        self._labels = [int(v) for v in labels]
        self._pending = files is not None
        self.skipped, self.where = 0, where
        self.preprocess, self.augment = preprocess, augment
        c = preprocess.channels
        self._mean = torch.tensor(preprocess.mean).expand(c).reshape(c, 1, 1).clone()
        self._std = torch.tensor(preprocess.std).expand(c).reshape(c, 1, 1).clone()
        self._gen = torch.Generator().manual_seed(seed)

    def _ensure(self) -> None:
        if not self._pending:
            return
        self._pending = False
        cache, files, labels = _materialise(self.files, self._labels, self.preprocess, self.where)
        self.skipped = len(self._labels) - len(labels)
        if self.skipped:
            log.warning("skipped %d corrupt image files in %s", self.skipped, self.where)
        if not labels:
            raise DataError(f"no readable images in {self.where} ({self.skipped} corrupt files)")
        self.images, self.files, self._labels = cache, (None if cache is not None else files), labels

    @property
    def labels(self) -> list[int]:
        self._ensure()
        return self._labels

    def __len__(self) -> int:
        return len(self.labels)

    def _raw(self, i: int) -> torch.Tensor:
        if self.images is not None:
            img = self.images[i]
        else:
            arr = _decode(self.files[i], self.preprocess)
            if arr is None:
                raise DataError(f"cannot decode image {self.files[i]}: remove or replace the file")
            img = _to_chw(arr)
        return img.float().div_(255) if img.dtype == torch.uint8 else img.float()

    def _augment(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        pad = max(h, w) // 8
        if pad:
            img = F.pad(img, (pad, pad, pad, pad))
            dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=self._gen))
            img = img[:, dy:dy + h, dx:dx + w]
        if torch.rand((), generator=self._gen) < 0.5:
            img = img.flip(-1)
        return img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self._ensure()
        img = self._raw(i)
        if self.augment:
            img = self._augment(img)
        return (img - self._mean) / self._std, self._labels[i]


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
        """Non-image files found by the scan plus corrupt images found in the splits used so far."""
        return self.scan_skipped + sum(d.skipped for d in (self.train, self.val) if d is not None)


def _to_chw(arr: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def _resize(im, pre: Preprocess):
    h, w = pre.size
    if pre.resize is None:
        return im.resize((w, h), Image.BILINEAR)
    scale = pre.resize / min(im.size)
    nw, nh = max(w, round(im.size[0] * scale)), max(h, round(im.size[1] * scale))
    im = im.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - w) // 2, (nh - h) // 2
    return im.crop((left, top, left + w, top + h))


MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def to_8bit(im):
    """A PIL image with 8-bit channels: 16-bit (``I;16*``) and 32-bit integer (``I``) grayscale are
    scaled by 255/65535 (a 16-bit PNG opens as one of them), float (``F``) in [0, 1] by 255."""
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(arr * (255 / 65535)), 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(np.nan_to_num(arr) * scale), 0, 255).astype(np.uint8), "L")
    return im


def _decode(path: Path, pre: Preprocess) -> np.ndarray | None:
    """Decode, convert to ``pre.channels`` (L/RGB/RGBA, 16-bit scaled to 8) and resize one image to
    uint8 HxW(xC); None when unreadable."""
    try:
        with Image.open(path) as im:
            im = to_8bit(im).convert(MODES[pre.channels])
            return np.array(_resize(im, pre), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _verify(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def _files(folder: Path) -> tuple[list[Path], int]:
    """All non-hidden files below ``folder`` (sorted): image-extension files and a count of others."""
    images, other = [], 0
    for p in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in p.relative_to(folder).parts) or not p.is_file():
            continue
        if p.suffix.lower() in IMAGE_EXTS:
            images.append(p)
        else:
            other += 1
    return images, other


def class_folders(folder: Path) -> list[str]:
    """The class names of ``folder``: every non-hidden sub-folder, sorted (empty ones included).

    The label rule everywhere: a class's index is its position in this list, as torchvision's
    ``ImageFolder.find_classes`` does, so an empty class folder never shifts later labels."""
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _scan_tree(folder: Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str], int]:
    """Scan ``folder/<class>/**``: files, labels (index in ``classes``, default :func:`class_folders`),
    class names, non-image files skipped."""
    classes = class_folders(folder) if classes is None else classes
    files, labels, skipped = [], [], 0
    for index, name in enumerate(classes):
        if not (folder / name).is_dir():
            continue
        found, other = _files(folder / name)
        skipped += other
        labels += [index] * len(found)
        files += found
    return files, labels, classes, skipped


def _materialise(files: list[Path], labels: list[int], pre: Preprocess, what: str
                 ) -> tuple[torch.Tensor | None, list[Path], list[int]]:
    """Decode ``files`` into a uint8 cache when it fits in memory, else only verify them.

    Returns (cache or None, readable files, their labels)."""
    fits = len(files) * pre.channels * pre.size[0] * pre.size[1] <= CACHE_BYTES
    arrays, good, good_labels = [], [], []
    for path, label in tqdm(list(zip(files, labels)), desc=f"{'decoding' if fits else 'checking'} {what}",
                            unit="img", disable=len(files) < 2000, leave=False):
        arr = _decode(path, pre) if fits else None
        if arr is not None or (not fits and _verify(path)):
            arrays.append(arr)
            good.append(path)
            good_labels.append(label)
    if not fits or not arrays:
        return None, good, good_labels
    cache = torch.from_numpy(np.stack(arrays))
    cache = cache.unsqueeze(1) if cache.ndim == 3 else cache.permute(0, 3, 1, 2).contiguous()
    return cache, good, good_labels


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


def _scan(root: Path) -> tuple[list[Path], list[int], list[str | None], list[str] | None, int]:
    """Find images under ``root``: (files, labels, split of each file or None, classes, non-images skipped)."""
    held = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if (root / "train").is_dir() or held is not None:
        folders = [(name, folder) for name, folder in (("train", root / "train"), ("val", held))
                   if folder is not None and folder.is_dir()]
        names = sorted({c for _, folder in folders for c in class_folders(folder)})
        files, labels, which, skipped = [], [], [], 0
        for name, folder in folders:
            f, l, _, s = _scan_tree(folder, names)
            files += f
            labels += l
            which += [name] * len(f)
            skipped += s
        return files, labels, which, names, skipped
    files, labels, classes, skipped = _scan_tree(root)
    if not files:  # a flat folder of images: unlabelled
        loose = [p for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")]
        files = [p for p in loose if p.suffix.lower() in IMAGE_EXTS]
        labels, classes, skipped = [-1] * len(files), None, skipped + len(loose) - len(files)
    return files, labels, [None] * len(files), classes, skipped


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
    files, labels, which, classes, skipped = _scan(root)
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

    def mk(idx: np.ndarray, what: str, augment: bool) -> ImageDataset | None:
        return ImageDataset([labels[i] for i in idx], pre, files=[files[i] for i in idx], augment=augment,
                            seed=seed, where=f"{root} ({what})") if len(idx) else None

    rel = lambda idx: [files[i].relative_to(root).as_posix() for i in idx]  # noqa: E731
    record = split_record({"train": rel(tr), "val": rel(va)}, val_split=val_split, seed=seed, limit=limit)
    return DataSplits(mk(tr, "train", pre.augment), mk(va, "val", False), classes, pre, skipped, str(root), record)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
    """A single-process DataLoader whose order depends only on ``seed``."""
    check_number(batch_size, "batch_size", low=1, integer=True)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=0)
