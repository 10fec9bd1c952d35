"""Verifying a latency target by measurement: alternating rounds until a bootstrap interval is narrow enough.

The original and the converted model, exported as ``dsdeploy export`` writes them, are timed in
alternating rounds (ABBA: even rounds time the original first, odd rounds the converted first;
each a fresh session timing ``per_round`` runs, one session alive at a time) for at least ``min_rounds`` and at most
``max_rounds`` rounds or ``time_cap_s`` seconds. After each round from ``min_rounds`` on, the
speedup (median of the original's runs / median of the converted's) gets a 95 % percentile
bootstrap confidence interval over *rounds* (:func:`bootstrap_estimate`), and the rounds stop as
soon as the interval's half-width is within half the tolerance of the estimate
(:func:`narrow_enough`): the estimate is then good enough to tell a 5 % miss from a hit.

Why rounds, not runs, are resampled: on a shared VM the runs of one session are correlated (the
machine's speed drifts between sessions, not between runs), so the round is the independent unit;
an interval over runs would be far too narrow. A round's original and converted halves are
resampled together (a paired bootstrap), so a drift that slows both cancels in the ratio as it
does in the measurement. By default each round runs in a fresh child process
(:func:`dsdeploy.runtime.isolated.time_in_child`): a DS graph times within ~1 % from round to round over a
few seconds but 5-20 % apart between processes and over minutes, so rounds run back to back in the planning
process alone would give an interval too narrow for the model as a user's process will run it.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from dsdeploy.runtime.regimes import two_regimes

MIN_ROUNDS = 3
MAX_ROUNDS = 12
PER_ROUND = 20  # timed runs of each model per round
TIME_CAP_S = 120.0  # no new round starts after this many seconds of verification
ROUNDS_ENV = "DSDEPLOY_VERIFY_ROUNDS_IN"  # "process": rounds in this process (quicker; the test suite's choice)
RESAMPLES = 1000
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A speedup measured over ``rounds`` alternating rounds, with 95 % bootstrap intervals.

    ``speedup = original_ms / converted_ms`` (each the median of all its runs); ``ci95`` bounds
    the speedup, ``converted_ci95`` the converted model's median ms. Each interval holds its
    point estimate (a percentile interval need not; it is widened to it).
    """

    original_ms: float
    converted_ms: float
    speedup: float
    ci95: tuple[float, float]
    converted_ci95: tuple[float, float]
    rounds: int

    def half_width(self, on: str = "speedup") -> float:
        """The interval's half-width relative to its estimate (``on``: "speedup" or "converted")."""
        lo, hi = self.ci95 if on == "speedup" else self.converted_ci95
        point = self.speedup if on == "speedup" else self.converted_ms
        return (hi - lo) / 2 / point if point > 0 else float("inf")


def _check_rounds(original_rounds: Sequence[Sequence[float]], converted_rounds: Sequence[Sequence[float]],
                  who: str) -> int:
    """The number of rounds; ValueError unless both models have the same number (>= 1) of non-empty rounds."""
    n = len(original_rounds)
    if n == 0 or len(converted_rounds) != n or any(len(r) == 0 for r in (*original_rounds, *converted_rounds)):
        raise ValueError(f"{who} needs the same number (>= 1) of non-empty rounds for both models")
    return n


def bootstrap_estimate(original_rounds: Sequence[Sequence[float]], converted_rounds: Sequence[Sequence[float]], *,
                       resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Estimate:
    """The speedup of per-round samples (ms) and its percentile bootstrap interval over rounds.

    A pure function: ``original_rounds[i]`` and ``converted_rounds[i]`` are round i's run times of
    each model. Each of ``resamples`` bootstrap replicates draws ``len(rounds)`` round indices with
    replacement (seeded ``numpy`` generator) and recomputes both medians from the drawn rounds' runs,
    a round's two halves together (paired); the interval is the replicates' ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993,
    ch. 13, the percentile interval), widened to hold the point estimate.

    Raises:
        ValueError: no rounds, unequal numbers of rounds, or an empty round.
    """
    n = _check_rounds(original_rounds, converted_rounds, "bootstrap_estimate")
    orig = [np.asarray(r, dtype=np.float64) for r in original_rounds]
    conv = [np.asarray(r, dtype=np.float64) for r in converted_rounds]
    o_ms, c_ms = float(np.median(np.concatenate(orig))), float(np.median(np.concatenate(conv)))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(resamples, n))
    o_rep, c_rep = (_replicate_medians(rounds, picks) for rounds in (orig, conv))
    q = [(1 - level) / 2, (1 + level) / 2]
    speedup = o_ms / c_ms
    s_lo, s_hi = (float(v) for v in np.quantile(o_rep / c_rep, q))
    c_lo, c_hi = (float(v) for v in np.quantile(c_rep, q))
    return Estimate(o_ms, c_ms, speedup, (min(s_lo, speedup), max(s_hi, speedup)),
                    (min(c_lo, c_ms), max(c_hi, c_ms)), n)


@dataclass(frozen=True)
class Regime:
    """The rounds of one speed regime: how many, the original's and the converted's median ms (pooled runs)
    and ``speedup = original_ms / converted_ms``."""

    rounds: int
    original_ms: float
    converted_ms: float
    speedup: float


def split_regimes(original_rounds: Sequence[Sequence[float]], converted_rounds: Sequence[Sequence[float]], *,
                  tolerance: float, min_share: float = 0.1) -> tuple[Regime, Regime] | None:
    """Two speed regimes of the converted graph among the rounds ``(faster, slower)``, or None for one.

    A pure function of per-round run times (ms), paired as in :func:`bootstrap_estimate`: the rounds'
    converted medians are split by :func:`dsdeploy.runtime.regimes.two_regimes` (1-D 2-means, reported only
    with an empty gap of 5 robust SDs and medians more than ``tolerance`` apart); each regime's speedup is
    the median of its rounds' original runs over the median of their converted runs.
    Seen on cloud VMs: a multi-threaded DS graph runs at two speeds as the host moves the vCPUs between
    cores that share a last-level cache and cores that do not (``benchmarks/RESULTS-cache-regimes.md``).

    Raises:
        ValueError: as :func:`bootstrap_estimate`.
    """
    _check_rounds(original_rounds, converted_rounds, "split_regimes")
    split = two_regimes([float(np.median(r)) for r in converted_rounds], tolerance=tolerance, min_share=min_share)
    if split is None:
        return None

    def regime(idx: np.ndarray) -> Regime:
        o = float(np.median(np.concatenate([np.asarray(original_rounds[i], dtype=np.float64) for i in idx])))
        c = float(np.median(np.concatenate([np.asarray(converted_rounds[i], dtype=np.float64) for i in idx])))
        return Regime(len(idx), o, c, o / c)

    return regime(split[0]), regime(split[1])


def _replicate_medians(rounds: list[np.ndarray], picks: np.ndarray) -> np.ndarray:
    """Per row of ``picks`` (round indices), the median of those rounds' runs pooled."""
    if len({len(r) for r in rounds}) == 1:  # equal rounds (the usual case): one vectorised median
        return np.median(np.stack(rounds)[picks].reshape(len(picks), -1), axis=1)
    return np.array([np.median(np.concatenate([rounds[i] for i in p])) for p in picks])


def narrow_enough(est: Estimate, tolerance: float, on: str = "speedup") -> bool:
    """Whether ``est``'s interval tells a miss of ``tolerance`` from a hit: half-width <= tolerance / 2
    of the estimate (the interval then spans at most one tolerance)."""
    return est.half_width(on) <= tolerance / 2


def run_rounds(next_round: Callable[[], tuple[Sequence[float], Sequence[float]]], *, tolerance: float,
               on: str = "speedup", min_rounds: int = MIN_ROUNDS, max_rounds: int = MAX_ROUNDS,
               time_cap_s: float | None = TIME_CAP_S, seed: int = 0,
               clock: Callable[[], float] = time.monotonic) -> Estimate:
    """Call ``next_round()`` (one round: the original's and the converted's run times, ms) until, from
    ``min_rounds`` on, :func:`narrow_enough` holds, or ``max_rounds`` rounds were run, or ``time_cap_s``
    seconds have passed since the first call (checked after each round; at least ``min_rounds`` run)."""
    min_rounds = max(1, min_rounds)
    max_rounds = max(min_rounds, max_rounds)
    start = clock()
    orig: list[Sequence[float]] = []
    conv: list[Sequence[float]] = []
    while True:
        o, c = next_round()
        orig.append(o)
        conv.append(c)
        if len(orig) < min_rounds:
            continue
        est = bootstrap_estimate(orig, conv, seed=seed)
        if (narrow_enough(est, tolerance, on) or len(orig) >= max_rounds
                or (time_cap_s is not None and clock() - start >= time_cap_s)):
            return est


@dataclass
class Verification:
    """A whole-model measurement: the estimate, whether it is ``resolved`` (narrow enough), the protocol's
    line and the timed converted graph's op counts (as ``export`` reports them)."""

    estimate: Estimate
    resolved: bool
    protocol: str
    op_counts: dict[str, int] = field(default_factory=dict)
    regimes: tuple[Regime, Regime] | None = None  # (faster, slower) when the rounds show two (split_regimes)


def measure_pair(original: nn.Module, converted: nn.Module, shape: tuple[int, ...], target: dict[str, Any], *,
                 tolerance: float, on: str = "speedup", per_round: int = PER_ROUND, min_rounds: int = MIN_ROUNDS,
                 max_rounds: int = MAX_ROUNDS, time_cap_s: float | None = TIME_CAP_S,
                 isolated: bool | None = None) -> Verification:
    """Time ``original`` and ``converted`` as ``dsdeploy export`` writes them
    (:func:`dsdeploy.export.onnx_export.export_bytes`), quantized when ``target["precision"]`` says so
    (:func:`dsdeploy.export.quantize.quantize_bytes`), on ``target``'s EP/threads (``{"provider",
    "threads"}``) at ``shape``, in alternating rounds of ``per_round`` runs each until the interval on
    ``on`` ("speedup", or "converted" ms for a latency target) is within ``tolerance`` (:func:`run_rounds`).
    ``isolated``: each round (both graphs, one after the other) in a fresh child process
    (:func:`dsdeploy.runtime.isolated.time_in_child`), so the spread between processes is in the interval;
    else in this process (default: fresh processes unless ``$DSDEPLOY_VERIFY_ROUNDS_IN`` is "process").

    Raises:
        ProviderError: the EP cannot run a graph.
    """
    import onnx  # heavy: only when verifying

    from dsdeploy.export.graph import op_counts
    from dsdeploy.export.onnx_export import export_bytes
    from dsdeploy.export.quantize import quantize_bytes
    from dsdeploy.runtime import providers as eps
    from dsdeploy.runtime.isolated import time_in_child
    from dsdeploy.runtime.latency_table import TABLE_PROTOCOL
    from dsdeploy.runtime.timing import measure_samples

    if isolated is None:
        isolated = os.environ.get(ROUNDS_ENV, "").strip().lower() != "process"
    cfg = eps.ep_config(eps.resolve_ep_name(target["provider"]), None, target["threads"])
    protocol = dataclasses.replace(TABLE_PROTOCOL, iters=max(1, per_round))
    precision = target.get("precision") or "fp32"
    graphs = [quantize_bytes(export_bytes(m, shape), precision, shape) for m in (original, converted)]
    with tempfile.TemporaryDirectory(prefix="dsdeploy-verify-") as tmp:
        paths = [Path(tmp) / f"{what}.onnx" for what in ("original", "converted")]
        for path, graph in zip(paths, graphs, strict=True):
            path.write_bytes(graph)  # read by the child processes only; the folder is removed after

        done = [0]
        seen: tuple[list[Sequence[float]], list[Sequence[float]]] = ([], [])

        def one_round() -> tuple[Sequence[float], Sequence[float]]:
            # ABBA: odd rounds time the converted graph first, so whatever the first graph of a round pays
            # (a fresh process's first session: page faults, thread-pool start) falls on both alike
            order = (0, 1) if done[0] % 2 == 0 else (1, 0)
            done[0] += 1
            if isolated:
                got = time_in_child([paths[i] for i in order], ep_name=cfg.name, ep_options=cfg.options,
                                    threads=target["threads"], protocol=protocol, batch=shape[0])
            else:
                got = [measure_samples(graphs[i], ep=cfg, threads=target["threads"], protocol=protocol,
                                       batch=shape[0]) for i in order]
            by = dict(zip(order, got, strict=True))
            seen[0].append(by[0])
            seen[1].append(by[1])
            return by[0], by[1]

        est = run_rounds(one_round, tolerance=tolerance, on=on, min_rounds=min_rounds, max_rounds=max_rounds,
                         time_cap_s=time_cap_s)
    where = "each round in a fresh process" if isolated else "in this process"
    line = (f"{protocol.describe()} per round; the exported graphs (as `export` writes them"
            f"{'' if precision == 'fp32' else ', quantized ' + precision}), original and "
            f"converted alternating (ABBA), {where}, {est.rounds} rounds (from {min_rounds} until the 95 % bootstrap "
            f"interval over rounds is within {100 * tolerance / 2:g} % of the estimate, at most {max_rounds})")
    return Verification(est, narrow_enough(est, tolerance, on), line, op_counts(onnx.load_from_string(graphs[1])),
                        split_regimes(*seen, tolerance=tolerance))
