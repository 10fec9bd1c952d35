"""Name the spec that rebuilds a bare ``nn.Module`` (for saving a model that came without one).

A ``.dsd`` stores the source spec, not code. For a module built in a notebook the spec is
inferred without running anything the user did not already import: a torchvision model
is matched by its class and state-dict signature against the torchvision builders (built
on the ``meta`` device with ``weights=None``: no memory, no download), a timm model by its
recorded architecture (``timm:ARCH``, :func:`timm_spec`); any
other class that builds without arguments is recorded as ``module:Class`` (which loading imports only
with ``trust_code=True`` or ``factory=``, like every recorded factory).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from dsdeploy.errors import SourceError
from dsdeploy.models.timm_source import PREFIX as TIMM_PREFIX
from dsdeploy.models.timm_source import import_timm
from dsdeploy.models.trust import resolve_factory

HINT = "pass source='pkg.module:factory' (and model_kwargs=) naming code that builds it"


def signature(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """State-dict keys and tensor shapes: what a rebuilt model must match to load the weights."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _build_meta(builder: Any, kwargs: dict[str, Any]) -> nn.Module | None:
    """``builder(weights=None, **kwargs)`` on the meta device; None when it cannot be built so."""
    params = inspect.signature(builder).parameters
    args = {"weights": None, **({"weights_backbone": None} if "weights_backbone" in params else {}), **kwargs}
    try:
        with torch.device("meta"):
            return builder(**args)
    except (TypeError, ValueError, RuntimeError, NotImplementedError):  # not buildable with these args: no match
        return None


def _class_count(want: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]]) -> int | None:
    """The ``num_classes`` that would explain the difference (only the classifier's first dim differs)."""
    if want.keys() != got.keys():
        return None
    diff = [k for k in want if want[k] != got[k]]
    if not diff or not all(want[k] and len(want[k]) == len(got[k]) and want[k][1:] == got[k][1:] for k in diff):
        return None
    firsts = {want[k][0] for k in diff}
    return firsts.pop() if len(firsts) == 1 else None


def torchvision_spec(model: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """``("torchvision:NAME", model_kwargs)`` when a torchvision builder makes exactly this architecture."""
    cls = type(model)
    if not cls.__module__.startswith("torchvision.models"):
        return None
    # torchvision.models takes about as long as torch to import; only torchvision: models need it
    import torchvision.models as tvm

    want = signature(model)
    for name in tvm.list_models():
        builder = tvm.get_model_builder(name)
        if builder.__module__ != cls.__module__:
            continue
        kwargs: dict[str, Any] = {}
        built = _build_meta(builder, kwargs)
        if built is not None and type(built) is cls and signature(built) != want:
            n = _class_count(want, signature(built))
            if n is not None:  # builders take num_classes (most through **kwargs)
                kwargs = {"num_classes": n}
                built = _build_meta(builder, kwargs)
        if built is not None and type(built) is cls and signature(built) == want:
            return f"torchvision:{name}", kwargs
    return None


def timm_spec(model: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """``("timm:ARCH", model_kwargs)`` for a model timm built (its class lives in ``timm.models``),
    when ``timm.create_model(ARCH)`` (with ``num_classes`` when only the classifier differs)
    makes exactly its state-dict signature; else None. Builds on the ``meta`` device."""
    if not type(model).__module__.startswith("timm.models"):
        return None
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not arch:
        return None
    timm = import_timm(TIMM_PREFIX + arch)
    want = signature(model)
    kwargs: dict[str, Any] = {}
    for _ in range(2):
        try:
            with torch.device("meta"):
                got = signature(timm.create_model(arch, pretrained=False, **kwargs))
        except (TypeError, ValueError, RuntimeError, NotImplementedError, AssertionError):
            return None
        if got == want:
            return TIMM_PREFIX + arch, kwargs
        n = _class_count(want, got)
        if n is None or kwargs:
            return None
        kwargs = {"num_classes": n}
    return None


def class_spec(model: nn.Module) -> str:
    """``"module:Class"`` when ``type(model)`` is importable and builds, without arguments, the same signature.

    Raises:
        SourceError: the class is defined in ``__main__`` or inside a function, needs
        arguments, or builds a different architecture (the message says how to name a source).
    """
    cls = type(model)
    where = f"{cls.__module__}.{cls.__qualname__}"
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise SourceError(f"{where} is not importable (defined in __main__ or a function), so a .dsd cannot "
                          f"rebuild it; move it into a module or {HINT}")
    spec = f"{cls.__module__}:{cls.__qualname__}"
    if resolve_factory(spec) is not cls:
        raise SourceError(f"{spec} does not import as {where}; {HINT}")
    try:
        built = cls()
    except Exception as exc:  # user code: any failure means "needs arguments"
        raise SourceError(f"{where}() cannot be built without arguments ({type(exc).__name__}: "
                          f"{str(exc)[:120]}); {HINT}") from None
    if signature(built) != signature(model):
        raise SourceError(f"{where}() builds a different architecture than this model (its constructor was given "
                          f"arguments); {HINT}")
    return spec


def infer_source(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """The spec and ``model_kwargs`` that rebuild ``model``'s architecture (see the module docstring).

    Raises:
        SourceError: nothing rebuilds it without the user naming a factory (one line, says how).
    """
    found = torchvision_spec(model) or timm_spec(model)
    if found is not None:
        return found
    return class_spec(model), {}
