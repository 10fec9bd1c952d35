"""Export a torch model to ONNX with a parity gate after every transformation.

``export_onnx`` exports with the ``torch.export``-based exporter (``dynamo=True``, torch's
default since 2.9) and, when that fails (the exporter raises, ONNX Runtime cannot run its
graph, or the graph breaks parity), with the TorchScript exporter instead: the reason is
recorded in ``metadata_props`` (``dsdeploy.exporter_fallback``) and warned
(:mod:`dsdeploy.export.exporters`); ``exporter`` "dynamo" or "torchscript" forces one. It
checks parity against torch on ONNX Runtime's CPU EP (random inputs at the export batch, at
a second batch size when the batch is dynamic, and real samples when ``data`` is given), simplifies with onnxsim only when the result keeps parity, writes ONE
self-contained file with provenance in ``metadata_props`` and reports op counts, conv
MACs and the DS-structure check.

Facts measured with torch 2.14.1: the dynamo exporter raises any opset below 18 to 18
(its down-conversion to 17 fails for ResNet-18 and the file stays at 18), and by default
writes weights to a stray ``<name>.data`` file; dsdeploy passes ``external_data=False``.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from dsdeploy.conversion.artifact import source_architecture
from dsdeploy.conversion.block import ds_blocks
from dsdeploy.conversion.loading import load_model
from dsdeploy.conversion.opcount import _wants_image_list
from dsdeploy.data.datasets import load_data, readable_images
from dsdeploy.data.preprocessing import input_shape_for, resolve
from dsdeploy.errors import DsdeployError, ExportError, InputShapeError
from dsdeploy.export.config import ExportConfig
from dsdeploy.export.exporters import (
    DYNAMO_MIN_OPSET,
    META_EXPORTER_FALLBACK,
    Attempt,
    export_auto,
    first_line,
    gate,
)
from dsdeploy.export.graph import (
    META_CONV_MACS,
    META_LABELS,
    META_PREPROCESSING,
    check_ds_structure,
    check_model,
    fold_bn_after_conv_sum,
    set_metadata,
    summarize,
)
from dsdeploy.export.parity import (
    ATOL,
    RTOL,
    OutputParity,
    flatten_outputs,
    random_inputs,
)
from dsdeploy.fsutil import atomic_path
from dsdeploy.version import __version__

log = logging.getLogger(__name__)

TWO_GB = 2 * 1024**3


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and measured."""

    path: str
    exporter: str
    opset: int
    input_shape: list[int]
    dynamic_batch: bool
    parity: list[OutputParity] = field(default_factory=list)
    simplified: bool = False
    op_counts: dict[str, int] = field(default_factory=dict)
    conv_kinds: dict[str, int] = field(default_factory=dict)
    conv_macs: int | None = None
    ds_problems: list[str] | None = None
    warnings: list[str] = field(default_factory=list)
    fallback: str | None = None  # why "auto" did not use the dynamo exporter (None: it did, or one was forced)
    original: dict[str, Any] | None = None  # op counts / conv MACs of the source model's export

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_detection(model: nn.Module) -> bool:
    return _wants_image_list(model)


def _save(model, path: Path) -> None:
    """Write ``model`` atomically as ONE file (external data only above protobuf's 2 GB limit)."""
    with atomic_path(path) as tmp:
        if model.ByteSize() >= TWO_GB:
            onnx.save_model(model, str(tmp), save_as_external_data=True, location=path.name + ".data")
        else:
            onnx.save_model(model, str(tmp))


def _simplify(raw, raw_path: Path, model: nn.Module, cases, atol: float, rtol: float, warns: list[str]):
    """onnxsim on ``raw``; returns (model, parity) or (None, []) when it fails or breaks parity."""
    # onnxsim is heavy and needed only when simplifying
    import onnxsim

    try:
        simplified, ok = onnxsim.simplify(raw)
    except Exception as exc:  # onnxsim raises plain RuntimeError/ValueError from C++
        warns.append(f"onnxsim failed ({first_line(exc)}); kept the unsimplified model")
        return None, []
    if not ok:
        warns.append("onnxsim could not validate its result; kept the unsimplified model")
        return None, []
    sim_path = raw_path.with_name("simplified.onnx")
    onnx.save_model(simplified, str(sim_path))
    try:
        check_model(simplified, "the simplified model")
        return simplified, gate(model, sim_path, cases, "simplification", atol, rtol)
    except ExportError as exc:  # ParityError included
        warns.append(f"simplification broke parity or validity, kept the unsimplified model ({exc})")
        return None, []


def _fold_bn(raw, raw_path: Path, model: nn.Module, cases, atol: float, rtol: float, parity: list,
             warns: list[str]):
    """Fold BN after summed DS branches (see onnx_check.fold_bn_after_conv_sum), gated by parity."""
    folded = onnx.ModelProto()
    folded.CopyFrom(raw)
    if not fold_bn_after_conv_sum(folded):
        return raw, parity
    path = raw_path.with_name("bn_folded.onnx")
    onnx.save_model(folded, str(path))
    try:
        check_model(folded, "the BN-folded model")
        return folded, parity + gate(model, path, cases, "BN folding", atol, rtol)
    except ExportError as exc:  # ParityError included
        warns.append(f"folding BatchNorm into summed branches broke parity, kept it unfolded ({exc})")
        return raw, parity


def _parity_cases(shape: tuple[int, ...], dynamic_batch: bool, data: torch.Tensor | None,
                  seed: int) -> list[tuple[torch.Tensor, str]]:
    cases = [(random_inputs(shape, seed), f"random batch {shape[0]}")]
    if dynamic_batch:
        other = (shape[0] + 2, *shape[1:])
        cases.append((random_inputs(other, seed + 1), f"random batch {other[0]}"))
    if data is not None:
        cases.append((data, f"data batch {len(data)}"))
    return cases


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, ...], *, opset: int = 18,
                dynamic_batch: bool = True, simplify: bool = True, exporter: str = "auto",
                metadata: dict[str, Any] | None = None, data: torch.Tensor | None = None, atol: float = ATOL,
                rtol: float = RTOL, seed: int = 0) -> ExportReport:
    """Export ``model`` to ONE ``.onnx`` file at ``path``, gated by parity with torch.

    Args:
        model: an ``nn.Module`` taking one tensor (put in eval mode; not otherwise changed).
        path: destination; written atomically (nothing is written when a gate fails).
        input_shape: example input shape, batch first.
        opset: ONNX opset (the dynamo exporter uses at least 18, so "auto" exports an opset below
            18 with TorchScript; the report says which opset and exporter were used).
        dynamic_batch: make axis 0 dynamic, verified by running ONNX at two batch sizes.
        simplify: run onnxsim; a result that fails or breaks parity is discarded with a warning.
        exporter: "auto" (dynamo, falling back to TorchScript with the reason in the report's
            ``fallback``, its warnings and the ONNX metadata), "dynamo" or "torchscript" (forced).
        metadata: extra ``metadata_props`` (non-strings stored as JSON), e.g. provenance.
        data: real input samples (N, *input_shape[1:]) added to the parity cases.
        atol, rtol: parity tolerance, see :mod:`dsdeploy.export.parity`.
        seed: seed for the random parity inputs.

    Raises:
        ExportError: the exporter failed ("auto": both did), or the model takes a list of images (detection).
        ParityError: ONNX Runtime disagrees with torch on the export (every failing output listed;
            "auto": on both exporters' graphs).
    """
    ExportConfig(opset=opset, dynamic_batch=dynamic_batch, simplify=simplify, exporter=exporter, atol=atol, rtol=rtol)
    path = Path(path)
    shape = tuple(int(d) for d in input_shape)
    warns: list[str] = []
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:  # forced; "auto" takes TorchScript for opset < 18
        warns.append(f"the dynamo exporter supports opset >= {DYNAMO_MIN_OPSET}; exporting with opset "
                     f"{DYNAMO_MIN_OPSET} instead of {opset}")
    if _is_detection(model):
        raise ExportError(f"{type(model).__name__} is a torchvision detection model (it takes a list of images and "
                          f"returns per-image dicts of variable length); dsdeploy export supports models taking one "
                          f"batched tensor — export the backbone, or wrap the model to take a tensor")
    model.eval()
    n_outputs = _check_runs(model, shape, dynamic_batch, seed)
    cases = _parity_cases(shape, dynamic_batch, data, seed)
    with tempfile.TemporaryDirectory(prefix="dsdeploy-export-") as tmpdir:
        attempt = Attempt(model, shape, opset, dynamic_batch, n_outputs, cases, atol, rtol, seed, Path(tmpdir))
        used, fallback, (raw, raw_path, parity, used_opset) = export_auto(attempt, exporter, warns)
        raw, parity = _fold_bn(raw, raw_path, model, cases, atol, rtol, parity, warns)
        final, simplified = raw, False
        if simplify:
            sim, sim_parity = _simplify(raw, raw_path, model, cases, atol, rtol, warns)
            if sim is not None:
                final, simplified, parity = sim, True, parity + sim_parity
    for w in warns:
        warnings.warn(w, stacklevel=2)
    summary = summarize(final, shape)
    blocks = _ds_block_shapes(model)
    problems = check_ds_structure(final, blocks) if blocks else None
    set_metadata(final, {"dsdeploy.version": __version__, "dsdeploy.exporter": used,
                         **({META_EXPORTER_FALLBACK: fallback} if fallback else {}),
                         "dsdeploy.opset": str(used_opset), "dsdeploy.input_shape": list(shape),
                         "dsdeploy.dynamic_batch": "true" if dynamic_batch else "false",
                         **({META_CONV_MACS: str(summary.conv_macs)} if summary.conv_macs is not None else {}),
                         **(metadata or {})})
    _save(final, path)
    return ExportReport(str(path), used, used_opset, list(shape), dynamic_batch, parity, simplified,
                        summary.op_counts, summary.kinds(), summary.conv_macs, problems, warns, fallback)


def export_bytes(model: nn.Module, input_shape: tuple[int, ...], config: ExportConfig | None = None) -> bytes:
    """The serialized ONNX model :func:`export_onnx` writes for ``model`` at ``input_shape`` under ``config``
    (default ``ExportConfig()``: what ``dsdeploy export`` writes), for timing the graph a user deploys.

    Latency planning and its verification time this graph, not a twin export: the exporters differ in what
    ONNX Runtime can fuse (measured on a converted ResNet-18: the dynamo export with BatchNorm folded into
    summed DS branches leaves residual Add+Relu nodes unfused that the TorchScript export fuses). Export
    warnings are not repeated here (the user's own ``export`` shows them). Raises as :func:`export_onnx`.
    """
    cfg = config or ExportConfig()
    with tempfile.TemporaryDirectory(prefix="dsdeploy-timing-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dest = Path(tmp) / "model.onnx"
        export_onnx(model, dest, input_shape, opset=cfg.opset, dynamic_batch=cfg.dynamic_batch,
                    simplify=cfg.simplify, exporter=cfg.exporter, atol=cfg.atol, rtol=cfg.rtol)
        return dest.read_bytes()


def _check_runs(model: nn.Module, shape: tuple[int, ...], dynamic_batch: bool, seed: int) -> int:
    """Run ``model`` in torch at ``shape`` (and at another batch when dynamic); the number of outputs.

    Raises ExportError for non-float32 weights (export and parity run in float32) and
    InputShapeError when the model cannot run at the shape, or fixes its batch size while
    ``dynamic_batch`` is asked for.
    """
    odd = sorted({str(t.dtype).replace("torch.", "") for t in [*model.parameters(), *model.buffers()]
                  if t.is_floating_point() and t.dtype != torch.float32})
    if odd:
        raise ExportError(f"the model's weights are {', '.join(odd)}; ONNX export and its parity checks run in "
                          f"float32: convert the model with .float() first (deploy's quantize='fp16' makes an "
                          f"fp16 bundle from the float32 export)")
    try:
        with torch.no_grad():
            n_outputs = len(flatten_outputs(model(random_inputs(shape, seed))))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise InputShapeError(f"the model cannot run on input shape {','.join(map(str, shape))}: "
                              f"{first_line(exc)}") from None
    if dynamic_batch:
        other = shape[0] + 2
        try:
            with torch.no_grad():
                model(random_inputs((other, *shape[1:]), seed + 1))
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise InputShapeError(f"the model runs at batch {shape[0]} but cannot run at batch {other} (it fixes "
                                  f"its batch size: {first_line(exc)[:120]}); export with a static batch "
                                  f"(dynamic_batch=False)") from None
    return n_outputs


def _ds_block_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Expected depthwise/pointwise Conv counts per DS block of ``model``."""
    out = {}
    for name, b in ds_blocks(model).items():
        n_dw = len(b.depthwise)
        out[name] = {"in_channels": b.in_channels, "depthwise": n_dw, "pointwise": len(b.pointwise)}
    return out


def provenance(loaded: Any) -> dict[str, Any]:
    """Metadata for a :class:`dsdeploy.models.sources.LoadedModel`: source spec, plan hash, preprocessing, labels."""
    meta: dict[str, Any] = {"dsdeploy.source": loaded.spec}
    art = getattr(loaded, "artifact", None)
    if art is not None:
        meta["dsdeploy.plan_digest"] = art.plan.digest()
        meta["dsdeploy.source_model"] = (art.source or {}).get("spec")
    if loaded.preprocessing:
        meta[META_PREPROCESSING] = loaded.preprocessing
    if loaded.labels:
        meta[META_LABELS] = list(loaded.labels)
    return meta


def data_samples(spec: str, preprocessing: dict[str, Any] | None, shape: tuple[int, ...], count: int = 16,
                 seed: int = 0) -> torch.Tensor:
    """``count`` real preprocessed images from ``spec`` (dsdeploy.data.datasets), shaped like the model input;
    preprocessing per :func:`dsdeploy.data.preprocessing.resolve` (``preprocessing`` > derived from ``shape``)."""
    pre = resolve(preprocessing, shape, data=spec)
    splits = load_data(spec, pre, seed=seed, labelled=False, limit=count)
    ds = splits.val if splits.val is not None and len(splits.val) else splits.train
    x = readable_images(ds, min(count, len(ds)))
    if tuple(x.shape[1:]) != tuple(shape[1:]):
        raise InputShapeError(f"the data images are {tuple(x.shape[1:])} but the model input is {tuple(shape[1:])}")
    return x


def export_model(spec: str, out: str | Path, *, weights: str | None = None, model_kwargs: dict | None = None,
                 trust_pickle: bool = False, input_shape: tuple[int, ...] | None = None, data: str | None = None,
                 compare_original: bool = True, preprocess: dict[str, Any] | None = None, trust_code: bool = False,
                 **kwargs: Any) -> ExportReport:
    """``dsdeploy export``: load ``spec`` (dsdeploy.conversion.loading.load_model) and :func:`export_onnx` it with provenance.

    The ONNX metadata records the resolved preprocessing (``preprocess`` overrides > the model's
    own > derived from the input shape; :mod:`dsdeploy.data.preprocessing`) so bundles can predict.

    For a ``.dsd`` artifact the original ARCHITECTURE is exported too (to a temporary file,
    before ``out`` is written, random init: the source weights are never needed) so the report
    holds op counts and conv MACs before/after conversion. ``trust_code``: import the
    ``pkg.module:factory`` a ``.dsd`` records. A failure leaves no ``out`` behind.
    """
    loaded = load_model(spec, weights=weights, model_kwargs=model_kwargs, trust_pickle=trust_pickle,
                        trust_code=trust_code)
    pre = resolve(loaded.preprocessing, input_shape or loaded.input_shape, preprocess, data=data, model=loaded.model)
    shape = input_shape_for(pre, input_shape, loaded.input_shape, bool(preprocess))
    if pre.channels == shape[1] and tuple(pre.size) == tuple(shape[2:]):
        loaded.preprocessing = pre.to_dict()
    samples = data_samples(data, loaded.preprocessing, shape, seed=kwargs.get("seed", 0)) if data else None
    original = None
    if compare_original and loaded.artifact is not None:
        arch = source_architecture(loaded.artifact)
        keep = {k: v for k, v in kwargs.items() if k in ("opset", "exporter", "dynamic_batch", "simplify")}
        try:
            with tempfile.TemporaryDirectory(prefix="dsdeploy-orig-") as tmp:
                o = export_onnx(arch, Path(tmp) / "original.onnx", shape, **keep)
            original = {"op_counts": o.op_counts, "conv_kinds": o.conv_kinds, "conv_macs": o.conv_macs}
        except DsdeployError as exc:  # the comparison is informative only: say why it is missing
            original = str(exc)
    report = export_onnx(loaded.model, out, shape, metadata=provenance(loaded), data=samples, **kwargs)
    if isinstance(original, str):
        report.warnings.append(f"the original architecture did not export for comparison: {original}")
    else:
        report.original = original
    return report
