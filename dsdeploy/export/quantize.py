"""Quantization of an ONNX model for a bundle: INT8 static (QDQ, calibrated on real images), INT8 dynamic, FP16.

Modes (onnxruntime.quantization):
- ``int8``: ``quant_pre_process`` first, then static QDQ quantization, per-channel int8
  weights, int8 activations calibrated (MinMax) on real images.
- ``int8-dynamic``: ``quant_pre_process`` then dynamic quantization (uint8 weights: the
  CPU EP's ConvInteger kernel takes uint8).
- ``fp16``: ``onnxruntime.transformers.float16.convert_float_to_float16`` with fp32
  inputs/outputs kept (``onnxconverter-common`` is not needed). The CPU EP has few fp16
  kernels (it inserts Casts where one is missing); fp16 is meant mainly for GPU EPs.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from dsdeploy.errors import DeployError
from dsdeploy.export.config import PRECISIONS
from dsdeploy.export.graph import toposort

FP16_WARNING = ("fp16 bundle: the ONNX Runtime CPU EP has few fp16 kernels (where one is missing it inserts "
                "Casts and computes in fp32); fp16 pays off mainly on GPU EPs")


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type name when the message is empty)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


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
    warns: list[str] = []
    if mode == "none":
        shutil.copyfile(src, dest)
        return warns
    try:
        if mode == "fp16":
            # heavy (onnxruntime.transformers pulls in more): loaded only for fp16
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
            toposort(model.graph)  # keep_io_types appends its input Casts after their consumers
            onnx.save_model(model, str(dest))
            warns.append(FP16_WARNING)
            return warns
        # onnxruntime.quantization is heavy (~1 s, sympy): loaded only when quantizing
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
        raise DeployError(f"{mode} quantization failed: {type(exc).__name__}: {first_line(exc)}") from None
    return warns


def quantize_bytes(graph: bytes, mode: str, input_shape: tuple[int, ...], *, seed: int = 0,
                   reduce_range: bool | None = None) -> bytes:
    """``graph`` (a serialized fp32 ONNX model with one image input) quantized as ``deploy --quantize mode``
    would quantize it (:func:`quantize_model`), for timing: ``fp32`` returns it unchanged.

    ``int8`` calibrates on two batches of standard-normal inputs of ``input_shape`` ``(N, C, *spatial)``
    drawn from ``seed``: an INT8 graph's latency does not depend on its scales, so random inputs time it as
    the deployed one runs. ``reduce_range`` as ``deploy`` (None: 7-bit weights when this CPU lacks VNNI/AMX).

    Raises:
        DeployError: the quantization failed, or ``mode`` is not one of :data:`PRECISIONS`.
    """
    if mode == "fp32":
        return graph
    if mode not in PRECISIONS:
        raise DeployError(f"precision must be one of {', '.join(PRECISIONS)}, got {mode!r}")
    name = onnx.load_from_string(graph).graph.input[0].name
    calib = np.random.default_rng(seed).standard_normal((2 * input_shape[0], *input_shape[1:])).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="dsdeploy-quant-") as tmp:
        src, dest = Path(tmp) / "model.onnx", Path(tmp) / "quantized.onnx"
        src.write_bytes(graph)
        quantize_model(src, dest, mode, calib=calib, input_name=name, fixed_batch=input_shape[0],
                       reduce_range=(not host_has_int8_dot()) if reduce_range is None else reduce_range)
        return dest.read_bytes()
