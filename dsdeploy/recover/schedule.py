"""Learning-rate schedules (per optimizer step) with linear warmup, and time-budget sizing.

A schedule is plain data (:class:`Schedule`) plus a pure function of the step number,
so its whole state is the step number plus the schedule's own fields: checkpoints store
both and resuming gives the identical learning rate sequence. A time-budgeted run resizes
the schedule while it trains (:meth:`Schedule.resize`): the decay keeps the progress it
has made and spreads what is left over the new number of steps, so the learning rate
never jumps and still reaches its end value at the last step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from dsdeploy.errors import DsdeployError
from dsdeploy.ranges import check_number

KINDS = ("step", "cosine", "cosine-restarts", "constant")


@dataclass
class Schedule:
    """Learning rate as a function of the optimizer step.

    Attributes:
        kind: ``step`` (multiply by ``gamma`` at each fraction in ``milestones`` of the
            run), ``cosine`` (to ``min_lr_ratio * lr``), ``cosine-restarts`` (SGDR:
            ``cycles`` cosine cycles, each ``cycle_mult`` times longer than the previous)
            or ``constant``.
        lr: the peak learning rate.
        total_steps: optimizer steps in the whole run (warmup included).
        warmup_steps: linear warmup from ``warmup_start * lr`` to ``lr``.
        anchor_step, anchor_frac: set by :meth:`resize`: at ``anchor_step`` the decay had
            covered ``anchor_frac`` of its course; the rest is spread over the steps up to
            ``total_steps`` (0, 0.0: never resized, the decay runs from ``warmup_steps``).
    """

    kind: str = "cosine"
    lr: float = 0.01
    total_steps: int = 1
    warmup_steps: int = 0
    warmup_start: float = 0.1
    min_lr_ratio: float = 0.0
    gamma: float = 0.1
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    cycles: int = 3
    cycle_mult: float = 2.0
    anchor_step: int = 0
    anchor_frac: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError (a DsdeployError) naming the first field out of range."""
        if self.kind not in KINDS:
            raise DsdeployError(f"unknown LR schedule {self.kind!r}; choose one of {', '.join(KINDS)}")
        check_number(self.lr, "schedule lr", low=0, low_open=True)
        check_number(self.total_steps, "schedule total_steps", low=1, integer=True)
        check_number(self.warmup_steps, "schedule warmup_steps", low=0, integer=True)
        check_number(self.warmup_start, "schedule warmup_start", low=0, high=1)
        check_number(self.min_lr_ratio, "schedule min_lr_ratio", low=0, high=1)
        check_number(self.gamma, "schedule gamma", low=0, low_open=True)
        for m in self.milestones:
            check_number(m, "schedule milestones", low=0, high=1)
        check_number(self.cycles, "schedule cycles", low=1, integer=True)
        check_number(self.cycle_mult, "schedule cycle_mult", low=1)
        check_number(self.anchor_step, "schedule anchor_step", low=0, integer=True)
        check_number(self.anchor_frac, "schedule anchor_frac", low=0, high=1)

    def _warm(self) -> int:
        return min(max(0, int(self.warmup_steps)), max(1, int(self.total_steps)) - 1)

    def _position(self, step: int) -> tuple[float, float]:
        """(x, span): the decay has covered ``x / span`` of its course at ``step`` (after warmup)."""
        total, warm = max(1, int(self.total_steps)), self._warm()
        span = max(1, total - warm)
        if self.anchor_step <= warm or self.anchor_frac <= 0:
            return float(min(step - warm, span - 1)), float(span)
        x0 = self.anchor_frac * span
        left = max(1, total - self.anchor_step)
        t = min(max(0, step - self.anchor_step), left - 1)
        return x0 + t * (span - x0) / left, float(span)

    def lr_at(self, step: int) -> float:
        """The learning rate for optimizer step ``step`` (0-based)."""
        warm = self._warm()
        if step < warm:
            return self.lr * (self.warmup_start + (1.0 - self.warmup_start) * step / warm)
        t, span = self._position(step)
        if self.kind == "constant":
            return self.lr
        if self.kind == "step":
            return self.lr * self.gamma ** sum(1 for m in self.milestones if t / span >= m)
        if self.kind == "cosine":
            return self._cos(t, span)
        return self._restart_lr(t, span)

    def resize(self, step: int, total_steps: int, warmup_steps: int | None = None,
               progress: float | None = None) -> None:
        """Make the run ``total_steps`` long from ``step`` on (the next step to take) without a jump.

        Once the decay has begun, the fraction of it covered at ``step`` is kept and the rest
        spread over ``total_steps - step`` steps (the warmup length is then fixed); before,
        ``warmup_steps`` (when given) replaces the warmup length. ``progress``: the fraction of
        the run really done (e.g. by time); when the steps ran more than 5 points ahead of it
        (an earlier plan was far too short), the decay goes back to it: the learning rate
        rises once, as at a warm restart. ``total_steps <= step`` ends the run at ``step``.
        """
        total = max(1, int(total_steps), int(step))
        warm = self._warm()
        if step > warm:
            t, span = self._position(step)
            frac = min(1.0, t / span)
            if progress is not None and 0 <= progress < frac - 0.05:
                frac = progress
            self.warmup_steps, self.anchor_step, self.anchor_frac = warm, int(step), frac
        elif warmup_steps is not None:
            self.warmup_steps = max(0, int(warmup_steps))
        self.total_steps = total

    def _cos(self, t: float, period: float) -> float:
        low = self.lr * self.min_lr_ratio
        return low + 0.5 * (self.lr - low) * (1.0 + math.cos(math.pi * min(1.0, t / max(1.0, period))))

    def _restart_lr(self, t: float, span: float) -> float:
        weights = [self.cycle_mult ** i for i in range(self.cycles)]
        first = span / sum(weights)
        start = 0.0
        for w in weights:
            period = first * w
            if t < start + period:
                return self._cos(t - start, period)
            start += period
        return self._cos(1.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def steps_for_budget(budget_s: float, elapsed_s: float, step_s: float, steps_per_epoch: int,
                     eval_s: float, margin: float = 0.92, done_in_epoch: int = 0) -> int:
    """How many optimizer steps fit in what is left of a time budget.

    Args:
        budget_s: the whole budget in seconds.
        elapsed_s: seconds already spent (data preparation, evaluations, steps taken).
        step_s: measured seconds per training step.
        steps_per_epoch: steps in one pass over the training data.
        eval_s: seconds one end-of-epoch validation + checkpoint takes (estimated).
        margin: fraction of the remaining time to plan for (the rest absorbs noise).
        done_in_epoch: steps of the current epoch already taken (its evaluation is still due).

    Returns:
        The number of further steps (at least 1): the steps plus an evaluation at the end of
        each epoch (and after a partial last one) fit in ``margin * (budget_s - elapsed_s)``.
    """
    left = max(0.0, margin * (budget_s - elapsed_s))
    spe = max(1, int(steps_per_epoch))
    if step_s <= 0:
        return max(1, spe - min(done_in_epoch, spe - 1))
    steps = 0
    first = spe - min(max(0, int(done_in_epoch)), spe - 1)  # what the current epoch still holds
    if done_in_epoch:
        if first * step_s + eval_s > left:
            return max(1, min(first, int((left - eval_s) / step_s + 1e-9)))
        steps, left = first, left - first * step_s - eval_s
    epoch_s = spe * step_s + eval_s
    full = int(left / epoch_s + 1e-9)
    rest = left - full * epoch_s - eval_s  # a partial last epoch still ends with an evaluation
    extra = max(0, int(rest / step_s + 1e-9))
    return max(1, steps + full * spe + min(extra, spe))
