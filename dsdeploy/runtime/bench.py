"""Latency of ONNX models on ONNX Runtime execution providers, with parity against the CPU EP.

Protocol per (model, EP, batch), one session at a time (:mod:`dsdeploy.runtime.timing`:
the timed session is the only one alive that spins, and it is released before the next
is created; the report's ``config.protocol`` states it): create the session (timed;
profiling on), run once (first-inference time), read from the profile which EP ran each
node (silent CPU fallback shows here), then ``warmup`` untimed runs and ``iters`` timed
runs (or as many as fit in ``duration`` seconds), each timed with ``time.perf_counter_ns``. Peak memory
is sampled throughout. Each EP's outputs are compared with the CPU EP's on the same
inputs. Raw samples are kept. When the runs, cut into time windows, ran at two distinct speeds
(:func:`dsdeploy.runtime.regimes.window_regimes`), the result says so (``regimes``) and the report
gives each speed: a median over both describes neither.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np

from dsdeploy.errors import ConfigError, ExportError, InputShapeError, ProviderError
from dsdeploy.ranges import check_number
from dsdeploy.runtime import providers as eps
from dsdeploy.runtime.bench_report import compare, write_outputs
from dsdeploy.runtime.inputs import (
    ModelInfo,
    data_images,
    input_shape,
    model_info,
    random_feed,
)
from dsdeploy.runtime.regimes import window_regimes
from dsdeploy.runtime.results import BenchReport, EPResult
from dsdeploy.runtime.sessions import create_session
from dsdeploy.runtime.sysinfo import PeakMemory, environment
from dsdeploy.runtime.timing import Protocol, Stats, time_runs, timed_session


@dataclass
class BenchConfig:
    """What to measure. ``providers`` are aliases or EP names; ``ep_options`` is {EP name: {key: value}}."""

    providers: list[str] = field(default_factory=lambda: ["cpu"])
    batches: list[int] = field(default_factory=lambda: [1])
    threads: int | None = None
    warmup: int = 5
    iters: int | None = 50
    duration: float | None = None
    data: str | None = None
    ep_options: dict[str, dict[str, str]] = field(default_factory=dict)
    skip_unavailable: bool = False
    parity_items: int = 64
    seed: int = 0
    preprocess: dict[str, Any] | None = None  # overrides of the --data preprocessing (dsdeploy.data.preprocessing)

    def validate(self, name: Callable[[str], str] = str) -> None:
        """Raise ProviderError/InputShapeError naming the first field out of range.

        ``name`` maps a field to what the caller calls it (the recipe: ``bench.batch`` for ``batches``).
        """
        if not self.providers:
            raise ProviderError(f"{name('providers')} must name at least one provider")
        if not self.batches:
            raise InputShapeError(f"{name('batches')} must be a non-empty list of positive integers")
        try:
            for b in self.batches:
                check_number(b, name("batches"), low=1, integer=True)
            check_number(self.threads, name("threads"), low=1, integer=True, optional=True)
            check_number(self.warmup, name("warmup"), low=0, integer=True)
            check_number(self.iters, name("iters"), low=1, integer=True, optional=True)
            check_number(self.duration, f"{name('duration')} (seconds)", low=0, low_open=True, optional=True)
        except ConfigError as exc:
            raise InputShapeError(str(exc)) from None
        if (self.iters is None) == (self.duration is None):
            raise InputShapeError(f"give exactly one of {name('iters')} or {name('duration')}")


# ---------------------------------------------------------------------------------- measuring


def _run_all(session, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    return [session.run(None, f) for f in feeds]


def parity(outputs: list[list[np.ndarray]], reference: list[list[np.ndarray]], inputs: str) -> dict[str, Any]:
    """Max abs / relative difference of every output against the CPU EP's, and top-1 agreement of output 0."""
    max_abs, ref_max, agree, total = 0.0, 0.0, 0, 0
    for outs, refs in zip(outputs, reference):
        for o, r in zip(outs, refs):
            o64, r64 = np.asarray(o, np.float64), np.asarray(r, np.float64)
            max_abs = max(max_abs, float(np.abs(o64 - r64).max()) if o64.size else 0.0)
            ref_max = max(ref_max, float(np.abs(r64).max()) if r64.size else 0.0)
        if outs and np.ndim(outs[0]) == 2 and np.shape(outs[0])[1] > 1:
            agree += int((np.argmax(outs[0], 1) == np.argmax(refs[0], 1)).sum())
            total += len(outs[0])
    return {"reference": "CPUExecutionProvider", "inputs": inputs, "max_abs_diff": max_abs,
            "rel_diff": max_abs / ref_max if ref_max else max_abs,
            "top1_agreement": agree / total if total else None, "top1_items": total}


def measure(info: ModelInfo, ep: eps.EPConfig, batch: int, cfg: BenchConfig, feed: dict[str, np.ndarray] | None,
            parity_feeds: list[dict[str, np.ndarray]] | None, reference: list | None, profile_dir: str
            ) -> tuple[EPResult, list, dict[str, np.ndarray]]:
    """Measure one (model, EP, batch); returns the result, this EP's outputs on the parity
    feeds (default: the timing feed) and the timing feed (generated when ``feed`` is None)."""
    res = EPResult(info.name, ep.name, ep.alias, batch, precision=ep.precision, ep_options=dict(ep.options),
                   threads=cfg.threads)
    t0 = time.perf_counter_ns()
    profile = os.path.join(profile_dir, f"{info.name}_{ep.alias}")
    with PeakMemory() as mem, timed_session(lambda: create_session(info.path, ep, cfg.threads, profile,
                                                                   spinning=True)) as sess:
        res.session_create_ms = (time.perf_counter_ns() - t0) / 1e6
        if feed is None:
            feed = random_feed(sess, batch, info.preprocessing, cfg.seed + batch)
        t0 = time.perf_counter_ns()
        sess.run(None, feed)
        res.first_inference_ms = (time.perf_counter_ns() - t0) / 1e6
        prof = sess.end_profiling()
        nodes = eps.nodes_by_provider(prof)
        os.remove(prof)
        res.samples_ms = time_runs(sess, feed, warmup=cfg.warmup, iters=cfg.iters, duration=cfg.duration)
        session_providers = sess.get_providers()
        outs = _run_all(sess, parity_feeds or [feed])
        del sess  # released before the next session is timed (the protocol)
    res.memory = mem.to_dict()
    res.fallback = eps.fallback_report(ep.name, session_providers, nodes)
    res.device = "CPU" if res.fallback["status"] == "full" else eps.device_label(ep.name, ep.options)
    res.stats = Stats.of(res.samples_ms)
    res.regimes = window_regimes(res.samples_ms)
    res.throughput_items_s = batch * 1000.0 / res.stats.mean_ms if res.stats.mean_ms > 0 else None
    if reference is not None:
        res.parity = parity(outs, reference, "data" if parity_feeds else "random")
    return res, outs, feed


def _resolve(cfg: BenchConfig) -> tuple[list[eps.EPConfig], list[dict[str, str]]]:
    names = list(dict.fromkeys(eps.resolve_ep_name(p) for p in cfg.providers))
    names.sort(key=lambda n: n != "CPUExecutionProvider")  # CPU first: its outputs are the parity reference
    usable, skipped = [], []
    for name in names:
        try:
            eps.check_available(name)
        except ProviderError as exc:
            if not cfg.skip_unavailable:
                raise
            skipped.append({"ep": name, "reason": str(exc)})
            continue
        usable.append(eps.ep_config(name, cfg.ep_options.get(name), cfg.threads))
    return usable, skipped


def bench(model_paths: list[str], cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> BenchReport:
    """Benchmark every model on every requested EP and batch size (see the module docstring).

    The first model is the baseline for side-by-side comparisons. Raises ProviderError
    for an unavailable EP (naming the available ones) unless ``cfg.skip_unavailable``.
    """

    cfg.validate()
    if not model_paths:
        raise ExportError("give at least one ONNX model to benchmark")
    configs, skipped = _resolve(cfg)
    infos = [model_info(p) for p in model_paths]
    seen: dict[str, int] = {}
    for info in infos:  # names key the results: make them unique
        seen[info.name] = seen.get(info.name, 0) + 1
        info.name += f"#{seen[info.name]}" if seen[info.name] > 1 else ""
    cpu = eps.ep_config("CPUExecutionProvider", cfg.ep_options.get("CPUExecutionProvider"), cfg.threads)
    results: list[EPResult] = []
    with tempfile.TemporaryDirectory(prefix="dsdeploy-bench-") as tmp:
        for info in infos:
            images = data_images(cfg.data, info, cfg.parity_items, cfg.seed, cfg.preprocess) if cfg.data else None
            for batch in cfg.batches:
                try:
                    feed, pfeeds = _feeds(info, batch, images)
                except InputShapeError as exc:
                    results += [EPResult(info.name, c.name, c.alias, batch, "skipped", str(exc)) for c in configs]
                    continue
                reference = None
                for c in configs:
                    if progress:
                        progress(f"{info.name} {c.alias} batch {batch}")
                    if reference is None and c.name != "CPUExecutionProvider":
                        sess = create_session(info.path, cpu, cfg.threads)
                        feed = feed or random_feed(sess, batch, info.preprocessing, cfg.seed + batch)
                        reference = _run_all(sess, pfeeds or [feed])
                        del sess
                    try:
                        res, outs, feed = measure(info, c, batch, cfg, feed, pfeeds, reference, tmp)
                    except ProviderError as exc:  # this EP cannot run this model: say so, measure the rest
                        results.append(EPResult(info.name, c.name, c.alias, batch, "error", str(exc)))
                        continue
                    if c.name == "CPUExecutionProvider":
                        reference = outs
                        res.parity = parity(outs, outs, "data" if pfeeds else "random")
                    results.append(res)
    report = BenchReport(infos, results, environment(), _config_dict(cfg, configs),
                         [p.to_dict() for p in eps.list_providers()], skipped,
                         created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    report.comparisons = compare(report)
    return report


def _feeds(info: ModelInfo, batch: int, images: np.ndarray | None):
    """Timing feed and parity feeds for one batch size (None, None = random, generated from the session)."""
    for inp in info.inputs:  # raises InputShapeError for a fixed other batch or an unknown dynamic axis
        input_shape(inp["name"], inp["shape"], batch, info.preprocessing)
    if images is None:
        return None, None
    name = info.inputs[0]["name"]
    n = max(batch, len(images) // batch * batch)
    idx = np.arange(n) % len(images)
    pfeeds = [{name: images[idx[i:i + batch]]} for i in range(0, n, batch)]
    return pfeeds[0], pfeeds


def protocol(cfg: BenchConfig) -> Protocol:
    """The timing protocol ``cfg`` asks for (:mod:`dsdeploy.runtime.timing`)."""
    return Protocol(warmup=cfg.warmup, iters=cfg.iters, duration=cfg.duration, spinning=True)


def _config_dict(cfg: BenchConfig, configs: list[eps.EPConfig]) -> dict[str, Any]:
    d = asdict(cfg)
    d["resolved_providers"] = [c.to_dict() for c in configs]
    d["intra_op_threads"] = cfg.threads or "onnxruntime default (one per physical core)"
    d["protocol"] = protocol(cfg).describe()
    return d


def run_and_write(model_paths: list[str], cfg, *, json_path: str | None = None, csv_path: str | None = None,
                  markdown_path: str | None = None, plot_path: str | None = None, progress=None):
    """:func:`bench` then ``bench_report.write_outputs``; returns ``(report, paths written)``."""
    report = bench(model_paths, cfg, progress)
    return report, write_outputs(report, json_path=json_path, csv_path=csv_path, markdown_path=markdown_path,
                                 plot_path=plot_path)
