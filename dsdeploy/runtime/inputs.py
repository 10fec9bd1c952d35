"""What ``dsdeploy bench`` feeds a model: its inputs, conv MACs and preprocessing read from
the ONNX file, and seeded random or real-image inputs matching each input's dtype and shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsdeploy.data.preprocessing import resolve
from dsdeploy.errors import DataError, ExportError, InputShapeError
from dsdeploy.export.graph import load_onnx, summarize
from dsdeploy.fsutil import require_file, sha256_file

META_PREPROCESSING = "dsdeploy.preprocessing"
META_CONV_MACS = "dsdeploy.conv_macs"
DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
          "tensor(bool)": np.bool_}


@dataclass
class ModelInfo:
    """One benchmarked ONNX file: identity, inputs, conv MACs per item and where they came from."""

    name: str
    path: str
    sha256: str
    inputs: list[dict[str, Any]]
    conv_macs: int | None
    conv_macs_source: str
    preprocessing: dict[str, Any] | None


def _dims(value_info) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def conv_macs_from_graph(model, preprocessing: dict[str, Any] | None = None) -> int | None:
    """Conv MACs per item (batch 1) by ONNX shape inference (``onnx_check.summarize``); None when unknown."""
    size = (preprocessing or {}).get("size")
    shape = (1, int((preprocessing or {}).get("channels", 3)), *map(int, size)) if size else None
    return summarize(model, shape).conv_macs


def model_info(path: str) -> ModelInfo:
    """Read ``path``: inputs, ``dsdeploy.data.preprocessing`` metadata, conv MACs (metadata first, else counted)."""
    require_file(path, "ONNX model")
    model = load_onnx(path)
    meta = {p.key: p.value for p in model.metadata_props}
    pre = None
    if META_PREPROCESSING in meta:
        try:
            pre = json.loads(meta[META_PREPROCESSING])
        except json.JSONDecodeError:
            raise ExportError(f"{path}: metadata {META_PREPROCESSING} is not valid JSON") from None
    inits = {i.name for i in model.graph.initializer}
    inputs = [{"name": i.name, "shape": _dims(i)} for i in model.graph.input if i.name not in inits]
    if META_CONV_MACS in meta and meta[META_CONV_MACS].strip().isdigit():
        macs, source = int(meta[META_CONV_MACS]), f"metadata {META_CONV_MACS}"
    else:
        macs, source = conv_macs_from_graph(model, pre), "counted from the graph (shape inference)"
    return ModelInfo(Path(path).stem, str(path), sha256_file(path), inputs, macs, source if macs is not None
                     else "unknown (shapes not inferable)", pre)


# ---------------------------------------------------------------------------------- inputs


def input_shape(name: str, dims: list, batch: int, pre: dict[str, Any] | None) -> tuple[int, ...]:
    """Concrete shape for an input: dynamic axis 0 -> ``batch``; other dynamic axes from preprocessing."""
    shape = []
    for axis, d in enumerate(dims):
        if isinstance(d, int) and d > 0:
            if axis == 0 and d != batch:
                raise InputShapeError(f"input {name!r} has a fixed batch of {d}; batch {batch} cannot run")
            shape.append(d)
        elif axis == 0:
            shape.append(batch)
        elif pre and len(dims) == 4 and axis >= 1:
            shape.append(int(pre.get("channels", 3)) if axis == 1 else int(pre["size"][axis - 2]))
        else:
            raise InputShapeError(f"input {name!r} has dynamic axis {axis} ({d!r}); export it with a fixed size "
                                  f"or store {META_PREPROCESSING} metadata")
    return tuple(shape)


def random_feed(session, batch: int, pre: dict[str, Any] | None, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs matching each session input's dtype and shape (axis 0 = ``batch``)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in session.get_inputs():
        dims = [d if isinstance(d, int) else str(d) for d in inp.shape]
        shape = input_shape(inp.name, dims, batch, pre)
        dtype = DTYPES.get(inp.type)
        if dtype is None:
            raise InputShapeError(f"input {inp.name!r} has type {inp.type}, which bench cannot generate")
        if np.issubdtype(dtype, np.floating):
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feed[inp.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feed[inp.name] = rng.integers(0, 10, shape).astype(dtype)
    return feed


def data_images(spec: str, info: ModelInfo, count: int, seed: int,
                preprocess: dict[str, Any] | None = None) -> np.ndarray:
    """``count`` real images (N, C, H, W float32) from ``spec`` via ``dsdeploy.data.datasets.load_data``,
    preprocessed per :func:`dsdeploy.data.preprocessing.resolve` (``preprocess`` overrides > the model's
    ``dsdeploy.data.preprocessing`` metadata > derived from its fixed input shape)."""
    # torch stays out: only real-image inputs (data) need the data loaders
    from dsdeploy.data.datasets import load_data, readable_images

    dims = info.inputs[0]["shape"] if len(info.inputs) == 1 else []
    if len(dims) != 4:
        raise DataError(f"image data needs a model with one NCHW image input; {info.name} has {info.inputs}")
    fixed = all(isinstance(d, int) and d > 0 for d in dims[1:])
    if not info.preprocessing and not fixed and not (preprocess or {}).get("size"):
        raise DataError(f"{info.name} has dynamic image size and no {META_PREPROCESSING} metadata; "
                        f"give the image size (size) to preprocess data for it")
    pre = resolve(info.preprocessing, dims, preprocess, data=spec)
    splits = load_data(spec, pre, seed=seed, labelled=False, limit=count)
    ds = splits.val if splits.val is not None and len(splits.val) else splits.train
    if ds is None or not len(ds):
        raise DataError(f"no images in {spec}")
    imgs = readable_images(ds, count).numpy().astype(np.float32)
    want = [d for d in dims[1:]]
    if any(isinstance(w, int) and w != g for w, g in zip(want, imgs.shape[1:])):
        raise DataError(f"the data images are {tuple(imgs.shape[1:])} but {info.name} wants {tuple(want)}")
    return imgs
