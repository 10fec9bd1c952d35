"""The verification's statistics: a bootstrap interval over rounds that holds its estimate, rounds that stop
early when the interval is narrow and go on to the cap when it is wide (synthetic numbers: no timing)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dsdeploy.conversion.latency_verify import bootstrap_estimate, narrow_enough, run_rounds


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
