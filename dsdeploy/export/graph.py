"""Checks on ONNX graphs: load + checker, op counts, conv MACs, DS-block structure.

``load_onnx`` is the one way dsdeploy reads an ``.onnx`` file: a missing, corrupt or
invalid file becomes a one-line :class:`ExportError`. The other helpers take a loaded
``onnx.ModelProto`` and never touch torch.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from dsdeploy.errors import ExportError
from dsdeploy.fsutil import require_file, utf8

META_PREFIX = "dsdeploy."
META_PREPROCESSING = "dsdeploy.preprocessing"
META_CONV_MACS = "dsdeploy.conv_macs"
META_LABELS = "dsdeploy.labels"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def load_onnx(path: str | Path, *, check: bool = True):
    """Read ``path`` as an ONNX model and run ``onnx.checker`` on it.

    Raises:
        ExportError: the file is missing, not an ONNX protobuf, or fails the checker.
    """
    p = Path(path)
    if not p.exists():
        raise ExportError(f"ONNX model not found: {p}")
    require_file(p, "ONNX model")
    try:
        model = onnx.load(str(p))
    except Exception as exc:  # protobuf/onnx raise many types for a corrupt file
        raise ExportError(f"{p} is not a readable ONNX model ({_first_line(exc)})") from None
    if check:
        check_model(model, str(p))
    return model


def check_model(model, where: str = "model") -> None:
    """``onnx.checker.check_model`` with full checks; failure -> one-line ExportError."""
    if not model.graph.node:
        raise ExportError(f"{where} is not a valid ONNX model (empty graph)")
    try:
        onnx.checker.check_model(model, full_check=False)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ExportError(f"{where} fails onnx.checker: {_first_line(exc)}") from None


def metadata(model) -> dict[str, str]:
    """The model's ``metadata_props`` as a dict."""
    return {p.key: p.value for p in model.metadata_props}


def metadata_json(model, key: str) -> Any:
    """A JSON metadata value (None when absent); bad JSON -> ExportError."""
    raw = metadata(model).get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise ExportError(f"ONNX metadata {key!r} is not valid JSON") from None


def set_metadata(model, values: dict[str, Any]) -> None:
    """Replace/add metadata props; non-string values are stored as JSON."""
    current = metadata(model)
    for k, v in values.items():
        if v is None:
            continue
        current[k] = v if isinstance(v, str) else json.dumps(v)
    del model.metadata_props[:]
    for k, v in current.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, utf8(v)  # a path in a value may hold undecodable bytes


def op_counts(model) -> dict[str, int]:
    """Number of nodes per op type in the main graph, most frequent first."""
    return dict(Counter(n.op_type for n in model.graph.node).most_common())


def _dims(value_info) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def _attr(node, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _weight_shapes(model) -> dict[str, list[int]]:
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            t = _attr(node, "value")
            if t is not None and hasattr(t, "dims"):
                shapes[node.output[0]] = list(t.dims)
    return shapes


@dataclass
class ConvInfo:
    """One Conv node: weight shape, group, kind (depthwise/pointwise/dense) and MACs per item."""

    name: str
    weight: list[int]
    group: int
    kind: str
    macs: int | None


@dataclass
class GraphSummary:
    """What :func:`summarize` finds in a graph."""

    op_counts: dict[str, int]
    convs: list[ConvInfo] = field(default_factory=list)
    conv_macs: int | None = None

    def kinds(self) -> dict[str, int]:
        return dict(Counter(c.kind for c in self.convs))

    def to_dict(self) -> dict[str, Any]:
        return {"op_counts": self.op_counts, "conv_kinds": self.kinds(), "conv_macs": self.conv_macs}


def _conv_kind(weight: list[int], group: int) -> str:
    cout, cin_g, *k = weight
    if cin_g == 1 and cout % group == 0 and math.prod(k) > 1 and (group > 1 or cout == 1):
        return "depthwise"  # one filter per input channel (a 1-channel input gives group 1)
    if all(v == 1 for v in k):
        return "pointwise"
    return "dense" if group == 1 else "grouped"


def summarize(model, input_shape: tuple[int, ...] | None = None) -> GraphSummary:
    """Op counts, every Conv's kind, and conv MACs per item (batch 1) by ONNX shape inference.

    Dynamic input dims are fixed from ``input_shape`` (batch forced to 1) before inference;
    ``conv_macs`` is None when some Conv output shape stays unknown.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name for i in m.graph.initializer}
    real_inputs = [i for i in m.graph.input if i.name not in inits]
    for pos, inp in enumerate(real_inputs):
        for axis, d in enumerate(inp.type.tensor_type.shape.dim):
            if axis == 0:
                d.Clear()
                d.dim_value = 1
            elif not d.HasField("dim_value") and input_shape and pos == 0 and axis < len(input_shape):
                d.Clear()
                d.dim_value = int(input_shape[axis])
    try:
        inferred = onnx.shape_inference.infer_shapes(m)
    except Exception:  # inference failure means "MACs unknown", not an error
        inferred = m
    shapes = {vi.name: _dims(vi) for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    weights = _weight_shapes(m)
    convs, total = [], 0
    for node in inferred.graph.node:
        if node.op_type != "Conv":
            continue
        w = weights.get(node.input[1]) or shapes.get(node.input[1])
        group = int(_attr(node, "group", 1))
        out = shapes.get(node.output[0])
        macs = None
        if w and out and all(isinstance(v, int) and v > 0 for v in [*w, *out[1:]]):
            macs = math.prod(out[1:]) * math.prod(w[1:])
        convs.append(ConvInfo(node.name, list(w or []), group, _conv_kind(list(w), group) if w else "unknown", macs))
        total = None if (total is None or macs is None) else total + macs
    return GraphSummary(op_counts(model), convs, total)


def check_ds_structure(model, blocks: dict[str, dict[str, int]]) -> list[str]:
    """Problems found when checking that every converted block became DS convs, BN folded.

    Args:
        model: the exported converted model.
        blocks: per converted block name, ``{"in_channels", "depthwise", "pointwise"}``:
            the number of depthwise Conv nodes (group = in_channels) and 1x1 Conv nodes
            the block must contribute.

    Returns:
        One line per problem; empty when the graph has at least the expected depthwise
        and pointwise convs, each depthwise with ``group == in_channels``, and no
        BatchNormalization node left.
    """
    summary = summarize(model)
    problems: list[str] = []
    bn = summary.op_counts.get("BatchNormalization", 0)
    if bn:
        problems.append(f"{bn} BatchNormalization node(s) not folded into a Conv")
    dw_by_cin = Counter(c.group for c in summary.convs if c.kind == "depthwise")
    # a block on a 1-channel input: its depthwise convs have group 1 (any channel multiplier)
    dw_by_cin[1] = sum(1 for c in summary.convs if c.group == 1 and len(c.weight) > 2 and c.weight[1] == 1
                       and math.prod(c.weight[2:]) > 1)
    want_dw = Counter()
    for b in blocks.values():
        want_dw[b["in_channels"]] += b["depthwise"]
    for cin, n in sorted(want_dw.items()):
        if dw_by_cin.get(cin, 0) < n:
            problems.append(f"expected {n} depthwise Conv(s) with group={cin}, found {dw_by_cin.get(cin, 0)}")
    want_pw = sum(b["pointwise"] for b in blocks.values())
    have_pw = summary.kinds().get("pointwise", 0)
    if have_pw < want_pw:
        problems.append(f"expected at least {want_pw} pointwise (1x1) Conv(s), found {have_pw}")
    return problems


def toposort(graph) -> None:
    """Reorder ``graph.node`` in place so every node comes after the producers of its inputs."""
    produced = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in produced for i in n.input)]
        if not ready:  # a cycle or a dangling input: leave the rest in their order for the checker to report
            ordered += pending
            break
        ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ids]
        for n in ready:
            produced.update(n.output)
        ordered += ready
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def _const_name(name: str, inits: dict, producer: dict) -> str | None:
    """The initializer behind ``name``, following Identity nodes (deduplicated weights); None if not constant."""
    while name not in inits:
        node = producer.get(name)
        if node is None or node.op_type != "Identity":
            return None
        name = node.input[0]
    return name


def fold_bn_after_conv_sum(model) -> int:
    """Fold each BatchNormalization fed by a sum (Add chain) of Convs into those Convs, in place.

    The exporters fold Conv -> BN but not Conv + Conv -> Add -> BN, which is the shape of a
    rank > 1 "branches" DS block followed by its BatchNorm. Returns the number of BN nodes
    folded (0 leaves the model untouched).
    """
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    uses = Counter(i for n in g.node for i in n.input)
    uses.update(o.name for o in g.output)

    def convs_under(name: str) -> list | None:
        node = producer.get(name)
        if node is None or uses[name] != 1:
            return None
        if node.op_type == "Conv":
            ok = node.input[1] in inits and uses[node.input[1]] == 1 and (
                len(node.input) < 3 or (node.input[2] in inits and uses[node.input[2]] == 1))
            return [node] if ok else None
        if node.op_type in ("Add", "Sum"):
            found = [convs_under(i) for i in node.input]
            return None if any(f is None for f in found) else [c for f in found for c in f]
        return None

    folded, drop = 0, set()
    for bn in [n for n in g.node if n.op_type == "BatchNormalization" and len(n.output) == 1]:
        src = producer.get(bn.input[0])
        params = [_const_name(i, inits, producer) for i in bn.input[1:5]]
        if src is None or src.op_type not in ("Add", "Sum") or None in params:
            continue
        convs = convs_under(bn.input[0])
        if not convs:
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in params)
        scale = gamma / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))
        shift = beta - mean * scale
        for k, conv in enumerate(convs):
            w_init = inits[conv.input[1]]
            w = numpy_helper.to_array(w_init)
            w_new = (w.astype(np.float64) * scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
            w_init.CopyFrom(numpy_helper.from_array(w_new, w_init.name))
            if len(conv.input) >= 3 and conv.input[2]:
                b_init = inits[conv.input[2]]
                b = numpy_helper.to_array(b_init).astype(np.float64) * scale + (shift if k == 0 else 0.0)
                b_init.CopyFrom(numpy_helper.from_array(b.astype(w.dtype), b_init.name))
            elif k == 0:
                name = f"{conv.name or conv.output[0]}_folded_bn_bias"
                g.initializer.append(numpy_helper.from_array(shift.astype(w.dtype), name))
                inits[name] = g.initializer[-1]
                while len(conv.input) < 3:
                    conv.input.append("")
                conv.input[2] = name
        src.output[0] = bn.output[0]
        drop.add(id(bn))
        folded += 1
    if drop:  # rebuild the node list once: removing from a repeated field would shift held references
        keep = [type(n)() for n in g.node if id(n) not in drop]
        for c, n in zip(keep, [n for n in g.node if id(n) not in drop]):
            c.CopyFrom(n)
        del g.node[:]
        g.node.extend(keep)
    return folded
