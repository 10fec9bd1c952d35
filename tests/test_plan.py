"""The planner: a stated reason for every conv, and rank policies that hold."""

import pytest
from torch import nn

from dsdeploy.conversion.decompose import channel_svd, energy_curve
from dsdeploy.conversion.opcount import trace_calls
from dsdeploy.conversion.plan import Plan, Policy, ds_mac_ratio, make_plan
from dsdeploy.errors import PlanError

SHAPE = (1, 3, 16, 16)


def plan_for(model, **kw):
    return make_plan(model, Policy(**kw), trace_calls(model, SHAPE), SHAPE)


def reasons(plan):
    return {d.name: d.reason for d in plan.layers}


def test_every_conv_has_a_reason(net):
    r = reasons(plan_for(net, rank=1))
    assert r["stem"].startswith("stem")
    assert r["dw"] == "already depthwise"
    assert r["point"].startswith("1x1")
    assert r["up"] == "transposed conv"
    assert r["conv1"] == r["grouped"] == r["conv2"] == "converted"


def test_custom_conv_subclass_is_skipped():
    class WSConv(nn.Conv2d):
        def forward(self, x):
            w = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
            return self._conv_forward(x, w, self.bias)

    class Plain(nn.Conv2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, 8, 3), WSConv(8, 8, 3), Plain(8, 8, 3))
    r = reasons(plan_for(model, rank=1))
    assert "own forward" in r["1"]
    assert r["2"] == "converted"


def test_include_exclude_and_stem(net):
    r = reasons(plan_for(net, rank=1, include="conv", exclude="conv2"))
    assert r["conv1"] == "converted"
    assert r["conv2"] == "excluded by convert.exclude"
    assert r["grouped"] == "not matched by convert.include"
    assert reasons(plan_for(net, rank=1, convert_stem=True))["stem"] == "converted"
    with pytest.raises(PlanError):
        plan_for(net, include="(")


def test_no_gain_rank_is_skipped_with_reason():
    model = nn.Sequential(nn.Conv2d(8, 8, 3))  # K=1 costs 1/8+1/9 but K=8 costs > 1
    plan = make_plan(model, Policy(rank=8), trace_calls(model, (1, 8, 8, 8)),
                                                            (1, 8, 8, 8))
    assert plan.layers[0].reason.startswith("no gain at rank 8")
    assert not plan.converted


def test_energy_policy_picks_smallest_sufficient_rank(net):
    plan = plan_for(net, energy=0.9)
    assert plan.converted, "the fixture has convertible convs: an energy policy that converts none is a bug"
    mods = dict(net.named_modules())
    for d in plan.converted:
        assert d.energy >= 0.9 - 1e-6
        curve = energy_curve(channel_svd(mods[d.name].weight, mods[d.name].groups)[1])
        assert float(curve[d.rank - 1]) >= 0.9 - 1e-6  # sufficient
        assert d.rank == 1 or float(curve[d.rank - 2]) < 0.9  # and the smallest such rank


@pytest.mark.parametrize("budget", [0.2, 0.35, 0.6])
def test_mac_budget_is_respected_and_used(net, budget):
    plan = plan_for(net, mac_budget=budget)
    conv = {d.name: d for d in plan.converted}
    assert conv, f"a budget of {budget} leaves room for rank 1 on the fixture's convs: something must convert"
    spent = sum(d.macs_after for d in conv.values())
    total = sum(d.macs for d in conv.values())
    assert spent <= budget * total * 1.001
    mods = dict(net.named_modules())
    # greedy is tight: no converted layer could take one more rank step inside the budget
    for name, d in conv.items():
        step = d.macs * ds_mac_ratio(mods[name], 1)
        if d.rank < d.full_rank and ds_mac_ratio(mods[name], d.rank + 1) < 1:
            assert spent + step > budget * total * 0.999


def test_infeasible_budget_and_conflicting_policies(net):
    with pytest.raises(PlanError, match="below what rank 1"):
        plan_for(net, mac_budget=0.01)
    with pytest.raises(PlanError, match="choose one"):
        plan_for(net, rank=1, energy=0.5)


def test_plan_round_trips_through_dict(net):
    plan = plan_for(net, mac_budget=0.3)
    again = Plan.from_dict(plan.to_dict())
    assert again == plan and again.digest() == plan.digest()
