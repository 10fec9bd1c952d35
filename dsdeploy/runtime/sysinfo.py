"""The environment a benchmark ran in: CPU model and ISA flags, OS, package versions.

Recorded with every benchmark so that a number can be traced to the machine and the
runtime that produced it.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
from importlib import metadata
from typing import Any

# ISA features that change inference speed, by /proc/cpuinfo flag name.
KEY_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
PACKAGES = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-ep-openvino", "onnx", "numpy", "torch")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def cpu_info() -> dict[str, Any]:
    """``{"model", "vendor", "logical_cpus", "usable_cpus", "flags": {flag: bool}, "summary"}``.

    ``summary`` names the fast paths present, e.g. ``"AVX2 FMA"`` or ``"AVX2 AVX-512 VNNI AMX"``.
    """
    model, flags = _cpuinfo()
    present = {f: f in flags for f in KEY_FLAGS}
    parts = [name for name, keys in (("AVX2", ("avx2",)), ("FMA", ("fma",)), ("AVX-512", ("avx512f",)),
                                     ("VNNI", ("avx512_vnni", "avx_vnni")), ("AVX512-BF16", ("avx512_bf16",)),
                                     ("AMX", ("amx_tile",))) if any(present[k] for k in keys)]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    vendor = "AMD" if "AMD" in model.upper() else "Intel" if "INTEL" in model.upper() else platform.machine()
    return {"model": model, "vendor": vendor, "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "flags": present, "summary": " ".join(parts) or "none of AVX2/AVX-512/VNNI/AMX"}


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed distribution versions (None when not installed); reads metadata, imports nothing."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment() -> dict[str, Any]:
    """Everything recorded about the machine: CPU, OS, Python, package versions."""
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu_info(), "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "packages": package_versions(), "load_average_1_5_15m": load}


class PeakMemory:
    """Peak resident memory (RSS) of this process while the ``with`` block runs.

    Samples ``/proc/self/statm`` from a background thread every ``interval`` seconds
    (ONNX Runtime releases the GIL while it runs, so samples keep coming). Where
    ``/proc`` is missing it falls back to the ``resource.getrusage`` peak (ru_maxrss),
    which only shows a growth past the process's earlier peak; ``method`` says which.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.baseline_mb = self.peak_mb = 0.0
        self.method = ""
        self._stop = None
        self._thread = None

    @staticmethod
    def _rss_mb() -> float | None:
        try:
            with open("/proc/self/statm", encoding="ascii") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            return None

    @staticmethod
    def _maxrss_mb() -> float:
        import resource  # Unix only: this fallback never runs on Windows

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = self._rss_mb()
            if rss is not None and rss > self.peak_mb:
                self.peak_mb = rss

    def __enter__(self) -> "PeakMemory":
        rss = self._rss_mb()
        if rss is None:
            self.method = "resource.getrusage ru_maxrss delta (process peak; no /proc)"
            self.baseline_mb = self.peak_mb = self._maxrss_mb()
            return self
        self.method = f"RSS sampling of /proc/self/statm every {self.interval * 1000:g} ms"
        self.baseline_mb = self.peak_mb = rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            rss = self._rss_mb()
            self.peak_mb = max(self.peak_mb, rss or 0.0)
        else:
            self.peak_mb = self._maxrss_mb()

    def to_dict(self) -> dict[str, Any]:
        return {"peak_rss_mb": round(self.peak_mb, 1), "baseline_rss_mb": round(self.baseline_mb, 1),
                "delta_mb": round(self.peak_mb - self.baseline_mb, 1), "method": self.method}
