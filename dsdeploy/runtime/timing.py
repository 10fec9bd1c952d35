"""Latency timing: warm-up, then ``session.run`` timed with ``time.perf_counter_ns``, and the statistics of the samples."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass
class Stats:
    """Latency statistics in milliseconds over ``n`` timed runs; p99 is unreliable below 100 samples."""

    n: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    std_ms: float
    p99_reliable: bool

    @classmethod
    def of(cls, samples_ms: list[float]) -> "Stats":
        a = np.asarray(samples_ms, dtype=np.float64)
        p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
        return cls(len(a), float(a.mean()), p50, p90, p99, float(a.min()), float(a.max()), float(a.std()),
                   len(a) >= 100)


def time_runs(session, feed: dict[str, np.ndarray], *, warmup: int = 5, iters: int | None = 50,
              duration: float | None = None) -> list[float]:
    """Run ``session`` on ``feed`` ``warmup`` times untimed, then ``iters`` timed runs (or, with
    ``iters=None``, as many as fit in ``duration`` seconds, at least one); the samples in ms."""
    for _ in range(warmup):
        session.run(None, feed)
    samples: list[float] = []
    deadline = time.perf_counter_ns() + int((duration or 0) * 1e9)
    while (len(samples) < iters) if iters else (not samples or time.perf_counter_ns() < deadline):
        t0 = time.perf_counter_ns()
        session.run(None, feed)
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return samples
