"""Training-free accuracy recovery: least-squares pointwise weights, then BatchNorm re-estimation.

With each DS block's depthwise filters fixed, its output is linear in the pointwise
weights (and bias). For every converted layer, in the order the network calls them, we
solve ``min ||A W - B||^2`` where ``A`` holds the block's depthwise features and ``B``
the ORIGINAL conv's output, both computed on the input the block receives inside the
partially calibrated student — so each layer also corrects the error of those before it.
Normal equations are accumulated over batches in float64 (no activations are stored)
with a small ridge, per conv group. BatchNorm statistics are re-estimated afterwards.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from dsdeploy.conversion.block import DSConv, ds_blocks
from dsdeploy.conversion.plan import Plan
from dsdeploy.conversion.rewrite import original_convs
from dsdeploy.errors import DataError
from dsdeploy.recover.config import CALIB_BATCHES, CalibrationParams
from dsdeploy.recover.distill import call_order, evaluate

CHUNK_ELEMENTS = 1 << 22  # rows x features per float64 product chunk (32 MiB)


@dataclass
class LayerCalibration:
    """One layer's relative output error ``||y_student - y_original||^2 / ||y_original||^2``."""

    name: str
    error_before: float
    error_after: float
    rows: int


@dataclass
class CalibrationReport:
    """What calibration did and measured."""

    layers: list[LayerCalibration] = field(default_factory=list)
    batches: int = 0
    images: int = 0
    ridge: float = 1e-6
    bn_layers: int = 0
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    seconds: float = 0.0
    split: dict[str, Any] | None = None  # the data split calibrated on (dsdeploy.data.labels.split_record)
    block_reconstruction: dict[str, Any] | None = None  # dsdeploy.recover.blockrec.BlockReconReport, when run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def history_entry(self, **extra: Any) -> dict[str, Any]:
        """The artifact history record: ``{"stage": "calibrate", ...}``."""
        return {"stage": "calibrate", "images": self.images, "batches": self.batches, "ridge": self.ridge,
                "bn_layers": self.bn_layers, "accuracy_before": self.accuracy_before,
                "accuracy_after": self.accuracy_after, "seconds": round(self.seconds, 2),
                "layers": [{"name": c.name, "error_before": round(c.error_before, 6),
                            "error_after": round(c.error_after, 6)} for c in self.layers],
                **({"block_reconstruction": self.block_reconstruction} if self.block_reconstruction else {}), **extra}

    def render(self) -> str:
        from dsdeploy.tables import format_table

        rows = [[c.name, f"{c.error_before:.4f}", f"{c.error_after:.4f}"] for c in self.layers]
        lines = [format_table(["layer", "rel.err before", "rel.err after"], rows), "",
                 f"calibrated {len(self.layers)} layers on {self.images} images ({self.seconds:.1f}s); "
                 f"re-estimated {self.bn_layers} BatchNorm layers"]
        if self.accuracy_before is not None and self.accuracy_after is not None:
            lines.append(f"accuracy {100 * self.accuracy_before:.2f}% -> {100 * self.accuracy_after:.2f}%")
        if self.block_reconstruction:
            b = self.block_reconstruction
            lines.append(f"block reconstruction: {len(b['blocks'])} blocks in {b['seconds']:.1f}s "
                         f"(budget {b['time_budget']:.0f}s), summed block error "
                         f"{sum(x['error_before'] or 0 for x in b['blocks']):.4f} -> "
                         f"{sum(x['error_after'] or 0 for x in b['blocks']):.4f}")
        return "\n".join(lines)


class _Stop(Exception):
    """Raised by the capture hook to skip the rest of a forward pass."""


def _inputs(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def _batches(loader: Iterable, max_batches: int | None) -> Iterable:
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


class NormalEquations:
    """Per-group ``A^T A``, ``A^T B`` and ``||B||^2`` for one block, accumulated in float64."""

    def __init__(self, block: DSConv, conv: nn.Module) -> None:
        self.block, self.conv = block, conv
        g, k = block.groups, block.rank
        self.g, self.cin_g, self.cout_g = g, block.in_channels // g, block.out_channels // g
        self.bias = conv.bias is not None
        d = k * self.cin_g + int(self.bias)
        self.ata = torch.zeros(g, d, d, dtype=torch.float64)
        self.atb = torch.zeros(g, d, self.cout_g, dtype=torch.float64)
        self.btb = torch.zeros(g, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate one batch of block inputs ``x``."""
        feats = self.block.depthwise_features(x)  # (N, K, Cin, *sp)
        target = self.conv(x)  # (N, Cout, *sp)
        n, k = feats.shape[:2]
        a = feats.reshape(n, k, self.g, self.cin_g, -1).permute(0, 4, 2, 1, 3).reshape(-1, self.g, k * self.cin_g)
        b = target.reshape(n, self.g, self.cout_g, -1).permute(0, 3, 1, 2).reshape(-1, self.g, self.cout_g)
        step = max(1, CHUNK_ELEMENTS // (self.g * (a.shape[-1] + 1)))
        for i in range(0, a.shape[0], step):
            ac = a[i:i + step].to(torch.float64).transpose(0, 1)  # (g, m, D)
            if self.bias:
                ac = torch.cat([ac, ac.new_ones(ac.shape[0], ac.shape[1], 1)], dim=2)
            bc = b[i:i + step].to(torch.float64).transpose(0, 1)  # (g, m, Cout_g)
            act = ac.transpose(1, 2)
            self.ata += act @ ac
            self.atb += act @ bc
            self.btb += bc.square().sum(dim=(1, 2))
        self.rows += a.shape[0]

    def current(self) -> torch.Tensor:
        """The block's present pointwise weights as ``W (g, D, Cout_g)``."""
        pw, bias = self.block.get_pointwise()  # (K, Cout, Cin_g)
        k = pw.shape[0]
        w = pw.detach().reshape(k, self.g, self.cout_g, self.cin_g).permute(1, 0, 3, 2)
        w = w.reshape(self.g, k * self.cin_g, self.cout_g).to(torch.float64)
        if self.bias:
            bias = bias.detach() if bias is not None else torch.zeros(self.block.out_channels)
            w = torch.cat([w, bias.reshape(self.g, 1, self.cout_g).to(torch.float64)], dim=1)
        return w

    def error(self, w: torch.Tensor) -> float:
        """Relative squared error ``||A W - B||^2 / ||B||^2`` summed over groups."""
        sq = ((w.transpose(1, 2) @ self.ata @ w).diagonal(dim1=1, dim2=2).sum() - 2 * (w * self.atb).sum()
              + self.btb.sum())
        return float(sq.clamp_min(0) / self.btb.sum().clamp_min(1e-30))

    def solve(self, ridge: float) -> torch.Tensor:
        """Ridge-regularised least squares: ``(A^T A + lam I) W = A^T B``, lam = ridge * trace / D."""
        d = self.ata.shape[-1]
        lam = ridge * self.ata.diagonal(dim1=1, dim2=2).sum(-1) / d
        reg = self.ata + lam.clamp_min(1e-12)[:, None, None] * torch.eye(d, dtype=torch.float64)
        return torch.linalg.solve(reg, self.atb)

    def load(self, w: torch.Tensor) -> None:
        """Write ``W`` back into the block's pointwise weights and bias."""
        k = self.block.rank
        dtype = self.block.get_pointwise()[0].dtype
        bias = w[:, -1, :].reshape(-1).to(dtype) if self.bias else None
        wk = w[:, :k * self.cin_g, :].reshape(self.g, k, self.cin_g, self.cout_g).permute(1, 0, 3, 2)
        self.block.set_pointwise(wk.reshape(k, self.block.out_channels, self.cin_g).to(dtype), bias)


def _layer_order(student: nn.Module, names: list[str], loader: Iterable) -> list[str]:
    """Converted layers in the order one forward pass calls them (unused ones last)."""
    first = next(iter(_batches(loader, 1)), None)
    if first is None:
        raise DataError("the calibration data is empty")
    order = call_order(student, _inputs(first)[:2])
    ranked = {n: i for i, n in reversed(list(enumerate(order)))}
    return sorted(names, key=lambda n: ranked.get(n, len(order)))


def calibrate(student: nn.Module, teacher: nn.Module, plan: Plan, loader: Iterable, *,
              max_batches: int | None = None, ridge: float = 1e-6, progress: bool = True, bn: bool = True,
              eval_loader: Iterable | None = None) -> CalibrationReport:
    """Solve every converted layer's pointwise weights by least squares, IN PLACE, then fix BN.

    Args:
        student: the converted model (modified in place; returned in eval mode).
        teacher: the original model the plan was made from (its convs give the targets).
        plan: the conversion plan.
        loader: calibration batches (``x`` or ``(x, y)``), re-iterable, in a fixed order.
        max_batches: use only the first N batches per layer.
        ridge: relative ridge, ``lam = ridge * trace(A^T A) / D``.
        progress: show a tqdm bar on stderr.
        bn: re-estimate BatchNorm statistics after the solve (:func:`recalibrate_bn`).
        eval_loader: labelled batches to report top-1 accuracy before and after.

    Returns:
        A CalibrationReport with per-layer relative output errors before/after.
    """
    from tqdm import tqdm

    CalibrationParams(ridge=ridge, max_batches=max_batches)
    t0 = time.perf_counter()
    report = CalibrationReport(ridge=ridge)
    blocks, convs = ds_blocks(student), original_convs(teacher, plan)
    names = [d.name for d in plan.converted if d.name in blocks]
    if eval_loader is not None:
        report.accuracy_before = evaluate(student, eval_loader)
    student.eval()
    names = _layer_order(student, names, loader)
    bar = tqdm(total=len(names), desc="calibrating", unit="layer", disable=not progress, leave=False)
    with torch.no_grad():
        for name in names:
            eq = NormalEquations(blocks[name], convs[name])

            def hook(_mod, args, eq=eq):
                eq.add(args[0])
                raise _Stop

            handle = blocks[name].register_forward_pre_hook(hook)
            batches = images = 0
            try:
                for batch in _batches(loader, max_batches):
                    x = _inputs(batch)
                    try:
                        student(x)
                    except _Stop:
                        pass
                    batches, images = batches + 1, images + x.shape[0]
            finally:
                handle.remove()
            if eq.rows == 0:
                continue  # the forward pass never reached this layer
            before = eq.error(eq.current())
            w = eq.solve(ridge)
            after = eq.error(w)
            if after < before:  # never make a layer worse (e.g. too little data for its size)
                eq.load(w)
            report.layers.append(LayerCalibration(name, before, min(before, after), eq.rows))
            report.batches, report.images = batches, images
            bar.set_postfix(layer=name, err=f"{before:.3f}->{min(before, after):.3f}")
            bar.update(1)
    bar.close()
    if bn:
        report.bn_layers = recalibrate_bn(student, loader, max_batches)
    if eval_loader is not None:
        report.accuracy_after = evaluate(student, eval_loader)
    report.seconds = time.perf_counter() - t0
    return report


def affected_norms(model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """BatchNorm layers that run after the first DSConv (all of them when there is none)."""
    bns = {n: m for n, m in model.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}
    order = call_order(model, x)
    first = next((i for i, n in enumerate(order) if isinstance(model.get_submodule(n), DSConv)), None)
    if first is None:
        return list(bns.values())
    after = {n for n in order[first:]}
    return [m for n, m in bns.items() if n in after]


def recalibrate_bn(model: nn.Module, loader: Iterable, max_batches: int | None = None) -> int:
    """Re-estimate BatchNorm running statistics on ``loader`` (cumulative average, no grad).

    Only the BN layers downstream of the first DS block are reset (those whose inputs the
    conversion changed). Other layers stay in eval mode during the passes. Returns the
    number of BN layers re-estimated; the model is left in eval mode. Batches of one
    image (e.g. a short last batch) are skipped: one image has no batch statistics.
    Raises DataError when no batch has two images or more.
    """
    first = next(iter(_batches(loader, 1)), None)
    if first is None:
        raise DataError("the calibration data is empty")
    bns = affected_norms(model, _inputs(first)[:2])
    if not bns:
        return 0
    saved = [(m, m.momentum) for m in bns]
    model.eval()
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        used = 0
        with torch.no_grad():
            for batch in _batches(loader, max_batches):
                x = _inputs(batch)
                if x.shape[0] < 2:  # one image has no batch variance (BatchNorm1d refuses it); skip it
                    continue
                model(x)
                used += 1
        if used == 0:
            raise DataError("BatchNorm re-estimation needs batches of at least 2 images; "
                            "give more calibration images or a larger batch_size")
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.eval()
    return len(bns)


def calibrate_data(model: nn.Module, teacher: nn.Module, plan: Plan, data: str,
                   preprocessing: Any, *, max_batches: int | None = CALIB_BATCHES, seed: int = 0,
                   batch_size: int = 64, ridge: float = 1e-6, progress: bool = True, val_split: float = 0.2,
                   limit: int | None = None, labels: list[str] | None = None,
                   block_reconstruct: float | None = None) -> CalibrationReport:
    """Calibrate ``model`` in place on a data spec (``digits`` or a folder).

    ``preprocessing`` is the resolved preprocessing dict (:func:`dsdeploy.data.preprocessing.resolve`;
    None: resolved here from the model alone). The training split of ``load_data(data,
    val_split=, seed=, limit=)`` (no augmentation; a seeded random subset of ``max_batches *
    batch_size`` images when capped, the same for every layer; None = all) is the calibration
    set; the validation split, when labelled, measures accuracy before and after (data classes
    mapped to ``labels`` by name when the model records them). ``block_reconstruct``: seconds of
    :mod:`dsdeploy.recover.blockrec` afterwards on the same batches (None: off).
    """
    from torch.utils.data import Subset

    from dsdeploy.data.datasets import load_data, make_loader
    from dsdeploy.data.labels import check_outputs, output_count
    from dsdeploy.data.preprocessing import resolve

    CalibrationParams(ridge=ridge, max_batches=max_batches, batch_size=batch_size)
    pre = resolve(preprocessing, data=data, model=teacher)
    splits = load_data(data, pre, seed=seed, labelled=False, val_split=val_split, limit=limit, model_labels=labels)
    calib = splits.train if splits.train is not None else splits.val
    if calib is None or len(calib) == 0:
        raise DataError(f"no calibration images in {data}")
    if max_batches is not None and max_batches * batch_size < len(calib):
        perm = torch.randperm(len(calib), generator=torch.Generator().manual_seed(seed))
        calib = Subset(calib, perm[:max_batches * batch_size].sort().values.tolist())
    loader = make_loader(calib, batch_size, shuffle=False)
    eval_loader = make_loader(splits.val, 256, shuffle=False) if splits.val is not None and splits.classes else None
    if eval_loader is not None:
        check_outputs(splits.classes, output_count(teacher, calib[0][0][None]), "the model")
    report = calibrate(model, teacher, plan, loader, ridge=ridge, progress=progress, eval_loader=eval_loader)
    from dsdeploy.recover.blockrec import after_calibration

    after_calibration(report, model, teacher, loader, block_reconstruct, eval_loader=eval_loader, progress=progress)
    report.split = splits.split
    return report


def calibrate_on_data(model: nn.Module, teacher: nn.Module, plan: Plan, data: str,
                      preprocessing: Any, *, max_batches: int | None = CALIB_BATCHES, seed: int = 0,
                      batch_size: int = 64, labels: list[str] | None = None,
                      block_reconstruct: float | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """For ``convert --calib-data``: :func:`calibrate_data`, returning (model, artifact history entry)."""
    report = calibrate_data(model, teacher, plan, data, preprocessing, max_batches=max_batches, seed=seed,
                            batch_size=batch_size, labels=labels, block_reconstruct=block_reconstruct)
    return model, report.history_entry(data=data, seed=seed)


def calibrate_artifact(artifact_path: str, data: str, out: str, *, max_batches: int | None = CALIB_BATCHES,
                       batch_size: int = 64, seed: int = 0, ridge: float = 1e-6, progress: bool = True,
                       preprocess: dict[str, Any] | None = None, val_split: float = 0.2,
                       limit: int | None = None, trust_code: bool = False,
                       block_reconstruct: float | str | None = None) -> CalibrationReport:
    """``dsdeploy calibrate``: load a .dsd, calibrate it against its source model, write ``out``.

    The preprocessing is :func:`dsdeploy.data.preprocessing.resolve` of the artifact's recorded
    preprocessing and input shape with ``preprocess`` overrides; ``out`` records what was used.
    ``trust_code``: import the ``pkg.module:factory`` the artifact records (see :mod:`dsdeploy.models.trust`).
    ``block_reconstruct``: seconds or a duration (``"90s"``) of block reconstruction afterwards (None/0: off).
    """
    from dsdeploy.conversion.artifact import (
        load_artifact,
        load_source_model,
        save_artifact,
    )
    from dsdeploy.data.preprocessing import resolve

    params = CalibrationParams(ridge=ridge, max_batches=max_batches, batch_size=batch_size,
                               block_reconstruct=block_reconstruct)
    art = load_artifact(artifact_path, trust_code=trust_code)
    teacher = load_source_model(art)
    pre = resolve(art.metadata.get("preprocessing"), art.metadata.get("input_shape"), preprocess, data=data,
                  model=teacher)
    report = calibrate_data(art.model, teacher, art.plan, data, pre, max_batches=max_batches, seed=seed,
                            batch_size=batch_size, ridge=ridge, progress=progress, val_split=val_split, limit=limit,
                            labels=art.metadata.get("labels"), block_reconstruct=params.block_reconstruct)
    save_artifact(out, art.model, art.plan, art.source, {**art.metadata, "preprocessing": pre.to_dict()},
                  art.history + [report.history_entry(data=data, seed=seed)])
    return report
