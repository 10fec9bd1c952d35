"""Decoding one image file, the evaluation geometry, and the training augmentation recipes.

Evaluation (and calibration, and the no-augmentation training path) decodes with Pillow and
resizes exactly as a deployed bundle's ``predict.py`` does (resize straight to ``size``, or
the shorter side to ``resize`` then a center crop), so a model sees the same pixels in
training, evaluation and deployment. Training augmentation is ``torchvision.transforms.v2``:

* the ImageNet recipe for inputs whose shorter side is at least :data:`IMAGENET_RECIPE_SIDE`
  px: ``RandomResizedCrop(size)`` of the whole decoded image + ``RandomHorizontalFlip``;
* the small-image recipe below that (CIFAR-size): pad by ``max(size)//8`` + ``RandomCrop(size)``
  of the evaluation-geometry image + ``RandomHorizontalFlip``.

The transforms draw from torch's global RNG; :mod:`dsdeploy.data.datasets` seeds it per item.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dsdeploy.data.preprocessing import Preprocess

MODES = {1: "L", 3: "RGB", 4: "RGBA"}
IMAGENET_RECIPE_SIDE = 96  # inputs at least this many px on the shorter side train with the ImageNet recipe
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what a broken file raises
OPENS = [0]  # image files this process has opened for decoding (diagnostics: start-up never reads them all)


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


RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def eval_geometry(im, pre: Preprocess):
    """``im`` (PIL) resized straight to ``pre.size`` (``resize`` None), or its shorter side to ``pre.resize``
    then center-cropped to ``pre.size``; Pillow resampling ``pre.interpolation``, as the bundle's predict.py."""
    h, w = pre.size
    resample = RESAMPLE[pre.interpolation]
    if pre.resize is None:
        return im.resize((w, h), resample)
    scale = pre.resize / min(im.size)
    nw, nh = max(w, round(im.size[0] * scale)), max(h, round(im.size[1] * scale))
    im = im.resize((nw, nh), resample)
    left, top = (nw - w) // 2, (nh - h) // 2
    return im.crop((left, top, left + w, top + h))


def open_image(path: str | Path, channels: int):
    """The whole image at ``path`` as a loaded PIL image with ``channels`` (1/3/4) 8-bit channels.

    Raises one of :data:`UNREADABLE` for a file that is not a readable image."""
    OPENS[0] += 1
    with Image.open(path) as im:
        im = to_8bit(im).convert(MODES[channels])
        im.load()
        return im


def chw(arr: np.ndarray) -> torch.Tensor:
    """A uint8 HxW or HxWxC array as a CxHxW tensor."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def decode(path: str | Path, pre: Preprocess) -> np.ndarray | None:
    """Decode, convert to ``pre.channels`` (L/RGB/RGBA, 16-bit scaled to 8) and resize one image
    (:func:`eval_geometry`) to uint8 HxW(xC); None when unreadable."""
    try:
        return np.array(eval_geometry(open_image(path, pre.channels), pre), dtype=np.uint8)
    except UNREADABLE:
        return None


def recipe(pre: Preprocess) -> str:
    """The training augmentation recipe for ``pre``: ``"imagenet"`` or ``"small"`` (see the module notes)."""
    return "imagenet" if min(pre.size) >= IMAGENET_RECIPE_SIDE else "small"


def train_transform(pre: Preprocess) -> Any:
    """The ``torchvision.transforms.v2`` augmentation of :func:`recipe` (uint8 in, uint8 CxHxW out).

    The ImageNet recipe takes the whole decoded image (PIL or tensor); the small one takes the
    evaluation-geometry image (a CxHxW tensor of ``pre.size``)."""
    from torchvision.transforms import v2

    if recipe(pre) == "imagenet":
        mode = v2.InterpolationMode(pre.interpolation)
        return v2.Compose([v2.RandomResizedCrop(pre.size, interpolation=mode, antialias=True),
                           v2.RandomHorizontalFlip(), v2.PILToTensor()])
    pad = max(pre.size) // 8
    return v2.Compose([v2.RandomCrop(pre.size, padding=pad or None), v2.RandomHorizontalFlip()])
