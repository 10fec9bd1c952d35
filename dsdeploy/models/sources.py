"""Model specs -> ``nn.Module``.

Specs: ``torchvision:NAME`` (never downloads; weights from ``--weights``),
``timm:NAME`` (optional timm; never downloads; its preprocessing from timm's data config,
:mod:`dsdeploy.models.timm_source`), ``sample:NAME`` (the project's shipped models),
``pkg.module:factory`` (an ``nn.Module`` subclass or a function that builds one; see
:mod:`dsdeploy.models.trust`), or a path to a ``.dsd`` artifact (whose recorded factory is imported only with ``trust_code=True``).
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from dsdeploy.errors import ArtifactError, SourceError
from dsdeploy.models import samples
from dsdeploy.models.timm_source import PREFIX as TIMM_PREFIX
from dsdeploy.models.timm_source import build_timm
from dsdeploy.models.trust import (
    check_plain,
    library_builder_kwargs,
    may_resolve,
    refuse_recorded,
    resolve_factory,
)

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
    artifact: Any = None  # dsdeploy.conversion.artifact.Artifact for .dsd specs
    weights: str | None = None
    builder: Callable[..., Any] | None = None  # the factory that built a pkg.module:factory spec

    def shape_or_default(self, override: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """The input shape to use: an explicit override, the model's own, or 1,3,224,224."""
        return tuple(override or self.input_shape or DEFAULT_INPUT_SHAPE)


def is_artifact_spec(spec: str) -> bool:
    return spec.endswith(".dsd")


def _torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    # torchvision.models takes about as long as torch to import; only torchvision: specs need it
    import torchvision.models as tvm

    names = tvm.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise SourceError(f"unknown torchvision model {name!r}{hint}")
    builder = tvm.get_model_builder(name)
    params = inspect.signature(builder).parameters
    given = [k for k in ("weights", "weights_backbone") if kwargs.get(k) is not None]
    if given:  # a weights enum name would download: weights come from a checkpoint file only
        raise SourceError(f"torchvision:{name} model_kwargs may not set {given[0]!r} (dsdeploy never downloads); "
                          f"give the checkpoint file as the weights argument")
    args = {"weights": None, **kwargs}
    if "weights_backbone" in params:
        args.setdefault("weights_backbone", None)  # never download a backbone
    try:
        return builder(**args)
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:  # bad model_kwargs (e.g. num_classes=-5)
        raise SourceError(f"torchvision:{name} cannot be built with {kwargs}: {exc}") from None


def _call(factory: Callable[..., Any], spec: str, kwargs: dict[str, Any]) -> nn.Module:
    call_kwargs = library_builder_kwargs(factory, spec, kwargs)  # refuses download kwargs before any call
    try:
        model = factory(**call_kwargs)
    except Exception as exc:  # user code: any failure becomes one clear line
        raise SourceError(f"factory {spec!r} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise SourceError(f"factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _is_factory_spec(spec: str) -> bool:
    mod, _, attr = spec.partition(":")
    return bool(mod and attr and all(p.isidentifier() for p in mod.split(".") + attr.split(".")))


def build_source(spec: str, model_kwargs: dict[str, Any] | None = None, *, recorded_in: str | None = None,
                 trust_code: bool = False, factory: Callable[..., Any] | None = None) -> LoadedModel:
    """Build the architecture a spec names (torchvision/timm/factory: random init; samples: trained).

    ``recorded_in``: the file the spec was read from (a ``.dsd``). A ``pkg.module:factory``
    spec recorded in a file is imported only when ``trust_code`` is True (or the running
    ``dsdeploy run`` named that spec); ``factory`` builds the model instead of resolving the
    spec at all. Specs resolve only to model factories (:mod:`dsdeploy.models.trust`), and
    ``model_kwargs`` must be plain JSON data.

    Raises:
        SourceError: an unknown spec or one that is not a model factory, or a ``timm:`` spec
        without timm installed; ArtifactError: a recorded factory that is not trusted, or
        recorded kwargs that are not plain data.
    """
    kwargs = dict(model_kwargs or {})
    check_plain(kwargs, f"model_kwargs of {recorded_in}" if recorded_in else "model_kwargs",
                ArtifactError if recorded_in else SourceError)
    if spec.startswith("torchvision:"):
        return LoadedModel(_torchvision(spec.split(":", 1)[1], kwargs), spec, kwargs)
    if spec.startswith(TIMM_PREFIX):
        model, shape, pre = build_timm(spec[len(TIMM_PREFIX):], kwargs)
        return LoadedModel(model, spec, kwargs, input_shape=shape, preprocessing=pre)
    if spec.startswith("sample:"):
        model, meta = samples.load_sample(spec.split(":", 1)[1])
        return LoadedModel(model, spec, kwargs, input_shape=tuple(meta["input_shape"]),
                           preprocessing=meta.get("preprocessing"), labels=meta.get("labels"))
    if factory is not None:
        if not callable(factory):
            raise SourceError(f"factory must be callable, got {type(factory).__name__}")
        return LoadedModel(_call(factory, spec, kwargs), spec, kwargs, builder=factory)
    if ":" in spec and _is_factory_spec(spec) and (recorded_in or not Path(spec).exists()):
        if recorded_in and not may_resolve(spec, trust_code):
            raise refuse_recorded(spec, recorded_in)
        builder = resolve_factory(spec)
        return LoadedModel(_call(builder, spec, kwargs), spec, kwargs, builder=builder)
    raise SourceError(f"unknown model spec {spec!r:.200}: use torchvision:NAME, timm:NAME, sample:NAME, pkg.module:factory "
                      f"or a .dsd file")
