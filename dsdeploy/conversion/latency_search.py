"""A quantized latency target planned by measuring whole models, not by adding up small graphs.

Small INT8 (QDQ) graphs predict a whole quantized model poorly: on ResNet-18 (CPU EP, 1 thread) plans made on
the INT8 table for ~1.25x measured 0.67x-1.49x, and its fastest plan, predicted 1.38x, measured 3.73x
(``benchmarks/RESULTS-speedup-check.md``); the table's additive model (remainder + each layer's ms) does not hold
when the quantizer fuses and re-scales across layers. What the table still gives is an *order* of plans: a plan
made for a smaller predicted latency converts more, at lower ranks. So the search keeps the table's plans and
replaces its numbers by measurements: it plans at a stand-in predicted latency ``p`` (:func:`plan_at`), measures
the whole quantized pair as the fp32 verification does, and brackets the target between the measured points
and the dense model (``p = table.model_ms``: speedup 1, known without measuring). It starts from the table's own
plan for the target (its fastest plan when the table predicts the target out of reach), measures the fastest
plan next while nothing met the target, then steps by regula falsi on ``log p`` against ``log(measured / goal)``,
Illinois-weighted (:func:`next_planned_ms`), or to the bracket's midpoint when that point gives a plan already
measured. It stops on a measurement that surely meets the target (:func:`trusted_hit`, the rule that keeps an
attempt) and is at most the tolerance faster, no new plan inside the bracket, or :data:`MAX_PROBES` measurements
(an interval that merely reaches into the tolerance does not stop it: such an attempt would not be kept). A search whose fastest plan was measured
short of the target refuses it (PlanError, with the measured speedup). The kept attempt is chosen as for fp32
(:func:`choose`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from dsdeploy.conversion.latency_attempts import (
    TOLERANCE,
    attempt_record,
    choose,
    ratio,
    signature,
    target_of,
    trusted_hit,
)
from dsdeploy.conversion.latency_plan import target_from
from dsdeploy.conversion.latency_verify import Verification
from dsdeploy.conversion.plan import Policy
from dsdeploy.conversion.rewrite import ConversionResult, convert
from dsdeploy.errors import NothingToConvertError, PlanError
from dsdeploy.runtime.latency_table import LatencyTable

MAX_PROBES = 6  # whole-model measurements of one search, the first included
STEP_GUARD = 0.1  # each new point lies at least this share of the bracket (in log ms) inside it


def plan_at(model: nn.Module, input_shape: tuple[int, ...], policy: Policy, table: LatencyTable, ms: float,
            costs: Mapping[str, Mapping[int, float]] | None = None, cost_name: str | None = None
            ) -> ConversionResult:
    """The plan the table makes for a predicted latency of ``ms`` (a stand-in target, in ms), its policy record
    showing the user's target (``policy``'s speedup or target latency, and its ``target_ms`` on the table), not
    the stand-in. Raises PlanError below the table's fastest plan, NothingToConvertError when every layer stays
    dense at ``ms``."""
    stand_in = dataclasses.replace(policy, speedup=None, target_latency_ms=ms * (1 + 1e-9))
    res = convert(model, input_shape=input_shape, policy=stand_in, costs=costs, cost_name=cost_name, latency=table)
    res.plan.policy.pop("target_latency_ms", None)
    res.plan.policy.update(policy.to_dict())
    res.plan.policy["latency"]["target_ms"] = round(target_from(table, speedup=policy.speedup,
                                                                target_ms=policy.target_latency_ms), 5)
    return res


def fastest_planned_ms(model: nn.Module, input_shape: tuple[int, ...], policy: Policy, table: LatencyTable,
                       costs: Mapping[str, Mapping[int, float]] | None = None, cost_name: str | None = None) -> float:
    """The predicted ms of the table's fastest plan for ``model`` (what the planner's out-of-reach answer gives):
    every layer at its fastest option, on the layers the policy lets convert."""
    try:
        plan_at(model, input_shape, policy, table, 1e-9, costs, cost_name)
    except PlanError as exc:
        fastest = getattr(exc, "fastest_ms", None)
        if fastest is not None:
            return float(fastest)
        raise
    return 1e-9  # unreachable for a real table: a plan within a nanosecond


def next_planned_ms(points: Sequence[tuple[float, float]], *, fastest_ms: float, dense_ms: float,
                    dense_ratio: float, bisect: bool = False) -> float | None:
    """The stand-in latency (ms on the table) to plan and measure next, or None when the search is over.

    Args:
        points: the measured ``(planned ms, ratio)`` pairs; ratio = measured converted ms / the goal's ms
            (the goal's: original / speedup, or the target latency), <= 1 meets the target.
        fastest_ms: the table's fastest plan (the smallest plannable ms). dense_ms: the table's whole
            model (every layer dense). dense_ratio: the dense model's ratio (the speedup asked; original ms /
            target ms), > 1. bisect: the bracket's geometric midpoint instead (when the interpolated point gave a
            plan already measured).

    Nothing met yet: the fastest plan, unless it was measured (None: out of reach). Else regula falsi
    (linear in ``log ms`` against ``log ratio``) between the slowest plan that met and the fastest slower
    point above it that missed (the dense model when none), kept :data:`STEP_GUARD` inside the bracket, with
    the Illinois rule (Dowell & Jarratt, BIT 1971): when the newest ``k >= 2`` points all fell on one side,
    the endpoint kept on the other side counts ``0.5 ** (k - 1)`` of its log ratio, so the bracket closes
    from both ends (measured on ResNet-18 INT8, plain regula falsi crept toward a 2x target from the slow side
    in 1.79x, 1.70x, 1.85x while the fastest plan stood at 3.68x).
    """
    met = [(p, r) for p, r in points if r <= 1]
    if not met:
        return None if any(p <= fastest_ms * (1 + 1e-6) for p, _ in points) else fastest_ms
    p1, r1 = max(met)
    above = [(p, r) for p, r in points if r > 1 and p > p1] + [(dense_ms, max(dense_ratio, 1 + 1e-6))]
    p2, r2 = min(above)
    if not p2 > p1 * (1 + 1e-6):
        return None
    if bisect:
        return math.sqrt(p1 * p2)
    f1, f2 = math.log(max(r1, 1e-9)), math.log(r2)
    sides = [r <= 1 for _, r in points]
    run = next((i for i, s in enumerate(reversed(sides)) if s != sides[-1]), len(sides))
    if run >= 2:  # Illinois: the endpoint retained on the other side weighs less each time
        if sides[-1]:
            f2 *= 0.5 ** (run - 1)
        else:
            f1 *= 0.5 ** (run - 1)
    t = min(1 - STEP_GUARD, max(STEP_GUARD, -f1 / (f2 - f1)))
    return math.exp(math.log(p1) + t * (math.log(p2) - math.log(p1)))


def verify_by_search(model: nn.Module, input_shape: tuple[int, ...], policy: Policy, table: LatencyTable,
                     first: ConversionResult, first_ms: float, measure: Callable[[ConversionResult], Verification],
                     record: dict[str, Any], *, costs: Mapping[str, Mapping[int, float]] | None = None,
                     cost_name: str | None = None, max_probes: int = MAX_PROBES, fastest_ms: float | None = None
                     ) -> tuple[ConversionResult, dict[str, Any]]:
    """Measure ``first`` (planned at ``first_ms``) and search the table's plans by measurement (module doc).

    ``measure`` times a result's model against the original (:func:`dsdeploy.conversion.latency_verify.
    measure_pair`). Fills ``record`` (``protocol``, ``search: "measured"``, ``attempts`` with each one's
    ``planned_ms`` and ``why`` it was tried, ``chosen``, ``met`` and the chosen attempt's measured fields, as
    :func:`dsdeploy.conversion.latency_convert.convert_planned` documents) and returns ``(kept result, record)``.
    ``fastest_ms``: the table's fastest predicted ms when the caller has it (an out-of-reach answer gave it); else
    it is asked of the planner (:func:`fastest_planned_ms`).

    Raises:
        PlanError: the fastest plan was measured and misses the target by more than :data:`TOLERANCE` (the
            message gives its measured speedup).
    """
    if fastest_ms is None:
        fastest_ms = fastest_planned_ms(model, input_shape, policy, table, costs, cost_name)
    tried: list[tuple[ConversionResult, Verification, float]] = []
    seen: set[tuple] = set()
    res, p, fastest_seen = first, first_ms, False
    why = "the fastest plan" if p <= fastest_ms * (1 + 1e-6) else "the table's plan for the target"
    record["search"] = "measured"
    while True:
        v = measure(res)
        record.setdefault("protocol", v.protocol)
        record["attempts"].append({**attempt_record(res, v, policy), "planned_ms": round(p, 5), "why": why})
        tried.append((res, v, p))
        seen.add(signature(res))
        if len(tried) >= max_probes or (trusted_hit(v, policy) and ratio(v.estimate, policy)[0] >= 1 - TOLERANCE):
            break  # on target by the rule that keeps an attempt, without giving more than the tolerance away
        points = [(q, ratio(x.estimate, policy)[0]) for _, x, q in tried]
        dense = policy.speedup or v.estimate.original_ms / float(policy.target_latency_ms)
        res = None
        for bisect in (False, True):  # an interpolated plan already measured: the bracket's midpoint instead
            p = next_planned_ms(points, fastest_ms=fastest_ms, dense_ms=table.model_ms, dense_ratio=dense,
                                bisect=bisect)
            why = ("the fastest plan" if p is not None and p <= fastest_ms * (1 + 1e-6) else
                   "the bracket's midpoint" if bisect else "interpolated in the bracket")
            try:
                res = None if p is None else plan_at(model, input_shape, policy, table, p, costs, cost_name)
            except NothingToConvertError:  # so close to dense that nothing converts
                res = None
            if res is None or signature(res) not in seen:
                break
            fastest_seen = fastest_seen or p <= fastest_ms * (1 + 1e-6)  # an earlier plan was the fastest one
            res = None
        if res is None:  # out of reach, or no plan left between the bracket's ends
            break
    res, _, _, record["chosen"] = choose([(r, x.estimate.original_ms, x.estimate.converted_ms) for r, x, _ in tried],
                                         policy, [trusted_hit(x, policy) for _, x, _ in tried])
    kept = tried[record["chosen"]][1].estimate
    record["met"] = bool(ratio(kept, policy)[0] <= 1 + TOLERANCE)
    fastest_tried = fastest_seen or any(q <= fastest_ms * (1 + 1e-6) for _, _, q in tried)
    if not record["met"] and fastest_tried:
        asked = f"a {policy.speedup:g}x speedup" if policy.speedup else f"{policy.target_latency_ms:g} ms"
        raise PlanError(f"measured x{kept.speedup:.2f} ({kept.converted_ms:.3f} ms against {kept.original_ms:.3f} ms) "
                        f"for the fastest plan, whole and {target_of(policy)['precision']}-quantized: {asked} in "
                        f"{target_of(policy)['precision']} is out of reach here; x{kept.speedup:.2f} is the best "
                        f"measured")
    chosen = record["attempts"][record["chosen"]]
    record.update({k: chosen[k] for k in ("measured_speedup", "ci95", "rounds", "resolved", "interval")})
    res.plan.policy["verified"] = record
    return res, record
