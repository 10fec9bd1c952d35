"""The verification's statistics: a bootstrap interval over rounds that holds its estimate, rounds that stop
early when the interval is narrow and go on to the cap when it is wide (synthetic numbers: no timing)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dsdeploy.conversion.latency_verify import bootstrap_estimate, narrow_enough, run_rounds, split_regimes
from dsdeploy.conversion.workflow import latency_lines, regimes_line


def rounds_of(medians, runs=20, spread=0.01, seed=0):
    rng = np.random.default_rng(seed)
    return [list(m * (1 + spread * rng.standard_normal(runs))) for m in medians]


def test_the_interval_holds_the_estimate_and_is_seeded():
    orig, conv = rounds_of([10, 11, 9.5, 10.4]), rounds_of([5, 6.2, 4.6, 5.1], seed=1)
    est = bootstrap_estimate(orig, conv)
    assert est.ci95[0] <= est.speedup <= est.ci95[1] and est.rounds == 4
    assert est.converted_ci95[0] <= est.converted_ms <= est.converted_ci95[1]
    assert est.speedup == pytest.approx(np.median(np.concatenate(orig)) / np.median(np.concatenate(conv)))
    assert bootstrap_estimate(orig, conv) == est  # seeded
    assert bootstrap_estimate(orig, [r[:7] for r in conv]).rounds == 4  # rounds of unequal lengths
    with pytest.raises(ValueError):
        bootstrap_estimate(orig, conv[:3])


def test_a_drift_that_hits_both_models_cancels_in_the_ratio():
    """Rounds are resampled in pairs: a machine that is 30 % slower in some rounds for both models gives a
    narrow speedup interval, though each model's own interval is wide."""
    drift = [1.0, 1.3, 1.0, 1.3, 1.0, 1.3]
    est = bootstrap_estimate(rounds_of([10 * d for d in drift]), rounds_of([4 * d for d in drift], seed=1))
    assert est.speedup == pytest.approx(2.5, rel=0.05)
    assert narrow_enough(est, 0.05) and not narrow_enough(est, 0.05, on="converted")


def test_two_speed_regimes_are_found_with_each_ones_rounds_and_speedup():
    """What a 2-vCPU cloud VM does to a DS graph (benchmarks/RESULTS-cache-regimes.md): some rounds ~5.3 ms,
    others ~8.0 ms, the original ~17.2 ms throughout."""
    conv_medians = [5.3, 5.4, 8.0, 8.1, 5.3, 5.35, 7.9, 5.25, 5.3, 8.05, 5.4, 5.3]
    fast, slow = split_regimes(rounds_of([17.2] * 12), rounds_of(conv_medians, seed=1), tolerance=0.05)
    assert (fast.rounds, slow.rounds) == (8, 4)
    assert fast.converted_ms == pytest.approx(5.3, rel=0.02) and slow.converted_ms == pytest.approx(8.0, rel=0.02)
    assert fast.speedup == pytest.approx(17.2 / 5.3, rel=0.03) and slow.speedup == pytest.approx(17.2 / 8.0, rel=0.03)
    with pytest.raises(ValueError):
        split_regimes(rounds_of([17.2] * 3), rounds_of([5.3] * 4), tolerance=0.05)


@pytest.mark.parametrize("conv_medians", [
    list(np.linspace(5.0, 5.5, 12)),  # one regime, evenly spread over 10 %: no empty gap
    [5.3] * 10 + [5.5, 5.5],  # two groups, but 4 % apart: within the tolerance
    [5.3] * 11 + [8.0],  # a single slow round is an outlier, not a regime
    [5.3, 8.0, 5.3],  # too few rounds to tell
])
def test_one_regime_or_too_little_evidence_is_not_split(conv_medians):
    n = len(conv_medians)
    assert split_regimes(rounds_of([17.2] * n), rounds_of(conv_medians, spread=0.0), tolerance=0.05) is None


def test_the_report_says_in_which_regime_the_target_holds():
    fast = {"rounds": 8, "original_ms": 17.2, "measured_ms": 5.4, "measured_speedup": 3.19}
    slow = {"rounds": 4, "original_ms": 17.2, "measured_ms": 8.0, "measured_speedup": 2.15}
    assert "holds in the faster only" in regimes_line([fast, slow], None, 3.0)
    assert "holds in both" in regimes_line([fast, slow], None, 2.0)
    assert "holds in neither" in regimes_line([fast, slow], None, 3.5)
    assert "holds in the faster only" in regimes_line([fast, slow], 5.6, None)  # a latency target in ms
    assert "share no cache" in regimes_line([fast, slow], None, 3.0, threads=2)  # only the DS graph slowed
    assert "at one thread: other work" in regimes_line([fast, slow], None, 3.0, threads=1)
    both = {**slow, "original_ms": 19.0}  # the original slowed too: the machine, not the graph
    assert "the original slowed too" in regimes_line([fast, both], None, 3.0, threads=2)
    attempt = {"target_ms": 5.7, "predicted_ms": 5.7, "original_ms": 17.2, "measured_ms": 5.6,
               "measured_speedup": 3.07, "ci95": [2.2, 3.2], "rounds": 12, "prediction_error": 0.02,
               "resolved": False, "interval": "undecided", "regimes": [fast, slow]}
    lines = latency_lines({"speedup": 3.0, "verified": {"attempts": [attempt], "chosen": 0, "met": True}})
    assert any("two speed regimes in these rounds: x3.19 in 8 rounds (5.400 ms), x2.15 in 4 rounds" in line
               for line in lines)


def test_rounds_stop_at_the_minimum_when_the_interval_is_narrow():
    calls = itertools.count(1)
    feed = iter(zip(rounds_of([10] * 50), rounds_of([4] * 50, seed=1), strict=True))

    def next_round():
        next(calls)
        return next(feed)

    est = run_rounds(next_round, tolerance=0.05, min_rounds=3, max_rounds=12)
    assert est.rounds == 3 and next(calls) == 4 and narrow_enough(est, 0.05)


def test_rounds_go_on_to_the_cap_when_the_interval_is_wide():
    """The converted model's speed flips between rounds (4 ms / 6 ms, the original steady): the interval
    stays wider than the tolerance, so all max_rounds run; a time cap stops sooner."""
    conv = [4.0, 6.0] * 10
    feed = iter(zip(rounds_of([10] * 20), rounds_of(conv, seed=1), strict=True))
    est = run_rounds(lambda: next(feed), tolerance=0.05, min_rounds=3, max_rounds=8)
    assert est.rounds == 8 and not narrow_enough(est, 0.05) and est.ci95[0] <= est.speedup <= est.ci95[1]
    feed = iter(zip(rounds_of([10] * 20), rounds_of(conv, seed=1), strict=True))
    ticks = itertools.count(0, 10)  # each clock read 10 s later
    est = run_rounds(lambda: next(feed), tolerance=0.05, min_rounds=2, max_rounds=12, time_cap_s=35,
                     clock=lambda: float(next(ticks)))
    assert est.rounds == 5  # the clock read after round 5 (40 s) is past the cap


def test_measure_pair_times_rounds_in_fresh_processes():
    """The verification as users get it: each round of both exported graphs in a child process; the same
    graph on both sides gives a speedup near 1 whose interval holds it (no speed asserted)."""
    import torch

    from dsdeploy.conversion.latency_verify import measure_pair

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU()).eval()
    v = measure_pair(net, net, (1, 8, 16, 16), {"provider": "cpu", "threads": 1}, tolerance=0.05, per_round=5,
                     min_rounds=2, max_rounds=2, isolated=True)
    est = v.estimate
    assert est.rounds == 2 and est.ci95[0] <= est.speedup <= est.ci95[1] and isinstance(v.resolved, bool)
    assert "fresh process" in v.protocol and v.op_counts.get("Conv") == 1
