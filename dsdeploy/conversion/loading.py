"""Open the model a command names: a ``.dsd`` artifact (converted) or a source spec with its weights.

It sits above :mod:`dsdeploy.models.sources` (specs -> architectures) and
:mod:`dsdeploy.conversion.artifact` (the ``.dsd`` file), so neither needs the other's loader.
"""

from __future__ import annotations

from typing import Any

from dsdeploy.conversion.artifact import load_artifact
from dsdeploy.errors import SourceError
from dsdeploy.models.sources import LoadedModel, build_source, is_artifact_spec
from dsdeploy.models.weights import load_weights


def load_model(spec: str, weights: str | None = None, model_kwargs: dict[str, Any] | None = None,
               trust_pickle: bool = False, *, trust_code: bool = False) -> LoadedModel:
    """Resolve ``spec`` to a model in eval mode, loading ``weights`` when given.

    Checkpoints load with ``weights_only=True``; a whole pickled model needs
    ``trust_pickle=True``. A ``.dsd`` spec loads the artifact (weights then refused); the
    ``pkg.module:factory`` it records is imported only with ``trust_code=True``.
    """
    if is_artifact_spec(spec):
        if weights:
            raise SourceError("a weights file does not apply to a .dsd artifact (it holds its own weights)")
        art = load_artifact(spec, trust_code=trust_code)
        meta = art.metadata
        shape = meta.get("input_shape")
        return LoadedModel(art.model.eval(), spec, dict(art.source.get("model_kwargs") or {}),
                           input_shape=tuple(shape) if shape else None, preprocessing=meta.get("preprocessing"),
                           labels=meta.get("labels"), artifact=art, builder=art.builder)
    loaded = build_source(spec, model_kwargs)
    if weights:
        load_weights(loaded.model, weights, trust_pickle=trust_pickle)
        loaded.weights = str(weights)
    loaded.model.eval()
    return loaded
