"""Budgeted choice of one option per layer (a multiple-choice knapsack), on plain numbers.

Each item (a layer) has options (a rank, or later a rank and a layout, or "keep dense"),
each with a ``cost`` (what to minimise: a spectral error, a measured output or logit error)
and a ``resource`` (what is limited: MACs, or measured latency). :func:`allocate` picks one
option per item minimising the summed cost with the summed resource ``<= limit``. Nothing
here knows about torch or convolutions, so the MAC-budget planner and the latency planner
share it.

Two solvers, both returning feasible selections:

- :func:`greedy`: the Lagrangian greedy. Start every item at its cheapest-resource option;
  repeatedly take the step (to the next vertex of the item's lower convex hull of
  (resource, cost) points) with the largest cost reduction per unit of resource that still
  fits. With convex cost curves (the spectral error) the hull keeps every option and this is
  exactly the rank-by-rank greedy dsdeploy has always used.
- :func:`dp`: dynamic programming over the resource discretised into ``bins`` steps of
  ``limit / bins`` (each option's resource rounded UP, so the result always fits); optimal
  up to that rounding.

:func:`allocate` runs both (and any reference selections given) and returns the cheapest.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

import numpy as np

Options = Mapping[Hashable, tuple[float, float]]  # option -> (cost, resource)
Selection = dict[str, Hashable]


class InfeasibleBudget(ValueError):
    """Even the cheapest-resource option of every item exceeds the limit (``floor`` says by how much)."""

    def __init__(self, floor: float, limit: float) -> None:
        super().__init__(f"the cheapest choice everywhere needs {floor:g}, over the limit {limit:g}")
        self.floor, self.limit = floor, limit


def _check(items: Mapping[str, Options], limit: float) -> float:
    if not math.isfinite(limit) or limit < 0:
        raise ValueError(f"limit must be a finite number >= 0, got {limit}")
    for name, opts in items.items():
        if not opts:
            raise ValueError(f"item {name!r} has no options")
        for key, (c, r) in opts.items():
            if not (math.isfinite(c) and math.isfinite(r)) or r < 0:
                raise ValueError(f"item {name!r} option {key!r}: cost and resource must be finite, resource >= 0")
    floor = sum(min(r for _, r in opts.values()) for opts in items.values())
    if floor > limit * (1 + 1e-12) + 1e-12:
        raise InfeasibleBudget(floor, limit)
    return floor


def totals(items: Mapping[str, Options], selection: Mapping[str, Hashable]) -> tuple[float, float]:
    """``(summed cost, summed resource)`` of a selection (one option per item)."""
    cost = sum(items[n][k][0] for n, k in selection.items())
    res = sum(items[n][k][1] for n, k in selection.items())
    return cost, res


def _hull(opts: Options, tol: float = 1e-12) -> list[Hashable]:
    """Options on the lower convex hull of (resource, cost), by increasing resource.

    Starts at the cheapest-resource option (lowest cost among ties); keeps only points that lower
    the cost; drops a point when the step after it saves more per unit than the step into it
    (collinear points are kept, so a convex curve keeps every option).
    """
    pts = sorted(opts.items(), key=lambda kv: (kv[1][1], kv[1][0]))
    chain: list[tuple[Hashable, float, float]] = []
    for key, (c, r) in pts:
        if chain and (r <= chain[-1][2] or c >= chain[-1][1]):
            continue  # same resource (keep the first, cheaper) or no cost reduction
        while len(chain) >= 2:
            (_, c0, r0), (_, c1, r1) = chain[-2], chain[-1]
            in_gain, out_gain = (c0 - c1) / (r1 - r0), (c1 - c) / (r - r1)
            if out_gain > in_gain * (1 + tol) + tol:
                chain.pop()
            else:
                break
        chain.append((key, c, r))
    return [k for k, _, _ in chain]


def greedy(items: Mapping[str, Options], limit: float) -> Selection:
    """The Lagrangian greedy over hull steps (see the module docstring); ties go to the earlier item.

    Raises InfeasibleBudget when the cheapest-resource options already exceed ``limit``.
    """
    _check(items, limit)
    hulls = {n: _hull(opts) for n, opts in items.items()}
    pos = {n: 0 for n in items}
    used = sum(items[n][h[0]][1] for n, h in hulls.items())
    while True:
        best, best_gain = None, 0.0
        for n, h in hulls.items():
            i = pos[n]
            if i + 1 >= len(h):
                continue
            (c0, r0), (c1, r1) = items[n][h[i]], items[n][h[i + 1]]
            if used + (r1 - r0) > limit * (1 + 1e-12) + 1e-9:
                continue
            gain = (c0 - c1) / (r1 - r0)
            if gain > best_gain:
                best, best_gain = n, gain
        if best is None:
            return {n: hulls[n][pos[n]] for n in items}
        h, i = hulls[best], pos[best]
        used += items[best][h[i + 1]][1] - items[best][h[i]][1]
        pos[best] = i + 1


def dp(items: Mapping[str, Options], limit: float, bins: int = 2048) -> Selection:
    """Optimal selection with resources rounded up to multiples of ``limit / bins``.

    Exact when every resource is a multiple of ``limit / bins`` (e.g. integer resources and
    ``bins = limit``). Time O(items x options x bins). Raises InfeasibleBudget when nothing fits
    (also when only the rounding makes it not fit).
    """
    _check(items, limit)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    unit = limit / bins if limit > 0 else 1.0

    def weight(r: float) -> int:
        if limit <= 0:
            return 0 if r == 0 else bins + 1
        return max(0, math.ceil(r / unit - 1e-9))

    best = np.full(bins + 1, np.inf)
    best[0] = 0.0  # best[b]: min cost with total (rounded) resource exactly b
    picks: list[tuple[str, list[Hashable], np.ndarray]] = []
    for name, opts in items.items():
        keys = list(opts)
        new = np.full(bins + 1, np.inf)
        pick = np.full(bins + 1, -1, dtype=np.int64)
        for i, k in enumerate(keys):
            c, r = opts[k]
            w = weight(r)
            if w > bins:
                continue
            cand = np.full(bins + 1, np.inf)
            cand[w:] = best[:bins + 1 - w] + c
            better = cand < new
            new[better], pick[better] = cand[better], i
        best = new
        picks.append((name, keys, pick))
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        raise InfeasibleBudget(_check(items, limit), limit)
    out: Selection = {}
    for name, keys, pick in reversed(picks):
        k = keys[int(pick[end])]
        out[name] = k
        end -= weight(items[name][k][1])
    return {n: out[n] for n in items}


def allocate(items: Mapping[str, Options], limit: float, *, bins: int = 2048,
             references: list[Mapping[str, Hashable]] | tuple = ()) -> tuple[Selection, str]:
    """The cheapest feasible selection among :func:`greedy`, :func:`dp` and ``references``.

    Args:
        items: item name -> option -> ``(cost, resource)``; costs and resources finite, resources >= 0.
        limit: the summed resource allowed.
        bins: resolution of :func:`dp` (its work grows linearly with it).
        references: other selections to beat (e.g. a spectral plan); used only when feasible
            and every option they name exists.

    Returns:
        ``(selection, solver)`` where solver is "greedy", "dp" or "reference" (which won; ties
        prefer that order).

    Raises:
        InfeasibleBudget: the cheapest-resource options already exceed ``limit``.
        ValueError: an item without options, or a non-finite number.
    """
    candidates = [(greedy(items, limit), "greedy")]
    try:
        candidates.append((dp(items, limit, bins), "dp"))
    except InfeasibleBudget:
        pass  # only the rounding made it infeasible; the greedy's answer fits
    for ref in references:
        known = set(ref) == set(items) and all(k in items[n] for n, k in ref.items())
        if known and totals(items, ref)[1] <= limit * (1 + 1e-12) + 1e-9:
            candidates.append((dict(ref), "reference"))
    sel, solver = min(candidates, key=lambda s: totals(items, s[0])[0])  # min keeps the first of ties
    return sel, solver
