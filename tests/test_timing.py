"""The timing protocol: one timed session at a time, every other session spin-free, so a session
interleaved with another measures what it measures alone (no speed is asserted, only ratios with
a generous margin, best of a few rounds so a loaded 2-core machine does not fail it)."""

from __future__ import annotations

import io
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dsdeploy.runtime.providers import ep_config
from dsdeploy.runtime.sessions import create_session, session_options
from dsdeploy.runtime.timing import Protocol, measure, timed_session

THREADS = 2
PROTO = Protocol(warmup=5, iters=40)


def _onnx(model: nn.Module, shape) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(*shape),), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"])
    return buf.getvalue()


@pytest.fixture(scope="module")
def graphs():
    torch.manual_seed(0)
    a = _onnx(nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)),
              (1, 32, 40, 40))
    b = _onnx(nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 32, 1)), (1, 32, 40, 40))
    feed = {"input": np.random.default_rng(0).standard_normal((1, 32, 40, 40)).astype(np.float32)}
    return a, b, feed


def _median_interleaved(timed, other, feed, iters: int) -> float:
    """Alternate ``other.run`` (untimed) and ``timed.run`` (timed); the median of the timed runs in ms."""
    for _ in range(5):
        other.run(None, feed)
        timed.run(None, feed)
    samples = []
    for _ in range(iters):
        other.run(None, feed)
        t0 = time.perf_counter_ns()
        timed.run(None, feed)
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return float(np.median(samples))


def _best_ratio(alone, interleaved, rounds: int = 3) -> float:
    """min over rounds of the interleaved median / min over rounds of the alone median."""
    a, i = [], []
    for _ in range(rounds):
        a.append(alone())
        i.append(interleaved())
    return min(i) / min(a)


def test_protocol_is_stated():
    text = Protocol(warmup=3, iters=20).describe()
    assert "sequential" in text and "spinning on" in text and "3 warmup" in text and "median of 20" in text
    assert "spinning off" in Protocol(spinning=False).describe()


def test_other_sessions_are_spin_free():
    so = session_options(THREADS)
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(THREADS, spinning=True).get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_one_timed_session_at_a_time(graphs):
    a, b, _ = graphs
    cpu = ep_config("CPUExecutionProvider", None, THREADS)
    with timed_session(lambda: create_session(a, cpu, THREADS, spinning=True)), \
            pytest.raises(RuntimeError, match="one session at a time"), \
            timed_session(lambda: create_session(b, cpu, THREADS, spinning=True)):
        pass  # pragma: no cover
    with timed_session(lambda: create_session(b, cpu, THREADS, spinning=True)):
        pass  # released: the slot is free again


def test_timed_session_interleaved_with_another_measures_as_alone(graphs):
    """The timed (spinning) session alternating with a tool session (spin-free) keeps its alone median."""
    a, b, feed = graphs
    cpu = ep_config("CPUExecutionProvider", None, THREADS)

    def interleaved() -> float:
        other = create_session(b, cpu, THREADS)  # how dsdeploy opens every session it does not time
        with timed_session(lambda: create_session(a, cpu, THREADS, spinning=True)) as timed:
            return _median_interleaved(timed, other, feed, PROTO.iters)

    ratio = _best_ratio(lambda: measure(a, feed, threads=THREADS, protocol=PROTO).p50_ms, interleaved)
    assert ratio < 1.5, f"interleaved median is {ratio:.2f}x the alone median"


def test_two_spin_free_sessions_interleaved_each_measure_as_alone(graphs):
    """Two sessions both opened as dsdeploy opens untimed ones, run alternately: each keeps its alone median."""
    a, b, feed = graphs
    cpu = ep_config("CPUExecutionProvider", None, THREADS)
    proto = Protocol(warmup=5, iters=40, spinning=False)
    for mine, theirs in ((a, b), (b, a)):
        def interleaved(mine=mine, theirs=theirs) -> float:
            s_mine, s_theirs = create_session(mine, cpu, THREADS), create_session(theirs, cpu, THREADS)
            return _median_interleaved(s_mine, s_theirs, feed, proto.iters)

        ratio = _best_ratio(lambda mine=mine: measure(mine, feed, threads=THREADS, protocol=proto).p50_ms,
                            interleaved)
        assert ratio < 1.5, f"interleaved median is {ratio:.2f}x the alone median"


def test_measure_generates_inputs_and_reports_median(graphs):
    a, _, _ = graphs
    stats = measure(a, threads=1, protocol=Protocol(warmup=1, iters=5))
    assert stats.n == 5 and stats.min_ms <= stats.p50_ms <= stats.max_ms
