"""Model specs -> ``nn.Module``.

Specs: ``torchvision:NAME`` (never downloads; weights from ``--weights``),
``sample:NAME`` (the project's shipped models), ``pkg.module:factory`` (any importable
callable returning an ``nn.Module``), or a path to a ``.dsd`` artifact.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from dsdeploy.checkpoints import load_weights
from dsdeploy.errors import SourceError

DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)


@dataclass
class LoadedModel:
    """A model ready to use, with what is known about its inputs."""

    model: nn.Module
    spec: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    preprocessing: dict[str, Any] | None = None
    labels: list[str] | None = None
    artifact: Any = None  # dsdeploy.artifact.Artifact for .dsd specs
    weights: str | None = None

    def shape_or_default(self, override: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """The input shape to use: an explicit override, the model's own, or 1,3,224,224."""
        return tuple(override or self.input_shape or DEFAULT_INPUT_SHAPE)


def is_artifact_spec(spec: str) -> bool:
    return spec.endswith(".dsd")


def _torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision.models as tvm

    names = tvm.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise SourceError(f"unknown torchvision model {name!r}{hint}")
    builder = tvm.get_model_builder(name)
    params = inspect.signature(builder).parameters
    args = {"weights": None, **kwargs}
    if "weights_backbone" in params:
        args.setdefault("weights_backbone", None)  # never download a backbone
    try:
        return builder(**args)
    except (TypeError, ValueError) as exc:
        raise SourceError(f"torchvision:{name} cannot be built with {kwargs}: {exc}") from None


def _factory(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SourceError(f"cannot import {module_name!r} for model spec {spec!r}: {exc}") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise SourceError(f"{module_name!r} has no attribute {attr!r} (model spec {spec!r})")
        factory = getattr(factory, part)
    if not callable(factory):
        raise SourceError(f"{spec!r} is not callable")
    try:
        model = factory(**kwargs)
    except Exception as exc:  # user code: any failure becomes one clear line
        raise SourceError(f"factory {spec!r} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise SourceError(f"factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_source(spec: str, model_kwargs: dict[str, Any] | None = None) -> LoadedModel:
    """Build the architecture a spec names (torchvision/factory: random init; samples: trained)."""
    kwargs = dict(model_kwargs or {})
    if spec.startswith("torchvision:"):
        return LoadedModel(_torchvision(spec.split(":", 1)[1], kwargs), spec, kwargs)
    if spec.startswith("sample:"):
        from dsdeploy import samples

        model, meta = samples.load_sample(spec.split(":", 1)[1])
        return LoadedModel(model, spec, kwargs, input_shape=tuple(meta["input_shape"]),
                           preprocessing=meta.get("preprocessing"), labels=meta.get("labels"))
    if ":" in spec and not Path(spec).exists():
        mod, _, attr = spec.partition(":")
        if mod and attr and all(p.isidentifier() for p in mod.split(".") + attr.split(".")):
            return LoadedModel(_factory(spec, kwargs), spec, kwargs)
    raise SourceError(f"unknown model spec {spec!r}: use torchvision:NAME, sample:NAME, pkg.module:factory "
                      f"or a .dsd file")


def load_model(spec: str, weights: str | None = None, model_kwargs: dict[str, Any] | None = None,
               trust_pickle: bool = False) -> LoadedModel:
    """Resolve ``spec`` to a model in eval mode, loading ``weights`` when given.

    Checkpoints load with ``weights_only=True``; a whole pickled model needs
    ``trust_pickle=True``. A ``.dsd`` spec loads the artifact (weights then refused).
    """
    if is_artifact_spec(spec):
        if weights:
            raise SourceError("--weights does not apply to a .dsd artifact (it holds its own weights)")
        from dsdeploy.artifact import load_artifact

        art = load_artifact(spec)
        meta = art.metadata
        shape = meta.get("input_shape")
        return LoadedModel(art.model.eval(), spec, dict(art.source.get("model_kwargs") or {}),
                           input_shape=tuple(shape) if shape else None, preprocessing=meta.get("preprocessing"),
                           labels=meta.get("labels"), artifact=art)
    loaded = build_source(spec, model_kwargs)
    if weights:
        load_weights(loaded.model, weights, trust_pickle=trust_pickle)
        loaded.weights = str(weights)
    loaded.model.eval()
    return loaded
