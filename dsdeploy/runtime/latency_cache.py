"""The on-disk cache of measured layer latencies: one JSON file per measuring environment.

The environment (:func:`environment_key`) is everything a latency depends on besides the
layer: the EP and its options, the device/CPU signature, the ONNX Runtime version, the
intra-op threads, the batch and the timing protocol's spinning. Each environment gets its
own file under :func:`cache_dir`, so a different EP, device, version, thread count or batch
never reads another's numbers. Inside, entries are keyed by layer shape (+ rank and layout),
so identical layers are measured once. Files are written atomically
(:func:`dsdeploy.fsutil.write_json`) under a ``filelock`` lock, merging what another
process wrote meanwhile. A file that cannot be read raises :class:`LatencyCacheError`
(one line) unless the caller re-measures (``refresh``), which replaces it.

The file also keeps, per model (:func:`dsdeploy.runtime.latency_table.model_key`), the correction a
whole-model measurement taught (``corrections``: dense and DS-block factors, see
:mod:`dsdeploy.conversion.latency_convert`); it rides with the environment's key, and a ``refresh``
drops every correction of the file (they were relative to the entries it re-measures).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from filelock import FileLock

from dsdeploy.errors import LatencyCacheError
from dsdeploy.fsutil import show, write_json
from dsdeploy.runtime.providers import device_label
from dsdeploy.runtime.sysinfo import cpu_info, package_versions

SCHEMA = 2  # 2: the whole model is timed as `export` writes it (entries of 1 mixed with new ones would disagree)
CACHE_ENV = "DSDEPLOY_CACHE"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """``override``, else ``$DSDEPLOY_CACHE/latency``, else ``~/.cache/dsdeploy/latency``."""
    if override is not None:
        return Path(override)
    root = os.environ.get(CACHE_ENV)
    return Path(root) / "latency" if root else Path.home() / ".cache" / "dsdeploy" / "latency"


def device_signature(ep_name: str, options: dict[str, str] | None = None) -> str:
    """The hardware a latency belongs to: CPU model, ISA fast paths and usable cores, plus the
    EP's device for non-CPU EPs."""
    cpu = cpu_info()
    sig = f"{cpu['model']} [{cpu['summary']}] x{cpu['usable_cpus']}"
    if ep_name != "CPUExecutionProvider":
        sig += f"; {device_label(ep_name, options)}"
    return sig


def environment_key(ep_name: str, ep_options: dict[str, str] | None, *, threads: int | None, batch: int,
                    ort_version: str | None = None, spinning: bool = True, device: str | None = None,
                    precision: str = "fp32") -> dict[str, Any]:
    """Everything besides the layer that a measured latency depends on (JSON-able).

    ``ort_version`` defaults to the installed onnxruntime's; ``device`` to :func:`device_signature`;
    ``precision`` other than "fp32" (the graphs timed quantized) is part of the key (fp32 keys are as before).
    """
    if ort_version is None:
        ort_version = package_versions(("onnxruntime",))["onnxruntime"] or "unknown"
    return {"schema": SCHEMA, "ep": ep_name, "ep_options": dict(sorted((ep_options or {}).items())),
            "device": device or device_signature(ep_name, ep_options), "onnxruntime": str(ort_version),
            "threads": threads, "batch": int(batch), "spinning": bool(spinning),
            **({"precision": precision} if precision != "fp32" else {})}


def cache_file(env: dict[str, Any], folder: Path) -> Path:
    """The file of environment ``env`` in ``folder`` (a readable prefix + a digest of the whole key)."""
    digest = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]
    ep = env["ep"].replace("ExecutionProvider", "").lower()
    prec = f"-{env['precision']}" if env.get("precision", "fp32") != "fp32" else ""
    return folder / f"{ep}{prec}-b{env['batch']}-t{env['threads'] or 'auto'}-{digest}.json"


class LatencyCache:
    """Entries ``{key: {"ms": median, "min_ms": ..., "n": ...}}`` of one environment's file.

    ``refresh=True`` ignores (and on :meth:`flush` replaces) what the file holds.
    Raises LatencyCacheError when an existing file is unreadable and ``refresh`` is off.
    """

    def __init__(self, env: dict[str, Any], folder: str | os.PathLike | None = None, *, refresh: bool = False):
        self.env = env
        self.path = cache_file(env, cache_dir(folder))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LatencyCacheError(f"cannot create the latency cache folder {show(self.path.parent)}: "
                                    f"{exc.strerror or exc}") from None
        self._lock = FileLock(str(self.path) + ".lock", timeout=600)  # re-entrant: one object per cache
        self.refresh = refresh
        self.entries: dict[str, dict[str, Any]] = {} if refresh else self._read(strict=True)
        self.corrections: dict[str, dict[str, Any]] = {} if refresh else self._corrections()
        self.measured: dict[str, dict[str, Any]] = {}  # this run's measurements
        self._dirty = refresh  # a refresh rewrites the file even when nothing is measured (drops corrections)

    def _corrections(self) -> dict[str, dict[str, Any]]:
        """The file's per-model corrections (none when the file is absent or unreadable)."""
        with self._lock:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                return {}
        found = data.get("corrections") if isinstance(data, dict) and data.get("env") == self.env else None
        return {k: v for k, v in found.items() if isinstance(v, dict)} if isinstance(found, dict) else {}

    def _read(self, *, strict: bool) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        with self._lock:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                ok = (isinstance(data, dict) and data.get("env") == self.env and isinstance(data.get("entries"), dict)
                      and all(isinstance(v, dict) and isinstance(v.get("ms"), (int, float))
                              for v in data["entries"].values()))
                why = "" if ok else "not a latency table of this environment"
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                ok, why = False, (str(exc).splitlines() or [type(exc).__name__])[0]
        if ok:
            return dict(data["entries"])
        if strict:
            raise LatencyCacheError(f"latency cache {show(self.path)} is unreadable ({why}); delete it or "
                                    f"re-measure with refresh")
        return {}

    def get(self, key: str) -> dict[str, Any] | None:
        """The entry of ``key`` measured in this run or read from the file (None: measure it)."""
        return self.measured.get(key) or self.entries.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Record a measured entry (written by :meth:`flush`)."""
        self.measured[key] = value
        self._dirty = True

    def flush(self) -> None:
        """Merge this run's entries into the file, keeping what another process added meanwhile
        (an unreadable file is replaced), atomically."""
        if not self._dirty:
            return
        with self._lock:
            merged = {**self._read(strict=False), **self.measured}
            corrections = {} if self.refresh else self._corrections()
            self._write(merged, corrections)
        self._dirty = False

    def correction(self, model: str) -> dict[str, Any] | None:
        """The stored correction of ``model`` (a model key), None when there is none."""
        return self.corrections.get(model)

    def put_correction(self, model: str, value: dict[str, Any]) -> None:
        """Store ``value`` as ``model``'s correction now (atomically, keeping the file's other content)."""
        with self._lock:
            corrections = {**self._corrections(), model: value}
            self._write(self._read(strict=False), corrections)
        self.corrections[model] = value

    def _write(self, entries: dict[str, dict[str, Any]], corrections: dict[str, dict[str, Any]]) -> None:
        data: dict[str, Any] = {"env": self.env, "entries": dict(sorted(entries.items()))}
        if corrections:
            data["corrections"] = dict(sorted(corrections.items()))
        write_json(self.path, data)
