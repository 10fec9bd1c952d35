"""``ConvertedModel``: what :func:`dsdeploy.api.convert` returns (the model, its plan, op counts, provenance)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsdeploy.conversion.opcount import Profile
from dsdeploy.conversion.plan import Plan
from dsdeploy.conversion.workflow import ModelReport
from dsdeploy.models.sources import LoadedModel


@dataclass
class ConvertedModel:
    """What :func:`convert` returns: the converted model, its plan, op counts, and what saving needs.

    Attributes:
        model: the converted ``nn.Module`` (eval mode); each converted conv is a ``DSConv``.
        plan: per-conv decisions (rank, full rank, relative kernel error, MACs before/after).
        before, after: op counts (params, MACs) of the original and converted model at ``input_shape``.
        original: the model that was converted (never modified): the teacher of calibrate/finetune.
        input_shape: the shape (N, C, H, W) the model was traced with.
        spec, model_kwargs, weights: the source spec when known (a spec string was converted).
        preprocessing, labels: the model's input preprocessing dict and class names, when known.
        history: one record per stage (convert, calibrate, finetune), saved in the ``.dsd``.
    """

    model: nn.Module
    plan: Plan
    before: Profile
    after: Profile
    original: nn.Module
    input_shape: tuple[int, ...]
    spec: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    preprocessing: dict[str, Any] | None = None
    labels: list[str] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def mac_ratio(self) -> float:
        """Total MACs after / before (< 1 is cheaper)."""
        return self.after.total_macs / max(1, self.before.total_macs)

    def __call__(self, x: torch.Tensor) -> Any:
        """Run the converted model on ``x`` (shape ``input_shape`` with any batch size)."""
        return self.model(x)

    def report(self, output: str | Path | None = None) -> ModelReport:
        """The convert report (plan, op counts before/after, history) the CLI prints; ``output``: where it was saved."""
        return ModelReport(self.spec or "", list(self.input_shape), self.plan, self.before, self.after,
                           None if output is None else str(output), list(self.history))

    def loaded(self) -> LoadedModel:
        """The converted model as the library's commands see a loaded model."""
        name = f"{self.spec or type(self.original).__name__} (converted)"
        return LoadedModel(self.model, name, dict(self.model_kwargs),
                           input_shape=self.input_shape, preprocessing=self.preprocessing, labels=self.labels)
