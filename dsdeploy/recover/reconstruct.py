"""Training-free accuracy recovery: least-squares factors on real activations, then BatchNorm re-estimation.

For every converted layer, in the order the network calls them, the block is fitted to the
ORIGINAL conv's output on the input the block receives inside the partially calibrated
student — so each layer also corrects the error of those before it. First the pointwise
weights (the block output is linear in them with the depthwise filters fixed), then
``rounds`` alternating rounds (depthwise filters with the pointwise weights fixed — linear
too — then pointwise again; :mod:`dsdeploy.recover.als`), stopping when the layer's output
error stops falling. Normal equations are accumulated over batches in float64 (no
activations stored; :mod:`dsdeploy.recover.lsq`); stage inputs are cached so the network
prefix is not rerun per layer (:mod:`dsdeploy.recover.stagecache`). BatchNorm statistics
are re-estimated afterwards and each layer's output error measured again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from dsdeploy.conversion.block import ds_blocks
from dsdeploy.conversion.plan import Plan
from dsdeploy.conversion.rewrite import original_convs
from dsdeploy.data.datasets import first_item, make_loader
from dsdeploy.data.given import calibration_images
from dsdeploy.data.labels import check_outputs, output_count
from dsdeploy.data.preprocessing import resolve
from dsdeploy.errors import DataError
from dsdeploy.progress import bar as progress_bar
from dsdeploy.recover.als import PatchEquations, alternate
from dsdeploy.recover.blockrec import after_calibration
from dsdeploy.recover.bnfit import (
    affected_norms,
    batch_inputs,
    bn_gain,
    pass_moments,
    patch_moments,
    recalibrate_bn,
    set_statistics,
    take_batches,
)
from dsdeploy.recover.config import (
    CALIB_BATCHES,
    CALIB_CACHE_MB,
    CALIB_EVAL_IMAGES,
    CALIB_ROUNDS,
    CalibrationParams,
)
from dsdeploy.recover.device import on_device, placed, resolve_device, supports_float64
from dsdeploy.recover.distill import call_order, evaluate, following_norms
from dsdeploy.recover.lsq import CHUNK_ELEMENTS, PATCH_MB, NormalEquations, patch_bytes
from dsdeploy.recover.stagecache import LayerInputs
from dsdeploy.tables import format_table

__all__ = ["CHUNK_ELEMENTS", "CalibrationReport", "LayerCalibration", "NormalEquations", "affected_norms",
           "calibrate", "calibrate_data", "recalibrate_bn"]


@dataclass
class LayerCalibration:
    """One layer's relative output errors ``||y_student - y_original||^2 / ||y_original||^2``.

    ``error_before``: after SVD (before any fit); ``error_pointwise``: after the pointwise solve;
    ``error_rounds``: after each alternating round; ``error_after``: the fitted layer (all on the
    inputs it had while being fitted); ``error_bn``: after BatchNorm re-estimation, on its final
    inputs (None without it). ``method``: how it was fitted. ``seconds``: wall time of this layer's
    fit (its inputs, statistics, solves and BatchNorm moments).
    """

    name: str
    error_before: float
    error_after: float
    rows: int
    error_pointwise: float | None = None
    error_rounds: list[float] = field(default_factory=list)
    error_bn: float | None = None
    method: str = "pointwise"
    seconds: float = 0.0


@dataclass
class CalibrationReport:
    """What calibration did and measured (``seconds``: the whole call; ``cache``: stage-cache use).

    ``fit_seconds``: the per-layer fits; ``bn_seconds``: the final BatchNorm re-estimation and error
    pass; ``eval_seconds``: scoring top-1 before and after."""

    layers: list[LayerCalibration] = field(default_factory=list)
    batches: int = 0
    images: int = 0
    ridge: float = 1e-6
    bn_layers: int = 0
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    seconds: float = 0.0
    split: dict[str, Any] | None = None  # the data split calibrated on (dsdeploy.data.labels.split_record)
    rounds: int = 0
    fit_seconds: float = 0.0
    bn_seconds: float = 0.0
    eval_seconds: float = 0.0
    cache: dict[str, Any] | None = None
    block_reconstruction: dict[str, Any] | None = None  # dsdeploy.recover.blockrec.BlockReconReport, when run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def history_entry(self, **extra: Any) -> dict[str, Any]:
        """The artifact history record: ``{"stage": "calibrate", ...}``."""
        def r6(v: float | None) -> float | None:
            return None if v is None else round(v, 6)

        return {"stage": "calibrate", "images": self.images, "batches": self.batches, "ridge": self.ridge,
                "rounds": self.rounds, "bn_layers": self.bn_layers, "accuracy_before": self.accuracy_before,
                "accuracy_after": self.accuracy_after, "seconds": round(self.seconds, 2),
                "fit_seconds": round(self.fit_seconds, 2), "bn_seconds": round(self.bn_seconds, 2),
                "eval_seconds": round(self.eval_seconds, 2), "cache": self.cache,
                "layers": [{"name": c.name, "error_before": r6(c.error_before), "error_after": r6(c.error_after),
                            "error_pointwise": r6(c.error_pointwise), "error_rounds": [r6(e) for e in c.error_rounds],
                            "error_bn": r6(c.error_bn), "method": c.method, "seconds": round(c.seconds, 2)}
                           for c in self.layers],
                **({"block_reconstruction": self.block_reconstruction} if self.block_reconstruction else {}), **extra}

    def render(self) -> str:
        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.4f}"

        rows = [[c.name, f(c.error_before), f(c.error_pointwise),
                 " ".join(f"{e:.4f}" for e in c.error_rounds) or "-", f(c.error_after), f(c.error_bn), c.method,
                 f"{c.seconds:.1f}"]
                for c in self.layers]
        cache = self.cache or {}
        cached = cache.get("stage_layers", 0) + cache.get("streamed_layers", 0)
        summary = (f"calibrated {len(self.layers)} layers on {self.images} images ({self.seconds:.1f}s: fit "
                   f"{self.fit_seconds:.1f}s, BN {self.bn_seconds:.1f}s, scoring {self.eval_seconds:.1f}s; {cached} "
                   f"layers from cached stage inputs, peak {cache.get('peak_mb', 0)} MiB); re-estimated {self.bn_layers} BatchNorm layers")
        lines = [format_table(["layer", "rel.err SVD", "pointwise", "rounds", "fitted", "after BN", "method", "s"], rows),
                 "", summary]
        if self.accuracy_before is not None and self.accuracy_after is not None:
            lines.append(f"accuracy {100 * self.accuracy_before:.2f}% -> {100 * self.accuracy_after:.2f}%")
        if self.block_reconstruction:
            b = self.block_reconstruction
            lines.append(f"block reconstruction: {len(b['blocks'])} blocks in {b['seconds']:.1f}s "
                         f"(budget {b['time_budget']:.0f}s), summed block error "
                         f"{sum(x['error_before'] or 0 for x in b['blocks']):.4f} -> "
                         f"{sum(x['error_after'] or 0 for x in b['blocks']):.4f}")
        return "\n".join(lines)


def _layer_order(student: nn.Module, names: list[str], loader: Iterable) -> list[str]:
    """Converted layers in the order one forward pass calls them (unused ones last)."""
    first = next(iter(take_batches(loader, 1)), None)
    if first is None:
        raise DataError("the calibration data is empty")
    order = call_order(student, batch_inputs(first)[:2])
    ranked = {n: i for i, n in reversed(list(enumerate(order)))}
    return sorted(names, key=lambda n: ranked.get(n, len(order)))


def _fit(eq: NormalEquations | PatchEquations, name: str, rounds: int, ridge: float) -> LayerCalibration:
    """Solve one layer from its accumulated equations (never making it worse); load the result."""
    if isinstance(eq, PatchEquations):
        res = alternate(eq, rounds, ridge)
        method = "alternating" if eq.depthwise_solvable else "pointwise (depthwise system too large)"
        return LayerCalibration(name, res.error_svd, res.error, eq.rows, res.error_pointwise, res.error_rounds,
                                method=method)
    before = eq.error(eq.current())
    w = eq.solve(ridge)
    after = eq.error(w)
    if after < before:  # never make a layer worse (e.g. too little data for its size)
        eq.load(w)
    method = "pointwise" if rounds == 0 else "pointwise (patch statistics too large)"
    return LayerCalibration(name, before, min(before, after), eq.rows, min(before, after), method=method)


def _count(loader: Iterable, max_batches: int | None) -> int:
    """How many calibration batches there are (``len`` when the loader has one; else ``max_batches`` or 32)."""
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        n = max_batches or 32
    return max(1, min(n, max_batches) if max_batches is not None else n)


class Capped:
    """The first ``images`` images of a labelled loader, as ``(x, y)`` batches, re-iterable (nothing kept)."""

    def __init__(self, loader: Iterable, images: int) -> None:
        self.loader, self.images = loader, images

    def __iter__(self):
        n = 0
        for x, y in self.loader:
            if n >= self.images:
                return
            yield x[:self.images - n], y[:self.images - n]
            n += min(x.shape[0], self.images - n)


def capped(loader: Iterable | None, images: int) -> Capped | None:
    """``loader`` scored on at most ``images`` images (None when ``images`` is 0 or there is no loader)."""
    return None if loader is None or images <= 0 else Capped(loader, images)


def _following_bns(student: nn.Module, loader: Iterable) -> dict[str, nn.Module]:
    """The BatchNorm (tracking running statistics) called directly after each DS block."""
    x = batch_inputs(next(iter(take_batches(loader, 1))))[:2]
    out = {}
    for block, norm in following_norms(student, x).items():
        m = student.get_submodule(norm)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            out[block] = m
    return out


def layer_errors(student: nn.Module, convs: dict[str, nn.Module], loader: Iterable,
                 max_batches: int | None = None) -> dict[str, float]:
    """Each DS block's relative output error against its original conv, on the input it gets in ``student``.

    One forward pass per batch (no grad); the first call of each block per batch counts.
    """
    blocks = {n: b for n, b in ds_blocks(student).items() if n in convs}
    sums = {n: [0.0, 0.0] for n in blocks}
    seen: set[str] = set()
    handles = []

    def hook(name: str):
        def fn(_mod, args, out):
            if name not in seen:
                seen.add(name)
                ref = convs[name](args[0])
                dt = torch.float64 if supports_float64(ref.device) else torch.float32
                sums[name][0] += float((out - ref).to(dt).square().sum())
                sums[name][1] += float(ref.to(dt).square().sum())
        return fn

    student.eval()
    try:
        for n, b in blocks.items():
            handles.append(b.register_forward_hook(hook(n)))
        with torch.no_grad():
            for batch in take_batches(loader, max_batches):
                seen.clear()
                student(batch_inputs(batch))
    finally:
        for h in handles:
            h.remove()
    return {n: s[0] / max(s[1], 1e-30) for n, s in sums.items() if s[1] > 0}


def calibrate(student: nn.Module, teacher: nn.Module, plan: Plan, loader: Iterable, *,
              max_batches: int | None = None, ridge: float = 1e-6, progress: bool = True, bn: bool = True,
              eval_loader: Iterable | None = None, rounds: int = CALIB_ROUNDS,
              cache_mb: float | str = CALIB_CACHE_MB, interleave_bn: bool = True,
              bn_weight: bool = False, eval_images: int = CALIB_EVAL_IMAGES,
              device: str | torch.device = "auto") -> CalibrationReport:
    """Fit every converted layer's factors by least squares, IN PLACE, then fix BN.

    Args:
        student: the converted model (modified in place; returned in eval mode).
        teacher: the original model the plan was made from (its convs give the targets).
        plan: the conversion plan.
        loader: calibration batches (``x`` or ``(x, y)``), re-iterable, in a fixed order.
        max_batches: use only the first N batches per layer.
        ridge: relative ridge, ``lam = ridge * trace(A^T A) / D``.
        progress: show a tqdm bar on stderr.
        bn: re-estimate BatchNorm statistics after the solve (:func:`recalibrate_bn`), then
            measure each layer's output error again (one more pass).
        eval_loader: labelled batches to report top-1 accuracy before and after, on at most
            ``eval_images`` images of it (0: not scored).
        rounds: alternating (depthwise, then pointwise) rounds after the pointwise solve; 0 fits
            the pointwise weights only. Layers whose patch statistics exceed ``lsq.PATCH_MB`` get
            the pointwise fit (their ``method`` says so).
        cache_mb: MiB of cached stage inputs (:mod:`dsdeploy.recover.stagecache`; 0: none), or
            ``"auto"``: half the memory available when calibration starts.
        interleave_bn: right after each layer is fitted, re-estimate the BatchNorm called directly
            after it from the fitted layer's outputs (:mod:`dsdeploy.recover.bnfit`), so later layers
            are fitted on inputs with the final statistics (``bn_layers`` counts these too).
        bn_weight: with ``interleave_bn``, weight each output channel's error by its gain through the
            original BatchNorm after it (the fit then targets the post-BN output; the errors reported
            for those layers are the weighted ones).
        device: where the networks run (auto | cpu | cuda | cuda:N | mps; :mod:`dsdeploy.recover.device`);
            both models go back where they were afterwards. The least-squares sums are float64 (on
            the device when it has float64, else on the CPU); the solves run on the CPU.

    Returns:
        A CalibrationReport with per-layer relative output errors (SVD, pointwise, rounds, after BN).
    """
    CalibrationParams(ridge=ridge, max_batches=max_batches, rounds=rounds, cache_mb=cache_mb, eval_images=eval_images)
    dev = resolve_device(device, "calibrate.device")
    with placed(dev, student, teacher):
        return _calibrate(student, teacher, plan, on_device(loader, dev), max_batches=max_batches, ridge=ridge,
                          progress=progress, bn=bn, eval_loader=capped(eval_loader, eval_images), rounds=rounds,
                          cache_mb=cache_mb, interleave_bn=interleave_bn, bn_weight=bn_weight)


def _calibrate(student: nn.Module, teacher: nn.Module, plan: Plan, loader: Iterable, *, max_batches: int | None,
               ridge: float, progress: bool, bn: bool, eval_loader: Iterable | None, rounds: int,
               cache_mb: float | str, interleave_bn: bool, bn_weight: bool) -> CalibrationReport:
    """:func:`calibrate` with the models and ``loader`` on one device."""
    t0 = time.perf_counter()
    report = CalibrationReport(ridge=ridge, rounds=rounds)
    blocks, convs = ds_blocks(student), original_convs(teacher, plan)
    names = [d.name for d in plan.converted if d.name in blocks]
    if eval_loader is not None:
        report.accuracy_before = evaluate(student, eval_loader)
    t_fit = time.perf_counter()
    report.eval_seconds = t_fit - t0
    student.eval()
    names = _layer_order(student, names, loader)
    norms = _following_bns(student, loader) if interleave_bn else {}
    n_batches = _count(loader, max_batches)
    interleaved = 0
    bar = progress_bar(total=len(names), desc="calibrating", unit="layer", show=progress)
    with torch.no_grad():
        feeder = LayerInputs(student, lambda: (batch_inputs(b) for b in take_batches(loader, max_batches)), cache_mb)
        for name in names:
            t_layer = time.perf_counter()
            block = blocks[name]
            patch = rounds > 0 and patch_bytes(block) <= PATCH_MB * 2 ** 20
            weight = bn_gain(norms[name]) if bn_weight and name in norms else None
            eq = (PatchEquations(block, convs[name], n_batches, weight=weight) if patch
                  else NormalEquations(block, convs[name]))
            batches, images = feeder.feed(name, block, eq.add)
            if eq.rows == 0:
                continue  # the forward pass never reached this layer
            layer = _fit(eq, name, rounds, ridge)
            if name in norms:
                moments = (patch_moments(eq) if isinstance(eq, PatchEquations)
                           else pass_moments(lambda fn, n=name, b=block: feeder.feed(n, b, fn, False), block))
                interleaved += set_statistics(norms[name], moments)
            layer.seconds = time.perf_counter() - t_layer
            report.layers.append(layer)
            report.batches, report.images = batches, images
            bar.set_postfix(layer=name, err=f"{layer.error_before:.3f}->{layer.error_after:.3f}")
            bar.update(1)
        feeder.inputs = []
    bar.close()
    report.cache, report.fit_seconds = feeder.stats, time.perf_counter() - t_fit
    report.bn_layers = interleaved
    t_bn = time.perf_counter()
    if bn:
        report.bn_layers = recalibrate_bn(student, loader, max_batches)
        errors = layer_errors(student, convs, loader, max_batches)
        for layer in report.layers:
            layer.error_bn = errors.get(layer.name)
    t_eval = time.perf_counter()
    report.bn_seconds = t_eval - t_bn
    if eval_loader is not None:
        report.accuracy_after = evaluate(student, eval_loader)
    report.eval_seconds += time.perf_counter() - t_eval
    report.seconds = time.perf_counter() - t0
    return report


def calibrate_data(model: nn.Module, teacher: nn.Module, plan: Plan, data: str,
                   preprocessing: Any, *, max_batches: int | None = CALIB_BATCHES, seed: int = 0,
                   batch_size: int = 64, ridge: float = 1e-6, progress: bool = True, val_split: float = 0.2,
                   limit: int | None = None, labels: list[str] | None = None, rounds: int = CALIB_ROUNDS,
                   cache_mb: float | str = CALIB_CACHE_MB, block_reconstruct: float | None = None,
                   eval_images: int = CALIB_EVAL_IMAGES, device: str | torch.device = "auto",
                   workers: int | None = None) -> CalibrationReport:
    """Calibrate ``model`` in place on a data spec (``digits`` or a folder).

    ``preprocessing`` is the resolved preprocessing dict (:func:`dsdeploy.data.preprocessing.resolve`;
    None: resolved here from the model alone). The training split of ``load_data(data,
    val_split=, seed=, limit=)`` (no augmentation; a seeded random subset of ``max_batches *
    batch_size`` images when capped, the same for every layer; None = all) is the calibration
    set; the validation split, when labelled, measures accuracy before and after (data classes
    mapped to ``labels`` by name when the model records them). ``rounds``, ``cache_mb``: as in :func:`calibrate`.
    ``block_reconstruct``: seconds of :mod:`dsdeploy.recover.blockrec` afterwards on the same batches (None: off).
    ``eval_images``: score on at most this many validation images (0: none).
    ``device``: where calibration and block reconstruction run (as in :func:`calibrate`).
    ``workers``: DataLoader worker processes reading the images.
    """
    CalibrationParams(ridge=ridge, max_batches=max_batches, batch_size=batch_size, rounds=rounds, cache_mb=cache_mb,
                      eval_images=eval_images)
    dev = resolve_device(device, "calibrate.device")
    pre = resolve(preprocessing, data=data, model=teacher)
    splits, calib = calibration_images(data, pre, max_batches=max_batches, batch_size=batch_size, seed=seed,
                                       val_split=val_split, limit=limit, labels=labels)
    loader = make_loader(calib, batch_size, shuffle=False, workers=workers)
    val = splits.val if eval_images > 0 and splits.val is not None and splits.classes else None
    if val is not None and len(val) > eval_images:
        val = Subset(val, range(eval_images))
    eval_loader = make_loader(val, 256, shuffle=False, workers=workers) if val is not None else None
    if eval_loader is not None:
        check_outputs(splits.classes, output_count(teacher, first_item(calib)[0][None]), "the model")
    report = calibrate(model, teacher, plan, loader, ridge=ridge, progress=progress, eval_loader=eval_loader,
                       rounds=rounds, cache_mb=cache_mb, eval_images=eval_images, device=dev)
    with placed(dev, model, teacher):
        after_calibration(report, model, teacher, on_device(loader, dev), block_reconstruct, eval_loader=eval_loader,
                          progress=progress)
    report.split = splits.split
    return report
