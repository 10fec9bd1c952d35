"""Two speed regimes in a latency series (dsdeploy.runtime.regimes) and bench's report of them: synthetic
series (no timing), and a real bench report whose recorded runs are replaced by a two-speed series."""

from __future__ import annotations

import numpy as np
import pytest

from dsdeploy.runtime.regimes import two_regimes, window_regimes


def series(*parts, spread=0.01, seed=0):
    """Consecutive runs: ``parts`` are (ms, count) pairs, each run with a ``spread`` relative noise."""
    rng = np.random.default_rng(seed)
    return list(np.concatenate([ms * (1 + spread * rng.standard_normal(n)) for ms, n in parts]))


def test_two_regimes_returns_the_indices_of_each_group():
    values = [5.3, 8.0, 5.2, 5.4, 8.1, 5.3, 5.35, 7.9]
    fast, slow = two_regimes(values, tolerance=0.05)
    assert sorted(fast) == [0, 2, 3, 5, 6] and sorted(slow) == [1, 4, 7]


def test_a_series_that_switches_speed_gives_each_speed_and_its_share():
    runs = series((5.3, 600), (8.0, 300), (5.3, 300))
    fast, slow = window_regimes(runs)
    assert fast["p50_ms"] == pytest.approx(5.3, rel=0.01) and slow["p50_ms"] == pytest.approx(8.0, rel=0.01)
    assert fast["share"] == pytest.approx(0.75, abs=0.05) and slow["share"] == pytest.approx(0.25, abs=0.05)
    assert fast["windows"] + slow["windows"] == 20


@pytest.mark.parametrize("runs", [
    series((5.3, 1200), spread=0.05),  # one speed, noisy
    series((5.3, 600), (5.5, 600)),  # a 4 % step: within the tolerance
    series((5.3, 8), (8.0, 7)),  # too few runs for four windows of five
    series((5.3, 1140), (8.0, 60)),  # one slow window of twenty: an outlier, not a regime
])
def test_one_speed_or_too_little_evidence_gives_none(runs):
    assert window_regimes(runs) is None


def test_bench_reports_two_speeds_in_its_notes(tmp_path):
    """The report of a real bench run, its recorded runs replaced by a two-speed series: the note gives each
    speed and its share; a one-speed series gives no such note."""
    import torch

    from dsdeploy.runtime.bench import BenchConfig, bench
    from dsdeploy.runtime.bench_report import render_text
    from dsdeploy.runtime.regimes import window_regimes as wr

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), str(path), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "n"}})
    report = bench([str(path)], BenchConfig(iters=20, warmup=1))
    assert "two speeds" not in render_text(report) or report.results[0].regimes  # said only when found
    r = report.results[0]
    r.samples_ms = series((5.3, 600), (8.0, 300), (5.3, 300))
    r.regimes = wr(r.samples_ms)
    text = render_text(report)
    fast, slow = r.regimes
    assert f"ran at two speeds while timed, p50 {fast['p50_ms']:.3f} ms in 75 % of the runs and {slow['p50_ms']:.3f}" \
        in text


def test_a_speedup_against_a_two_speed_model_is_marked():
    from dsdeploy.runtime.bench_report import COMPARE_HEADERS, _compare_row

    row = {"model": "ds", "baseline": "orig", "alias": "cpu", "precision": "fp32", "batch": 1, "baseline_p50_ms": 17.2,
           "model_p50_ms": 8.0, "speedup": 2.15, "conv_mac_ratio": 0.3, "mac_limit_speedup": 3.3,
           "fraction_of_limit": 0.65}
    speed = COMPARE_HEADERS.index("speedup")
    assert _compare_row({**row, "two_speeds": True})[speed] == "2.15x*"
    assert _compare_row({**row, "two_speeds": False})[speed] == "2.15x"
