"""The ``.dsd`` artifact: source spec + plan + state_dict + metadata + history.

It is a ``torch.save`` file of plain data and tensors, so it loads with
``weights_only=True``; loading rebuilds the source architecture, applies the plan's
structure and loads the weights, giving a model whose outputs are identical.
Nothing time-dependent is stored: the same conversion gives byte-identical files.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from dsdeploy.conversion.artifact_check import check_payload, plan_of, rebuild, show
from dsdeploy.conversion.plan import Plan
from dsdeploy.errors import ArtifactError, SourceError, WeightsError
from dsdeploy.fsutil import atomic_path, sha256_file
from dsdeploy.models.sources import build_source
from dsdeploy.models.weights import load_weights, torch_load
from dsdeploy.outputs import check_output
from dsdeploy.version import __version__

FORMAT = "dsdeploy-artifact"
FORMAT_VERSION = 1

SUFFIX = ".dsd"


def check_artifact_output(path: str | os.PathLike, *, what: str = "out",
                          inputs: Iterable[tuple[str, str | os.PathLike | None]] = ()) -> Path:
    """Refuse, before any work, a path an artifact may not be written to (not ``.dsd``, an input,
    a file of another kind); the one home of the ``.dsd`` suffix rule (:func:`dsdeploy.fsutil.check_output`)."""
    return check_output(path, kind="torch", suffixes=(SUFFIX,), what=what, inputs=inputs)


@dataclass
class Artifact:
    """A loaded ``.dsd`` file."""

    model: nn.Module
    plan: Plan
    source: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    path: str | None = None
    builder: Callable[..., Any] | None = None  # the factory that rebuilt a pkg.module:factory source


def source_record(spec: str, model_kwargs: dict[str, Any] | None = None, weights: str | None = None) -> dict[str, Any]:
    """What an artifact needs to rebuild (and re-load) its source model."""
    rec: dict[str, Any] = {"spec": spec, "model_kwargs": dict(model_kwargs or {}), "weights": None,
                           "weights_sha256": None}
    if weights:
        rec["weights"] = str(Path(weights).resolve())
        rec["weights_sha256"] = sha256_file(weights)
    return rec


def save_artifact(path: str | Path, model: nn.Module, plan: Plan, source: dict[str, Any],
                  metadata: dict[str, Any] | None = None, history: list[dict[str, Any]] | None = None) -> Path:
    """Write the artifact atomically (a failure leaves any previous file intact)."""
    meta = {"dsdeploy_version": __version__, "torch_version": torch.__version__.split("+")[0], **(metadata or {})}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": dict(source),
        "plan": plan.to_dict(),
        "metadata": meta,
        "history": list(history or []),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    buf = io.BytesIO()  # a file name would enter the zip's record names: save to memory for identical bytes
    torch.save(payload, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return Path(path)


def read_payload(path: str | Path) -> dict[str, Any]:
    """Load and validate the raw artifact dict (``weights_only``; imports and calls nothing).

    Raises:
        ArtifactError: not an artifact, another format version, or any part of the wrong
        type (source record, plan, metadata, history, state_dict of dense CPU tensors).
    """
    try:
        payload = torch_load(path, what=".dsd artifact")
    except WeightsError as exc:
        raise ArtifactError(str(exc).replace("checkpoint", ".dsd artifact")) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("format"), str) or payload["format"] != FORMAT:
        raise ArtifactError(f"{path} is not a dsdeploy artifact (write one with `dsdeploy convert`)")
    version = payload.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ArtifactError(f"{path} uses artifact format version {show(version)}; this dsdeploy {__version__} reads "
                            f"version {FORMAT_VERSION}: re-run `dsdeploy convert` with this version")
    missing = [k for k in ("source", "plan", "state_dict") if k not in payload]
    if missing:
        raise ArtifactError(f"{path} is incomplete: missing {', '.join(missing)}")
    check_payload(payload, str(path))
    return payload


def load_artifact(path: str | Path, *, trust_code: bool = False,
                  factory: Callable[..., Any] | None = None) -> Artifact:
    """Rebuild the converted model stored in ``path`` (eval mode, identical outputs).

    The source architecture is rebuilt from the recorded spec: ``torchvision:``/``sample:``
    specs always; a recorded ``pkg.module:factory`` only with ``trust_code=True`` or when
    ``factory`` (the callable that builds it) is passed.

    Raises:
        ArtifactError: a corrupt or crafted file, or an untrusted recorded factory.
    """
    payload = read_payload(path)
    source = payload["source"]
    plan = plan_of(payload, str(path))
    try:
        loaded = build_source(source["spec"], source.get("model_kwargs"), recorded_in=str(path),
                              trust_code=trust_code, factory=factory)
    except SourceError as exc:
        raise ArtifactError(f"{path}: its source model cannot be rebuilt: {exc}") from None
    model = rebuild(loaded.model, plan, payload["state_dict"], str(path))
    return Artifact(model=model.eval(), plan=plan, source=source, metadata=dict(payload.get("metadata") or {}),
                    history=list(payload.get("history") or []), path=str(path), builder=loaded.builder)


def source_architecture(artifact: Artifact, *, trust_code: bool = False,
                        factory: Callable[..., Any] | None = None) -> nn.Module:
    """The source model's architecture (random init for factories/torchvision; no weights file read).

    Reuses the factory that rebuilt ``artifact``; otherwise the same trust rule as :func:`load_artifact`.
    """
    src = artifact.source
    return build_source(src["spec"], src.get("model_kwargs"), recorded_in=artifact.path or "the artifact",
                        trust_code=trust_code, factory=factory or artifact.builder).model.eval()


def load_source_model(artifact: Artifact, *, trust_code: bool = False,
                      factory: Callable[..., Any] | None = None) -> nn.Module:
    """The ORIGINAL model an artifact was converted from (the default distillation teacher).

    Its architecture as :func:`source_architecture`, then the recorded source weights
    (``weights_only``), which must still exist and match their recorded sha256.
    """
    src = artifact.source
    model = source_architecture(artifact, trust_code=trust_code, factory=factory)
    weights = src.get("weights")
    if weights:
        if not Path(weights).is_file():
            raise ArtifactError(f"the source weights {weights} recorded in {artifact.path} are gone; restore the "
                                f"file")
        if src.get("weights_sha256") and sha256_file(weights) != src["weights_sha256"]:
            raise ArtifactError(f"the source weights {weights} changed since {artifact.path} was converted (sha256 "
                                f"differs); restore the file")
        load_weights(model, weights)
    return model.eval()
