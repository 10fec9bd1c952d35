"""Which code a model spec may run: model factories only, and a file's recorded ones only when trusted.

A ``pkg.module:factory`` spec names Python code. The person may name it (on the command
line, in a recipe they chose, in code); a file the tool reads (a ``.dsd`` artifact) may
only *record* it, and a recorded factory is imported only after an explicit opt-in
(``trust_code=True``, CLI ``--trust-code``) or when the caller passes the factory itself.
Either way the spec must resolve to a model factory: an ``nn.Module`` subclass, or a plain
Python function outside the standard library and the infrastructure packages (torch,
numpy, onnx, pickle-likes, dsdeploy, ...; torchvision/timm model builders are allowed).
Keyword arguments must be plain JSON data. Nothing from the standard library is ever
imported for a spec, and no module a file records is imported before the trust decision.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from torch import nn

from dsdeploy.errors import ArtifactError, SourceError

# Packages whose functions are never model factories (their import may also run tooling code).
INFRASTRUCTURE = frozenset({
    "torch", "torchvision", "timm", "torchaudio", "torchtext", "functorch", "numpy", "scipy", "sklearn", "pandas",
    "onnx", "onnxruntime", "onnxsim", "onnxscript", "onnx_ir", "onnxconverter_common", "dill", "cloudpickle",
    "joblib", "pip", "setuptools", "pkg_resources", "wheel", "distutils", "_distutils_hack", "dsdeploy", "click",
    "PIL", "matplotlib", "requests", "urllib3", "huggingface_hub", "safetensors", "filelock", "fsspec", "yaml",
    "tqdm", "hypothesis", "pytest", "_pytest", "IPython", "jinja2", "sympy", "networkx", "psutil", "tomllib",
    "tomli", "packaging", "typing_extensions", "cpuinfo", "openvino", "multiprocess",
})
# Infrastructure packages that hold model classes/builders: importing them for a spec is fine.
IMPORTABLE_INFRASTRUCTURE = frozenset({"torch", "torchvision", "timm", "dsdeploy"})
KWARGS_DEPTH = 32
TRUST_HINT = "pass trust_code=True, or the factory itself (factory=...)"


@dataclass(frozen=True)
class Scope:
    """What the running command was told by the person: opt-in, specs they named, their code folders."""

    trust_code: bool = False
    named: frozenset[str] = frozenset()
    pythonpath: tuple[str, ...] = ()


_SCOPE: contextvars.ContextVar[Scope] = contextvars.ContextVar("dsdeploy_trust_scope", default=Scope())


@contextlib.contextmanager
def user_scope(*, trust_code: bool = False, named: Sequence[str] = (), pythonpath: Sequence[str] = ()
               ) -> Iterator[Scope]:
    """For the duration of a run (``dsdeploy run``): the person's opt-in, the specs they named
    (artifacts the run writes from those specs reload without opt-in) and the folders that may
    resolve their own factory modules (searched after installed packages, never before)."""
    token = _SCOPE.set(Scope(bool(trust_code), frozenset(named), tuple(str(p) for p in pythonpath)))
    try:
        yield _SCOPE.get()
    finally:
        _SCOPE.reset(token)


def current_scope() -> Scope:
    """The scope set by :func:`user_scope` (the default: nothing trusted, nothing named)."""
    return _SCOPE.get()


def check_plain(value: Any, where: str, error: type[Exception] = SourceError, _depth: int = 0) -> None:
    """Raise ``error`` unless ``value`` is plain JSON data (None/bool/int/float/str, lists, str-keyed dicts)."""
    if _depth > KWARGS_DEPTH:
        raise error(f"{where} is nested too deeply (more than {KWARGS_DEPTH} levels)")
    if value is None or type(value) in (bool, int, float, str):
        return
    if type(value) in (list, tuple):
        for item in value:
            check_plain(item, where, error, _depth + 1)
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise error(f"{where} must have string keys, got {type(key).__name__} key")
            check_plain(item, f"{where}[{' '.join(repr(key).split())[:40]}]", error, _depth + 1)
        return
    raise error(f"{where} must be plain JSON data (numbers, strings, lists, tables), got {type(value).__name__}")


def _root(module: str) -> str:
    return module.split(".", 1)[0]


def _is_stdlib(module: str) -> bool:
    return _root(module) in sys.stdlib_module_names or _root(module) in ("builtins", "__future__")


def _allowed_library_builder(func: Callable) -> bool:
    """A registered torchvision or timm model builder (not any helper of those packages)."""
    mod = func.__module__ or ""
    if mod == "torchvision.models" or mod.startswith("torchvision.models."):
        # slow to import (about as long as torch); loaded already when func comes from it
        import torchvision.models as tvm

        return func is tvm.get_model or any(tvm.get_model_builder(n) is func for n in tvm.list_models())
    if mod == "timm.models" or mod.startswith("timm.models."):
        # optional (not a dependency); loaded already when func comes from it
        import timm

        name = getattr(func, "__name__", "")
        return func is timm.create_model or (timm.is_model(name) and timm.models.model_entrypoint(name) is func)
    return False


WEIGHT_KWARGS = ("weights", "weights_backbone", "pretrained", "pretrained_backbone")


def library_builder_kwargs(func: Callable, spec: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The kwargs to call ``func`` with, refusing any that would download weights.

    For a torchvision/timm model builder (see :func:`check_factory`): ``weights``,
    ``weights_backbone``, ``pretrained`` or ``pretrained_backbone`` set to anything but
    None/False raises SourceError (weights come from a checkpoint file only), and a
    torchvision builder's ``weights_backbone`` defaults to None (never a download). Other
    factories get ``kwargs`` unchanged.
    """
    if not (inspect.isfunction(func) and _allowed_library_builder(func)):
        return kwargs
    given = [k for k in WEIGHT_KWARGS if kwargs.get(k) not in (None, False)]
    if given:
        raise SourceError(f"{spec!r} model_kwargs may not set {given[0]!r} (dsdeploy never downloads); "
                          f"give the checkpoint file as the weights argument")
    target = func
    if (func.__module__ or "").startswith("torchvision.models"):
        # slow to import (about as long as torch); loaded already when func comes from it
        import torchvision.models as tvm

        if func is tvm.get_model and kwargs.get("name") in tvm.list_models():
            target = tvm.get_model_builder(kwargs["name"])
        if target is not tvm.get_model and "weights_backbone" in inspect.signature(target).parameters:
            return {"weights_backbone": None, **kwargs}  # never download a backbone
    return kwargs


def check_factory(obj: Any, spec: str) -> None:
    """Raise SourceError unless ``obj`` is an ``nn.Module`` subclass or a plain function that may build one."""
    if inspect.isclass(obj):
        if issubclass(obj, nn.Module):
            return
        raise SourceError(f"{spec!r} is the class {obj.__name__}, not a torch.nn.Module subclass or model factory")
    if inspect.isfunction(obj):
        mod = obj.__module__ or ""
        if _allowed_library_builder(obj):
            return
        if _is_stdlib(mod) or _root(mod) in INFRASTRUCTURE:
            raise SourceError(f"{spec!r} is {mod}.{obj.__qualname__}, a function of {_root(mod)!r}, not a model "
                              f"factory; name an nn.Module subclass or your own function that builds one")
        return
    kind = type(obj).__name__
    raise SourceError(f"{spec!r} is a {kind}, not a model factory; name an nn.Module subclass or a Python "
                      f"function that builds one")


@contextlib.contextmanager
def _appended(folders: Sequence[str]) -> Iterator[None]:
    """``folders`` at the END of sys.path (installed packages always win), removed afterwards."""
    added = [f for f in folders if f not in sys.path]
    sys.path.extend(added)
    try:
        yield
    finally:
        for f in added:
            if f in sys.path:
                sys.path.remove(f)


def resolve_factory(spec: str) -> Callable[..., Any]:
    """Import ``pkg.module:factory`` and return the factory (checked by :func:`check_factory`).

    Never imports a standard-library or tooling module; the current scope's ``pythonpath``
    folders are searched after installed packages, only while the module is imported.
    """
    module_name, _, attr = spec.partition(":")
    root = _root(module_name)
    if _is_stdlib(module_name) or (root in INFRASTRUCTURE and root not in IMPORTABLE_INFRASTRUCTURE):
        what = "the Python standard library" if _is_stdlib(module_name) else "tooling"
        raise SourceError(f"{spec!r} names the module {module_name!r} ({what}), which holds no model factory; "
                          f"name an nn.Module subclass or your own factory function")
    with _appended(current_scope().pythonpath):
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise SourceError(f"cannot import {module_name!r} for model spec {spec!r}: {exc}") from None
        except Exception as exc:  # user code failing at import: one clear line
            first = (str(exc).strip().splitlines() or [""])[0]
            raise SourceError(f"importing {module_name!r} for model spec {spec!r} raised "
                              f"{type(exc).__name__}: {first[:200]}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SourceError(f"{module_name!r} has no attribute {attr!r} (model spec {spec!r})")
        obj = getattr(obj, part)
    check_factory(obj, spec)
    return obj


def may_resolve(spec: str, trust_code: bool) -> bool:
    """Whether a spec recorded in a file may be imported: opted in, or the person named it in this run."""
    scope = current_scope()
    return bool(trust_code or scope.trust_code or spec in scope.named)


def refuse_recorded(spec: str, origin: str) -> ArtifactError:
    """The one-line refusal for a factory a file records but nobody trusted."""
    return ArtifactError(f"{origin} records the model factory {spec!r:.200}, which is not imported unless you "
                         f"trust the file: {TRUST_HINT}")
