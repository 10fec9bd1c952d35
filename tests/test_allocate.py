"""The budget solver on plain numbers: optimal on small instances, within budget, and today's
spectral greedy when given the spectral costs."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

from dsdeploy.conversion.allocate import InfeasibleBudget, allocate, dp, greedy, totals
from dsdeploy.conversion.decompose import energy_curve
from dsdeploy.conversion.opcount import trace_calls
from dsdeploy.conversion.plan import Policy, ds_mac_ratio, make_plan, max_gainful_rank
from dsdeploy.errors import PlanError


def random_instance(rng: random.Random, items: int, options: int, integer: bool):
    out = {}
    for i in range(items):
        opts = {}
        for k in range(rng.randint(1, options)):
            res = rng.randint(0, 9) if integer else rng.uniform(0, 9)
            opts[k] = (rng.uniform(0, 5), res)
        out[f"l{i}"] = opts
    return out


def brute_force(items, limit):
    names = list(items)
    best = None
    for combo in itertools.product(*(list(items[n]) for n in names)):
        sel = dict(zip(names, combo))
        cost, res = totals(items, sel)
        if res <= limit + 1e-9 and (best is None or cost < best):
            best = cost
    return best


@pytest.mark.parametrize("seed", range(40))
def test_dp_and_allocate_are_optimal_on_small_instances(seed):
    rng = random.Random(seed)
    items = random_instance(rng, rng.randint(1, 4), 4, integer=True)
    floor = sum(min(r for _, r in o.values()) for o in items.values())
    limit = floor + rng.randint(0, 12)
    want = brute_force(items, limit)
    bins = max(1, limit)  # integer resources on a grid of 1: the DP is exact
    got = totals(items, dp(items, limit, bins=bins))
    assert got[1] <= limit and got[0] == pytest.approx(want)
    sel, _ = allocate(items, limit, bins=bins)
    assert totals(items, sel)[0] == pytest.approx(want)


@pytest.mark.parametrize("seed", range(40))
def test_every_solver_respects_the_budget_with_real_valued_resources(seed):
    rng = random.Random(1000 + seed)
    items = random_instance(rng, rng.randint(1, 6), 6, integer=False)
    floor = sum(min(r for _, r in o.values()) for o in items.values())
    limit = floor + rng.uniform(0, 20)
    for sel in (greedy(items, limit), dp(items, limit, bins=64), allocate(items, limit, bins=64)[0]):
        assert set(sel) == set(items) and totals(items, sel)[1] <= limit * (1 + 1e-9)
    # never worse than a feasible reference, nor than either solver alone
    ref = {n: min(o, key=lambda k, o=o: o[k][1]) for n, o in items.items()}
    best = totals(items, allocate(items, limit, bins=64, references=[ref])[0])[0]
    assert best <= min(totals(items, ref)[0], totals(items, greedy(items, limit))[0]) + 1e-12


def test_greedy_steps_over_a_non_convex_point():
    # rank 2 is no better than rank 1, rank 3 much better: a rank-by-rank greedy would stop at 1
    items = {"a": {1: (1.0, 1), 2: (1.0, 2), 3: (0.1, 3)}, "b": {1: (0.5, 1), 2: (0.45, 2)}}
    assert greedy(items, 4) == {"a": 3, "b": 1}
    assert allocate(items, 4)[0] == {"a": 3, "b": 1}


def test_infeasible_budget_is_refused():
    items = {"a": {1: (1.0, 5.0)}, "b": {1: (1.0, 5.0), 2: (0.0, 9.0)}}
    with pytest.raises(InfeasibleBudget) as exc:
        allocate(items, 9.0)
    assert exc.value.floor == 10.0
    with pytest.raises(ValueError, match="no options"):
        greedy({"a": {}}, 1.0)


def old_budget_ranks(plan, mods, budget):
    """The spectral greedy as it was before the solver moved to conversion/allocate.py (reference)."""
    from dsdeploy.conversion.decompose import channel_svd

    macs = {d.name: d.macs for d in plan.layers if d.name in mods}
    cost = {n: macs[n] * ds_mac_ratio(mods[n], 1) for n in mods}
    limit = budget * sum(macs.values())
    ranks = {n: 1 for n in mods}
    used = sum(cost.values())
    cap = {n: max_gainful_rank(mods[n]) for n in mods}
    curves = {n: energy_curve(channel_svd(mods[n].weight, mods[n].groups)[1]).tolist() for n in mods}

    def sq_err(n, r):
        return max(0.0, 1.0 - curves[n][r - 1])

    while True:
        best, best_gain = None, 0.0
        for n in mods:
            r = ranks[n]
            if r >= cap[n] or used + cost[n] > limit:
                continue
            gain = (sq_err(n, r) - sq_err(n, r + 1)) / cost[n]
            if gain > best_gain:
                best, best_gain = n, gain
        if best is None:
            return ranks
        ranks[best] += 1
        used += cost[best]


def wide_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 5, padding=2), nn.ReLU(), nn.Conv2d(64, 16, 3, padding=1, groups=4))


@pytest.mark.parametrize("budget", [0.2, 0.3, 0.45, 0.7, 1.0])
def test_spectral_costs_give_todays_plan(budget):
    model, shape = wide_net(), (1, 8, 12, 12)
    calls = trace_calls(model, shape)
    plan = make_plan(model, Policy(mac_budget=budget), calls, shape)
    mods = {d.name: model.get_submodule(d.name) for d in plan.layers if d.full_rank is not None}
    want = old_budget_ranks(plan, mods, budget)
    assert {d.name: d.rank for d in plan.converted} == want
    assert plan.policy["allocation"] == "spectral"


def test_measured_costs_drive_the_plan_and_are_recorded():
    model, shape = wide_net(), (1, 8, 12, 12)
    calls = trace_calls(model, shape)
    spectral = make_plan(model, Policy(mac_budget=0.3), calls, shape)
    names = [d.name for d in spectral.converted]
    # a made-up cost: only the 5x5 conv matters, and it matters a lot
    costs = {n: {r: (10.0 / r if n == "4" else 0.001 / r) for r in range(1, 26)} for n in names}
    plan = make_plan(model, Policy(mac_budget=0.3), calls, shape, costs=costs, cost_name="toy")
    ranks = {d.name: d.rank for d in plan.converted}
    assert ranks["4"] > {d.name: d.rank for d in spectral.converted}["4"]
    assert sum(d.macs_after for d in plan.converted) <= 0.3 * sum(d.macs for d in plan.converted) * 1.001
    assert plan.policy["allocation"] == "data" and plan.policy["cost"] == "toy"
    assert plan.policy["cost_total"] <= plan.policy["spectral_cost_total"]
    assert all(d.cost == costs[d.name][d.rank] for d in plan.converted)


def test_data_allocation_without_costs_or_budget_is_refused():
    model, shape = wide_net(), (1, 8, 12, 12)
    with pytest.raises(PlanError, match="convert.allocation = data needs calibration data"):
        make_plan(model, Policy(mac_budget=0.3, allocation="data"), trace_calls(model, shape), shape)
    with pytest.raises(PlanError, match="set convert.mac_budget"):
        Policy(rank=2, allocation="data").validate()
    with pytest.raises(PlanError, match="convert.allocation must be one of"):
        Policy(allocation="fast").validate()
