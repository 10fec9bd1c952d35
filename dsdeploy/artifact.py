"""The ``.dsd`` artifact: source spec + plan + state_dict + metadata + history.

It is a ``torch.save`` file of plain data and tensors, so it loads with
``weights_only=True``; loading rebuilds the source architecture, applies the plan's
structure and loads the weights, giving a model whose outputs are identical.
Nothing time-dependent is stored: the same conversion gives byte-identical files.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsdeploy import __version__
from dsdeploy.checkpoints import check_state_dict, load_weights, torch_load
from dsdeploy.errors import ArtifactError, WeightsError
from dsdeploy.fsutil import atomic_path, sha256_file
from dsdeploy.plan import Plan

FORMAT = "dsdeploy-artifact"
FORMAT_VERSION = 1


@dataclass
class Artifact:
    """A loaded ``.dsd`` file."""

    model: nn.Module
    plan: Plan
    source: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    path: str | None = None


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
    """Load and validate the raw artifact dict (weights_only)."""
    try:
        payload = torch_load(path, what=".dsd artifact")
    except WeightsError as exc:
        raise ArtifactError(str(exc).replace("checkpoint", ".dsd artifact")) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a dsdeploy artifact (write one with `dsdeploy convert`)")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path} uses artifact format version {version}; this dsdeploy {__version__} reads "
                            f"version {FORMAT_VERSION}: re-run `dsdeploy convert` with this version")
    missing = [k for k in ("source", "plan", "state_dict") if k not in payload]
    if missing:
        raise ArtifactError(f"{path} is incomplete: missing {', '.join(missing)}")
    return payload


def load_artifact(path: str | Path) -> Artifact:
    """Rebuild the converted model stored in ``path`` (eval mode, identical outputs)."""
    from dsdeploy.rewrite import apply_plan
    from dsdeploy.sources import build_source

    payload = read_payload(path)
    source = payload["source"]
    plan = Plan.from_dict(payload["plan"])
    base = build_source(source["spec"], source.get("model_kwargs")).model
    model = apply_plan(base, plan, init_from_weights=False)
    check_state_dict(model, payload["state_dict"], str(path))
    model.load_state_dict(payload["state_dict"], strict=True)
    return Artifact(model=model.eval(), plan=plan, source=source, metadata=dict(payload.get("metadata") or {}),
                    history=list(payload.get("history") or []), path=str(path))


def load_source_model(artifact: Artifact) -> nn.Module:
    """The ORIGINAL model an artifact was converted from (the default distillation teacher)."""
    from dsdeploy.sources import build_source

    src = artifact.source
    model = build_source(src["spec"], src.get("model_kwargs")).model
    weights = src.get("weights")
    if weights:
        if not Path(weights).is_file():
            raise ArtifactError(f"the source weights {weights} recorded in the artifact are gone; pass --teacher")
        if src.get("weights_sha256") and sha256_file(weights) != src["weights_sha256"]:
            raise ArtifactError(f"the source weights {weights} changed since conversion (sha256 differs); "
                                f"pass --teacher")
        load_weights(model, weights)
    return model.eval()
