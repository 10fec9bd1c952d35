"""Latency timing: the one measuring protocol every reported latency comes from, and its statistics.

The protocol (:class:`Protocol`) is *sequential*: a timed session is created, warmed up,
timed run by run with ``time.perf_counter_ns`` and released, and only one timed session
is alive in the process at a time (:func:`timed_session` refuses a second). Every other
session dsdeploy opens (parity references, accuracy evaluation, export gates) has
intra-op spinning off (:func:`dsdeploy.runtime.sessions.session_options`), so an idle
or interleaved session never burns the cores the timed one runs on. The timed session
itself spins as a deployed ONNX Runtime session does by default (``spinning=True``);
with ``spinning=False`` it is timed spin-free, as a process serving several models would
run. Why: several sessions each with its own spinning intra-op pool distort each other
(a CIFAR ResNet at batch 32: 48.6 ms interleaved vs 12.2 ms alone on 2 cores), while
spinning off costs ~12 % on a DS-converted ResNet-18 at 2 threads (measured), so turning
it off for the timed session would misstate deployed speed.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from dsdeploy.runtime.providers import ep_config
from dsdeploy.runtime.sessions import create_session


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
    def of(cls, samples_ms: list[float]) -> Stats:
        a = np.asarray(samples_ms, dtype=np.float64)
        p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
        return cls(len(a), float(a.mean()), p50, p90, p99, float(a.min()), float(a.max()), float(a.std()),
                   len(a) >= 100)


@dataclass(frozen=True)
class Protocol:
    """How a latency is measured: ``warmup`` untimed runs, then ``iters`` timed runs (or as many
    as fit in ``duration`` seconds); the reported figure is the ``statistic`` ("median" or "min"). ``spinning``: whether
    the timed session's intra-op threads spin between parallel sections (ONNX Runtime's default)."""

    warmup: int = 5
    iters: int | None = 50
    duration: float | None = None
    spinning: bool = True
    statistic: str = "median"  # or "min": the undisturbed figure on a machine other processes load

    def describe(self) -> str:
        """One line for reports and JSON, e.g. ``"sequential (one timed session alive at a time, ...), 5 warmup, median of 50"``."""
        runs = f"{self.statistic} of {self.iters}" if self.iters else f"{self.statistic} of the runs in {self.duration:g} s"
        return (f"sequential (one timed session alive at a time, every other session spin-free), "
                f"intra-op spinning {'on' if self.spinning else 'off'}, {self.warmup} warmup, {runs}")


_TIMED = threading.Lock()
_holder: list[int] = []  # the thread holding the slot


@contextlib.contextmanager
def timed_session(create: Callable[[], Any]) -> Iterator[Any]:
    """Hold the process's one timed-session slot, yield ``create()``'s session, release it on exit.

    Another thread's timed session is waited for (timings are serialised); opening a second one
    in the thread that holds the slot raises RuntimeError (a bug in the caller, not a user error):
    two timed sessions alive together would distort each other. Do not keep a reference to the
    session past the ``with`` block (its threads are freed when it is collected).
    """
    if _holder and _holder[0] == threading.get_ident():
        raise RuntimeError("another timed ONNX Runtime session is alive: time one session at a time")
    with _TIMED:
        _holder.append(threading.get_ident())
        try:
            yield create()
        finally:
            _holder.clear()


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


def measure(model: str | bytes, feed: dict[str, np.ndarray] | None = None, *, ep=None, threads: int | None = None,
            protocol: Protocol = Protocol(), seed: int = 0, batch: int = 1) -> Stats:
    """Latency of one ONNX model (a path, or the serialized bytes) by ``protocol``.

    ``ep`` is an :class:`dsdeploy.runtime.providers.EPConfig` (default: the CPU EP);
    ``feed`` defaults to standard-normal float32 inputs at the model's input shapes (seeded by
    ``seed``; a dynamic first axis is fed ``batch``, any other dynamic axis 1). Raises ProviderError
    when the EP cannot create the session.
    """
    return Stats.of(measure_samples(model, feed, ep=ep, threads=threads, protocol=protocol, seed=seed, batch=batch))


def measure_samples(model: str | bytes, feed: dict[str, np.ndarray] | None = None, *, ep=None,
                    threads: int | None = None, protocol: Protocol = Protocol(), seed: int = 0,
                    batch: int = 1) -> list[float]:
    """The timed runs' latencies (ms) of :func:`measure`, in order."""
    cfg = ep or ep_config("CPUExecutionProvider", None, threads)
    with timed_session(lambda: create_session(model, cfg, threads, spinning=protocol.spinning)) as sess:
        if feed is None:
            rng = np.random.default_rng(seed)
            feed = {i.name: rng.standard_normal([d if isinstance(d, int) else (batch if a == 0 else 1)
                                                 for a, d in enumerate(i.shape)]).astype(np.float32)
                    for i in sess.get_inputs()}
        samples = time_runs(sess, feed, warmup=protocol.warmup, iters=protocol.iters, duration=protocol.duration)
        del sess
    return samples
