"""Latency tables measured on the target: per convertible conv, dense ms vs each DS block (rank x layout) ms.

For every conv the planner could convert (:func:`dsdeploy.conversion.plan.skip_reason`,
ranks ``1..max_gainful_rank``), at the model's real input shape and batch, the dense conv
(its bias standing for the folded BatchNorm) and each candidate DS block are exported as
single-layer ONNX graphs (:mod:`dsdeploy.export.small_graphs`) and timed on the chosen EP
and thread count by the timing protocol (:mod:`dsdeploy.runtime.timing`). The whole
original model is timed once, exported as ``dsdeploy export`` writes it
(:func:`dsdeploy.export.onnx_export.export_bytes`), so the part no conversion touches is known
(``remainder_ms = model_ms - sum of the convertible convs' dense ms``). A single conv or DS
block (no BatchNorm, no residual) exports to the same ONNX ops under either exporter, so the
small graphs keep the quicker TorchScript export. Measurements are
cached per environment and layer shape (:mod:`dsdeploy.runtime.latency_cache`) and reused
across runs; ``refresh`` re-measures.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import nn

from dsdeploy.conversion.block import LAYOUTS
from dsdeploy.conversion.opcount import trace_calls
from dsdeploy.conversion.plan import Policy, conv_modules, max_gainful_rank, skip_reason
from dsdeploy.errors import InputShapeError, PlanError, ProviderError
from dsdeploy.export.config import PRECISIONS
from dsdeploy.export.onnx_export import export_bytes
from dsdeploy.export.quantize import quantize_bytes
from dsdeploy.export.small_graphs import ConvSpec, layer_graph
from dsdeploy.fsutil import show
from dsdeploy.runtime import providers as eps
from dsdeploy.runtime.latency_cache import LatencyCache, environment_key
from dsdeploy.runtime.timing import Protocol, measure
from dsdeploy.tables import format_table

TABLE_PROTOCOL = Protocol(warmup=5, iters=25)

NEGATIVE = (" (negative: the convs cost less inside the whole model than as single graphs; a plan's prediction "
            "adds this negative remainder, and convert's verification measures the whole model)")


@dataclass
class BlockTiming:
    """One candidate DS block of a layer: its rank, layout and median latency (ms)."""

    rank: int
    layout: str
    ms: float


@dataclass
class LayerTiming:
    """One conv: its dense latency and its candidate blocks', or why it has none (``reason``)."""

    name: str
    reason: str = ""
    spec: dict[str, Any] | None = None
    key: str | None = None
    dense_ms: float | None = None
    blocks: list[BlockTiming] = field(default_factory=list)

    def block(self, rank: int, layout: str) -> BlockTiming | None:
        """The candidate of ``rank`` in ``layout`` (None when it was not measured)."""
        return next((b for b in self.blocks if b.rank == rank and b.layout == layout), None)

    def fastest(self, rank: int) -> BlockTiming | None:
        """The fastest layout at ``rank``."""
        cands = [b for b in self.blocks if b.rank == rank]
        return min(cands, key=lambda b: b.ms) if cands else None


@dataclass
class LatencyTable:
    """Per-layer latencies of one model at one input shape on one EP (see the module docstring)."""

    model: str
    input_shape: list[int]
    environment: dict[str, Any]
    protocol: str
    model_ms: float
    layers: list[LayerTiming]
    cache_file: str
    measured: int = 0  # distinct graphs timed by this call (0: everything came from the cache)
    reused: int = 0    # distinct graphs read from the cache file
    seconds: float = 0.0
    model_key: str = ""  # :func:`model_key` of the model at this shape (the cache's key of its correction)
    correction: dict[str, Any] | None = None  # the stored correction of this model (LatencyCache.correction)

    @property
    def candidates(self) -> list[LayerTiming]:
        """The layers with measured candidates, in network order."""
        return [lt for lt in self.layers if lt.dense_ms is not None]

    @property
    def remainder_ms(self) -> float:
        """Whole model minus every convertible conv's dense latency: what no conversion changes."""
        return self.model_ms - sum(lt.dense_ms for lt in self.candidates)

    def scaled(self, dense: float, block: float) -> LatencyTable:
        """A copy with the whole model's and every dense conv's ms times ``dense`` (so the remainder too)
        and every DS block's ms times ``block``: a table corrected from whole-model measurements."""
        layers = [replace(lt, dense_ms=None if lt.dense_ms is None else lt.dense_ms * dense,
                          blocks=[replace(b, ms=b.ms * block) for b in lt.blocks]) for lt in self.layers]
        return replace(self, model_ms=self.model_ms * dense, layers=layers)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["remainder_ms"] = self.remainder_ms
        return d

    def render(self) -> str:
        """A text table: per layer, dense ms and each rank's ms per layout (fastest layout marked *)."""
        layouts = sorted({b.layout for lt in self.candidates for b in lt.blocks}, key=LAYOUTS.index)
        rows = []
        for lt in self.layers:
            if lt.dense_ms is None:
                rows.append([lt.name, "-", "-", *["-"] * len(layouts), lt.reason])
                continue
            for rank in sorted({b.rank for b in lt.blocks}):
                best = lt.fastest(rank)
                cells = [("-" if (b := lt.block(rank, lay)) is None else f"{b.ms:.3f}{'*' if b is best else ''}")
                         for lay in layouts]
                first = rank == min(b.rank for b in lt.blocks)
                rows.append([lt.name if first else "", f"{lt.dense_ms:.3f}" if first else "", rank, *cells,
                             f"x{lt.dense_ms / best.ms:.2f}" if best.ms > 0 else ""])
        env = self.environment
        head = (f"{self.model} at {'x'.join(map(str, self.input_shape))} on {env['ep']} ({env['device']}), "
                f"{env['threads'] or 'default'} threads, onnxruntime {env['onnxruntime']}"
                f"{'' if env.get('precision', 'fp32') == 'fp32' else ', graphs quantized ' + env['precision']}\n"
                f"whole model {self.model_ms:.3f} ms; not converted (whole - dense convs) {self.remainder_ms:.3f} ms"
                f"{NEGATIVE if self.remainder_ms < 0 else ''}\n"
                f"protocol: {self.protocol}\n"
                f"{self.measured} graphs measured, {self.reused} from the cache {self.cache_file} "
                f"({self.seconds:.1f} s)")
        if self.correction:
            c = self.correction
            head += (f"\nstored correction from a verified conversion: dense x{c.get('dense_factor')}, DS blocks "
                     f"x{c.get('block_factor')} ({c.get('rounds')} rounds)")
        table = format_table(["layer", "dense ms", "rank", *[f"{lay} ms" for lay in layouts], "best speedup / why"],
                             rows)
        return head + "\n" + table


def model_key(model: nn.Module, input_shape: Sequence[int]) -> str:
    """A digest of the model's structure (module tree, parameter/buffer shapes) and input shape."""
    h = hashlib.sha256(repr(model).encode())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    h.update(repr(tuple(input_shape)).encode())
    return h.hexdigest()[:16]


def latency_table(model: nn.Module, input_shape: Sequence[int], *, provider: str = "cpu",
                  threads: int | None = None, ep_options: dict[str, str] | None = None,
                  layouts: Sequence[str] = LAYOUTS, max_rank: int | None = None, policy: Policy | None = None,
                  refresh: bool = False, cache_dir: str | os.PathLike | None = None, ort_version: str | None = None,
                  protocol: Protocol = TABLE_PROTOCOL, name: str = "model",
                  progress: Callable[[str], None] | None = None, precision: str = "fp32") -> LatencyTable:
    """Measure (or read from the cache) the latency table of ``model`` at ``input_shape`` (batch first).

    Args:
        model: the original model (read only), in eval mode.
        input_shape: ``(N, C, *spatial)``; N is the batch the table is for.
        provider: EP alias or name; ``ep_options`` its options; ``threads`` intra-op threads (None: ORT's default).
        layouts: the DS layouts to time (default all of :data:`dsdeploy.conversion.block.LAYOUTS`).
        max_rank: time ranks up to this (default: each layer's ``max_gainful_rank``).
        policy: which convs are candidates (include/exclude/convert_stem); default :class:`Policy`'s.
        refresh: re-measure everything, replacing the cached entries.
        cache_dir: the cache folder (default :func:`dsdeploy.runtime.latency_cache.cache_dir`).
        ort_version: the ONNX Runtime version recorded in the cache key (default: the installed one).
        protocol: the timing protocol; the table's figure is its ``statistic`` of ``iters`` runs (the cache
            keeps the median and the min of each graph, so either statistic reads the same entries).
        precision: "fp32", or the deployment's quantization ("int8": static QDQ, "int8-dynamic"): every
            graph, the whole model's too, is quantized as ``deploy --quantize`` would
            (:func:`dsdeploy.export.quantize.quantize_bytes`) before it is timed; its own cache file.

    Returns:
        The table as measured (never corrected); ``correction`` carries the correction a verification
        stored for this model in this environment (None after a ``refresh``).

    Raises:
        ProviderError: the EP is unavailable or cannot run a graph. PlanError: a bad layout, max_rank or precision.
        InputShapeError: the model cannot run at ``input_shape``. LatencyCacheError: an unreadable cache file.
    """
    bad = [lay for lay in layouts if lay not in LAYOUTS]
    if bad or not layouts:
        raise PlanError(f"layouts must name some of {', '.join(LAYOUTS)}, got {', '.join(bad) or 'none'}")
    if max_rank is not None and max_rank < 1:
        raise PlanError(f"max_rank must be >= 1, got {max_rank}")
    if protocol.statistic not in ("median", "min"):
        raise PlanError(f"statistic must be median or min, got {protocol.statistic!r}")
    if threads is not None and threads < 1:
        raise ProviderError(f"threads must be >= 1, got {threads}")
    if precision not in PRECISIONS:
        raise PlanError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not input_shape or any(int(d) < 1 for d in input_shape):
        raise InputShapeError(f"input_shape must hold positive integers (batch first), got {list(input_shape)}")
    t_start = time.perf_counter()
    ep_name = eps.resolve_ep_name(provider)
    eps.check_available(ep_name)
    cfg = eps.ep_config(ep_name, ep_options, threads)
    shape = tuple(int(d) for d in input_shape)
    env = environment_key(ep_name, cfg.options, threads=threads, batch=shape[0], ort_version=ort_version,
                          spinning=protocol.spinning, precision=precision)
    cache = LatencyCache(env, cache_dir, refresh=refresh)
    reused: set[str] = set()

    def timed(key: str, make: Callable[[], bytes], what: str, in_shape: tuple[int, ...]) -> float:
        hit = cache.get(key)
        if hit is not None:  # from the file, or an identical layer measured earlier in this run
            if key not in cache.measured:
                reused.add(key)
        else:
            if progress:
                progress(what)
            graph = quantize_bytes(make(), precision, in_shape)
            stats = measure(graph, ep=cfg, threads=threads, protocol=protocol, batch=shape[0])
            hit = {"ms": round(stats.p50_ms, 5), "min_ms": round(stats.min_ms, 5), "n": stats.n}
            cache.put(key, hit)
        return float(hit["min_ms"] if protocol.statistic == "min" and "min_ms" in hit else hit["ms"])

    policy = policy or Policy()
    calls = trace_calls(model, shape)
    layers: list[LayerTiming] = []
    try:
        mkey = model_key(model, shape)
        model_ms = timed(f"model-export:{mkey}", lambda: export_bytes(model, shape),
                         f"{name} (whole, as exported)", shape)
        for lname, mod in conv_modules(model):
            lt = LayerTiming(lname)
            layers.append(lt)
            reason = skip_reason(lname, mod, policy) or ("" if lname in calls else "not run at this input shape")
            kmax = max_gainful_rank(mod) if not reason else 0
            if not reason and kmax == 0:
                reason = "no gain at any rank (a DS block would cost more MACs)"
            if reason:
                lt.reason = reason
                continue
            spec = ConvSpec.of(mod, calls[lname][0])
            lt.spec, lt.key = spec.to_dict(), spec.key()
            lt.dense_ms = timed(f"dense:{lt.key}", lambda spec=spec: layer_graph(spec), f"{lname} dense",
                                spec.input_shape)
            for rank in range(1, min(kmax, max_rank or kmax) + 1):
                for lay in layouts:
                    ms = timed(f"ds:{lt.key}:r{rank}:{lay}", lambda s=spec, r=rank, y=lay: layer_graph(s, r, y),
                               f"{lname} rank {rank} {lay}", spec.input_shape)
                    lt.blocks.append(BlockTiming(rank, lay, ms))
            cache.flush()  # a killed run keeps what it measured
    finally:
        cache.flush()
    return LatencyTable(name, list(shape), env, protocol.describe(), model_ms, layers, show(cache.path),
                        len(cache.measured), len(reused), time.perf_counter() - t_start, mkey, cache.correction(mkey))
