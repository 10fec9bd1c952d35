"""Checks of a ``.dsd`` payload's parts before they are used: a crafted file ends in one ArtifactError.

:func:`check_payload` validates the types of everything :func:`dsdeploy.conversion.artifact.read_payload`
returns (source record, plan, metadata, history, state_dict); :func:`rebuild` applies the
plan to the source architecture and loads the state_dict, turning any mismatch into one line.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dsdeploy.conversion.block import CONV_TYPES, LAYOUTS
from dsdeploy.conversion.plan import Plan
from dsdeploy.conversion.rewrite import apply_plan, check_finite_model
from dsdeploy.errors import ArtifactError, DsdeployError
from dsdeploy.models.weights import load_state_checked

MAX_SPEC = 1000
MAX_SIDE = 8192  # image side (pixels) a recorded preprocessing may ask for
MAX_INPUT = 2 ** 28  # elements of a recorded input shape (1 GiB of float32)


def show(value: Any, width: int = 60) -> str:
    """``repr(value)`` on one line, at most ``width`` characters (values come from the file)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _opt(value: Any, kind: type | tuple[type, ...]) -> bool:
    return value is None or isinstance(value, kind)


def _ints(value: Any, positive: bool = True) -> bool:
    return isinstance(value, (list, tuple)) and all(type(v) is int and (v > 0 or not positive) for v in value)


def _check_source(src: Any, origin: str) -> None:
    if not isinstance(src, dict):
        raise ArtifactError(f"{origin}: its source record is {type(src).__name__}, not a table; the file is damaged")
    spec = src.get("spec")
    if not isinstance(spec, str) or not spec or len(spec) > MAX_SPEC:
        raise ArtifactError(f"{origin}: its source record has no valid spec (a model spec string); the file is damaged")
    for key, kind in (("model_kwargs", dict), ("weights", str), ("weights_sha256", str)):
        if not _opt(src.get(key), kind):
            raise ArtifactError(f"{origin}: source.{key} must be {kind.__name__} or absent, got "
                                f"{type(src.get(key)).__name__}; the file is damaged")


def _check_plan(plan: Any, origin: str) -> None:
    if not isinstance(plan, dict) or not isinstance(plan.get("layers", []), list):
        raise ArtifactError(f"{origin}: its plan is not a table with a list of layers; the file is damaged")
    if plan.get("layout", "branches") not in LAYOUTS:
        raise ArtifactError(f"{origin}: plan.layout must be one of {', '.join(LAYOUTS)}; the file is damaged")
    if not isinstance(plan.get("policy", {}), dict) or not _ints(plan.get("input_shape", [])):
        raise ArtifactError(f"{origin}: plan.policy/input_shape have the wrong type; the file is damaged")
    for i, layer in enumerate(plan.get("layers", [])):
        ok = (isinstance(layer, dict) and isinstance(layer.get("name"), str) and isinstance(layer.get("convert"), bool)
              and (not layer["convert"] or (type(layer.get("rank")) is int and layer["rank"] >= 1)))
        if not ok:
            raise ArtifactError(f"{origin}: plan layer {i} is not a decision (name, convert, rank); "
                                f"the file is damaged")
        if layer.get("layout") is not None and layer["layout"] not in LAYOUTS:
            raise ArtifactError(f"{origin}: plan layer {i} has layout {show(layer['layout'])}, not one of "
                                f"{', '.join(LAYOUTS)}; the file is damaged")
        for key in ("dense_ms", "block_ms"):
            if layer.get(key) is not None and not (_number(layer[key]) and layer[key] >= 0):
                raise ArtifactError(f"{origin}: plan layer {i} has {key} {show(layer[key])}, not a latency in ms; "
                                    f"the file is damaged")
    names = [layer["name"] for layer in plan.get("layers", [])]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ArtifactError(f"{origin}: plan lists layer {twice!r:.80} more than once; the file is damaged")


def _check_metadata(meta: Any, history: Any, origin: str) -> None:
    if not _opt(meta, dict) or not _opt(history, list):
        raise ArtifactError(f"{origin}: metadata must be a table and history a list; the file is damaged")
    meta = meta or {}
    shape = meta.get("input_shape")
    if shape is not None and not (_ints(shape) and 2 <= len(shape) <= 5 and math.prod(shape) <= MAX_INPUT):
        raise ArtifactError(f"{origin}: metadata.input_shape must be 2-5 positive integers (at most {MAX_INPUT} "
                            f"elements); the file is damaged")
    labels = meta.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise ArtifactError(f"{origin}: metadata.labels must be a list of strings; the file is damaged")
    if labels is not None and len(set(labels)) != len(labels):
        seen: set[str] = set()
        dup = next(x for x in labels if x in seen or seen.add(x))
        raise ArtifactError(f"{origin}: metadata.labels holds {show(dup)} more than once (labels name distinct "
                            f"outputs); the file is damaged")
    if not _opt(meta.get("preprocessing"), dict):
        raise ArtifactError(f"{origin}: metadata.preprocessing must be a table; the file is damaged")
    _check_preprocessing(meta.get("preprocessing") or {}, origin)


def _number(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _check_preprocessing(pre: dict[str, Any], origin: str) -> None:
    """Types and sizes only (the values' meaning is checked where preprocessing is built)."""
    checks = {
        "size": lambda v: _ints(v) and 1 <= len(v) <= 2 and max(v) <= MAX_SIDE,
        "resize": lambda v: v is None or (type(v) is int and 1 <= v <= MAX_SIDE),
        "mean": lambda v: isinstance(v, (list, tuple)) and 1 <= len(v) <= 4 and all(map(_number, v)),
        "std": lambda v: isinstance(v, (list, tuple)) and 1 <= len(v) <= 4 and all(map(_number, v)),
        "channels": lambda v: type(v) is int,
        "interpolation": lambda v: v in ("bilinear", "bicubic", "nearest"),
    }
    for key, ok in checks.items():
        if key in pre and not ok(pre[key]):
            raise ArtifactError(f"{origin}: metadata.preprocessing.{key} has the wrong type or size "
                                f"({show(pre[key])}); the file is damaged")


def _check_state(state: Any, origin: str) -> None:
    if not isinstance(state, dict):
        raise ArtifactError(f"{origin}: its state_dict is {type(state).__name__}, not a table; the file is damaged")
    for key, t in state.items():
        if not isinstance(key, str):
            raise ArtifactError(f"{origin}: state_dict key {show(key, 40)} is not a string; the file is damaged")
        if type(t) not in (torch.Tensor, nn.Parameter):
            raise ArtifactError(f"{origin}: state_dict[{key!r}] is {type(t).__name__}, not a tensor; "
                                f"the file is damaged")
        if t.layout is not torch.strided or t.device.type != "cpu" or t.is_quantized:
            kind = "a meta" if t.is_meta else f"a {t.layout} {t.device.type}"
            raise ArtifactError(f"{origin}: state_dict[{key!r}] is {kind} tensor, not a dense one; "
                                f"the file is damaged")


def check_payload(payload: dict[str, Any], origin: str) -> None:
    """Raise ArtifactError (one line, naming the part) unless every part of ``payload`` has its type."""
    _check_source(payload["source"], origin)
    _check_plan(payload["plan"], origin)
    _check_metadata(payload.get("metadata"), payload.get("history"), origin)
    _check_state(payload["state_dict"], origin)


def plan_of(payload: dict[str, Any], origin: str) -> Plan:
    """The payload's :class:`Plan` (after :func:`check_payload`); ArtifactError on unknown fields."""
    try:
        return Plan.from_dict(payload["plan"])
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{origin}: its plan does not parse ({exc}); the file is damaged") from None


def rebuild(base: nn.Module, plan: Plan, state: dict[str, torch.Tensor], origin: str) -> nn.Module:
    """Apply ``plan`` to the source architecture ``base`` and load ``state`` strictly.

    Raises:
        ArtifactError: a converted layer that is not a conv of ``base``, a rank out of range,
        or a state_dict that does not fit.
    """
    for d in plan.converted:
        try:
            conv = base.get_submodule(d.name)
        except AttributeError:
            raise ArtifactError(f"{origin}: plan layer {d.name!r:.80} is not in the source model; the file is "
                                f"damaged or the source changed") from None
        if not isinstance(conv, tuple(CONV_TYPES.values())):
            raise ArtifactError(f"{origin}: plan layer {d.name!r} is a {type(conv).__name__}, not a conv; the file "
                                f"is damaged or the source changed")
        limit = max(conv.out_channels, math.prod(conv.kernel_size))
        if d.rank > limit:
            raise ArtifactError(f"{origin}: plan layer {d.name!r} has rank {d.rank} > {limit}; the file is damaged")
    try:
        model = apply_plan(base, plan, init_from_weights=False)
        for key, want in model.state_dict().items():
            got = state.get(key)
            if got is not None and (got.is_complex() != want.is_complex()
                                    or got.is_floating_point() != want.is_floating_point()):
                raise ArtifactError(f"{origin}: state_dict[{key!r}] is {got.dtype}, the model holds {want.dtype}; "
                                    f"the file is damaged")
        load_state_checked(model, state, origin)
        check_finite_model(model)  # e.g. a negative BatchNorm variance: refused here, not as NaN outputs later
    except DsdeployError as exc:  # names come from the file: keep the message on one line
        raise ArtifactError(" ".join(str(exc).split())) from None
    except (RuntimeError, ValueError, TypeError) as exc:  # a crafted tensor torch refuses to copy
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ArtifactError(f"{origin}: its weights do not load into the model ({first[:200]})") from None
    return model
