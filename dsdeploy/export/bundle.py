"""Deployment bundles: the bundle folder (model, manifest, predict.py) built from an exported ONNX model.

``deploy(onnx_path, out_dir, ...)`` builds everything in a temporary folder and swaps it
into place (``fsutil.owned_dir``) only when every step and the accuracy gate passed; an existing
folder is written only when empty or a bundle deploy wrote (``overwrite``), and then only
the bundle's own files are replaced.

Quantization is :mod:`dsdeploy.export.quantize`; the accuracy gate and latency are
:mod:`dsdeploy.export.measure`.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from dsdeploy.conversion.artifact import read_payload
from dsdeploy.errors import DeployError, OutputError
from dsdeploy.export.config import DeployConfig
from dsdeploy.export.graph import (
    META_LABELS,
    META_PREPROCESSING,
    load_onnx,
    metadata,
    metadata_json,
    set_metadata,
)
from dsdeploy.export.measure import accuracy, deployed_session, eval_images, latency, model_preprocess
from dsdeploy.export.quantize import host_has_int8_dot, quantize_model
from dsdeploy.fsutil import (
    check_dir,
    owned_dir,
    sha256_file,
    show,
    write_json,
)
from dsdeploy.runtime.sessions import save_ort_format
from dsdeploy.version import __version__

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "dsdeploy-bundle"


@dataclass
class DeployReport:
    """What :func:`deploy` wrote and measured (accuracy in % top-1, latency in ms)."""

    bundle: str
    quantize: str
    reduce_range: bool | None = None  # INT8 only: 7-bit weights
    files: dict[str, str] = field(default_factory=dict)
    accuracy: dict[str, Any] | None = None
    latency_ms: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _image_input(model) -> tuple[str, list[Any]]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(inputs[0].type.tensor_type.shape.dim) != 4:
        raise DeployError("deploy needs a model with one NCHW image input; this one has "
                          f"{[i.name for i in inputs]}")
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims


def _io(sess) -> dict[str, list[dict[str, Any]]]:
    def one(v):
        return {"name": v.name, "shape": [d if isinstance(d, int) else str(d) for d in v.shape], "dtype": v.type}
    return {"inputs": [one(v) for v in sess.get_inputs()], "outputs": [one(v) for v in sess.get_outputs()]}


def deploy(onnx_path: str | Path, out_dir: str | Path, *, quantize: str = "none", calib_data: str | None = None,
           eval_data: str | None = None, max_accuracy_drop: float | None = None, ort_format: bool = False,
           calib_items: int = 256, eval_items: int | None = None, latency_iters: int = 30,
           threads: int | None = None, seed: int = 0, preprocessing: dict[str, Any] | None = None,
           labels: list[str] | None = None, reduce_range: bool | None = None,
           overwrite: bool = False, preprocess: dict[str, Any] | None = None,
           val_split: float = 0.2) -> DeployReport:
    """Build a deployment bundle folder from an exported ONNX model.

    Args:
        onnx_path: fp32 model (from ``dsdeploy export``; its metadata gives preprocessing/labels).
        out_dir: bundle folder: new, empty (``.`` too), or a bundle deploy wrote before (only with
            ``overwrite``; only that bundle's files are replaced, other files stay). Written on success only.
        quantize: one of ``none``, ``int8`` (static QDQ, needs ``calib_data``), ``int8-dynamic``, ``fp16``.
        calib_data: data spec (dsdeploy.data.datasets) for INT8 calibration (its train split; ``calib_items`` images).
        eval_data: labelled data spec; top-1 of the bundle vs the fp32 model on its val split is recorded.
        max_accuracy_drop: fail (DeployError, nothing written) when top-1 drops more than this many points.
        ort_format: also write ``model.ort`` for ONNX Runtime Mobile.
        latency_iters: timed CPU-EP runs per model at batch 1 (0 skips latency).
        threads: CPU-EP intra-op threads for latency (None: ORT default).
        seed: data subset seed; val_split: held-out fraction (the same split as the other stages).
        preprocessing, labels: used when the model's metadata lacks them (recorded in the bundle's model).
        preprocess: overrides of the preprocessing (dsdeploy.data.preprocessing.resolve: overrides > metadata
            > derived from a fixed input shape); the resolved one is written to the manifest and metadata,
            so the bundle's predict.py always runs.
        reduce_range: 7-bit INT8 weights (see :func:`quantize_model`); None = when this CPU lacks VNNI/AMX.
        overwrite: allow replacing a previous bundle's files in ``out_dir``.

    Raises:
        OutputError: ``out_dir`` is a file, a non-empty folder that is not a bundle, a bundle without
            ``overwrite``, or holds ``onnx_path`` itself.
        DeployError: bad options, quantization failure, or the accuracy gate.
        ExportError: a missing/corrupt input model.
    """
    DeployConfig(quantize=quantize, ort_format=ort_format, max_accuracy_drop=max_accuracy_drop,
                 latency_iters=latency_iters, threads=threads, reduce_range=reduce_range, calib_items=calib_items,
                 eval_items=eval_items)
    if quantize == "int8" and not calib_data:
        raise DeployError("deploy.quantize int8 (static) needs calib_data (real images to calibrate on)")
    if max_accuracy_drop is not None and not eval_data:
        raise DeployError("deploy.max_accuracy_drop needs eval_data (labelled images) to measure the drop")
    src = Path(onnx_path)
    mine = check_dir(out_dir, owned=bundle_files, overwrite=overwrite, what="bundle folder")
    if src.name in mine and src.exists() and Path(out_dir).is_dir() and src.resolve().parent == Path(out_dir).resolve():
        raise OutputError(f"the model {show(src)} is a file of the bundle in {show(out_dir)} it would replace: "
                          f"copy it elsewhere first or choose another folder")
    model = load_onnx(src)
    name, dims = _image_input(model)
    meta = metadata(model)
    pre_meta = model_preprocess(metadata_json(model, META_PREPROCESSING) or preprocessing, dims, calib_data or eval_data,
                           preprocess).to_dict()
    labels = metadata_json(model, META_LABELS) or labels
    meta.update({k: json.dumps(v) for k, v in ((META_PREPROCESSING, pre_meta), (META_LABELS, labels)) if v})
    fixed_batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
    report = DeployReport(bundle=str(out_dir), quantize=quantize)
    if quantize.startswith("int8"):
        report.reduce_range = (not host_has_int8_dot()) if reduce_range is None else reduce_range
    with tempfile.TemporaryDirectory(prefix="dsdeploy-deploy-") as tmp:
        work = Path(tmp)
        calib = None
        if quantize == "int8":
            calib = eval_images(calib_data, model_preprocess(pre_meta, dims, calib_data), split="train", limit=calib_items,
                            seed=seed, labelled=False, val_split=val_split)[0]
        qpath = work / "model.onnx"
        report.warnings += quantize_model(src, qpath, quantize, calib=calib, input_name=name, fixed_batch=fixed_batch,
                                          reduce_range=bool(report.reduce_range))
        qmodel = load_onnx(qpath)  # checker before use
        set_metadata(qmodel, {**meta, "dsdeploy.quantize": quantize, "dsdeploy.version": __version__})
        onnx.save_model(qmodel, str(qpath))
        sess = deployed_session(qpath)
        if eval_data:
            pre = model_preprocess(pre_meta, dims, eval_data)
            images, y, classes = eval_images(eval_data, pre, split="val", limit=eval_items, seed=seed, labelled=True,
                                         labels=labels, val_split=val_split)
            report.accuracy = {"data": eval_data, **accuracy(src, qpath, images, y, name, fixed_batch, classes)}
            drop = report.accuracy["drop_pts"]
            if max_accuracy_drop is not None and drop > max_accuracy_drop:
                raise DeployError(f"{quantize} bundle loses {drop:.2f} top-1 points on {eval_data} "
                                  f"(fp32 {report.accuracy['fp32_top1']:.2f}% -> {report.accuracy['bundle_top1']:.2f}%)"
                                  f", more than deploy.max_accuracy_drop {max_accuracy_drop}; nothing written")
        if latency_iters > 0:
            shape = (fixed_batch or 1, *model_preprocess(pre_meta, dims, "").input_shape()[1:])
            report.latency_ms = {"batch": shape[0], "threads": threads, "iters": latency_iters,
                                 "fp32": latency(src, name, shape, iters=latency_iters, threads=threads),
                                 "bundle": latency(qpath, name, shape, iters=latency_iters, threads=threads)}
        if ort_format:
            save_ort_format(qpath, work / "model.ort")
        for w in report.warnings:
            warnings.warn(w, stacklevel=2)
        with owned_dir(out_dir, owned=bundle_files, overwrite=overwrite, what="bundle folder") as bundle:
            shutil.copyfile(qpath, bundle / "model.onnx")
            if ort_format:
                shutil.copyfile(work / "model.ort", bundle / "model.ort")
            shutil.copyfile(Path(__file__).parent / "templates" / "predict.py", bundle / "predict.py")
            report.files = {p.name: sha256_file(p) for p in sorted(bundle.iterdir())}
            write_json(bundle / "manifest.json", _manifest(report, sess, qmodel, meta, pre_meta, labels, ort_format))
    return report


def bundle_files(folder: Path) -> set[str] | None:
    """The names a bundle deploy wrote in ``folder`` (from its ``manifest.json``), or None when it is no bundle."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        return None
    names = {"manifest.json", "predict.py"}
    names.update(n for n in (manifest.get("model"), manifest.get("ort_model")) if isinstance(n, str))
    hashes = manifest.get("sha256")
    names.update(n for n in (hashes if isinstance(hashes, dict) else {}) if isinstance(n, str))
    return names


SOURCE_KEYS = ("dsdeploy.source", "dsdeploy.source_model", "dsdeploy.plan_digest", "dsdeploy.exporter",
               "dsdeploy.exporter_fallback")  # the ONNX metadata a manifest's "source" repeats


def _manifest(report: DeployReport, sess, qmodel, meta: dict[str, str], pre: dict | None, labels: list | None,
              ort_format: bool) -> dict[str, Any]:
    opset = next((o.version for o in qmodel.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"format": BUNDLE_FORMAT, "format_version": 1, "dsdeploy_version": __version__,
            "model": "model.onnx", "ort_model": "model.ort" if ort_format else None, "quantize": report.quantize,
            "reduce_range": report.reduce_range,
            "opset": opset, **_io(sess), "preprocessing": pre, "labels": labels,
            "source": {k.removeprefix("dsdeploy."): v for k, v in meta.items() if k in SOURCE_KEYS},
            "accuracy": report.accuracy, "latency_ms": report.latency_ms, "warnings": report.warnings,
            "sha256": dict(report.files)}


def build_bundle(onnx_path: str | Path, out_dir: str | Path, *, artifact: str | Path | None = None,
                 quantize: str = "none", ort_format: bool = False, data: str | None = None,
                 max_accuracy_drop: float | None = None, seed: int = 0) -> DeployReport:
    """The pipeline's deploy stage: :func:`deploy` with ``data`` for calibration and evaluation, and the
    preprocessing/labels of the ``.dsd`` ``artifact`` used where the ONNX metadata lacks them."""
    meta: dict[str, Any] = {}
    if artifact is not None:
        meta = read_payload(artifact).get("metadata") or {}
    return deploy(onnx_path, out_dir, quantize=quantize, ort_format=ort_format, calib_data=data,
                  eval_data=data,
                  max_accuracy_drop=max_accuracy_drop, seed=seed, preprocessing=meta.get("preprocessing"),
                  labels=meta.get("labels"))
