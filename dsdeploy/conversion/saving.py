"""Saving a converted model (or a plain module) as a ``.dsd`` artifact, and loading one back."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dsdeploy.conversion.artifact import load_artifact, save_artifact, source_record
from dsdeploy.conversion.block import ds_blocks
from dsdeploy.conversion.converted import ConvertedModel
from dsdeploy.conversion.plan import Plan
from dsdeploy.conversion.rewrite import verify_rebuild
from dsdeploy.data.preprocessing import resolve
from dsdeploy.errors import ArtifactError, DsdeployError
from dsdeploy.fsutil import atomic_path
from dsdeploy.models.infer import infer_source
from dsdeploy.models.sources import build_source


def save(model: ConvertedModel | nn.Module, path: str | Path, *, source: str | None = None,
         model_kwargs: dict[str, Any] | None = None) -> Path:
    """Write a ``.dsd`` artifact (source spec + plan + weights + metadata + history), atomically.

    The source architecture is recorded as a spec, never as code: the converted spec when known;
    else ``source`` (``pkg.module:factory`` with ``model_kwargs``); else inferred
    (:func:`dsdeploy.models.infer.infer_source`: a matching ``torchvision:NAME``, or
    ``module:Class`` for a class that builds without arguments). A model converted from an
    in-memory module also gets its original weights beside it (``PATH.source.pt``, sha256
    recorded): the default teacher of later ``calibrate``/``finetune``. The artifact is rebuilt as
    :func:`load` will and must give the same outputs before anything is written.

    Raises:
        SourceError: no source can be named (the message says to pass ``source=``);
        ModelError: the rebuild differs; ArtifactError: ``path`` does not end in ``.dsd``.
    """
    path = Path(path)
    if path.suffix != ".dsd":
        raise ArtifactError(f"save path must end in .dsd, got {path.name!r}")
    if isinstance(model, ConvertedModel):
        cm = model
    elif isinstance(model, nn.Module):
        if ds_blocks(model):
            raise DsdeployError("this module holds DS blocks but no plan: save the ConvertedModel that "
                                "dsdeploy.convert returned")
        pre = resolve(None, None, model=model)
        cm = ConvertedModel(model, Plan(input_shape=list(pre.input_shape(1))), None, None, model,  # type: ignore
                            pre.input_shape(1), preprocessing=pre.to_dict())
    else:
        raise DsdeployError(f"save needs a ConvertedModel or an nn.Module, got {type(model).__name__}")
    spec, kwargs, weights = cm.spec, dict(cm.model_kwargs), cm.weights
    if source is not None:
        spec, kwargs, weights = source, dict(model_kwargs or {}), None
    elif spec is None:
        spec, kwargs = infer_source(cm.original)
    fresh = build_source(spec, kwargs).model
    verify_rebuild(fresh, cm.plan, cm.model)
    if weights is None and cm.spec is None and cm.plan.converted and not spec.startswith("sample:"):
        weights = str(path.with_suffix(".source.pt"))
        with atomic_path(weights) as tmp:
            torch.save({k: v.detach().cpu() for k, v in cm.original.state_dict().items()}, tmp)
    meta = {"input_shape": list(cm.input_shape), "preprocessing": cm.preprocessing, "labels": cm.labels}
    if cm.before is not None:
        meta.update(conv_macs_before=cm.before.conv_macs, conv_macs_after=cm.after.conv_macs)
    return save_artifact(path, cm.model, cm.plan, source_record(spec, kwargs, weights), meta, cm.history)


def load(path: str | Path, *, trust_code: bool = False, factory: Callable[..., Any] | None = None) -> nn.Module:
    """The model a ``.dsd`` holds, in eval mode, with outputs identical to the saved one.

    A recorded ``pkg.module:factory`` (including an inferred ``module:Class``) is imported only
    with ``trust_code=True`` or when ``factory`` (the callable that builds it) is given;
    ``torchvision:``/``sample:`` sources always load. Raises ArtifactError for a corrupt or
    crafted file or an untrusted factory.
    """
    return load_artifact(path, trust_code=trust_code, factory=factory).model
