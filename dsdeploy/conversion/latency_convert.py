"""Conversion planned on measured latency, then verified: measure the converted model, re-plan on a
significant miss (at most :data:`MAX_REPLANS` times), and keep what the measurement taught.

:func:`convert_planned` is what :func:`dsdeploy.api.convert` calls. Without latency in the
policy it is :func:`dsdeploy.conversion.rewrite.convert`. With a ``speedup`` /
``target_latency_ms`` (or a ``mac_budget`` with a ``provider``) it measures (or reads from the
cache) the model's latency table on the target (:func:`dsdeploy.runtime.latency_table.latency_table`)
and plans on it, corrected by what an earlier verification of the same model in the same
environment stored with the table (``correction``, ``source: cache``). A latency target is then
verified, not predicted: the original and the converted model are exported as ``dsdeploy export``
writes them and timed in alternating rounds until a 95 % bootstrap interval of the speedup is
narrow enough or a cap is reached (:mod:`dsdeploy.conversion.latency_verify`). Only a *significant*
miss (the whole interval more than :data:`TOLERANCE` off the target, either way: too slow, or faster
than asked, which gives accuracy away) corrects the table from the measurement (:func:`corrected_table`:
the dense side's and the DS blocks' factors) and plans again, then measures again, at most
:data:`MAX_REPLANS` times; when two attempts bracket the target (one faster than asked, one slower) the
next plan takes the factors between theirs. The slowest attempt that meets the target is kept. The last measurement's factors are stored with the cached
table for the next run. A target the corrected table cannot reach raises PlanError with the best
reachable speedup. Every attempt is recorded (the history entry's ``latency``).

A quantized ``precision`` (int8, int8-dynamic) plans differently after its first plan: small INT8 graphs do not
add up to a quantized model, so no factor corrects the table; the table's plans are searched by measuring the
whole quantized pair instead (:mod:`dsdeploy.conversion.latency_search`), and no correction is stored or applied.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from dsdeploy.conversion.latency_attempts import (
    TOLERANCE,
    attempt_record,
    caveat,
    choose,
    ratio,
    signature,
    target_of,
    trusted_hit,
)
from dsdeploy.conversion.latency_search import plan_at, verify_by_search
from dsdeploy.conversion.latency_verify import Verification, measure_pair
from dsdeploy.conversion.plan import Plan, Policy
from dsdeploy.conversion.rewrite import ConversionResult, convert
from dsdeploy.errors import NothingToConvertError, PlanError
from dsdeploy.runtime.latency_cache import LatencyCache
from dsdeploy.runtime.latency_table import LatencyTable, latency_table

MAX_REPLANS = 2  # re-plans after the first attempt (each one exported and measured)
FACTOR_RANGE = (0.1, 10.0)  # the DS blocks' correction factor (learned; stored: also a product of two) stays within


def measure_table(model: nn.Module, policy: Policy, input_shape: tuple[int, ...], *, cache_dir: Any = None,
                  name: str = "model", progress: Callable[[str], None] | None = None, refresh: bool = False):
    """The latency table of ``model`` at ``input_shape`` with the policy's batch, on its provider/threads
    (``refresh``: re-measure it and drop its stored corrections)."""
    t = target_of(policy)
    shape = (t["batch"], *input_shape[1:])
    return latency_table(model, shape, provider=t["provider"], threads=t["threads"], policy=policy,
                         cache_dir=cache_dir, name=name, progress=progress, refresh=refresh,
                         precision=t["precision"])


def corrected_table(table: LatencyTable, plan: Plan, original_ms: float, converted_ms: float
                    ) -> tuple[LatencyTable, float, float]:
    """``table`` corrected from two whole-model measurements: ``(table, dense factor, block factor)``.

    The measured original fixes the factor of the dense side (remainder and dense convs):
    ``a = original_ms / table.model_ms``. The measured converted model then fixes the DS blocks'
    factor ``b`` from ``converted_ms = a * (remainder + kept dense ms) + b * (chosen blocks' ms)``
    (clamped to :data:`FACTOR_RANGE` against noise; 1 when no block was chosen). A block whose in-graph cost differs from its
    small graph's thus scales every block of the re-plan, not a fixed remainder.
    """
    a = original_ms / table.model_ms if table.model_ms > 0 else 1.0
    dense_kept = sum(d.dense_ms for d in plan.layers if d.dense_ms is not None and not d.convert)
    blocks = sum(d.block_ms for d in plan.layers if d.dense_ms is not None and d.convert and d.block_ms is not None)
    b = 1.0
    if blocks > 0:
        b = min(FACTOR_RANGE[1], max(FACTOR_RANGE[0], (converted_ms - a * (table.remainder_ms + dense_kept)) / blocks))
    return table.scaled(a, b), a, b


def _factors(value: Any) -> tuple[float, float] | None:
    """A stored correction's ``(dense, block)`` factors, None when it is not a usable one."""
    if not isinstance(value, dict):
        return None
    a, b = value.get("dense_factor"), value.get("block_factor")
    ok = all(isinstance(x, (int, float)) and 0 < x < float("inf") for x in (a, b))
    return (float(a), float(b)) if ok else None


def convert_planned(model: nn.Module, input_shape: tuple[int, ...], policy: Policy, *,
                    costs: Mapping[str, Mapping[int, float]] | None = None, cost_name: str | None = None,
                    cache_dir: Any = None, verify: bool = True, refresh: bool = False, name: str = "model",
                    progress: Callable[[str], None] | None = None) -> tuple[ConversionResult, dict[str, Any] | None]:
    """Convert a copy of ``model`` under ``policy``; with latency in the policy, plan on the measured table.

    Args:
        model: the original model (never modified). input_shape: ``(N, C, *spatial)`` traced with.
        policy: a validated :class:`Policy`. costs / cost_name: measured per-layer costs (data allocation).
        cache_dir: the latency cache folder (default ``$DSDEPLOY_CACHE/latency`` or ``~/.cache/dsdeploy``).
        verify: measure the converted model against the original (latency targets) in alternating rounds
            (:func:`dsdeploy.conversion.latency_verify.measure_pair`) and re-plan (at most :data:`MAX_REPLANS`
            times; a plan already measured ends it) while the miss is significant: the whole 95 % interval more than :data:`TOLERANCE` off the target either way (too
            slow; or faster than asked, which gives away accuracy); of the attempts, the slowest that meets
            the target is kept (``chosen``: its attempt index; among those whose whole interval meets it, when
            there are any), else the fastest. The last measurement's
            correction is stored with the cached table. A quantized precision searches the table's plans by
            measurement instead (:func:`dsdeploy.conversion.latency_search.verify_by_search`: ``search``
            "measured", each attempt's ``planned_ms``; no correction stored).
        refresh: re-measure the latency table and ignore (drop) the stored correction.

    Returns:
        ``(result, latency)``: ``latency`` is None without latency in the policy; else a JSON-able
        record: the target (provider, batch, threads), the table's whole-model ms and cache file,
        ``correction`` (``{"source": "cache", "dense_factor", "block_factor", "rounds", "ci95", ...}``) when
        a stored one was applied before the first plan, and per attempt the target, predicted and measured
        ms, the measured speedup with its ``ci95`` (speedup) / ``ci95_ms`` (converted ms) and ``rounds``,
        ``resolved`` (the interval is narrow enough to tell a :data:`TOLERANCE` miss from a hit),
        ``interval`` ("met" / "missed": the whole interval does; else "undecided"), the prediction error
        (``(predicted - measured) / measured``), the timed graph's ``op_counts`` and, for the re-plan, the
        correction's ``dense_factor``/``block_factor``; ``regimes`` (faster, slower: each ``rounds``,
        ``original_ms``, ``measured_ms``, ``measured_speedup``) when its rounds ran at two speeds
        (:func:`dsdeploy.conversion.latency_verify.split_regimes`). ``met`` (the chosen attempt's point estimate within
        :data:`TOLERANCE` of the target, or faster), ``measured_speedup``, ``ci95``, ``rounds`` and ``resolved``
        are the chosen attempt's. The same record is in ``result.plan.policy["verified"]``.

    Raises:
        PlanError: an out-of-reach target (with the best reachable speedup), also when the table corrected
            after a measured miss cannot reach it (the message gives the measured speedup). In a quantized
            ``precision`` a target predicted out of reach is not refused on the prediction: the fastest plan is
            measured (``fastest_instead`` in the record) and kept when it meets the target, else refused with
            its measured speedup; ProviderError: the EP
            cannot run; NothingToConvertError: nothing converts; LatencyCacheError: an unreadable cache file.
    """
    if not policy.measures_latency:
        return convert(model, input_shape=input_shape, policy=policy, costs=costs, cost_name=cost_name), None
    table = measure_table(model, policy, input_shape, cache_dir=cache_dir, name=name, progress=progress,
                          refresh=refresh)
    record: dict[str, Any] = {**target_of(policy), "table_model_ms": round(table.model_ms, 5),
                              "cache_file": table.cache_file, "graphs_measured": table.measured, "attempts": []}
    base, planned_on = (1.0, 1.0), table
    quantized = target_of(policy)["precision"] != "fp32"
    stored = _factors(table.correction) if policy.latency_target and not quantized else None
    if stored is not None:  # what an earlier verification of this model here measured
        base, planned_on = stored, table.scaled(*stored)
        record["correction"] = {"source": "cache", **table.correction}

    def plan(on: LatencyTable) -> ConversionResult:
        return convert(model, input_shape=input_shape, policy=policy, costs=costs, cost_name=cost_name, latency=on)

    fastest = None  # the table's fastest predicted ms, when it called the target out of reach
    try:
        res = plan(planned_on)
    except PlanError as exc:
        why, fastest = caveat(policy), getattr(exc, "fastest_ms", None)
        prefix = "" if stored is None else (f"with the table corrected by the measurement stored with it (dense "
                                            f"x{base[0]:.2f}, DS blocks x{base[1]:.2f}; refresh drops it), ")
        if not (why and verify and policy.latency_target and fastest is not None):
            raise PlanError(f"{prefix}{exc}{why}") from None
        try:  # a quantized table predicts poorly: measure its fastest plan instead of refusing on a prediction
            res = plan_at(model, input_shape, policy, planned_on, fastest, costs, cost_name)
        except NothingToConvertError:  # the fastest plan keeps every layer dense: nothing to measure
            raise PlanError(f"{prefix}{exc}{why}") from None
        record["fastest_instead"] = str(exc)
    if not policy.latency_target or not verify:
        return res, record
    shape = (int(policy.batch), *input_shape[1:])
    target = target_of(policy)

    def measure(r: ConversionResult) -> Verification:
        return measure_pair(model, r.model, shape, target, tolerance=TOLERANCE,
                            on="speedup" if policy.speedup else "converted")

    if quantized:  # planned at the target on the table, or at its fastest plan
        first_ms = float(fastest if fastest is not None else res.plan.policy["latency"]["target_ms"])
        return verify_by_search(model, input_shape, policy, table, res, first_ms, measure, record, costs=costs,
                                cost_name=cost_name, fastest_ms=fastest)
    v = measure(res)
    record["protocol"] = v.protocol
    record["attempts"].append(attempt_record(res, v, policy))
    tried = [(res, v)]
    cache = LatencyCache(table.environment, cache_dir)
    learned = [_learned(planned_on, res, v, base)]
    cache.put_correction(table.model_key, learned[-1])
    seen = {signature(res)}
    while len(tried) <= MAX_REPLANS:
        miss, lo, hi = ratio(tried[-1][1].estimate, policy)
        if not (lo > 1 + TOLERANCE or hi < 1 - TOLERANCE):  # no significant miss: done
            break
        a, b = _next_factors(tried, learned, policy)
        fixed = table.scaled(a, b)
        try:
            again = plan(fixed)
        except PlanError as exc:
            last = tried[-1][1].estimate
            if miss > 1 and len(tried) == 1:  # too slow, and the corrected table cannot reach the target
                raise PlanError(f"measured x{last.speedup:.2f} ({last.converted_ms:.3f} ms against "
                                f"{last.original_ms:.3f} ms) where x{res.plan.policy['latency']['predicted_speedup']:.2f} "
                                f"was predicted; with the table corrected from that measurement, {exc}"
                                f"{caveat(policy)}") from None
            break  # already fast enough, or an earlier attempt is kept
        if signature(again) in seen:  # the corrected table gives a plan already measured: nothing new to learn
            break
        seen.add(signature(again))
        v2 = measure(again)
        record["attempts"].append({**attempt_record(again, v2, policy), "dense_factor": round(a, 4),
                                   "block_factor": round(b, 4)})
        tried.append((again, v2))
        learned.append(_learned(fixed, again, v2, (a, b)))
        cache.put_correction(table.model_key, learned[-1])
    res, _, _, record["chosen"] = choose([(r, x.estimate.original_ms, x.estimate.converted_ms) for r, x in tried],
                                         policy, [trusted_hit(x, policy) for _, x in tried])
    chosen = record["attempts"][record["chosen"]]
    record["met"] = bool(ratio(tried[record["chosen"]][1].estimate, policy)[0] <= 1 + TOLERANCE)
    record.update({k: chosen[k] for k in ("measured_speedup", "ci95", "rounds", "resolved", "interval")})
    res.plan.policy["verified"] = record
    return res, record


def _next_factors(tried: list[tuple[ConversionResult, Verification]], learned: list[dict[str, Any]],
                  policy: Policy) -> tuple[float, float]:
    """The (dense, block) factors of the next re-plan, relative to the measured table.

    The last attempt's learned factors; but when the attempts so far bracket the target (one measured
    faster than asked, one slower), the geometric mean of the two nearest either side: the truth for a
    plan between them lies between (a secant step on the block factor, which the latency is monotone in).
    """
    ratios = [ratio(v.estimate, policy)[0] for _, v in tried]
    fast = [i for i, r in enumerate(ratios) if r < 1]
    slow = [i for i, r in enumerate(ratios) if r > 1]
    if fast and slow:
        i, j = max(fast, key=lambda k: ratios[k]), min(slow, key=lambda k: ratios[k])
        return tuple(float((learned[i][k] * learned[j][k]) ** 0.5) for k in ("dense_factor", "block_factor"))
    return float(learned[-1]["dense_factor"]), float(learned[-1]["block_factor"])


def _learned(table: LatencyTable, res: ConversionResult, v: Verification, base: tuple[float, float]
             ) -> dict[str, Any]:
    """The correction ``v``'s measurement of ``res`` (planned on ``table``, itself the measured table
    scaled by ``base``) teaches, relative to the measured table: the value stored with it."""
    est = v.estimate
    _, a, b = corrected_table(table, res.plan, est.original_ms, est.converted_ms)
    block = min(FACTOR_RANGE[1], max(FACTOR_RANGE[0], base[1] * b))  # a stored factor times a new one: kept in range
    return {"dense_factor": round(base[0] * a, 4), "block_factor": round(block, 4), "rounds": est.rounds,
            "ci95": [round(x, 4) for x in est.ci95], "measured_speedup": round(est.speedup, 4),
            "resolved": v.resolved}
