"""The one label rule: data classes -> model output indices, and refusing data a model cannot score.

A folder's class index is the position of its class folder name in the sorted list of ALL
class folders (empty ones included: ``dsdeploy.data.datasets.class_folders``, as torchvision's
``ImageFolder.find_classes``). When the model records its labels, data classes are mapped
to the model's outputs by name in every command; a data class the model does not know, or
more data classes than the model has outputs, is one :class:`DataError` line.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch

from dsdeploy.errors import DataError


def show_label(name: Any, width: int = 40) -> str:
    """A label or class name for a message: ``repr`` on one line, at most ``width`` characters
    (names come from files and folders and may hold newlines or control characters)."""
    text = repr(str(name))
    return text if len(text) <= width else text[:width - 1] + "…"


def _preview(names: Sequence[str], n: int = 5) -> str:
    return ", ".join(map(show_label, names[:n])) + (", ..." if len(names) > n else "")


def to_model_labels(classes: Sequence[str], model_labels: Sequence[str], used: set[int] | None = None,
                    where: str = "the data") -> list[int]:
    """Data class index -> index in ``model_labels`` (by name).

    Args:
        classes: the data's class names (index = data label).
        model_labels: the names of the model's outputs.
        used: data class indices that hold images (others may be unknown to the model); None = all.
        where: the data, for the message.

    Raises:
        DataError: a data class holding images is not among ``model_labels``.
    """
    index = {str(name): i for i, name in enumerate(model_labels)}
    unknown = [c for i, c in enumerate(classes) if str(c) not in index and (used is None or i in used)]
    if unknown:
        raise DataError(f"data class {show_label(unknown[0])} in {where} is not one of the model's {len(model_labels)} "
                        f"labels ({_preview(list(model_labels))}); give data whose class folders use the model's "
                        f"label names")
    return [index.get(str(c), -1) for c in classes]


def check_outputs(classes: Sequence[str] | None, n_outputs: int, model: str = "the model") -> None:
    """Raise DataError when labelled data has more classes than ``model`` has outputs."""
    if classes and len(classes) > n_outputs:
        raise DataError(f"the data has {len(classes)} classes ({_preview(list(classes))}) but {model} has "
                        f"{n_outputs} outputs; give data with at most {n_outputs} class folders, or a model with "
                        f"one output per class")


def output_count(model: Any, x: Any) -> int:
    """Outputs per item of ``model`` on one batch ``x`` (eval mode, no grad; training mode restored)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:1])
    finally:
        model.train(was)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return int(out.reshape(out.shape[0], -1).shape[1])


def split_record(names: dict[str, Sequence[str]], **facts: Any) -> dict[str, Any]:
    """What a run records about its one split: counts per split and a digest of the members."""
    h = hashlib.sha256()
    for split in sorted(names):
        for name in names[split]:
            h.update(f"{split}\0{name}\n".encode("utf-8", "surrogateescape"))
    return {**facts, **{split: len(items) for split, items in names.items()}, "digest": h.hexdigest()[:16]}
