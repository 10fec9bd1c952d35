"""ONNX Runtime execution providers (EPs): discovery, plugin registration, per-EP configuration.

Built-in EPs come from ``onnxruntime.get_available_providers()``; plugin EPs (the
OpenVINO plugin ``onnxruntime-ep-openvino``) are registered once per process with
``onnxruntime.register_execution_provider_library`` and run on the devices the plugin
claims (``onnxruntime.get_ep_devices()``). Short aliases (cpu, openvino, cuda, ...) map
to EP names. Every EP configuration carries the numeric precision it computes in.
"""

from __future__ import annotations

import importlib
import json
import threading
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

from dsdeploy.errors import ProviderError

ALIASES: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "ov": "OpenVINOExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
    "acl": "ACLExecutionProvider",
    "azure": "AzureExecutionProvider",
}
SHORT = {v: k for k, v in reversed(list(ALIASES.items()))}  # EP name -> first alias

# Plugin EPs we know how to register: EP name -> (python package, distribution name).
PLUGINS: dict[str, tuple[str, str]] = {
    "OpenVINOExecutionProvider": ("onnxruntime_ep_openvino", "onnxruntime-ep-openvino"),
}
# Devices a built-in EP runs on (built-ins are not always listed by get_ep_devices).
BUILTIN_DEVICE = {"CPUExecutionProvider": "CPU", "CUDAExecutionProvider": "GPU", "TensorrtExecutionProvider": "GPU",
                  "DmlExecutionProvider": "GPU", "ROCMExecutionProvider": "GPU", "MIGraphXExecutionProvider": "GPU",
                  "CoreMLExecutionProvider": "CPU/GPU/ANE", "QNNExecutionProvider": "NPU",
                  "XnnpackExecutionProvider": "CPU", "AzureExecutionProvider": "remote"}
OPENVINO_PRECISIONS = {"fp32": "f32", "f32": "f32", "bf16": "bf16", "fp16": "f16", "f16": "f16", "default": None}

_lock = threading.Lock()
_registered: dict[str, str] = {}        # EP name -> library path (registered in this process)
_register_errors: dict[str, str] = {}   # EP name -> why registration failed


@dataclass
class ProviderInfo:
    """One EP as seen on this machine: availability, kind, devices, version."""

    name: str
    alias: str | None
    kind: str                                   # "builtin" | "plugin"
    available: bool
    devices: list[str] = field(default_factory=list)
    version: str | None = None
    library: str | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EPConfig:
    """An EP ready to use: its name, the options passed to it, and its precision label."""

    name: str
    options: dict[str, str] = field(default_factory=dict)
    precision: str = "fp32"

    @property
    def alias(self) -> str:
        return SHORT.get(self.name, self.name)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "alias": self.alias, "options": dict(self.options), "precision": self.precision}


def resolve_ep_name(name: str) -> str:
    """``"openvino"`` -> ``"OpenVINOExecutionProvider"``; full EP names pass through (case-insensitive)."""
    key = name.strip()
    if key.lower() in ALIASES:
        return ALIASES[key.lower()]
    for full in ALIASES.values():
        if full.lower() == key.lower():
            return full
    if key.endswith("ExecutionProvider"):
        return key
    raise ProviderError(f"unknown execution provider {name!r}; use one of {', '.join(sorted(set(ALIASES)))} "
                        f"or a full name like CPUExecutionProvider")


def _dist_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def register_plugins() -> dict[str, str]:
    """Register every installed plugin EP once per process; returns EP name -> library path.

    A plugin whose package is not installed is left out; one that fails to load is
    recorded (see ``list_providers``) rather than raised, so other EPs stay usable.
    """
    # onnxruntime is heavy: `dsdeploy --help` and the library import stay without it
    import onnxruntime as ort

    with _lock:
        for ep, (module, _dist) in PLUGINS.items():
            if ep in _registered or ep in _register_errors:
                continue
            try:
                mod = importlib.import_module(module)
            except ImportError:
                continue
            try:
                path = mod.get_library_path()
                ort.register_execution_provider_library(ep, path)
            except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail type; recorded, not swallowed
                if "already registered" in str(exc):
                    _registered[ep] = str(getattr(mod, "get_library_path", lambda: "")())
                    continue
                _register_errors[ep] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
                continue
            _registered[ep] = path
        return dict(_registered)


def ep_devices(ep_name: str) -> list:
    """The ``OrtEpDevice`` objects ``ep_name`` claims on this machine (after plugin registration)."""
    # onnxruntime is heavy: `dsdeploy --help` and the library import stay without it
    import onnxruntime as ort

    register_plugins()
    return [d for d in ort.get_ep_devices() if d.ep_name == ep_name]


def pick_device(ep_name: str, want: str | None = None):
    """The one ``OrtEpDevice`` of plugin ``ep_name`` to use: ``want`` (e.g. ``GPU``) or else CPU, else the first.

    Raises ProviderError (naming the available EPs) when the plugin claims no device.
    """
    devs = ep_devices(ep_name)
    if not devs:
        check_available(ep_name)

    def kind(d) -> str:
        return str(dict(d.ep_metadata).get("ov_device") or str(d.device.type).rsplit(".", 1)[-1]).upper()

    want_u = (want or "CPU").upper()
    for d in devs:
        if kind(d).startswith(want_u):
            return d
    if want:
        raise ProviderError(f"{SHORT.get(ep_name, ep_name)} has no {want} device here; it has "
                            f"{', '.join(describe_device(d) for d in devs)}")
    return devs[0]


def describe_device(dev) -> str:
    """``OrtEpDevice`` -> ``"CPU (Intel, id 0)"``-style text."""
    hw = dev.device
    kind = str(hw.type).rsplit(".", 1)[-1]
    label = dict(dev.ep_metadata).get("ov_device")
    extra = f", {label}" if label else ""
    return f"{kind} ({hw.vendor}, id {hw.device_id}{extra})"


def device_label(ep_name: str, options: dict[str, str] | None = None) -> str:
    """The device ``ep_name`` runs on, for result tables (a plugin's chosen device, else the built-in's kind)."""
    if ep_name in PLUGINS:
        return describe_device(pick_device(ep_name, (options or {}).get("device_type")))
    return BUILTIN_DEVICE.get(ep_name, "?")


def cpu_vendor() -> str:
    """The vendor of this machine's CPU as ONNX Runtime sees it (e.g. ``AMD``, ``Intel``)."""
    # onnxruntime is heavy: `dsdeploy --help` and the library import stay without it
    import onnxruntime as ort

    for d in ort.get_ep_devices():
        if str(d.device.type).endswith("CPU"):
            return str(d.device.vendor)
    return "unknown"


def list_providers() -> list[ProviderInfo]:
    """Every EP this ONNX Runtime build or an installed plugin offers, with its devices.

    Plugin EPs that are installed but claim no device here are listed as unavailable,
    with the reason in ``note``.
    """
    # onnxruntime is heavy: `dsdeploy --help` and the library import stay without it
    import onnxruntime as ort

    register_plugins()
    out = []
    for name in ort.get_available_providers():
        devs = [describe_device(d) for d in ep_devices(name)]
        out.append(ProviderInfo(name, SHORT.get(name), "builtin", True, devs or [BUILTIN_DEVICE.get(name, "?")],
                                ort.__version__))
    for name, (_module, dist) in PLUGINS.items():
        version = _dist_version(dist)
        if version is None:
            out.append(ProviderInfo(name, SHORT.get(name), "plugin", False,
                                    note=f"not installed (pip install {dist})"))
            continue
        if name in _register_errors:
            out.append(ProviderInfo(name, SHORT.get(name), "plugin", False, version=version,
                                    note=f"failed to register: {_register_errors[name]}"))
            continue
        devs = ep_devices(name)
        note = "" if devs else (f"registered, but the plugin claims none of this machine's devices "
                                f"(CPU vendor: {cpu_vendor()}; the OpenVINO plugin claims Intel devices only)")
        out.append(ProviderInfo(name, SHORT.get(name), "plugin", bool(devs), [describe_device(d) for d in devs],
                                version, _registered.get(name), note))
    return out


def available_names() -> list[str]:
    """Names (with aliases) of the EPs usable here, for error messages."""
    return [f"{p.alias or p.name}" for p in list_providers() if p.available]


def check_available(ep_name: str) -> ProviderInfo:
    """Return the ProviderInfo of ``ep_name`` or raise ProviderError naming the available EPs."""
    infos = {p.name: p for p in list_providers()}
    info = infos.get(ep_name)
    if info is None or not info.available:
        why = f" ({info.note})" if info is not None and info.note else ""
        raise ProviderError(f"execution provider {SHORT.get(ep_name, ep_name)} is not available here{why}; "
                            f"available: {', '.join(available_names())} (or pass skip_unavailable=True)")
    return info


def parse_ep_options(items: list[str] | tuple[str, ...] | None) -> dict[str, dict[str, str]]:
    """``["openvino:precision=bf16", "tensorrt:trt_fp16_enable=1"]`` -> {EP name: {key: value}}."""
    out: dict[str, dict[str, str]] = {}
    for item in items or ():
        ep, sep, kv = item.partition(":")
        key, eq, value = kv.partition("=")
        if not sep or not eq or not key.strip():
            raise ProviderError(f"bad EP option {item!r}: write EP:KEY=VALUE, e.g. openvino:precision=bf16")
        out.setdefault(resolve_ep_name(ep), {})[key.strip()] = value.strip()
    return out


def _openvino_config(options: dict[str, str], threads: int | None) -> EPConfig:
    opts = dict(options)
    precision = opts.pop("precision", None)
    if "load_config" in opts:
        if precision is not None:
            raise ProviderError("give either openvino:precision or openvino:load_config, not both")
        try:
            hint = json.loads(opts["load_config"]).get("CPU", {}).get("INFERENCE_PRECISION_HINT")
        except (json.JSONDecodeError, AttributeError):
            raise ProviderError("openvino:load_config must be JSON like {\"CPU\":{\"INFERENCE_PRECISION_HINT\":"
                                "\"f32\"}}") from None
        label = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(str(hint).lower(), "plugin default")
    else:
        key = (precision or "fp32").lower()
        if key not in OPENVINO_PRECISIONS:
            raise ProviderError(f"openvino:precision={precision} is not one of {', '.join(OPENVINO_PRECISIONS)}")
        hint = OPENVINO_PRECISIONS[key]
        cpu_cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint} if hint else {}
        if threads:  # OpenVINO's own thread count, set like ORT's intra-op threads for a fair comparison
            cpu_cfg["INFERENCE_NUM_THREADS"] = int(threads)
        if cpu_cfg:
            opts["load_config"] = json.dumps({"CPU": cpu_cfg})
        label = {"f32": "fp32", "bf16": "bf16", "f16": "fp16", None: "plugin default (bf16 on CPUs with AMX/"
                 "AVX512-BF16, else fp32)"}[hint]
    return EPConfig("OpenVINOExecutionProvider", opts, label)


def ep_config(ep_name: str, options: dict[str, str] | None = None, threads: int | None = None) -> EPConfig:
    """The options and precision label for ``ep_name``.

    OpenVINO defaults to fp32 (``load_config`` INFERENCE_PRECISION_HINT f32; the plugin
    would otherwise pick bf16 on CPUs with AMX); ``precision=bf16|fp16|default`` switches.
    TensorRT's precision follows ``trt_fp16_enable``/``trt_int8_enable``.
    """
    opts = {k: str(v) for k, v in (options or {}).items()}
    if ep_name == "OpenVINOExecutionProvider":
        return _openvino_config(opts, threads)
    precision = opts.pop("precision", "fp32") if ep_name != "TensorrtExecutionProvider" else "fp32"
    if ep_name == "TensorrtExecutionProvider":
        if opts.get("trt_int8_enable", "0").lower() in ("1", "true"):
            precision = "int8 (TensorRT mixed)"
        elif opts.get("trt_fp16_enable", "0").lower() in ("1", "true"):
            precision = "fp16 (TensorRT mixed)"
    return EPConfig(ep_name, opts, precision)


def nodes_by_provider(profile_path: str) -> dict[str, int]:
    """Count the graph nodes (kernels after ORT's graph optimisation) each EP ran, from a profile JSON.

    A subgraph an EP compiled (e.g. OpenVINO) counts as one node.
    """
    with open(profile_path, encoding="utf-8") as f:
        events = json.load(f)
    seen: dict[str, set[str]] = {}
    for ev in events:
        args = ev.get("args") or {}
        if ev.get("cat") == "Node" and "provider" in args:
            node = str(ev.get("name", "")).removesuffix("_kernel_time").removesuffix("_fence_before") \
                .removesuffix("_fence_after")
            seen.setdefault(args["provider"], set()).add(node)
    return {ep: len(nodes) for ep, nodes in sorted(seen.items())}


def fallback_report(requested: str, session_providers: list[str], nodes: dict[str, int]) -> dict[str, Any]:
    """Whether ``requested`` really ran the model: ``none`` / ``partial`` / ``full`` fallback to CPU.

    Judged from the profiled node counts when there are any, else from the session's EP list.
    """
    total = sum(nodes.values())
    on_ep = nodes.get(requested, 0)
    if requested == "CPUExecutionProvider":
        status = "none"
    elif total:
        status = "full" if on_ep == 0 else "partial" if on_ep < total else "none"
    else:
        status = "none" if requested in session_providers else "full"
    return {"status": status, "requested": requested, "session_providers": list(session_providers),
            "nodes_on_requested": on_ep, "nodes_total": total, "nodes_by_provider": dict(nodes)}
