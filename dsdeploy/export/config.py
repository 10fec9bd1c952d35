"""The export and deploy stages' options: ``ExportConfig`` and ``DeployConfig`` (the recipe's [export]/[deploy]).

One definition and one validation for the library, the CLI (which maps its flags onto these
objects) and ``dsdeploy run`` (whose recipe sections are these dataclasses). Messages name the
field as ``export.FIELD`` / ``deploy.FIELD``; the CLI shows its flag instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsdeploy.errors import DeployError, ExportError
from dsdeploy.export.parity import ATOL, RTOL
from dsdeploy.ranges import check_number

EXPORTERS = ("auto", "dynamo", "torchscript")
QUANT_MODES = ("none", "int8", "int8-dynamic", "fp16")
PRECISIONS = ("fp32", "int8", "int8-dynamic")  # what a latency table or a verification can time graphs in


@dataclass
class ExportConfig:
    """How :func:`dsdeploy.export.onnx_export.export_onnx` exports and gates a model.

    Attributes:
        opset: ONNX opset (>= 7; the dynamo exporter writes at least 18, so "auto" takes
            TorchScript for a lower one).
        dynamic_batch: axis 0 dynamic (verified at two batch sizes), else the example's fixed batch.
        simplify: run onnxsim; a result that fails or breaks parity is discarded with a warning.
        exporter: "auto" (the ``torch.export``-based exporter, ``dynamo=True``; when it fails or
            breaks parity, TorchScript, the reason warned and recorded in the ONNX metadata),
            "dynamo" or "torchscript" (``dynamo=False``): that one only.
        atol, rtol: parity gate ``max|onnx - torch| <= atol + rtol * max|torch|`` (>= 0; see
            :mod:`dsdeploy.export.parity`).
    """

    opset: int = 18
    dynamic_batch: bool = True
    simplify: bool = True
    exporter: str = "auto"
    atol: float = ATOL
    rtol: float = RTOL

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ExportError (a choice) or ConfigError (a number) naming the first field out of range (``export.atol``)."""
        if self.exporter not in EXPORTERS:
            raise ExportError(f"export.exporter must be one of {', '.join(EXPORTERS)}, got {self.exporter!r}")
        check_number(self.opset, "export.opset", low=7, integer=True)
        check_number(self.atol, "export.atol", low=0)
        check_number(self.rtol, "export.rtol", low=0)


@dataclass
class DeployConfig:
    """How :func:`dsdeploy.export.bundle.deploy` builds and gates a bundle.

    Attributes:
        quantize: "none", "int8" (static QDQ per-channel, calibrated on ``calib_data``),
            "int8-dynamic" or "fp16".
        ort_format: also write ``model.ort`` for ONNX Runtime Mobile.
        max_accuracy_drop: top-1 points (>= 0) the bundle may lose against the fp32 model on the
            labelled ``eval_data``; more fails the deploy and nothing is written. None: no gate.
        latency_iters: timed CPU-EP runs per model at batch 1 (0 skips the latency check).
        threads: CPU-EP intra-op threads for the latency check (None: ONNX Runtime's choice).
        reduce_range: 7-bit INT8 weights; None = when this CPU lacks VNNI/AMX (whose absence
            makes 8-bit weights saturate).
        calib_items: images INT8 calibration reads (>= 1).
        eval_items: images the accuracy gate scores (None: the whole validation split).
    """

    quantize: str = "none"
    ort_format: bool = False
    max_accuracy_drop: float | None = None
    latency_iters: int = 30
    threads: int | None = None
    reduce_range: bool | None = None
    calib_items: int = 256
    eval_items: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise DeployError (a choice) or ConfigError (a number) naming the field (``deploy.max_accuracy_drop``)."""
        if self.quantize not in QUANT_MODES:
            raise DeployError(f"deploy.quantize must be one of {', '.join(QUANT_MODES)}, got {self.quantize!r}")
        check_number(self.max_accuracy_drop, "deploy.max_accuracy_drop (top-1 points)", low=0, optional=True)
        check_number(self.latency_iters, "deploy.latency_iters", low=0, integer=True)
        check_number(self.threads, "deploy.threads", low=1, integer=True, optional=True)
        check_number(self.calib_items, "deploy.calib_items", low=1, integer=True)
        check_number(self.eval_items, "deploy.eval_items", low=1, integer=True, optional=True)
