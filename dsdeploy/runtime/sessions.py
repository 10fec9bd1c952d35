"""ONNX Runtime session creation: the session options, a session on a chosen EP, the CPU reference session.

Every ``InferenceSession`` the package opens comes from here, so threads, log level,
profiling and non-UTF-8 model paths (:func:`dsdeploy.fsutil.ort_model`) are handled once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsdeploy.errors import DeployError, ExportError, ProviderError
from dsdeploy.fsutil import ort_model, utf8
from dsdeploy.runtime.providers import PLUGINS, EPConfig, pick_device


def session_options(threads: int | None, profile_prefix: str | None = None, *, spinning: bool = False):
    """``onnxruntime.SessionOptions`` with intra-op threads and optional profiling.

    Intra- and inter-op spinning are off unless ``spinning``: only a session being timed
    (:mod:`dsdeploy.runtime.timing`) spins, so no idle or interleaved session steals its cores.
    """
    import onnxruntime as ort  # heavy (~0.3 s): loaded only when a session is opened

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        so.add_session_config_entry(key, "1" if spinning else "0")
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = utf8(profile_prefix)  # the binding takes UTF-8 only
    return so


def create_session(model_path: str | bytes, cfg: EPConfig, threads: int | None = None,
                   profile_prefix: str | None = None, *, spinning: bool = False):
    """An InferenceSession of ``model_path`` (or a serialized model's bytes) on ``cfg`` (nodes it
    cannot run fall back to CPU); ``spinning`` only for a timed session (see :func:`session_options`).

    Plugin EPs are attached with ``add_provider_for_devices``; built-ins by name.
    Raises ProviderError when the EP is unavailable or rejects the model.
    """
    import onnxruntime as ort  # heavy (~0.3 s): loaded only when a session is opened

    so = session_options(threads, profile_prefix, spinning=spinning)
    what = "the model" if isinstance(model_path, bytes) else model_path
    source = model_path if isinstance(model_path, bytes) else ort_model(model_path)
    try:
        if cfg.name in PLUGINS:
            opts = dict(cfg.options)
            device = pick_device(cfg.name, opts.pop("device_type", None))
            so.add_provider_for_devices([device], opts)
            return ort.InferenceSession(source, so)
        providers: list[Any] = [(cfg.name, cfg.options)]
        if cfg.name != "CPUExecutionProvider":
            providers.append(("CPUExecutionProvider", {}))
        return ort.InferenceSession(source, so, providers=providers)
    except ProviderError:
        raise
    except Exception as exc:  # noqa: BLE001 - ORT's pybind errors: one actionable line for the user
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ProviderError(f"{cfg.alias} could not create a session for {what}: {msg}") from exc


def cpu_session(onnx_path: str | Path, threads: int | None = None):
    """An ONNX Runtime session on the CPU EP; a model ORT cannot load -> one-line ExportError."""
    import onnxruntime as ort  # heavy (~0.3 s): loaded only when a session is opened

    opts = session_options(threads)
    try:
        return ort.InferenceSession(ort_model(onnx_path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for bad models
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"ONNX Runtime cannot load {onnx_path}: {first}") from None


def save_ort_format(onnx_file: Path, ort_file: Path) -> None:
    """Save the ORT-format model ONNX Runtime Mobile loads (basic, portable optimizations)."""
    import onnxruntime as ort  # heavy (~0.3 s): loaded only when a session is opened

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(ort_file)
    opts.add_session_config_entry("session.save_model_format", "ORT")
    try:
        ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types
        first = (str(exc).strip().splitlines() or [""])[0]
        raise DeployError(f"ORT-format conversion failed: {first or type(exc).__name__}") from None
