"""Conversion planned on measured latency, then verified: measure the converted model, re-plan once if it misses.

:func:`convert_planned` is what :func:`dsdeploy.api.convert` calls. Without latency in the
policy it is :func:`dsdeploy.conversion.rewrite.convert`. With a ``speedup`` /
``target_latency_ms`` (or a ``mac_budget`` with a ``provider``) it measures (or reads from the
cache) the model's latency table on the target (:func:`dsdeploy.runtime.latency_table.latency_table`)
and plans on it. A latency target is then verified, not predicted: the original and the
converted model are exported as ``dsdeploy export`` writes them and timed alternately by the same
protocol on the same EP, batch and threads (:func:`measure_pair`); when the measured latency misses
the target by more than :data:`TOLERANCE` either way (too slow, or faster than asked: accuracy
given away), the table is corrected from the two measurements
(:func:`corrected_table`: the dense side's and the DS blocks' factors) and the plan is made once
more, then measured again, and the slowest attempt that meets the target is kept; a target the
corrected table cannot reach raises PlanError with the best reachable speedup. Every attempt is recorded (the history entry's ``latency``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from torch import nn

from dsdeploy.conversion.plan import Plan, Policy
from dsdeploy.conversion.rewrite import ConversionResult, convert
from dsdeploy.errors import PlanError
from dsdeploy.runtime import providers as eps
from dsdeploy.runtime.latency_table import TABLE_PROTOCOL, LatencyTable, latency_table
from dsdeploy.runtime.timing import measure_samples

TOLERANCE = 0.05  # a measured latency this far from the target (either way) triggers the one re-plan
VERIFY_ITERS = 60
VERIFY_ROUNDS = 3


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
                 iters: int = VERIFY_ITERS, rounds: int = VERIFY_ROUNDS) -> tuple[float, float, str, dict[str, int]]:
    """Median ms of ``original`` and ``converted`` as ``dsdeploy export`` writes them
    (:func:`dsdeploy.export.onnx_export.export_bytes`: the graph a user deploys and benches), on the
    policy's EP/threads at ``shape``; the protocol's line; the timed converted graph's op counts
    (:func:`dsdeploy.export.graph.op_counts`, as ``export`` reports them).

    The two are timed in ``rounds`` alternating rounds (A, B, A, B, ...; one session alive at a time, as
    ``bench`` times one model) of ``iters // rounds`` runs each, so a drift in the machine's speed hits
    both; each figure is the median of all its runs.
    """
    import onnx  # heavy: only when verifying

    from dsdeploy.export.graph import op_counts
    from dsdeploy.export.onnx_export import export_bytes

    t = target_of(policy)
    cfg = eps.ep_config(eps.resolve_ep_name(t["provider"]), None, t["threads"])
    rounds = max(1, min(rounds, iters))
    per_round = dataclasses.replace(TABLE_PROTOCOL, iters=max(1, iters // rounds))
    graphs = [export_bytes(m, shape) for m in (original, converted)]
    samples: list[list[float]] = [[], []]
    for _ in range(rounds):
        for i, graph in enumerate(graphs):
            samples[i] += measure_samples(graph, ep=cfg, threads=t["threads"], protocol=per_round, batch=shape[0])
    protocol = dataclasses.replace(TABLE_PROTOCOL, iters=len(samples[0]))
    line = (f"{protocol.describe()}; the exported graphs (as `export` writes them), original and converted "
            f"alternating in {rounds} rounds")
    ops = op_counts(onnx.load_from_string(graphs[1]))
    return float(np.median(samples[0])), float(np.median(samples[1])), line, ops


def corrected_table(table: LatencyTable, plan: Plan, original_ms: float, converted_ms: float
                    ) -> tuple[LatencyTable, float, float]:
    """``table`` corrected from two whole-model measurements: ``(table, dense factor, block factor)``.

    The measured original fixes the factor of the dense side (remainder and dense convs):
    ``a = original_ms / table.model_ms``. The measured converted model then fixes the DS blocks'
    factor ``b`` from ``converted_ms = a * (remainder + kept dense ms) + b * (chosen blocks' ms)``
    (clamped to [0.1, 10] against noise; 1 when no block was chosen). A block whose in-graph cost differs from its
    small graph's thus scales every block of the re-plan, not a fixed remainder.
    """
    a = original_ms / table.model_ms if table.model_ms > 0 else 1.0
    dense_kept = sum(d.dense_ms for d in plan.layers if d.dense_ms is not None and not d.convert)
    blocks = sum(d.block_ms for d in plan.layers if d.dense_ms is not None and d.convert and d.block_ms is not None)
    b = 1.0
    if blocks > 0:
        b = min(10.0, max(0.1, (converted_ms - a * (table.remainder_ms + dense_kept)) / blocks))
    return table.scaled(a, b), a, b


def _attempt(res: ConversionResult, original_ms: float, converted_ms: float) -> dict[str, Any]:
    lat = res.plan.policy["latency"]
    predicted = lat["predicted_ms"]
    return {"target_ms": lat["target_ms"], "predicted_ms": predicted, "predicted_speedup": lat["predicted_speedup"],
            "original_ms": round(original_ms, 5), "measured_ms": round(converted_ms, 5),
            "measured_speedup": round(original_ms / converted_ms, 4) if converted_ms > 0 else None,
            "prediction_error": round((predicted - converted_ms) / converted_ms, 4) if converted_ms > 0 else None}


def _choose(tried: list[tuple[ConversionResult, float, float]], policy: Policy
            ) -> tuple[ConversionResult, float, float, int]:
    """Of the measured attempts ``(result, original_ms, converted_ms)``: the slowest that meets the target
    (it converts least, so it keeps the most accuracy), else the fastest; with its index."""
    def goal(o: float) -> float:
        return o / policy.speedup if policy.speedup else float(policy.target_latency_ms)

    ok = [i for i, (_, o, c) in enumerate(tried) if c <= goal(o) * (1 + TOLERANCE)]
    i = max(ok, key=lambda i: tried[i][2] / goal(tried[i][1])) if ok else \
        min(range(len(tried)), key=lambda i: tried[i][2] / goal(tried[i][1]))
    return (*tried[i], i)


def convert_planned(model: nn.Module, input_shape: tuple[int, ...], policy: Policy, *,
                    costs: Mapping[str, Mapping[int, float]] | None = None, cost_name: str | None = None,
                    cache_dir: Any = None, verify: bool = True, name: str = "model",
                    progress: Callable[[str], None] | None = None) -> tuple[ConversionResult, dict[str, Any] | None]:
    """Convert a copy of ``model`` under ``policy``; with latency in the policy, plan on the measured table.

    Args:
        model: the original model (never modified). input_shape: ``(N, C, *spatial)`` traced with.
        policy: a validated :class:`Policy`. costs / cost_name: measured per-layer costs (data allocation).
        cache_dir: the latency cache folder (default ``$DSDEPLOY_CACHE/latency`` or ``~/.cache/dsdeploy``).
        verify: measure the converted model against the original (latency targets) and re-plan once when it
            misses the target by more than :data:`TOLERANCE` either way (too slow; or faster than asked,
            which gives away accuracy); of the two, the slowest that meets the target is kept
            (``chosen``: its attempt index), else the fastest.

    Returns:
        ``(result, latency)``: ``latency`` is None without latency in the policy; else a JSON-able
        record: the target (provider, batch, threads), the table's whole-model ms and cache file,
        and per attempt the target, predicted and measured ms, the measured speedup, the prediction
        error (``(predicted - measured) / measured``), the timed graph's ``op_counts`` and, for the
        re-plan, the correction's ``dense_factor``/``block_factor``; ``met`` says whether the last attempt is
        within :data:`TOLERANCE` of the target. The same record is in ``result.plan.policy["verified"]``.

    Raises:
        PlanError: an out-of-reach target (with the best reachable speedup), also when the table corrected
            after a measured miss cannot reach it (the message gives the measured speedup); ProviderError: the EP
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
    original_ms, converted_ms, protocol, ops = measure_pair(model, res.model, shape, policy)
    record["protocol"] = protocol
    record["attempts"].append({**_attempt(res, original_ms, converted_ms), "op_counts": ops})
    goal = original_ms / policy.speedup if policy.speedup else float(policy.target_latency_ms)
    tried = [(res, original_ms, converted_ms)]
    if abs(converted_ms - goal) > goal * TOLERANCE:  # too slow, or faster than asked (accuracy given away)
        fixed, a, b = corrected_table(table, res.plan, original_ms, converted_ms)
        try:
            res = convert(model, input_shape=input_shape, policy=policy, costs=costs, cost_name=cost_name,
                          latency=fixed)
        except PlanError as exc:
            if converted_ms < goal:  # already fast enough: keep it
                res = None
            else:
                raise PlanError(f"measured x{original_ms / converted_ms:.2f} ({converted_ms:.3f} ms against "
                                f"{original_ms:.3f} ms) where x{res.plan.policy['latency']['predicted_speedup']:.2f} "
                                f"was predicted; with the table corrected from that measurement, {exc}") from None
        if res is not None:
            original_ms, converted_ms, _, ops = measure_pair(model, res.model, shape, policy)
            record["attempts"].append({**_attempt(res, original_ms, converted_ms), "op_counts": ops,
                                       "dense_factor": round(a, 4), "block_factor": round(b, 4)})
            tried.append((res, original_ms, converted_ms))
    res, original_ms, converted_ms, record["chosen"] = _choose(tried, policy)
    goal = original_ms / policy.speedup if policy.speedup else float(policy.target_latency_ms)
    record["met"] = bool(converted_ms <= goal * (1 + TOLERANCE))
    res.plan.policy["verified"] = record
    return res, record
