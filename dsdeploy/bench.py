"""Latency of ONNX models on ONNX Runtime execution providers, with parity against the CPU EP.

Protocol per (model, EP, batch): create the session (timed; profiling on), run once
(first-inference time), read from the profile which EP ran each node (silent CPU
fallback shows here), then ``warmup`` untimed runs and ``iters`` timed runs (or as many
as fit in ``duration`` seconds), each timed with ``time.perf_counter_ns``. Peak memory
is sampled throughout. Each EP's outputs are compared with the CPU EP's on the same
inputs. Raw samples are kept.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dsdeploy import providers as eps
from dsdeploy.errors import DataError, ExportError, InputShapeError, ProviderError

SCHEMA = "dsdeploy.bench/1"
META_PREPROCESSING = "dsdeploy.preprocessing"
META_CONV_MACS = "dsdeploy.conv_macs"
DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
          "tensor(bool)": np.bool_}


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

    def validate(self) -> None:
        if not self.providers or not self.batches:
            raise ProviderError("give at least one provider and one batch size")
        if any(b <= 0 for b in self.batches) or self.warmup < 0 or (self.threads is not None and self.threads <= 0):
            raise InputShapeError("batch sizes and threads must be positive and warmup >= 0")
        if (self.iters is None) == (self.duration is None) or (self.iters or 1) <= 0 or (self.duration or 1) <= 0:
            raise InputShapeError("give exactly one of iters (> 0) or duration (> 0 seconds)")


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


@dataclass
class ModelInfo:
    """One benchmarked ONNX file: identity, inputs, conv MACs per item and where they came from."""

    name: str
    path: str
    sha256: str
    inputs: list[dict[str, Any]]
    conv_macs: int | None
    conv_macs_source: str
    preprocessing: dict[str, Any] | None


@dataclass
class EPResult:
    """One (model, EP, batch) measurement; ``status`` is ``ok``, ``skipped`` or ``error`` (with ``note``)."""

    model: str
    ep: str
    alias: str
    batch: int
    status: str = "ok"
    note: str = ""
    device: str = ""
    precision: str = ""
    ep_options: dict[str, str] = field(default_factory=dict)
    threads: int | None = None
    session_create_ms: float | None = None
    first_inference_ms: float | None = None
    stats: Stats | None = None
    throughput_items_s: float | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    fallback: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] | None = None
    samples_ms: list[float] = field(default_factory=list)


@dataclass
class BenchReport:
    """Everything one ``bench`` call measured, plus the environment and the config."""

    models: list[ModelInfo]
    results: list[EPResult]
    environment: dict[str, Any]
    config: dict[str, Any]
    providers: list[dict[str, Any]]
    skipped_providers: list[dict[str, str]] = field(default_factory=list)
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"schema": SCHEMA, **d}

    def ok(self) -> list[EPResult]:
        return [r for r in self.results if r.status == "ok"]


# ---------------------------------------------------------------------------------- models


def _load_onnx(path: str):
    import onnx

    try:
        return onnx.load(path)
    except Exception as exc:  # noqa: BLE001 - protobuf/onnx raise many types for a bad file
        raise ExportError(f"cannot read ONNX model {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from exc


def _dims(value_info) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def conv_macs_from_graph(model, preprocessing: dict[str, Any] | None = None) -> int | None:
    """Conv MACs per item (batch 1), counted with ONNX shape inference; None when shapes stay unknown."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    size = (preprocessing or {}).get("size")
    for inp in m.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        for axis, d in enumerate(dims):
            if d.HasField("dim_value"):
                continue
            if axis == 0:
                d.dim_value = 1
            elif size and len(dims) == 4 and axis >= 2:
                d.dim_value = int(size[axis - 2])
    try:
        inferred = onnx.shape_inference.infer_shapes(m)
    except Exception:  # noqa: BLE001 - inference failure means "unknown", reported as None
        return None
    shapes = {vi.name: _dims(vi) for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    total = 0
    for node in inferred.graph.node:
        if node.op_type != "Conv":
            continue
        w, out = inits.get(node.input[1]) or shapes.get(node.input[1]), shapes.get(node.output[0])
        if not w or not out or not all(isinstance(v, int) and v > 0 for v in [*w, *out[1:]]):
            return None
        total += math.prod(out[1:]) * math.prod(w[1:])
    return total


def model_info(path: str) -> ModelInfo:
    """Read ``path``: inputs, ``dsdeploy.preprocessing`` metadata, conv MACs (metadata first, else counted)."""
    from dsdeploy.fsutil import require_file, sha256_file

    require_file(path, "ONNX model")
    model = _load_onnx(path)
    meta = {p.key: p.value for p in model.metadata_props}
    pre = None
    if META_PREPROCESSING in meta:
        try:
            pre = json.loads(meta[META_PREPROCESSING])
        except json.JSONDecodeError:
            raise ExportError(f"{path}: metadata {META_PREPROCESSING} is not valid JSON") from None
    inits = {i.name for i in model.graph.initializer}
    inputs = [{"name": i.name, "shape": _dims(i)} for i in model.graph.input if i.name not in inits]
    if META_CONV_MACS in meta and meta[META_CONV_MACS].strip().isdigit():
        macs, source = int(meta[META_CONV_MACS]), f"metadata {META_CONV_MACS}"
    else:
        macs, source = conv_macs_from_graph(model, pre), "counted from the graph (shape inference)"
    return ModelInfo(Path(path).stem, str(path), sha256_file(path), inputs, macs, source if macs is not None
                     else "unknown (shapes not inferable)", pre)


# ---------------------------------------------------------------------------------- inputs


def input_shape(name: str, dims: list, batch: int, pre: dict[str, Any] | None) -> tuple[int, ...]:
    """Concrete shape for an input: dynamic axis 0 -> ``batch``; other dynamic axes from preprocessing."""
    shape = []
    for axis, d in enumerate(dims):
        if isinstance(d, int) and d > 0:
            if axis == 0 and d != batch:
                raise InputShapeError(f"input {name!r} has a fixed batch of {d}; batch {batch} cannot run")
            shape.append(d)
        elif axis == 0:
            shape.append(batch)
        elif pre and len(dims) == 4 and axis >= 1:
            shape.append(int(pre.get("channels", 3)) if axis == 1 else int(pre["size"][axis - 2]))
        else:
            raise InputShapeError(f"input {name!r} has dynamic axis {axis} ({d!r}); export it with a fixed size "
                                  f"or store {META_PREPROCESSING} metadata")
    return tuple(shape)


def random_feed(session, batch: int, pre: dict[str, Any] | None, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs matching each session input's dtype and shape (axis 0 = ``batch``)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in session.get_inputs():
        dims = [d if isinstance(d, int) else str(d) for d in inp.shape]
        shape = input_shape(inp.name, dims, batch, pre)
        dtype = DTYPES.get(inp.type)
        if dtype is None:
            raise InputShapeError(f"input {inp.name!r} has type {inp.type}, which bench cannot generate")
        if np.issubdtype(dtype, np.floating):
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feed[inp.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feed[inp.name] = rng.integers(0, 10, shape).astype(dtype)
    return feed


def data_images(spec: str, info: ModelInfo, count: int, seed: int) -> np.ndarray:
    """``count`` real images (N, C, H, W float32) from ``spec`` via ``dsdeploy.data.load_data``,
    preprocessed per the model's ``dsdeploy.preprocessing`` metadata (else sized to its input)."""
    from dsdeploy.data import Preprocess, load_data

    dims = info.inputs[0]["shape"] if len(info.inputs) == 1 else []
    if len(dims) != 4:
        raise DataError(f"--data needs a model with one NCHW image input; {info.name} has {info.inputs}")
    if info.preprocessing:
        pre = Preprocess.from_dict(info.preprocessing)
    elif spec == "digits":
        pre = None
    elif all(isinstance(d, int) for d in dims[1:]):
        pre = Preprocess(size=(dims[2], dims[3]), resize=None, channels=dims[1])
    else:
        raise DataError(f"{info.name} has dynamic image size and no {META_PREPROCESSING} metadata; "
                        f"cannot preprocess --data for it")
    splits = load_data(spec, pre, seed=seed, labelled=False, limit=count)
    ds = splits.val if splits.val is not None and len(splits.val) else splits.train
    if ds is None or not len(ds):
        raise DataError(f"no images in {spec}")
    imgs = np.stack([ds[i % len(ds)][0].numpy() for i in range(count)]).astype(np.float32)
    want = [d for d in dims[1:]]
    if any(isinstance(w, int) and w != g for w, g in zip(want, imgs.shape[1:])):
        raise DataError(f"--data images are {tuple(imgs.shape[1:])} but {info.name} wants {tuple(want)}")
    return imgs


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


def _time_runs(session, feed, cfg: BenchConfig) -> list[float]:
    for _ in range(cfg.warmup):
        session.run(None, feed)
    samples: list[float] = []
    deadline = time.perf_counter_ns() + int((cfg.duration or 0) * 1e9)
    while (len(samples) < cfg.iters) if cfg.iters else (not samples or time.perf_counter_ns() < deadline):
        t0 = time.perf_counter_ns()
        session.run(None, feed)
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return samples


def measure(info: ModelInfo, ep: eps.EPConfig, batch: int, cfg: BenchConfig, feed: dict[str, np.ndarray] | None,
            parity_feeds: list[dict[str, np.ndarray]] | None, reference: list | None, profile_dir: str
            ) -> tuple[EPResult, list, dict[str, np.ndarray]]:
    """Measure one (model, EP, batch); returns the result, this EP's outputs on the parity
    feeds (default: the timing feed) and the timing feed (generated when ``feed`` is None)."""
    from dsdeploy.sysinfo import PeakMemory

    res = EPResult(info.name, ep.name, ep.alias, batch, precision=ep.precision, ep_options=dict(ep.options),
                   threads=cfg.threads)
    with PeakMemory() as mem:
        t0 = time.perf_counter_ns()
        sess = eps.create_session(info.path, ep, cfg.threads, os.path.join(profile_dir, f"{info.name}_{ep.alias}"))
        res.session_create_ms = (time.perf_counter_ns() - t0) / 1e6
        if feed is None:
            feed = random_feed(sess, batch, info.preprocessing, cfg.seed + batch)
        t0 = time.perf_counter_ns()
        sess.run(None, feed)
        res.first_inference_ms = (time.perf_counter_ns() - t0) / 1e6
        prof = sess.end_profiling()
        nodes = eps.nodes_by_provider(prof)
        os.remove(prof)
        res.samples_ms = _time_runs(sess, feed, cfg)
    res.memory = mem.to_dict()
    res.fallback = eps.fallback_report(ep.name, sess.get_providers(), nodes)
    res.device = "CPU" if res.fallback["status"] == "full" else eps.device_label(ep.name, ep.options)
    res.stats = Stats.of(res.samples_ms)
    res.throughput_items_s = batch * 1000.0 / res.stats.mean_ms if res.stats.mean_ms > 0 else None
    feeds = parity_feeds or [feed]
    outs = _run_all(sess, feeds)
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
    from datetime import datetime, timezone

    from dsdeploy.bench_report import compare
    from dsdeploy.sysinfo import environment

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
            images = data_images(cfg.data, info, cfg.parity_items, cfg.seed) if cfg.data else None
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
                        sess = eps.create_session(info.path, cpu, cfg.threads)
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


def _config_dict(cfg: BenchConfig, configs: list[eps.EPConfig]) -> dict[str, Any]:
    d = asdict(cfg)
    d["resolved_providers"] = [c.to_dict() for c in configs]
    d["intra_op_threads"] = cfg.threads or "onnxruntime default (one per physical core)"
    return d
