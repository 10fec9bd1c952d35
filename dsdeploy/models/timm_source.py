"""``timm:NAME`` model specs: a timm architecture built without downloading, with timm's own preprocessing.

timm is optional (``pip install -e '.[timm]'``); without it a ``timm:`` spec is refused with
one line. ``timm.create_model(NAME, pretrained=False, **model_kwargs)`` builds the
architecture (``NAME`` may carry a pretrained tag, ``resnet50.a1_in1k``, which selects that
tag's data config); weights come from the user's checkpoint (``.pth`` or ``.safetensors``,
:mod:`dsdeploy.models.weights`), never from the network. The model's input shape and
preprocessing come from timm's data config (``timm.data.resolve_model_data_config``):
``input_size``, ``mean``/``std``, ``interpolation`` and the eval resize rule
``floor(size / crop_pct)`` then a center crop, as timm's eval transform does.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

from torch import nn

from dsdeploy.errors import SourceError

PREFIX = "timm:"
INSTALL_HINT = "pip install -e '.[timm]'"
# create_model kwargs that would read or fetch weights other than the user's weights file
REFUSED_KWARGS = ("pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay")


def import_timm(spec: str) -> Any:
    """The ``timm`` module, or SourceError (one line: how to install it) when it cannot be imported."""
    try:
        import timm
    except ImportError:
        raise SourceError(f"{spec} needs timm: {INSTALL_HINT}") from None
    return timm


def data_config_preprocessing(config: dict[str, Any]) -> tuple[tuple[int, ...], dict[str, Any]]:
    """``(input_shape, preprocessing dict)`` from a timm data config (``resolve_model_data_config``).

    The preprocessing dict has the keys of :meth:`dsdeploy.data.preprocessing.Preprocess.to_dict`
    plus ``interpolation`` (timm's name: bilinear, bicubic, ...). ``resize`` is the shorter side
    before the center crop: ``floor(min(size) / crop_pct)`` (timm's eval transform).
    """
    channels, h, w = (int(v) for v in config["input_size"])
    crop_pct = float(config.get("crop_pct") or 0.875)  # timm's DEFAULT_CROP_PCT
    resize = math.floor(min(h, w) / crop_pct)
    pre = {"size": [h, w], "resize": resize, "mean": [float(v) for v in config["mean"]],
           "std": [float(v) for v in config["std"]], "channels": channels, "layout": "NCHW",
           "interpolation": str(config.get("interpolation") or "bilinear")}
    return (1, channels, h, w), pre


def build_timm(name: str, kwargs: dict[str, Any]) -> tuple[nn.Module, tuple[int, ...], dict[str, Any]]:
    """``timm.create_model(name, pretrained=False, **kwargs)`` with its input shape and preprocessing.

    Raises:
        SourceError: timm is not installed; ``name`` is not a timm model (close names suggested);
            ``kwargs`` set a weights source (``pretrained``, ``checkpoint_path``, ...); or timm
            cannot build the model with ``kwargs``.
    """
    spec = PREFIX + name
    timm = import_timm(spec)
    given = [k for k in REFUSED_KWARGS if kwargs.get(k) not in (None, False)]
    if given:
        raise SourceError(f"{spec} model_kwargs may not set {given[0]!r} (dsdeploy never downloads or reads "
                          f"weights that way); give the checkpoint file as the weights argument")
    if not name or not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise SourceError(f"unknown timm model {name!r}{hint}")
    args = {k: v for k, v in kwargs.items() if k not in REFUSED_KWARGS}
    try:
        model = timm.create_model(name, pretrained=False, **args)
    except (TypeError, ValueError, RuntimeError, AssertionError, KeyError) as exc:  # bad model_kwargs
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SourceError(f"{spec} cannot be built with {args}: {type(exc).__name__}: {first[:200]}") from None
    shape, pre = data_config_preprocessing(timm.data.resolve_model_data_config(model))
    return model, shape, pre
