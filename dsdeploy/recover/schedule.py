"""Learning-rate schedules (per optimizer step) with linear warmup, and time-budget sizing.

A schedule is plain data (:class:`Schedule`) plus a pure function of the step number,
so its whole state is one integer: checkpoints store the step and resuming gives the
identical learning rate sequence. ``total_steps`` may be set after construction (the
time-budget mode sizes it from the measured speed of the first steps).
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

    def lr_at(self, step: int) -> float:
        """The learning rate for optimizer step ``step`` (0-based)."""
        total = max(1, int(self.total_steps))
        warm = min(max(0, int(self.warmup_steps)), total - 1)
        if step < warm:
            return self.lr * (self.warmup_start + (1.0 - self.warmup_start) * step / warm)
        t = min(step - warm, total - warm - 1)
        span = max(1, total - warm)
        frac = t / span
        if self.kind == "constant":
            return self.lr
        if self.kind == "step":
            return self.lr * self.gamma ** sum(1 for m in self.milestones if frac >= m)
        if self.kind == "cosine":
            return self._cos(t, span)
        return self._restart_lr(t, span)

    def _cos(self, t: float, period: float) -> float:
        low = self.lr * self.min_lr_ratio
        return low + 0.5 * (self.lr - low) * (1.0 + math.cos(math.pi * min(1.0, t / max(1.0, period))))

    def _restart_lr(self, t: int, span: int) -> float:
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
                     eval_s: float, margin: float = 0.92) -> int:
    """How many optimizer steps fit in what is left of a time budget.

    Args:
        budget_s: the whole budget in seconds.
        elapsed_s: seconds already spent (setup, measured steps).
        step_s: measured seconds per training step.
        steps_per_epoch: steps in one pass over the training data.
        eval_s: seconds one end-of-epoch validation + checkpoint takes (estimated).
        margin: fraction of the remaining time to plan for (the rest absorbs noise).

    Returns:
        The number of further steps (at least 1): each epoch's steps plus its evaluation
        fit in ``margin * (budget_s - elapsed_s)``.
    """
    left = max(0.0, margin * (budget_s - elapsed_s))
    epoch_s = steps_per_epoch * step_s + eval_s
    full = int(left / epoch_s + 1e-9) if epoch_s > 0 else 0
    rest = left - full * epoch_s - eval_s  # a partial last epoch still ends with an evaluation
    extra = max(0, int(rest / step_s + 1e-9)) if step_s > 0 else 0
    return max(1, full * steps_per_epoch + min(extra, steps_per_epoch))
