"""The clock of a time-budgeted fine-tune: what the budget counts, the measured pace, the time split.

The budget is the wall time of the whole fine-tune, counted from when its caller started
the clock (``dsdeploy finetune``: the command's start, so loading the model and decoding
the data count), to the last checkpoint. The schedule is sized from what is left once
the data is ready and the input model has been evaluated, divided by the pace of the
*training steps alone* (the median of the most recent steps), and re-sized every
``RECHECK_S`` seconds while training and after each evaluation: a slow start (a job
sharing the cores, a first batch that decodes lazily) shrinks the run only while it
lasts, and the run grows again when the pace recovers. The schedule is also re-checked
when it reaches its planned end, and when the plan was far too short the decay goes back
to the fraction of the training time really spent (:meth:`Schedule.resize`).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Any

from dsdeploy.recover.schedule import Schedule, steps_for_budget

MIN_STEPS = 4  # steps measured before the first sizing
WINDOW = 24  # the pace is the median of this many most recent steps
RECHECK_S = 2.0  # re-size the schedule this often while training
RESERVE_S = 0.02  # of the budget, kept for restoring the best weights and writing the result


class Budget:
    """One run's clock and pace; ``seconds`` None means no budget (only the time split is kept).

    Args:
        seconds: the budget in seconds, or None.
        start: ``time.perf_counter()`` when the budget's clock started.
        spent: seconds already spent before ``start`` counts (a resumed run's earlier processes).
        trained: seconds of training steps among them.
    """

    def __init__(self, seconds: float | None, start: float, spent: float = 0.0, trained: float = 0.0) -> None:
        self.seconds, self.start, self.trained = seconds, start - spent, trained
        self.recent: deque[float] = deque(maxlen=WINDOW)
        self.last_sized: float | None = None
        self.eval_s = 0.0  # the longest evaluation (+ checkpoint) seen: what each epoch end costs

    def elapsed(self) -> float:
        """Seconds on the clock so far."""
        return time.perf_counter() - self.start

    def step_took(self, seconds: float) -> None:
        """Record one training step's duration (its batch's loading included)."""
        self.recent.append(seconds)
        self.trained += seconds

    def pace(self) -> float | None:
        """Seconds per training step now: the median of the recent steps (None before ``MIN_STEPS``)."""
        return statistics.median(self.recent) if len(self.recent) >= MIN_STEPS else None

    def evaluation_took(self, seconds: float) -> None:
        """Record one end-of-epoch evaluation + checkpoint (the sizing plans one per epoch)."""
        self.eval_s = max(self.eval_s, seconds)

    def due(self) -> bool:
        """Whether the schedule should be re-sized now (never without a budget or a pace)."""
        if self.seconds is None or self.pace() is None:
            return False
        return self.last_sized is None or time.perf_counter() - self.last_sized >= RECHECK_S

    def resize(self, sched: Schedule, step: int, steps_per_epoch: int, done_in_epoch: int,
               warmup_steps: int | None, cap: int | None = None) -> None:
        """Size ``sched`` so the run ends within the budget at the current pace (see the module notes).

        ``step``: the next step; ``done_in_epoch``: steps of the current epoch taken; ``warmup_steps``:
        the warmup wanted (capped at a tenth of the run; used while it lasts); ``cap``: the most
        steps in all (``epochs`` given with the budget). Without a budget or a pace, nothing changes.
        """
        pace = self.pace()
        if self.seconds is None or pace is None:
            return
        self.last_sized = time.perf_counter()
        left = self.seconds * (1 - RESERVE_S)
        more = steps_for_budget(left, self.elapsed(), pace, steps_per_epoch, self.eval_s, done_in_epoch=done_in_epoch)
        if left - self.elapsed() < self.eval_s + pace:
            more = 0  # no time for another step and its evaluation: end at this step
        total = step + more if cap is None else min(cap, step + more)
        warm = None if warmup_steps is None else min(warmup_steps, max(1, total // 10) if warmup_steps else 0)
        progress = self.trained / (self.trained + (total - step) * pace) if self.trained > 0 else None
        sched.resize(step, total, warm, progress)

    def over(self) -> bool:
        """Whether training must stop now to leave room for the last evaluation (the safety net)."""
        if self.seconds is None:
            return False
        return self.elapsed() > self.seconds * (1 - RESERVE_S) - self.eval_s

    def record(self) -> dict[str, Any]:
        """The pace as the history shows it."""
        pace = self.pace()
        return {"step_seconds": None if pace is None else round(pace, 5)}
