"""The latency planner: a multiple-choice knapsack over (dense | rank x fastest layout) per layer,
solved here by exhaustive search (the reference any solver must match on small instances)."""

from __future__ import annotations

import itertools

import pytest
import torch

from dsdeploy.conversion.decompose import channel_svd
from dsdeploy.conversion.latency_plan import DENSE, latency_items, plan_for_latency
from dsdeploy.errors import PlanError
from dsdeploy.runtime.latency_table import BlockTiming, LatencyTable, LayerTiming


def exhaustive(items, limit):
    names = list(items)
    best, best_cost = None, float("inf")
    for combo in itertools.product(*(list(items[n]) for n in names)):
        cost = sum(items[n][k][0] for n, k in zip(names, combo))
        res = sum(items[n][k][1] for n, k in zip(names, combo))
        if res <= limit + 1e-12 and cost < best_cost:
            best, best_cost = dict(zip(names, combo)), cost
    return best


def spectrum(values):
    return torch.tensor([values], dtype=torch.float64)  # one channel, singular values


def hand_table() -> LatencyTable:
    """Whole model 10 ms; layers a (4 ms dense) and b (3 ms dense); c skipped."""
    a = LayerTiming("a", dense_ms=4.0, key="ka", blocks=[BlockTiming(1, "branches", 1.0), BlockTiming(1, "concat", 1.2),
                                                         BlockTiming(2, "branches", 2.5), BlockTiming(2, "concat", 2.0)])
    b = LayerTiming("b", dense_ms=3.0, key="kb", blocks=[BlockTiming(1, "branches", 0.5), BlockTiming(2, "branches", 1.5)])
    c = LayerTiming("c", reason="1x1 kernel (already pointwise)")
    return LatencyTable("m", [1, 3, 8, 8], {"ep": "CPUExecutionProvider"}, "p", 10.0, [a, c, b], "f")


SPECTRA = {"a": spectrum([3.0, 2.0, 1.0]), "b": spectrum([3.0, 0.5, 0.1])}


def test_items_take_the_fastest_layout_per_rank_and_the_spectral_error():
    items = latency_items(hand_table(), SPECTRA)
    assert set(items) == {"a", "b"}
    assert items["a"][DENSE] == (0.0, 4.0) and items["a"][(2, "concat")][1] == 2.0 and (1, "concat") not in items["a"]
    assert items["a"][(1, "branches")][0] == pytest.approx(1 - 9 / 14)
    assert items["b"][(2, "branches")][0] == pytest.approx(0.01 / 9.26)


@pytest.mark.parametrize("speedup", [1.0, 1.3, 1.6, 1.9])
def test_plan_meets_the_target_with_least_error(speedup):
    table = hand_table()
    plan = plan_for_latency(table, SPECTRA, exhaustive, speedup=speedup)
    assert plan.predicted_ms <= plan.target_ms + 1e-9 and plan.target_ms == pytest.approx(10.0 / speedup)
    assert plan.remainder_ms == pytest.approx(3.0)
    items = latency_items(table, SPECTRA)
    best = exhaustive(items, plan.target_ms - 3.0)
    assert sum(c.error for c in plan.choices) == pytest.approx(sum(items[n][k][0] for n, k in best.items()))
    if speedup == 1.0:
        assert all(c.rank is None and c.reason.startswith("kept dense") for c in plan.choices)


@pytest.mark.parametrize("speedup", [1.2, 1.5, 1.8])
def test_the_shared_solver_matches_exhaustive_search(speedup):
    """The MAC-budget planner's solver (the default) finds the exhaustive optimum here."""
    table = hand_table()
    plan = plan_for_latency(table, SPECTRA, speedup=speedup)
    ref = plan_for_latency(table, SPECTRA, exhaustive, speedup=speedup)
    assert plan.predicted_ms <= plan.target_ms + 1e-9
    assert sum(c.error for c in plan.choices) == pytest.approx(sum(c.error for c in ref.choices), abs=1e-9)


def test_out_of_reach_says_the_best_speedup():
    with pytest.raises(PlanError, match=r"out of reach: the fastest plan predicts 4.500 ms, a speedup of 2.22x"):
        plan_for_latency(hand_table(), SPECTRA, exhaustive, speedup=3)
    with pytest.raises(PlanError, match="exactly one"):
        plan_for_latency(hand_table(), SPECTRA, exhaustive)
    with pytest.raises(PlanError, match="target_latency must be > 0"):
        plan_for_latency(hand_table(), SPECTRA, exhaustive, target_ms=0)


def test_plan_from_a_measured_table(tmp_path):
    from dsdeploy.runtime.latency_table import latency_table
    from tests.test_latency_table import FAST, TwinNet

    torch.manual_seed(0)
    model = TwinNet().eval()
    table = latency_table(model, (1, 8, 12, 12), threads=1, max_rank=2, layouts=("branches", "concat"),
                          protocol=FAST, cache_dir=tmp_path)
    spectra = {lt.name: channel_svd(model.get_submodule(lt.name).weight.detach())[1] for lt in table.candidates}
    fastest = table.remainder_ms + sum(min([lt.dense_ms, *[b.ms for b in lt.blocks]]) for lt in table.candidates)
    target = (fastest + table.model_ms) / 2
    plan = plan_for_latency(table, spectra, exhaustive, target_ms=target)
    assert plan.predicted_ms <= target + 1e-9 and [c.name for c in plan.choices] == ["a", "b", "c", "d"]
