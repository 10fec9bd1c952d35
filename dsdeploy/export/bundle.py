"""Deployment bundles: optional INT8/FP16 quantization, accuracy gate, manifest, predict.py.

``deploy(onnx_path, out_dir, ...)`` builds everything in a temporary folder and swaps it
into place (``fsutil.owned_dir``) only when every step and the accuracy gate passed; an existing
folder is written only when empty or a bundle deploy wrote (``overwrite``), and then only
the bundle's own files are replaced.

Quantization (onnxruntime.quantization):
- ``int8``: ``quant_pre_process`` first, then static QDQ quantization, per-channel int8
  weights, int8 activations calibrated (MinMax) on real images from ``calib_data``.
- ``int8-dynamic``: ``quant_pre_process`` then dynamic quantization (uint8 weights: the
  CPU EP's ConvInteger kernel takes uint8).
- ``fp16``: ``onnxruntime.transformers.float16.convert_float_to_float16`` with fp32
  inputs/outputs kept (``onnxconverter-common`` is not needed). The CPU EP has few fp16
  kernels (it inserts Casts where one is missing); fp16 is meant mainly for GPU EPs.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dsdeploy import __version__
from dsdeploy.errors import DataError, DeployError, ExportError, OutputError
from dsdeploy.export.graph import (
    META_LABELS,
    META_PREPROCESSING,
    load_onnx,
    metadata,
    metadata_json,
    set_metadata,
    toposort,
)
from dsdeploy.fsutil import (
    check_dir,
    owned_dir,
    sha256_file,
    show,
    write_json,
)

log = logging.getLogger(__name__)

QUANT_MODES = ("none", "int8", "int8-dynamic", "fp16")
BUNDLE_FORMAT = "dsdeploy-bundle"
FP16_WARNING = ("fp16 bundle: the ONNX Runtime CPU EP has few fp16 kernels (where one is missing it inserts "
                "Casts and computes in fp32); fp16 pays off mainly on GPU EPs")


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


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _image_input(model) -> tuple[str, list[Any]]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(inputs[0].type.tensor_type.shape.dim) != 4:
        raise DeployError("deploy needs a model with one NCHW image input; this one has "
                          f"{[i.name for i in inputs]}")
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims


def _preprocess(meta_pre: dict[str, Any] | None, dims: list[Any], spec: str | None,
                overrides: dict[str, Any] | None = None):
    """The model's Preprocess (:func:`dsdeploy.data.preprocessing.resolve`: overrides > its metadata >
    derived from a fixed input shape); DeployError when nothing gives the image size."""
    from dsdeploy.data.preprocessing import resolve

    fixed = all(isinstance(d, int) and d > 0 for d in dims[1:])
    if not meta_pre and not fixed and not (overrides or {}).get("size"):
        raise DeployError(f"the model has no {META_PREPROCESSING} metadata and a dynamic image size; export it "
                          f"with dsdeploy export so its preprocessing is recorded, or give the image size (size)")
    return resolve(meta_pre, dims, overrides, data=spec)


def _images(spec: str, pre, *, split: str, limit: int | None, seed: int, labelled: bool,
            labels: list[str] | None = None, val_split: float = 0.2):
    """(images float32 NCHW, labels, classes) from ``spec``'s split (falls back to the other split);
    labels mapped to the model's ``labels`` by name (dsdeploy.data.labels)."""
    from dsdeploy.data.datasets import load_data

    splits = load_data(spec, pre, seed=seed, labelled=labelled, limit=limit, model_labels=labels if labelled else None,
                       val_split=val_split)
    ds = getattr(splits, split)
    if ds is None or not len(ds):
        ds = splits.val if split == "train" else splits.train
    if ds is None or not len(ds):
        raise DataError(f"no images in {spec}")
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return np.stack([x.numpy() for x in xs]).astype(np.float32), np.asarray(ys), splits.classes


class _Calibration:
    """An onnxruntime CalibrationDataReader over preprocessed images (batches of ``batch``).

    With ``fixed`` (a model exported with a static batch), every chunk has exactly
    ``batch`` images: a short last chunk is filled with images from the start of the set
    (real images, so the activation ranges stay those of the data; zeros would not be).
    """

    def __init__(self, name: str, images: np.ndarray, batch: int, fixed: bool = False) -> None:
        self.name, self.images, self.batch, self.fixed, self.pos = name, images, batch, fixed, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.images):
            return None
        chunk = self.images[self.pos:self.pos + self.batch]
        self.pos += self.batch
        if self.fixed and len(chunk) < self.batch:
            idx = np.arange(self.batch - len(chunk)) % len(self.images)
            chunk = np.concatenate([chunk, self.images[idx]])
        return {self.name: chunk}

    def rewind(self) -> None:
        self.pos = 0


def host_has_int8_dot() -> bool:
    """Whether this CPU has VNNI/AMX int8 dot-product instructions (Linux /proc/cpuinfo; False elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set(next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), []))
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def quantize_model(src: Path, dest: Path, mode: str, *, calib: np.ndarray | None = None, input_name: str = "input",
                   fixed_batch: int | None = None, reduce_range: bool = False) -> list[str]:
    """Write ``src`` quantized per ``mode`` to ``dest``; returns warnings. Failures -> DeployError.

    ``reduce_range`` quantizes weights to 7 bits: x86 CPUs without VNNI compute u8 x s8 with
    VPMADDUBSW, whose 16-bit intermediate saturates with full-range weights (measured here:
    the digits sample lost 2.8 top-1 points with 8-bit weights, 0 with 7-bit).
    """
    import onnx

    warns: list[str] = []
    if mode == "none":
        shutil.copyfile(src, dest)
        return warns
    try:
        if mode == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
            toposort(model.graph)  # keep_io_types appends its input Casts after their consumers
            onnx.save_model(model, str(dest))
            warns.append(FP16_WARNING)
            return warns
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = dest.with_name("preprocessed.onnx")
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        if mode == "int8-dynamic":
            quantize_dynamic(str(pre), str(dest), per_channel=True, reduce_range=reduce_range,
                             weight_type=QuantType.QUInt8)
        else:
            batch = fixed_batch or 16
            reader = _Calibration(input_name, calib, batch, fixed=fixed_batch is not None)
            quantize_static(str(pre), str(dest), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=reduce_range, activation_type=QuantType.QInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        pre.unlink(missing_ok=True)
    except (RuntimeError, ValueError, KeyError, TypeError, onnx.checker.ValidationError) as exc:
        raise DeployError(f"{mode} quantization failed: {type(exc).__name__}: {_first_line(exc)}") from None
    return warns


def _session(path: Path):
    from dsdeploy.export.parity import cpu_session

    try:
        return cpu_session(path)
    except ExportError as exc:
        raise DeployError(f"the deployed model does not load in ONNX Runtime: {exc}") from None


def _run(sess, name: str, images: np.ndarray, fixed_batch: int | None, batch: int = 64) -> np.ndarray:
    step = fixed_batch or batch
    outs = []
    for i in range(0, len(images), step):
        x = images[i:i + step]
        n = len(x)
        if fixed_batch and n < fixed_batch:
            x = np.concatenate([x, np.zeros((fixed_batch - n, *x.shape[1:]), np.float32)])
        outs.append(np.asarray(sess.run(None, {name: x})[0])[:n].reshape(n, -1))
    return np.concatenate(outs)


def accuracy(fp32: Path, bundle: Path, images: np.ndarray, y: np.ndarray, name: str,
             fixed_batch: int | None, classes: list[str] | None = None) -> dict[str, Any]:
    """Top-1 (%) of the fp32 and deployed models on the same images, and their agreement
    (DataError when the data has more ``classes`` than the model has outputs)."""
    from dsdeploy.data.labels import check_outputs

    s32 = _run(_session(fp32), name, images, fixed_batch)
    check_outputs(classes, s32.shape[1], "the model")
    p32 = s32.argmax(1)
    pb = _run(_session(bundle), name, images, fixed_batch).argmax(1)
    a32, ab = float((p32 == y).mean() * 100), float((pb == y).mean() * 100)
    return {"fp32_top1": round(a32, 3), "bundle_top1": round(ab, 3), "drop_pts": round(a32 - ab, 3),
            "agreement": round(float((p32 == pb).mean() * 100), 3), "images": int(len(y))}


def latency(path: Path, name: str, shape: tuple[int, ...], *, warmup: int = 5, iters: int = 30,
            threads: int | None = None) -> dict[str, float]:
    """Median and p90 latency (ms) of one CPU-EP run on a random batch of ``shape``."""
    from dsdeploy.export.parity import cpu_session

    sess = cpu_session(path, threads)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(warmup):
        sess.run(None, {name: x})
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {"p50": round(statistics.median(times), 4), "p90": round(times[int(0.9 * (len(times) - 1))], 4)}


def write_ort(onnx_file: Path, ort_file: Path) -> None:
    """Save the ORT-format model ONNX Runtime Mobile loads (basic, portable optimizations)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(ort_file)
    opts.add_session_config_entry("session.save_model_format", "ORT")
    try:
        ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types
        raise DeployError(f"ORT-format conversion failed: {_first_line(exc)}") from None


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
    if quantize not in QUANT_MODES:
        raise DeployError(f"unknown --quantize {quantize!r}; choose one of {', '.join(QUANT_MODES)}")
    if quantize == "int8" and not calib_data:
        raise DeployError("--quantize int8 (static) needs --calib-data DATA (real images to calibrate on)")
    if max_accuracy_drop is not None and not eval_data:
        raise DeployError("--max-accuracy-drop needs --eval-data DATA (labelled images) to measure the drop")
    src = Path(onnx_path)
    mine = check_dir(out_dir, owned=bundle_files, overwrite=overwrite, what="bundle folder")
    if src.name in mine and src.exists() and Path(out_dir).is_dir() and src.resolve().parent == Path(out_dir).resolve():
        raise OutputError(f"the model {show(src)} is a file of the bundle in {show(out_dir)} it would replace: "
                          f"copy it elsewhere first or choose another folder")
    model = load_onnx(src)
    name, dims = _image_input(model)
    meta = metadata(model)
    pre_meta = _preprocess(metadata_json(model, META_PREPROCESSING) or preprocessing, dims, calib_data or eval_data,
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
            calib = _images(calib_data, _preprocess(pre_meta, dims, calib_data), split="train", limit=calib_items,
                            seed=seed, labelled=False, val_split=val_split)[0]
        qpath = work / "model.onnx"
        report.warnings += quantize_model(src, qpath, quantize, calib=calib, input_name=name, fixed_batch=fixed_batch,
                                          reduce_range=bool(report.reduce_range))
        qmodel = load_onnx(qpath)  # checker before use
        set_metadata(qmodel, {**meta, "dsdeploy.quantize": quantize, "dsdeploy.version": __version__})
        import onnx

        onnx.save_model(qmodel, str(qpath))
        sess = _session(qpath)
        if eval_data:
            pre = _preprocess(pre_meta, dims, eval_data)
            images, y, classes = _images(eval_data, pre, split="val", limit=eval_items, seed=seed, labelled=True,
                                         labels=labels, val_split=val_split)
            report.accuracy = {"data": eval_data, **accuracy(src, qpath, images, y, name, fixed_batch, classes)}
            drop = report.accuracy["drop_pts"]
            if max_accuracy_drop is not None and drop > max_accuracy_drop:
                raise DeployError(f"{quantize} bundle loses {drop:.2f} top-1 points on {eval_data} "
                                  f"(fp32 {report.accuracy['fp32_top1']:.2f}% -> {report.accuracy['bundle_top1']:.2f}%)"
                                  f", more than --max-accuracy-drop {max_accuracy_drop}; nothing written")
        if latency_iters > 0:
            shape = (fixed_batch or 1, *_preprocess(pre_meta, dims, "").input_shape()[1:])
            report.latency_ms = {"batch": shape[0], "threads": threads, "iters": latency_iters,
                                 "fp32": latency(src, name, shape, iters=latency_iters, threads=threads),
                                 "bundle": latency(qpath, name, shape, iters=latency_iters, threads=threads)}
        if ort_format:
            write_ort(qpath, work / "model.ort")
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


def _manifest(report: DeployReport, sess, qmodel, meta: dict[str, str], pre: dict | None, labels: list | None,
              ort_format: bool) -> dict[str, Any]:
    opset = next((o.version for o in qmodel.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"format": BUNDLE_FORMAT, "format_version": 1, "dsdeploy_version": __version__,
            "model": "model.onnx", "ort_model": "model.ort" if ort_format else None, "quantize": report.quantize,
            "reduce_range": report.reduce_range,
            "opset": opset, **_io(sess), "preprocessing": pre, "labels": labels,
            "source": {k.removeprefix("dsdeploy."): v for k, v in meta.items()
                       if k in ("dsdeploy.source", "dsdeploy.source_model", "dsdeploy.plan_digest", "dsdeploy.exporter")},
            "accuracy": report.accuracy, "latency_ms": report.latency_ms, "warnings": report.warnings,
            "sha256": dict(report.files)}


def build_bundle(onnx_path: str | Path, out_dir: str | Path, *, artifact: str | Path | None = None,
                 quantize: str = "none", ort_format: bool = False, data: str | None = None,
                 max_accuracy_drop: float | None = None, seed: int = 0) -> DeployReport:
    """The pipeline's deploy stage: :func:`deploy` with ``data`` for calibration and evaluation, and the
    preprocessing/labels of the ``.dsd`` ``artifact`` used where the ONNX metadata lacks them."""
    meta: dict[str, Any] = {}
    if artifact is not None:
        from dsdeploy.convert.artifact import (
            read_payload,  # metadata only: no model is rebuilt, no code imported
        )

        meta = read_payload(artifact).get("metadata") or {}
    return deploy(onnx_path, out_dir, quantize=quantize, ort_format=ort_format, calib_data=data,
                  eval_data=data,
                  max_accuracy_drop=max_accuracy_drop, seed=seed, preprocessing=meta.get("preprocessing"),
                  labels=meta.get("labels"))
