"""Two speed regimes in a latency series: a graph that runs at two distinct speeds while it is timed.

Seen on cloud VMs: a multi-threaded DS graph runs at two speeds, switching every few seconds, as the host
moves the vCPUs between cores that share a last-level cache and cores that do not, while a dense graph
holds still (``benchmarks/RESULTS-cache-regimes.md``). A median over such a series describes neither
speed, so the tool finds the two groups and reports each (``convert``'s verification rounds; ``bench``'s
runs in time windows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

REGIME_GAP = 5.0  # robust SDs of empty space between two groups of values that make them two regimes


def two_regimes(values: Sequence[float], *, tolerance: float, min_share: float = 0.1
                ) -> tuple[np.ndarray, np.ndarray] | None:
    """Indices of ``values`` in the faster (lower) and the slower regime, or None for one regime.

    ``values`` are per-round or per-window latencies (any one unit). They are sorted and split in two
    where the within-group sum of squares is least (exact 1-D 2-means, Fisher's natural breaks: Fisher,
    "On grouping for maximum homogeneity", JASA 53, 1958), each group holding at least
    ``max(2, min_share * len(values))`` values. The split is reported only when the groups' medians differ
    by more than ``tolerance`` (relative to the faster) and the empty gap between the groups is wider than
    :data:`REGIME_GAP` robust standard deviations (1.4826 x the median absolute deviation of the values
    from their group's median; Hampel, JASA 69, 1974). On 12 values of one log-normal regime with a 5 %
    spread, fewer than 2 % of draws are split (5 % with heavy tails).
    """
    v_all = np.asarray(values, dtype=np.float64)
    n = len(v_all)
    least = max(2, int(np.ceil(min_share * n)))
    if n < 2 * least:
        return None
    order = np.argsort(v_all, kind="stable")
    v = v_all[order]
    k = min(range(least, n - least + 1), key=lambda k: v[:k].var() * k + v[k:].var() * (n - k))
    lo, hi = v[:k], v[k:]
    sigma = 1.4826 * float(np.median(np.concatenate([abs(lo - np.median(lo)), abs(hi - np.median(hi))])))
    if np.median(hi) <= (1 + tolerance) * np.median(lo) or hi[0] - lo[-1] <= REGIME_GAP * sigma:
        return None
    return order[:k], order[k:]


def window_regimes(samples_ms: Sequence[float], *, tolerance: float = 0.05, windows: int = 20,
                   min_per_window: int = 5) -> list[dict[str, Any]] | None:
    """Two speed regimes in a time-ordered series of run latencies (ms), or None.

    The series is cut into ``windows`` consecutive windows of equal run counts (fewer when there are fewer
    than ``min_per_window`` runs per window; none below 4 windows) and :func:`two_regimes` splits the
    windows' medians. Returns ``[faster, slower]``, each ``{"p50_ms", "share", "windows"}``: the median of
    the regime's runs, its share of the runs (0-1) and its number of windows.
    """
    s = np.asarray(samples_ms, dtype=np.float64)
    count = min(windows, len(s) // max(1, min_per_window))
    if count < 4:
        return None
    parts = np.array_split(s, count)
    split = two_regimes([float(np.median(p)) for p in parts], tolerance=tolerance)
    if split is None:
        return None
    out = []
    for idx in split:
        runs = np.concatenate([parts[i] for i in idx])
        out.append({"p50_ms": round(float(np.median(runs)), 5), "share": round(len(runs) / len(s), 4),
                    "windows": len(idx)})
    return out
