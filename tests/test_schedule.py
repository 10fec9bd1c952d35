"""LR schedules, warmup, duration parsing and time-budget sizing."""

import math

import pytest

from dsdeploy.errors import DsdeployError
from dsdeploy.ranges import parse_duration
from dsdeploy.recover.schedule import Schedule, steps_for_budget


def test_linear_warmup_then_cosine_to_min():
    s = Schedule("cosine", lr=0.1, total_steps=110, warmup_steps=10, warmup_start=0.1, min_lr_ratio=0.01)
    assert s.lr_at(0) == pytest.approx(0.01)
    assert s.lr_at(5) == pytest.approx(0.01 + 0.09 * 0.5)
    assert s.lr_at(10) == pytest.approx(0.1)
    lrs = [s.lr_at(i) for i in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay after warmup
    assert s.lr_at(60) == pytest.approx(0.001 + 0.5 * 0.099 * (1 + math.cos(math.pi * 50 / 100)))
    assert s.lr_at(10_000) == s.lr_at(109)  # clamped past the end


def test_step_schedule_drops_at_milestones():
    s = Schedule("step", lr=1.0, total_steps=100, milestones=[0.5, 0.75], gamma=0.1)
    assert s.lr_at(49) == 1.0
    assert s.lr_at(50) == pytest.approx(0.1)
    assert s.lr_at(75) == pytest.approx(0.01)


def test_cosine_restarts_restart_and_grow():
    s = Schedule("cosine-restarts", lr=1.0, total_steps=70, cycles=3, cycle_mult=2.0)  # periods 10, 20, 40
    assert s.lr_at(0) == pytest.approx(1.0)
    assert s.lr_at(9) < 0.1
    assert s.lr_at(10) == pytest.approx(1.0)  # first restart
    assert s.lr_at(20) == pytest.approx(0.5)  # middle of the 20-step cycle
    assert s.lr_at(30) == pytest.approx(1.0)  # second restart
    assert s.lr_at(69) < 0.01


def test_constant_and_validation():
    assert Schedule("constant", lr=0.3, total_steps=5).lr_at(4) == 0.3
    with pytest.raises(DsdeployError, match="unknown LR schedule"):
        Schedule("linear").validate()
    with pytest.raises(DsdeployError, match="positive"):
        Schedule("cosine", lr=0).validate()


@pytest.mark.parametrize("text,seconds", [("10m", 600), ("90s", 90), ("1h30m", 5400), ("45", 45), ("0.5m", 30),
                                          (12, 12), ("500ms", 0.5), ("2h", 7200), ("1m30s", 90), ("2s500ms", 2.5),
                                          ("1h 30m", 5400), ("3.5", 3.5), (".5s", 0.5), ("10M", 600)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "ten minutes", "5x", "0s", "0ms", "30m1h", "1.2.3s", "-5s", "inf", float("nan"),
                                 True])
def test_parse_duration_rejects(bad):
    with pytest.raises(DsdeployError):
        parse_duration(bad)


@pytest.mark.parametrize("kind", ["cosine", "step", "cosine-restarts"])
def test_resize_keeps_the_learning_rate_continuous_and_still_decays_to_the_end(kind):
    s = Schedule(kind, lr=1.0, total_steps=40, warmup_steps=4, min_lr_ratio=0.0)
    end = Schedule(kind, lr=1.0, total_steps=40, warmup_steps=4).lr_at(39)  # where an unresized run ends
    for step, total in [(10, 400), (100, 60), (59, 200)]:  # grow, shrink, grow again
        before = s.lr_at(step)
        s.resize(step, total)
        assert s.lr_at(step) == pytest.approx(before)  # no jump at the resize
    lrs = [s.lr_at(i) for i in range(59, 200)]
    if kind != "cosine-restarts":
        assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert s.lr_at(199) <= end + 0.02 and s.lr_at(10_000) == s.lr_at(199)


def test_resize_before_the_decay_sets_the_warmup_and_a_short_plan_goes_back_to_the_real_progress():
    s = Schedule("cosine", lr=1.0, total_steps=10 ** 6, warmup_steps=50)
    s.resize(3, 100, warmup_steps=10)  # still warming up: the warmup shrinks with the run
    assert s.warmup_steps == 10 and s.lr_at(3) < s.lr_at(10) == pytest.approx(1.0)
    s.resize(95, 100)
    low = s.lr_at(95)
    s.resize(95, 300, progress=0.3)  # the plan was far too short: only 30% of the time is spent
    assert s.lr_at(95) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))
    assert s.lr_at(95) > low
    s.resize(100, 300, progress=0.35)  # within 5 points of the steps' own progress: no jump
    assert s.anchor_frac == pytest.approx(0.3 + 5 / 205 * 0.7)
    s.resize(120, 120)  # no time left: the run ends here
    assert s.total_steps == 120


def test_budget_sizing_mid_epoch_counts_the_current_epochs_evaluation():
    # 20 s: the current epoch's last 30 steps (3 s) + its evaluation (1 s), one 11 s epoch, then 5 s left:
    # 40 steps (4 s) + the last evaluation (1 s)
    n = steps_for_budget(20, 0, step_s=0.1, steps_per_epoch=100, eval_s=1.0, margin=1.0, done_in_epoch=70)
    assert n == 30 + 100 + 40
    assert steps_for_budget(3, 0, step_s=0.1, steps_per_epoch=100, eval_s=1.0, margin=1.0, done_in_epoch=70) == 20


def test_budget_sizing_fits_the_budget():
    # 100 steps/epoch at 0.1 s + 5 s eval = 15 s per epoch; 92% of 100 s left = 92 s -> 6 epochs (90 s) + nothing
    n = steps_for_budget(110, 10, step_s=0.1, steps_per_epoch=100, eval_s=5)
    assert n == 600
    assert n * 0.1 + (n / 100) * 5 <= 0.92 * 100
    # a partial last epoch is used when there is room for its steps and its evaluation
    # 9 epochs of 11 s = 99 s; of the 6 s left, 1 s is the last evaluation -> 50 more steps
    n = steps_for_budget(105, 0, step_s=0.1, steps_per_epoch=100, eval_s=1.0, margin=1.0)
    assert n == 950
    assert steps_for_budget(1, 5, step_s=0.1, steps_per_epoch=100, eval_s=1.0) == 1  # over budget: still >= 1
