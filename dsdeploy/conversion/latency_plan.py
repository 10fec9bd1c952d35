"""Choose each layer's rank and layout (or keep it dense) for a latency target, from a measured latency table.

The problem is a multiple-choice knapsack: per candidate layer, options "dense" (error 0,
the dense conv's measured ms) and, for each rank, the fastest measured layout (the spectral
relative squared error ``1 - energy(rank)``, the block's measured ms); minimise the summed
error with ``remainder_ms + sum(chosen ms) <= target_ms``. The solver is the MAC-budget
planner's (:func:`dsdeploy.conversion.allocate.allocate`: ``items`` is
``{layer: {option: (cost, resource)}}``), or any ``solve(items, limit) -> {layer: option}``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from dsdeploy.conversion.allocate import allocate
from dsdeploy.conversion.decompose import energy_curve
from dsdeploy.errors import PlanError

if TYPE_CHECKING:
    from dsdeploy.conversion.plan import Plan, Policy
    from dsdeploy.runtime.latency_table import LatencyTable

DENSE = "dense"
Items = dict[str, dict[Hashable, tuple[float, float]]]
Solver = Callable[[Mapping[str, Mapping[Hashable, tuple[float, float]]], float], Mapping[str, Hashable]]


@dataclass
class LayerChoice:
    """One layer's decision: ``rank``/``layout`` (None: kept dense), its error, its predicted ms and the dense ms."""

    name: str
    rank: int | None
    layout: str | None
    error: float
    ms: float
    dense_ms: float
    reason: str = ""


@dataclass
class LatencyPlan:
    """Per-layer choices for a target, with the predicted whole-model latency (ms)."""

    target_ms: float
    model_ms: float
    predicted_ms: float
    remainder_ms: float
    choices: list[LayerChoice] = field(default_factory=list)

    @property
    def predicted_speedup(self) -> float:
        return self.model_ms / self.predicted_ms if self.predicted_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["predicted_speedup"] = self.predicted_speedup
        return d


def latency_items(table: LatencyTable, spectra: Mapping[str, torch.Tensor],
                  costs: Mapping[str, Mapping[int, float]] | None = None) -> Items:
    """The knapsack instance: candidate layer -> option -> (spectral squared error, measured ms).

    ``spectra`` holds each layer's per-channel singular values
    (:func:`dsdeploy.conversion.decompose.channel_svd`'s ``S``); layers missing from it stay dense.
    ``costs`` (layer -> rank -> measured cost, e.g. the data-aware logit error of
    :mod:`dsdeploy.recover.sensitivity`) replaces the spectral error of the layers it holds; their
    ranks without a measured cost are left out.
    """
    items: Items = {}
    for lt in table.candidates:
        opts: dict[Hashable, tuple[float, float]] = {DENSE: (0.0, float(lt.dense_ms))}
        if lt.name in spectra:
            curve = energy_curve(spectra[lt.name]).tolist()
            measured = costs.get(lt.name) if costs is not None else None
            for rank in sorted({b.rank for b in lt.blocks}):
                best = lt.fastest(rank)
                if measured is not None and rank not in measured:
                    continue
                err = float(measured[rank]) if measured is not None else max(0.0, 1.0 - curve[rank - 1])
                opts[(rank, best.layout)] = (err, float(best.ms))
        items[lt.name] = opts
    return items


def target_from(table: LatencyTable, *, speedup: float | None = None, target_ms: float | None = None) -> float:
    """The latency target in ms: ``target_ms``, or the whole model's measured ms / ``speedup``."""
    if (speedup is None) == (target_ms is None):
        raise PlanError("give exactly one of speedup or target_latency")
    if speedup is not None:
        if not speedup > 0:
            raise PlanError(f"speedup must be > 0, got {speedup}")
        return table.model_ms / speedup
    if not target_ms > 0:
        raise PlanError(f"target_latency must be > 0 ms, got {target_ms}")
    return float(target_ms)


def plan_for_latency(table: LatencyTable, spectra: Mapping[str, torch.Tensor], solve: Solver | None = None, *,
                     speedup: float | None = None, target_ms: float | None = None,
                     costs: Mapping[str, Mapping[int, float]] | None = None) -> LatencyPlan:
    """The least-error choice per layer whose predicted latency meets the target.

    Predicted latency = ``table.remainder_ms`` + the chosen option's ms of every candidate layer.
    ``solve`` defaults to :func:`dsdeploy.conversion.allocate.allocate` (greedy and DP, the cheaper).
    ``costs``: measured per-layer costs replacing the spectral error (:func:`latency_items`).

    Raises:
        PlanError: no target or both; or the target is out of reach — the message gives the
            fastest predicted latency and the best reachable speedup.
    """
    target = target_from(table, speedup=speedup, target_ms=target_ms)
    items = latency_items(table, spectra, costs)
    floor = table.remainder_ms + sum(min(r for _, r in opts.values()) for opts in items.values())
    limit = target - table.remainder_ms
    if floor > target or limit < 0:
        asked = f"a {speedup:g}x speedup ({target:.3f} ms)" if speedup else f"{target:.3f} ms"
        prec = table.environment.get("precision", "fp32")
        asked += f" in {prec}" if prec != "fp32" else ""
        exc = PlanError(f"{asked} is out of reach: the fastest plan predicts {floor:.3f} ms, a speedup of "
                        f"{table.model_ms / floor:.2f}x over the measured {table.model_ms:.3f} ms")
        exc.fastest_ms = floor  # the caller may measure that plan instead of trusting the prediction
        raise exc
    if solve is None:
        selection = allocate(items, limit)[0]
    else:
        selection = solve(items, limit)
    choices, total = [], table.remainder_ms
    by_name = {lt.name: lt for lt in table.layers}
    for name, opts in items.items():
        key = selection[name]
        err, ms = opts[key]
        total += ms
        rank, layout = (None, None) if key == DENSE else key
        reason = "" if key != DENSE else (
            f"kept dense: the original already meets the target ({table.model_ms:.3f} ms measured, target "
            f"{target:.3f} ms)" if target >= table.model_ms else _dense_reason(by_name[name], name in spectra))
        choices.append(LayerChoice(name, rank, layout, err, ms, float(by_name[name].dense_ms), reason))
    return LatencyPlan(target, table.model_ms, total, table.remainder_ms, choices)


def _dense_reason(lt: Any, has_spectrum: bool) -> str:
    """Why the planner kept ``lt`` (a LayerTiming) dense."""
    if not has_spectrum:
        return "kept dense: no spectrum"
    fastest = min((b.ms for b in lt.blocks), default=None)
    if fastest is None or fastest >= lt.dense_ms:
        return (f"kept dense: no DS block is faster here (dense {lt.dense_ms:.3f} ms, fastest block "
                f"{fastest if fastest is None else round(fastest, 3)} ms)")
    return "kept dense: the target is met with less error elsewhere"


def plan_latency(plan: Plan, table: LatencyTable, spectra: Mapping[str, torch.Tensor], policy: Policy,
                 costs: Mapping[str, Mapping[int, float]] | None = None, cost_name: str | None = None
                 ) -> tuple[dict[str, int], dict[str, str]]:
    """Ranks and layouts of the layers ``policy``'s latency target converts (``plan`` is filled in).

    Layers kept dense get their reason; ``plan.policy["latency"]`` records the target, the
    predicted and the measured whole-model ms; with ``costs`` the allocation is "data" and each
    converted layer records its ``cost``. Raises PlanError when the target is out of reach.
    """
    lp = plan_for_latency(table, spectra, speedup=policy.speedup, target_ms=policy.target_latency_ms, costs=costs)
    by_name = {d.name: d for d in plan.layers}
    ranks: dict[str, int] = {}
    layouts: dict[str, str] = {}
    chosen = {c.name: c for c in lp.choices}
    for name in spectra:
        c, d = chosen.get(name), by_name[name]
        if c is None or c.rank is None:
            d.reason = c.reason if c is not None else "kept dense: not in the latency table"
            continue
        ranks[name], layouts[name] = c.rank, str(c.layout)
        if costs is not None and name in costs:
            d.cost = c.error
    plan.policy["latency"] = {"target_ms": round(lp.target_ms, 5), "predicted_ms": round(lp.predicted_ms, 5),
                              "model_ms": round(lp.model_ms, 5), "remainder_ms": round(lp.remainder_ms, 5),
                              "predicted_speedup": round(lp.predicted_speedup, 4)}
    plan.policy["allocation"] = "data" if costs is not None else "spectral"
    if costs is not None and cost_name is not None:
        plan.policy["cost"] = cost_name
    return ranks, layouts


def record_latencies(plan: Plan, table: LatencyTable, *, keep_layouts: bool) -> None:
    """Fill each measured layer's ``dense_ms`` and each converted layer's ``block_ms`` from ``table``.

    ``keep_layouts`` False (a MAC-budget plan): each converted layer first takes the fastest
    measured layout at its rank. ``plan.policy["latency_table"]`` records where it was measured.
    """
    by_name = {lt.name: lt for lt in table.layers}
    for d in plan.layers:
        lt = by_name.get(d.name)
        if lt is None or lt.dense_ms is None:
            continue
        d.dense_ms = round(float(lt.dense_ms), 5)
        if d.convert and d.rank is not None:
            best = lt.fastest(d.rank)
            if not keep_layouts and best is not None:
                d.layout = best.layout
            block = lt.block(d.rank, plan.layout_of(d))
            d.block_ms = round(float(block.ms), 5) if block is not None else None
    env = table.environment
    plan.policy["latency_table"] = {"ep": env.get("ep"), "threads": env.get("threads"), "batch": env.get("batch"),
                                    "input_shape": list(table.input_shape), "model_ms": round(table.model_ms, 5),
                                    "protocol": table.protocol, "precision": env.get("precision", "fp32")}
