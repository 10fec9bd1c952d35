"""Conversion planned on measured latency, then verified: measure the converted model, re-plan once if it misses.

:func:`convert_planned` is what :func:`dsdeploy.api.convert` calls. Without latency in the
policy it is :func:`dsdeploy.conversion.rewrite.convert`. With a ``speedup`` /
``target_latency_ms`` (or a ``mac_budget`` with a ``provider``) it measures (or reads from the
cache) the model's latency table on the target (:func:`dsdeploy.runtime.latency_table.latency_table`)
and plans on it. A latency target is then verified, not predicted: the original and the
converted model are exported to ONNX and timed by the same protocol on the same EP, batch and
threads; when the measured speedup misses the target by more than :data:`TOLERANCE`, the part
the table does not cover (the remainder) is corrected from the measurement and the plan is made
once more, then measured again. Every attempt is recorded (the history entry's ``latency``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from dsdeploy.conversion.plan import Policy
from dsdeploy.conversion.rewrite import ConversionResult, convert
from dsdeploy.export.small_graphs import to_onnx
from dsdeploy.runtime import providers as eps
from dsdeploy.runtime.latency_table import TABLE_PROTOCOL, latency_table
from dsdeploy.runtime.timing import measure

TOLERANCE = 0.05  # a measured speedup this far below the target triggers the one re-plan
VERIFY_ITERS = 50


def physical_cores() -> int:
    """Physical CPU cores usable by this process (from /proc/cpuinfo core ids), else 2."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 2
    cores: set[tuple[str, str]] = set()
    phys = core = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "physical id":
                    phys = value
                elif key == "core id":
                    core = value
                elif not key and core:
                    cores.add((phys, core))
                    core = ""
        if core:
            cores.add((phys, core))
    except OSError:
        return 2
    return max(1, min(len(cores), usable)) if cores else 2


def target_of(policy: Policy) -> dict[str, Any]:
    """Where latencies are measured: ``{"provider", "batch", "threads"}`` with the defaults filled in."""
    return {"provider": policy.provider or "cpu", "batch": int(policy.batch),
            "threads": policy.threads or physical_cores()}


def measure_table(model: nn.Module, policy: Policy, input_shape: tuple[int, ...], *, cache_dir: Any = None,
                  name: str = "model", progress: Callable[[str], None] | None = None):
    """The latency table of ``model`` at ``input_shape`` with the policy's batch, on its provider/threads."""
    t = target_of(policy)
    shape = (t["batch"], *input_shape[1:])
    return latency_table(model, shape, provider=t["provider"], threads=t["threads"], policy=policy,
                         cache_dir=cache_dir, name=name, progress=progress)


def measure_pair(original: nn.Module, converted: nn.Module, shape: tuple[int, ...], policy: Policy,
                 iters: int = VERIFY_ITERS) -> tuple[float, float, str]:
    """Median ms of ``original`` and ``converted`` exported to ONNX (BatchNorm folded by the exporter as the
    table's graphs are) and timed one after the other by the timing protocol; and the protocol's line."""
    t = target_of(policy)
    cfg = eps.ep_config(eps.resolve_ep_name(t["provider"]), None, t["threads"])
    protocol = dataclasses.replace(TABLE_PROTOCOL, iters=iters)
    out = [measure(to_onnx(m, shape), ep=cfg, threads=t["threads"], protocol=protocol).p50_ms
           for m in (original, converted)]
    return out[0], out[1], protocol.describe()


def _attempt(res: ConversionResult, original_ms: float, converted_ms: float) -> dict[str, Any]:
    lat = res.plan.policy["latency"]
    predicted = lat["predicted_ms"]
    return {"target_ms": lat["target_ms"], "predicted_ms": predicted, "predicted_speedup": lat["predicted_speedup"],
            "original_ms": round(original_ms, 5), "measured_ms": round(converted_ms, 5),
            "measured_speedup": round(original_ms / converted_ms, 4) if converted_ms > 0 else None,
            "prediction_error": round((predicted - converted_ms) / converted_ms, 4) if converted_ms > 0 else None}


def convert_planned(model: nn.Module, input_shape: tuple[int, ...], policy: Policy, *,
                    costs: Mapping[str, Mapping[int, float]] | None = None, cost_name: str | None = None,
                    cache_dir: Any = None, verify: bool = True, name: str = "model",
                    progress: Callable[[str], None] | None = None) -> tuple[ConversionResult, dict[str, Any] | None]:
    """Convert a copy of ``model`` under ``policy``; with latency in the policy, plan on the measured table.

    Args:
        model: the original model (never modified). input_shape: ``(N, C, *spatial)`` traced with.
        policy: a validated :class:`Policy`. costs / cost_name: measured per-layer costs (data allocation).
        cache_dir: the latency cache folder (default ``$DSDEPLOY_CACHE/latency`` or ``~/.cache/dsdeploy``).
        verify: measure the converted model against the original (latency targets) and re-plan once on a miss.

    Returns:
        ``(result, latency)``: ``latency`` is None without latency in the policy; else a JSON-able
        record: the target (provider, batch, threads), the table's whole-model ms and cache file,
        and per attempt the target, predicted and measured ms, the measured speedup and the prediction
        error (``(predicted - measured) / measured``); ``met`` says whether the last attempt is
        within :data:`TOLERANCE` of the target. The same record is in ``result.plan.policy["verified"]``.

    Raises:
        PlanError: an out-of-reach target (with the best reachable speedup); ProviderError: the EP
        cannot run; NothingToConvertError: nothing converts.
    """
    if not policy.measures_latency:
        return convert(model, input_shape=input_shape, policy=policy, costs=costs, cost_name=cost_name), None
    table = measure_table(model, policy, input_shape, cache_dir=cache_dir, name=name, progress=progress)
    res = convert(model, input_shape=input_shape, policy=policy, costs=costs, cost_name=cost_name, latency=table)
    record: dict[str, Any] = {**target_of(policy), "table_model_ms": round(table.model_ms, 5),
                              "cache_file": table.cache_file, "graphs_measured": table.measured, "attempts": []}
    if not policy.latency_target or not verify:
        return res, record
    shape = (int(policy.batch), *input_shape[1:])
    original_ms, converted_ms, protocol = measure_pair(model, res.model, shape, policy)
    record["protocol"] = protocol
    record["attempts"].append(_attempt(res, original_ms, converted_ms))
    goal = original_ms / policy.speedup if policy.speedup else float(policy.target_latency_ms)
    if converted_ms > goal * (1 + TOLERANCE):
        chosen = sum(d.block_ms if d.convert else d.dense_ms for d in res.plan.layers if d.dense_ms is not None)
        correction = (converted_ms - chosen) - (table.remainder_ms - table.correction_ms)
        fixed = dataclasses.replace(table, model_ms=original_ms, correction_ms=correction
                                    + (table.model_ms - original_ms))
        res = convert(model, input_shape=input_shape, policy=policy, costs=costs, cost_name=cost_name, latency=fixed)
        original_ms, converted_ms, _ = measure_pair(model, res.model, shape, policy)
        record["attempts"].append({**_attempt(res, original_ms, converted_ms), "remainder_corrected_ms":
                                   round(fixed.remainder_ms, 5)})
    goal = original_ms / policy.speedup if policy.speedup else float(policy.target_latency_ms)
    record["met"] = bool(converted_ms <= goal * (1 + TOLERANCE))
    res.plan.policy["verified"] = record
    return res, record
