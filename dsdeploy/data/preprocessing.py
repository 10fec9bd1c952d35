"""The one place that decides how images become a model's inputs.

:class:`Preprocess` says what is done to an image (resize / center-crop to ``size``, scale
to [0, 1], normalise by ``mean``/``std``, ``channels`` 1, 3 or 4). :func:`resolve` decides
which preprocessing a model gets, for every command that reads images (convert
``--calib-data``, calibrate, finetune, evaluate, export ``--data``, deploy, bench, ``run``):

1. explicit overrides (command-line options, a recipe's ``[preprocess]`` section), then
2. the preprocessing recorded with the model (sample metadata, ``.dsd``, ONNX metadata),
   re-sized when the model's input shape says otherwise, then
3. derived from the model's input shape ``(N, C, H, W)``: ``channels = C``,
   ``size = (H, W)``; inputs up to :data:`SMALL_SIDE` px resize straight to ``size``,
   larger ones resize the shorter side to ``round(side * 256 / 224)`` and center-crop, then
4. for a model without a known input shape, 224x224 with the channel count of its first
   convolution.

Setting ``size`` without ``resize`` derives ``resize`` from the new size by the same rule.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from PIL import Image

from dsdeploy.errors import DataError, InputShapeError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_SIDE = 4096  # the largest size/resize side accepted (larger: a typo, and no memory for it)
SMALL_SIDE = 64  # inputs whose shorter side is at most this many pixels resize straight to size
CHANNELS = (1, 3, 4)
OVERRIDE_KEYS = ("size", "resize", "mean", "std", "channels", "interpolation")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")  # Pillow / torchvision resampling by name
DEFAULT_SOURCES = ("ImageNet defaults", "224x224 defaults")  # sources of a preprocessing nobody chose


@dataclass
class Preprocess:
    """How images become model inputs: resize/crop to ``size``, scale to [0,1], normalise.

    ``resize`` is the shorter side before a center crop to ``size`` (None: resize straight
    to ``size``). ``channels`` 1 (grayscale), 3 (RGB) or 4 (RGBA). ``interpolation``
    (bilinear, bicubic or nearest) is the resampling of every resize. ``augment`` (the
    training recipe of :func:`dsdeploy.data.decode.recipe`: RandomResizedCrop + flip from 96 px,
    pad + random crop + flip below) applies to the training split only. ``source`` says where
    the values came from (shown to the user, not stored).
    """

    size: tuple[int, int] = (224, 224)
    resize: int | None = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3
    augment: bool = False
    interpolation: str = "bilinear"
    source: str = field(default="given", compare=False, repr=False)

    def __post_init__(self) -> None:
        self.size = (int(self.size[0]), int(self.size[-1])) if isinstance(self.size, Sequence) else (
            int(self.size), int(self.size))
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        self.resize = None if self.resize in (None, 0) else int(self.resize)
        if self.interpolation not in INTERPOLATIONS:
            raise DataError(f"preprocessing interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                            f"got {self.interpolation!r}")
        if self.channels not in CHANNELS:
            raise DataError(f"preprocessing channels must be 1, 3 or 4, got {self.channels}")
        for name, vals in (("mean", self.mean), ("std", self.std)):
            if len(vals) not in (1, self.channels):
                raise DataError(f"preprocessing {name} has {len(vals)} values for {self.channels} channels")
        if any(not math.isfinite(m) for m in self.mean):
            raise DataError(f"preprocessing mean must be finite numbers, got {list(self.mean)}")
        if any(not (math.isfinite(s) and s > 0) for s in self.std):
            raise DataError(f"preprocessing std must be positive finite numbers, got {list(self.std)}")
        if min(self.size) <= 0 or (self.resize is not None and self.resize <= 0):
            raise DataError("preprocessing size and resize must be positive")
        if max(self.size) > MAX_SIDE or (self.resize is not None and self.resize > MAX_SIDE):
            raise DataError(f"preprocessing size and resize must be at most {MAX_SIDE} px per side, "
                            f"got size {self.size[0]}x{self.size[1]}, resize {self.resize}")

    def to_dict(self) -> dict[str, Any]:
        """The dict stored as ``LoadedModel.preprocessing`` / artifact and ONNX metadata / bundle manifest."""
        return {"size": list(self.size), "resize": self.resize, "mean": list(self.mean), "std": list(self.std),
                "channels": self.channels, "interpolation": self.interpolation, "layout": "NCHW"}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> "Preprocess":
        """Inverse of ``to_dict`` (unknown keys such as ``layout`` are ignored; no ``resize``: straight)."""
        keys = {"size", "resize", "mean", "std", "channels", "interpolation", "augment", "source"}
        args = {k: v for k, v in d.items() if k in keys}
        if "size" in args:
            args["size"] = tuple(args["size"]) if isinstance(args["size"], (list, tuple)) else args["size"]
        args.setdefault("resize", None)
        args.update(overrides)
        return cls(**args)

    def input_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        """``(batch, channels, H, W)``."""
        return (batch, self.channels, *self.size)


DIGITS_PREPROCESS = Preprocess(size=(16, 16), resize=None, mean=(0.3,), std=(0.32,), channels=1,
                               source="digits defaults")


def derive_resize(size: Sequence[int]) -> int | None:
    """The resize rule for an input ``size`` (H, W): None (straight) up to SMALL_SIDE px, else 256/224 of it."""
    side = min(int(s) for s in size)
    return None if side <= SMALL_SIDE else round(side * 256 / 224)


def default_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std for a channel count without recorded ones: ImageNet for RGB (+0.5/0.5 for a 4th), 0.5/0.5 gray."""
    if channels == 1:
        return (0.5,), (0.5,)
    if channels == 4:
        return IMAGENET_MEAN + (0.5,), IMAGENET_STD + (0.5,)
    return IMAGENET_MEAN, IMAGENET_STD


def first_conv_channels(model: Any) -> int | None:
    """Input channels of ``model``'s first convolution (module order), or None."""
    # torch stays out: the ONNX-only bench path (runtime.inputs) resolves preprocessing without it
    from torch import nn

    if not isinstance(model, nn.Module):
        return None
    conv = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
    return int(conv.in_channels) if conv is not None else None


def _image_shape(shape: Sequence[Any] | None) -> tuple[int, tuple[int, int]] | None:
    """(channels, (H, W)) of a fixed NCHW shape; None when not 4-D or not fixed."""
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        return None
    return int(shape[1]), (int(shape[2]), int(shape[3]))


def _from_shape(channels: int, size: tuple[int, int], digits: bool, source: str) -> Preprocess:
    if channels not in CHANNELS:  # images cannot make this; consumers' shape checks then say so in one line
        source = f"the model takes {channels}-channel input but images give 1, 3 or 4 channels"
        channels = 3
    mean, std = (DIGITS_PREPROCESS.mean, DIGITS_PREPROCESS.std) if digits and channels == 1 else \
        default_stats(channels)
    return Preprocess(size=size, resize=None if digits else derive_resize(size), mean=mean, std=std,
                      channels=channels, source=source)


def normalise_overrides(overrides: Mapping[str, Any] | Preprocess | None) -> dict[str, Any]:
    """Overrides as ``{key: value}`` for the keys given (None values dropped); a Preprocess gives all keys."""
    if overrides is None:
        return {}
    if isinstance(overrides, Preprocess):
        return {**overrides.to_dict(), "augment": overrides.augment}
    unknown = set(overrides) - set(OVERRIDE_KEYS) - {"augment", "layout"}
    if unknown:
        raise DataError(f"unknown preprocessing keys {sorted(unknown)}; use {', '.join(OVERRIDE_KEYS)}")
    out = {k: v for k, v in overrides.items() if v is not None and k != "layout"}
    if "size" in out and isinstance(out["size"], (int, float)):
        out["size"] = (int(out["size"]),) * 2
    if "size" in out and len(out["size"]) == 1:
        out["size"] = tuple(out["size"]) * 2
    return out


def resolve(recorded: Mapping[str, Any] | Preprocess | None = None, input_shape: Sequence[Any] | None = None,
            overrides: Mapping[str, Any] | Preprocess | None = None, *, data: str | None = None,
            model: Any = None, augment: bool = False) -> Preprocess:
    """The preprocessing a model gets: overrides > recorded > derived from the input shape > defaults.

    Args:
        recorded: the preprocessing dict stored with the model (``Preprocess.to_dict()``), or None;
            an already resolved ``Preprocess`` is returned as is when there are no overrides.
        input_shape: the model's input shape (N, C, H, W); dynamic dims (strings) are ignored.
            When it disagrees with ``recorded`` on channels or size, the shape wins (the model
            cannot take anything else) and mean/std are kept where the channel count matches.
        overrides: explicit values (keys ``size``, ``resize``, ``mean``, ``std``, ``channels``, ``interpolation``;
            None values ignored). ``size`` without ``resize`` derives ``resize`` from the size;
            ``channels`` without ``mean``/``std`` takes the defaults for that channel count.
        data: the data spec (``digits`` without recorded preprocessing uses digits mean/std).
        model: the ``nn.Module``; without a shape its first conv gives the channel count.
        augment: the ``augment`` flag of the result.

    Returns:
        A :class:`Preprocess` whose ``source`` says where it came from.

    Raises:
        DataError: invalid values (channels not 1/3/4, mean/std lengths, non-positive sizes), or
            ``data`` given for a model whose input channels images cannot make (not 1, 3 or 4).
    """
    if isinstance(recorded, Preprocess) and not overrides:  # already resolved: keep it (and its source)
        return replace(recorded, augment=augment or recorded.augment)
    recorded = recorded.to_dict() if isinstance(recorded, Preprocess) else recorded
    over = normalise_overrides(overrides)
    digits = data == "digits"
    fixed = _image_shape(input_shape)
    takes = fixed[0] if fixed is not None else first_conv_channels(model)
    if data and takes is not None and takes not in CHANNELS:
        raise DataError(f"the model takes {takes}-channel inputs, but images give 1, 3 or 4 channels: "
                        f"image data ({data}) cannot be fed to it")
    if recorded:
        base = Preprocess.from_dict(recorded, source="recorded with the model")
        if fixed is not None and (base.channels, base.size) != fixed:
            keep = base.channels == fixed[0]
            base = replace(_from_shape(*fixed, digits, "recorded, sized to the model's input shape"),
                           interpolation=base.interpolation,
                           **({"mean": base.mean, "std": base.std} if keep else {}))
    elif fixed is not None:
        base = _from_shape(*fixed, digits, "from the model's input shape")
    elif digits:
        channels = first_conv_channels(model) or 1
        base = replace(DIGITS_PREPROCESS) if channels == 1 else _from_shape(channels, (16, 16), True,
                                                                            "digits defaults")
    else:
        channels = first_conv_channels(model)
        base = Preprocess(source=f"{DEFAULT_SOURCES[0]} (the model's input shape is unknown)")
        if channels in CHANNELS and channels != 3:
            base = _from_shape(channels, (224, 224), False, f"{DEFAULT_SOURCES[1]}; channels from the model's "
                                                            f"first conv, its input shape is unknown")
    if not over:
        return replace(base, augment=augment)
    args = {k: getattr(base, k) for k in OVERRIDE_KEYS}
    channels = int(over.get("channels", base.channels))
    if "channels" in over and fixed is not None and channels != fixed[0]:
        raise DataError(f"preprocessing channels {channels} do not fit the model, whose input shape takes "
                        f"{fixed[0]}-channel images")
    if channels != base.channels:
        args["mean"], args["std"] = default_stats(channels) if channels in CHANNELS else ((0.5,), (0.5,))
    if "size" in over and "resize" not in over:
        args["resize"] = derive_resize(over["size"])
    args.update(over)
    args["augment"] = bool(over.get("augment", augment))
    named = ", ".join(k for k in OVERRIDE_KEYS if k in over)
    return Preprocess(**args, source=f"{named} given, rest {base.source}" if named else base.source)


def is_default(pre: Preprocess) -> bool:
    """Whether ``pre`` is the 224x224 default: not recorded with the model, not given, not from a shape."""
    return pre.source.startswith(DEFAULT_SOURCES)


def warn_if_images_small(pre: Preprocess, files: Sequence[Any], n: int = 8) -> bool:
    """Log one warning when ``pre`` is a default (:func:`is_default`) and the first ``n`` image
    ``files`` are all much smaller (both sides at most half) than its size: a 32x32 model scored at
    224x224 is a wrong preprocessing, not a bad model. Only image headers are read. Returns whether
    it warned."""
    if not is_default(pre) or not files:
        return False
    h, w = pre.size
    sizes = []
    for path in list(files)[:n]:
        try:
            with Image.open(path) as im:
                sizes.append(im.size)
        except (OSError, ValueError, SyntaxError):
            continue  # corrupt files are reported where they are decoded
    if not sizes or any(iw * 2 > w or ih * 2 > h for iw, ih in sizes):
        return False
    iw, ih = max(sizes)
    log.warning("warning: the images are about %dx%d but the model's input size is unknown, so they are scaled "
                "to the %dx%d default; if the model takes %dx%d give that size "
                "(preprocess.size %dx%d or input_shape 1,%d,%d,%d)",
                ih, iw, h, w, ih, iw, ih, iw, pre.channels, ih, iw)
    return True


def describe(pre: Preprocess) -> str:
    """One line for the user: shape, resize/crop rule, mean/std and where they came from."""
    h, w = pre.size
    how = f"resize to {h}x{w}" if pre.resize is None else f"resize shorter side to {pre.resize}, center-crop {h}x{w}"
    fmt = lambda v: "[" + ", ".join(f"{x:g}" for x in v) + "]"  # noqa: E731
    if pre.interpolation != "bilinear":
        how += f" ({pre.interpolation})"
    return (f"preprocessing: {pre.channels}x{h}x{w}, {how}, mean {fmt(pre.mean)}, std {fmt(pre.std)} "
            f"({pre.source})")


def announce(pre: Preprocess, what: str = "") -> Preprocess:
    """Log :func:`describe` (INFO, logger ``dsdeploy.data.preprocessing``; the CLI prints it once) and return ``pre``."""
    log.info("%s%s", f"{what}: " if what else "", describe(pre))
    return pre


def input_shape_for(pre: Preprocess, given: Sequence[int] | None, own: Sequence[int] | None,
                    overridden: bool) -> tuple[int, ...]:
    """The input shape a model is traced/exported with: ``given`` (explicit), else the model's ``own``
    unless preprocessing was overridden, else ``pre.input_shape(1)``.

    Raises:
        InputShapeError: ``given`` is a fixed NCHW shape that overridden preprocessing does not produce.
    """
    if given:
        fixed = _image_shape(given)
        if overridden and fixed is not None and fixed != (pre.channels, pre.size):
            raise InputShapeError(f"the preprocessing makes {pre.channels}x{pre.size[0]}x{pre.size[1]} images but the "
                                  f"input shape is {'x'.join(map(str, given))}; give matching size/channels")
        return tuple(given)
    if own and not overridden:
        return tuple(own)
    return pre.input_shape(1)
