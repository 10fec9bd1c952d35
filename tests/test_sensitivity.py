"""The per-layer sensitivity table on calibration data, and the data-aware MAC-budget plan built on it."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch import nn

from dsdeploy.conversion.block import DSConv, ds_blocks
from dsdeploy.conversion.opcount import trace_calls
from dsdeploy.conversion.plan import Policy, ds_mac_ratio, make_plan
from dsdeploy.recover.reconstruct import NormalEquations
from dsdeploy.recover.sensitivity import measure_sensitivity, output_change, truncated
from tests.clirun import invoke


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 12, 3, padding=1, groups=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5)).eval()


def batches(n: int = 3, size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(size, 8, 10, 10, generator=g) for _ in range(n)]


def test_truncated_equations_equal_those_accumulated_at_that_rank():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=2)
    x = torch.randn(4, 8, 10, 10)
    with torch.no_grad():
        big = NormalEquations(DSConv.from_conv(conv, 6, "multiplier"), conv)
        big.add(x)
        for r in (1, 3, 6):
            block = DSConv.from_conv(conv, r)
            direct = NormalEquations(block, conv)
            direct.add(x)
            cut = truncated(big, block)
            assert cut.error(cut.solve(1e-6)) == pytest.approx(direct.error(direct.solve(1e-6)), abs=1e-9)


def test_table_is_exact_at_full_rank_and_never_worse_with_rank():
    model = tiny_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shape = (1, 8, 10, 10)
    policy = Policy(rank=1, require_gain=False, convert_stem=True)
    table = measure_sensitivity(model, policy, batches(), shape, max_rank=9, batches=3, logit_batches=2)
    assert set(table.layers) == {"0", "3"} and table.metric == "kl"
    assert table.batches == 3 and table.images == 48 and table.logit_batches == 2
    full = {"0": 6, "3": 6}  # min(Cout per group, 3x3)
    calls = trace_calls(model, shape)
    for name, ranks in table.layers.items():
        assert sorted(ranks) == list(range(1, full[name] + 1))
        assert ranks[full[name]]["output_error"] < 1e-6
        assert ranks[full[name]]["logit_error"] < 1e-6
        errs = [ranks[r]["output_error"] for r in sorted(ranks)]
        assert all(b <= a + 1e-9 for a, b in itertools.pairwise(errs)), errs  # nested features: LS error cannot rise
        assert ranks[1]["output_error"] > 1e-3
        for r, row in ranks.items():
            assert row["macs"] == round(calls[name][2] * ds_mac_ratio(model.get_submodule(name), r))
    json.dumps(table.to_dict())  # JSON-able
    assert not ds_blocks(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "output err" in table.render()


def test_output_change_is_kl_for_logits_and_relative_error_otherwise():
    a = torch.tensor([[2.0, 0.0, -1.0]])
    assert output_change(a, a) == 0.0
    b = torch.tensor([[0.0, 2.0, -1.0]])
    p, q = a.softmax(1), b.softmax(1)
    assert output_change(a, b) == pytest.approx(float((p * (p / q).log()).sum()))
    img = torch.ones(1, 2, 3, 3)
    assert output_change(img, 2 * img) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def digits_case():
    from dsdeploy.data.datasets import load_data, make_loader
    from dsdeploy.data.preprocessing import Preprocess
    from dsdeploy.models.samples import load_sample

    model, meta = load_sample("digits_cnn")
    pre = Preprocess.from_dict(meta["preprocessing"])
    split = load_data("digits", pre, seed=0, labelled=False, val_split=0.2)
    loader = make_loader(split.train, 64, shuffle=False)
    shape = tuple(meta["input_shape"])
    table = measure_sensitivity(model, Policy(mac_budget=0.3), loader, shape, batches=1, logit_batches=1)
    return model, shape, table


@pytest.mark.parametrize("budget", [0.2, 0.3, 0.5])
def test_data_plan_beats_the_spectral_plan_on_its_measured_cost(digits_case, budget):
    model, shape, table = digits_case
    calls = trace_calls(model, shape)
    spectral = make_plan(model, Policy(mac_budget=budget), calls, shape)
    data = make_plan(model, Policy(mac_budget=budget), calls, shape, costs=table.costs(), cost_name="kl")

    def summed(plan):
        return sum(table.layers[d.name][d.rank]["logit_error"] for d in plan.converted)

    assert [d.name for d in data.converted] == [d.name for d in spectral.converted]
    assert summed(data) <= summed(spectral) + 1e-12
    assert data.policy["cost_total"] == pytest.approx(summed(data))
    total = sum(d.macs for d in data.converted)
    assert sum(d.macs_after for d in data.converted) <= budget * total * 1.001


def test_inspect_prints_the_table_and_convert_allocates_on_data(tmp_path):
    text = invoke("inspect", "sample:digits_cnn", "--mac-budget", "0.3", "--calib-data", "digits",
                  "--calib-batches", "1", "--allocation", "data")
    assert text.returncode == 0, text.stderr
    assert "logit err (kl)" in text.stdout and "ranks allocated on data" in text.stdout
    for allocation, want in (("auto", "data"), ("spectral", "spectral"), (None, "spectral")):
        out = tmp_path / f"{allocation or 'default'}.dsd"
        res = invoke("convert", "sample:digits_cnn", "-o", out, "--mac-budget", "0.3", "--calib-data", "digits",
                     "--calib-batches", "1", *(["--allocation", allocation] if allocation else []), "--json")
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout)
        assert report["policy"]["allocation"] == want
        assert ("sensitivity" in report["history"][0]) == (want == "data")
        assert report["history"][-1]["stage"] == "calibrate" and out.is_file()
        if want == "data":
            assert report["history"][0]["sensitivity"]["layers"] == len([d for d in report["layers"] if d["convert"]])
            assert all(d["cost"] is not None for d in report["layers"] if d["convert"])
    res = invoke("inspect", "sample:digits_cnn", "--calib-data", "digits", "--calib-batches", "1", "--json")
    table = json.loads(res.stdout)["sensitivity"]["layers"]
    assert table and all({"output_error", "logit_error", "macs"} <= set(row) for ranks in table.values()
                         for row in ranks.values())
    res = invoke("convert", "sample:digits_cnn", "-o", tmp_path / "x.dsd", "--mac-budget", "0.3",
                 "--allocation", "data")
    assert res.returncode != 0 and "needs calibration data" in res.stderr


def test_recipe_convert_stage_allocates_on_the_run_data(tmp_path):
    from dsdeploy.pipeline.engine import Context
    from dsdeploy.pipeline.recipe import recipe_from_dict
    from dsdeploy.pipeline.stages import run_convert

    recipe = recipe_from_dict({"model": {"spec": "sample:digits_cnn"}, "data": {"spec": "digits"},
                               "convert": {"mac_budget": 0.3, "allocation": "data"}, "calibrate": {"batches": 1}}, "r.toml")
    folder = tmp_path / "convert"
    folder.mkdir()
    out = run_convert(Context(recipe, tmp_path), folder)
    plan = json.loads((folder / "plan.json").read_text())
    assert plan["policy"]["allocation"] == "data" and plan["history"][0]["sensitivity"]["images"] > 0
    assert out.result["calibration"] is not None
