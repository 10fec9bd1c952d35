"""Run the torch.onnx exporters: dynamo (``torch.export``) first, TorchScript when it fails.

:func:`export_auto` is the exporter choice of :func:`dsdeploy.export.onnx_export.export_onnx`:
"auto" exports with ``dynamo=True`` (torch's default since 2.9) and, when that raises, gives
a graph ONNX Runtime cannot run, or breaks parity, with the TorchScript exporter, returning
the reason; "dynamo"/"torchscript" run that one only. Every attempt is gated by parity
against torch on ONNX Runtime's CPU EP (:func:`gate`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsdeploy.errors import ExportError, ParityError
from dsdeploy.export.graph import load_onnx
from dsdeploy.export.parity import OutputParity, check_parity, raise_failures, random_inputs
from dsdeploy.runtime.sessions import cpu_session

DYNAMO_MIN_OPSET = 18
META_EXPORTER_FALLBACK = "dsdeploy.exporter_fallback"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def exporter_reason(exc: BaseException) -> str:
    """One line saying why an exporter failed: torch.onnx's "Exception summary" line when it has one."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [ln.strip() for ln in text.splitlines()]
    if "## Exception summary" in lines:
        after = [ln for ln in lines[lines.index("## Exception summary") + 1:] if ln]
        if after:
            return re.sub(r"^<class '(?:[\w.]+\.)?(\w+)'>", r"\1", after[0])[:300]
    first = next((ln for ln in lines if ln), type(exc).__name__)
    return f"{type(exc).__name__}: {first}"[:300]


@contextlib.contextmanager
def _quiet_logs():
    """While exporting: hold back log records below ERROR and what is printed (torch.export prints the
    traced graph when an attempt fails; the one-line reason is what the user gets)."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(before)


_TORCHLIB_OPS: dict[Any, Any] = {}  # onnxscript's get_torchlib_ops -> its result, kept for the process


def _torchlib_module() -> Any:
    """The onnxscript module whose ``get_torchlib_ops`` torch.onnx calls (through its lazy import), or None
    where torch/onnxscript are laid out otherwise (then nothing is patched)."""
    try:
        from torch.onnx._internal._lazy_import import onnxscript_apis

        module = importlib.import_module(onnxscript_apis._name)
        if not callable(getattr(module, "get_torchlib_ops", None)):
            return None
        return module
    except (ImportError, AttributeError):  # another torch/onnxscript layout: export as torch does
        return None


@contextlib.contextmanager
def _torchlib_ops_reused():
    """While dsdeploy exports: onnxscript's ATen->ONNX function table is built once per process.

    torch.onnx (2.9 to 2.14) rebuilds its exporter registry on every dynamo export
    (``ONNXRegistry.from_torchlib``) and asks onnxscript for that table
    (``onnxscript._framework_apis.torch_2_11.get_torchlib_ops``), which re-parses the Python source of
    its traced functions (~560 entries) each time. Measured with torch 2.14.1 + onnxscript 0.7.2 (2-core
    AMD EPYC, busy): that call is 0.35-0.57 of the 0.9-1.1 CPU seconds a small CNN's dynamo export
    takes; with the table kept, exports after the first took 0.6 CPU s instead of 0.9-1.2 (an
    ``export`` of a .dsd exports the original too; the test suite exports many models per process).
    The table depends only on what is installed; each call gets its own shallow copy. The ONNX
    written is the same with or without this (tests/test_exporters.py). Where torch's internals
    differ (no lazy ``onnxscript_apis``, no ``get_torchlib_ops``) this is a no-op, and so is a use
    inside an active one (nested, another thread); outside dsdeploy's export nothing changes.
    """
    module = _torchlib_module()
    original = getattr(module, "get_torchlib_ops", None)
    if module is None or getattr(original, "_dsdeploy_reused", False):
        yield
        return

    def reused():
        if original not in _TORCHLIB_OPS:
            _TORCHLIB_OPS[original] = original()
        return copy.copy(_TORCHLIB_OPS[original])

    reused._dsdeploy_reused = True
    module.get_torchlib_ops = reused
    try:
        yield
    finally:
        module.get_torchlib_ops = original


@contextlib.contextmanager
def _dynamo_context():
    """Around a dynamo export: quiet logs (:func:`_quiet_logs`), the torchlib table kept (:func:`_torchlib_ops_reused`)."""
    with _quiet_logs(), _torchlib_ops_reused():
        yield


def run_exporter(model: nn.Module, x: torch.Tensor, dest: Path, exporter: str, opset: int,
                 dynamic_batch: bool, n_outputs: int) -> int:
    """Write the raw export to ``dest``; returns the opset actually used."""
    outputs = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        if exporter == "torchscript":
            axes = {n: {0: "batch"} for n in ["input", *outputs]} if dynamic_batch else None
            torch.onnx.export(model, (x,), str(dest), dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=outputs, dynamic_axes=axes, do_constant_folding=True)
            return opset
        used = max(opset, DYNAMO_MIN_OPSET)
        shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
        prog = torch.onnx.export(model, (x,), None, dynamo=True, opset_version=used, input_names=["input"],
                                 output_names=outputs, dynamic_shapes=shapes, external_data=False, verbose=False)
        prog.save(str(dest), external_data=False)
        return used


def gate(model: nn.Module, onnx_path: Path, cases: list[tuple[torch.Tensor, str]], stage: str, atol: float,
         rtol: float) -> list[OutputParity]:
    """Parity on every case (collecting all failures); raises ONE ParityError listing them."""
    sess = cpu_session(onnx_path)
    results: list[OutputParity] = []
    for x, label in cases:
        results += check_parity(model, onnx_path, x, atol=atol, rtol=rtol, stage=stage, raise_on_fail=False,
                                label=f"{stage}, {label}", session=sess)
    raise_failures(results, stage)
    return results


@dataclass
class Attempt:
    """What every exporter attempt of one :func:`export_onnx` call shares."""

    model: nn.Module
    shape: tuple[int, ...]
    opset: int
    dynamic_batch: bool
    n_outputs: int
    cases: list[tuple[torch.Tensor, str]]
    atol: float
    rtol: float
    seed: int
    tmpdir: Path


def export_with(a: Attempt, exporter: str, warns: list[str]) -> tuple[Any, Path, list[OutputParity], int]:
    """Export with one exporter into its own temporary folder and gate it: ``(onnx model, its path, parity,
    opset used)``. Raises ExportError (the exporter failed, or ONNX Runtime cannot run the graph) or
    ParityError."""
    folder = a.tmpdir / exporter
    folder.mkdir()
    raw_path = folder / "raw.onnx"
    example = random_inputs(a.shape, a.seed)
    if exporter == "dynamo" and a.dynamic_batch and a.shape[0] == 1:
        example = random_inputs((2, *a.shape[1:]), a.seed)  # torch.export specialises a size-1 dim
    try:
        with _dynamo_context() if exporter == "dynamo" else contextlib.nullcontext():
            used_opset = run_exporter(a.model, example, raw_path, exporter, a.opset, a.dynamic_batch, a.n_outputs)
    except Exception as exc:  # exporters raise many types; the user gets one line
        raise ExportError(f"torch.onnx.export ({exporter}) failed for {type(a.model).__name__}: "
                          f"{exporter_reason(exc)}") from None
    if exporter == "dynamo" and any(p.name != "raw.onnx" for p in folder.iterdir()):
        warns.append("the dynamo exporter wrote an external data file; it was folded into the single file")
    raw = load_onnx(raw_path)  # checker before use
    try:
        parity = gate(a.model, raw_path, a.cases, "export", a.atol, a.rtol)
    except ParityError:
        raise
    except ExportError as exc:  # ORT cannot run the graph: name the cause, not the temp file
        msg = str(exc).replace(str(raw_path), "the exported model")
        raise ExportError(msg.splitlines()[0] if msg else str(exc)) from None
    return raw, raw_path, parity, used_opset


def export_auto(a: Attempt, exporter: str, warns: list[str]) -> tuple[str, str | None, tuple]:
    """``(exporter used, why "auto" fell back or None, export_with's result)``.

    "auto": dynamo when ``opset`` >= 18, else TorchScript (the opset asked for); a dynamo
    export that fails or breaks parity is redone with TorchScript, the reason warned.
    """
    if exporter == "torchscript":
        try:
            return exporter, None, export_with(a, exporter, warns)
        except ParityError:
            raise
        except ExportError as exc:  # the other exporter is the user's way out
            raise ExportError(f"{exc}; the dynamo exporter may work: set export.exporter to dynamo") from None
    if exporter == "dynamo":
        return exporter, None, export_with(a, exporter, warns)
    if a.opset < DYNAMO_MIN_OPSET:
        return "torchscript", (f"opset {a.opset} was asked for and the dynamo exporter writes opset "
                               f"{DYNAMO_MIN_OPSET} or later"), export_with(a, "torchscript", warns)
    try:
        return "dynamo", None, export_with(a, "dynamo", warns)
    except ExportError as exc:  # ParityError included: TorchScript gets its chance, gated the same way
        reason = first_line(exc)
    try:
        result = export_with(a, "torchscript", warns)
    except ExportError as exc:  # both failed: say both, keeping the TorchScript error's type (exit code)
        raise type(exc)(f"{first_line(exc)} (TorchScript exporter, tried after the dynamo exporter: "
                        f"{reason})") from None
    warns.append(f"the dynamo exporter did not give a valid export ({reason}); exported with the TorchScript "
                 f"exporter instead")
    return "torchscript", reason, result
