"""The bookkeeping of a verified latency plan: where it is measured (:func:`target_of`), how far a
measurement is from the target (:func:`ratio`), each measured attempt's record (:func:`attempt_record`),
which attempt to keep (:func:`choose`) and when two plans are the same graph (:func:`signature`).

Shared by the table-corrected re-planning of :mod:`dsdeploy.conversion.latency_convert` and the measured
search of :mod:`dsdeploy.conversion.latency_search` (quantized targets).
"""

from __future__ import annotations

import os
from typing import Any

from dsdeploy.conversion.latency_verify import Estimate, Verification
from dsdeploy.conversion.plan import Policy
from dsdeploy.conversion.rewrite import ConversionResult

TOLERANCE = 0.05  # a measured latency this far from the target (either way, significantly) triggers the re-plan


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
    """Where latencies are measured: ``{"provider", "batch", "threads", "precision"}`` with the defaults filled in."""
    return {"provider": policy.provider or "cpu", "batch": int(policy.batch),
            "threads": policy.threads or physical_cores(), "precision": policy.precision or "fp32"}


def ratio(est: Estimate, policy: Policy) -> tuple[float, float, float]:
    """``converted / goal`` (1: on target; the goal is ``original / speedup`` or the target ms) and its
    95 % interval ``(ratio, lo, hi)``."""
    if policy.speedup:
        return policy.speedup / est.speedup, policy.speedup / est.ci95[1], policy.speedup / est.ci95[0]
    ms = float(policy.target_latency_ms)
    return est.converted_ms / ms, est.converted_ci95[0] / ms, est.converted_ci95[1] / ms


def attempt_record(res: ConversionResult, v: Verification, policy: Policy) -> dict[str, Any]:
    """One measured attempt as the verified record lists it: the target, predicted and measured ms and speedup,
    the 95 % intervals (``ci95`` on the speedup, ``ci95_ms`` on the converted ms), ``rounds``, ``resolved``,
    ``interval`` ("met" / "missed": the whole interval, within :data:`TOLERANCE`; else "undecided"),
    ``prediction_error`` (``(predicted - measured) / measured``), the timed graph's ``op_counts`` and
    ``regimes`` when its rounds ran at two speeds."""
    lat, est = res.plan.policy["latency"], v.estimate
    predicted, converted_ms = lat["predicted_ms"], est.converted_ms
    _, lo, hi = ratio(est, policy)
    verdict = "met" if hi <= 1 + TOLERANCE else "missed" if lo > 1 + TOLERANCE else "undecided"
    return {"target_ms": lat["target_ms"], "predicted_ms": predicted, "predicted_speedup": lat["predicted_speedup"],
            "original_ms": round(est.original_ms, 5), "measured_ms": round(converted_ms, 5),
            "measured_speedup": round(est.speedup, 4), "ci95": [round(x, 4) for x in est.ci95],
            "ci95_ms": [round(x, 5) for x in est.converted_ci95], "rounds": est.rounds, "resolved": v.resolved,
            "interval": verdict, "prediction_error": round((predicted - converted_ms) / converted_ms, 4),
            "op_counts": v.op_counts,
            **({"regimes": [{"rounds": r.rounds, "original_ms": round(r.original_ms, 5),
                             "measured_ms": round(r.converted_ms, 5), "measured_speedup": round(r.speedup, 4)}
                            for r in v.regimes]} if v.regimes else {})}


def trusted_hit(v: Verification, policy: Policy) -> bool:
    """Whether measurement ``v`` surely meets the target: its whole 95 % interval does (within :data:`TOLERANCE`),
    or its point estimate does and either it is ``resolved`` (narrow enough to tell a miss from a hit) or its
    interval rules out missing by more than twice the tolerance."""
    point, _, hi = ratio(v.estimate, policy)
    return hi <= 1 + TOLERANCE or (point <= 1 + TOLERANCE and (v.resolved or hi <= 1 + 2 * TOLERANCE))


def choose(tried: list[tuple[ConversionResult, float, float]], policy: Policy, sure: list[bool] | None = None
            ) -> tuple[ConversionResult, float, float, int]:
    """Of the measured attempts ``(result, original_ms, converted_ms)``: the slowest that meets the target
    (it converts least, so it keeps the most accuracy), else the fastest; with its index. ``sure[i]``: attempt
    i surely meets the target (:func:`trusted_hit`); when some attempt does, only those are considered (a sure
    hit beats a point estimate that meets inside an interval too wide to tell)."""
    def goal(o: float) -> float:
        return o / policy.speedup if policy.speedup else float(policy.target_latency_ms)

    ok = [i for i, (_, o, c) in enumerate(tried) if c <= goal(o) * (1 + TOLERANCE)]
    if sure and any(sure[i] for i in ok):
        ok = [i for i in ok if sure[i]]
    i = max(ok, key=lambda i: tried[i][2] / goal(tried[i][1])) if ok else \
        min(range(len(tried)), key=lambda i: tried[i][2] / goal(tried[i][1]))
    return (*tried[i], i)


def caveat(policy: Policy) -> str:
    """What an out-of-reach answer adds for a quantized precision: its predictions are unreliable (measured on
    ResNet-18 INT8: attempts of 0.67x-1.49x for 1.25x predicted; benchmarks/RESULTS-speedup-check.md)."""
    prec = target_of(policy)["precision"]
    return "" if prec == "fp32" else (f" (predicted from {prec} small graphs, which predict a whole quantized model "
                                      f"poorly: a plan for a lower target may still measure the speedup you asked for)")


def signature(res: ConversionResult) -> tuple:
    """What makes two plans the same graph: each layer's (name, converted, rank, layout)."""
    return tuple((d.name, bool(d.convert), d.rank if d.convert else None, res.plan.layout_of(d) if d.convert else None)
                 for d in res.plan.layers)
