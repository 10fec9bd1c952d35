"""BatchNorm statistics in calibration: re-estimation at the end (:func:`recalibrate_bn`) and interleaved.

Interleaved: each fitted layer's following BN gets its statistics from the fitted layer's own
outputs before the layers after it are fitted.

Calibration fits layers in call order on the inputs they get inside the student. Re-estimating
BatchNorm only at the end changes every later layer's inputs after it was fitted (measured on
a CIFAR ResNet-32: the summed per-layer output error more than doubled). Here, right after a
DS block is fitted, the BatchNorm called directly after it (:func:`dsdeploy.recover.distill.following_norms`)
gets the mean and variance of the block's output over the calibration rows, so every later
layer is fitted on inputs normalised as they finally will be. With the alternating fit these
moments come exactly from the patch statistics already accumulated (``X^T X`` holds the row
sums in its ones column; no extra pass); otherwise one pass over the layer's inputs computes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from dsdeploy.conversion.block import DSConv
from dsdeploy.errors import DataError
from dsdeploy.recover.device import supports_float64
from dsdeploy.recover.distill import call_order

F64 = torch.float64


class Moments:
    """Per-channel sums of a layer's output over rows (float64): ``n``, ``sum y``, ``sum y^2``."""

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.s1 = torch.zeros(channels, dtype=F64)
        self.s2 = torch.zeros(channels, dtype=F64)

    def add(self, y: torch.Tensor) -> None:
        """Accumulate an output batch ``y (N, C, *spatial)`` (on any device; the sums stay on the CPU)."""
        y = y.detach()
        y = (y.to(F64) if supports_float64(y.device) else y.cpu().to(F64)).transpose(0, 1).reshape(y.shape[1], -1)
        self.n += y.shape[1]
        self.s1 += y.sum(1).cpu()
        self.s2 += y.square().sum(1).cpu()

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased variance per channel (what BatchNorm stores as running statistics)."""
        n = max(self.n, 2)
        mean = self.s1 / max(self.n, 1)
        var = (self.s2 / max(self.n, 1) - mean.square()).clamp_min(0) * n / (n - 1)
        return mean, var


def patch_moments(eq) -> Moments:
    """The fitted block's output moments from :class:`dsdeploy.recover.als.PatchEquations` (exact, no data pass).

    With the dense kernel ``W (g, D+1, Cout_g)`` (last row: bias) and ``X^T X`` whose last row
    is the row sums (ones column), ``sum y = (X^T X)[-1] W`` and ``sum y^2 = diag(W^T X^T X W)``.
    """
    d, p, b = eq.factors()
    w = eq.dense(d, p, b)  # (g, D+1, og)
    m = Moments(eq.g * eq.og)
    m.n = round(float(eq.xtx[0, -1, -1]))
    m.s1 = (eq.xtx[:, -1:, :] @ w).reshape(-1)
    m.s2 = ((eq.xtx @ w) * w).sum(1).reshape(-1)
    if eq.weight is not None:  # the equations are of the weighted outputs
        m.s1, m.s2 = m.s1 / eq.weight.reshape(-1), m.s2 / eq.weight.reshape(-1).square()
    return m


def bn_gain(norm: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """Each channel's gain through ``norm`` as it is now, ``|gamma| / sqrt(var + eps)``, scaled to mean square 1.

    Weighting a layer's output error by it fits the output as it matters after the original BatchNorm.
    """
    var = norm.running_var.detach().cpu()
    gamma = norm.weight.detach().cpu().abs() if norm.weight is not None else torch.ones_like(var)
    gain = gamma.to(F64) / (var.to(F64) + norm.eps).sqrt()
    gain = gain.clamp_min(1e-3 * float(gain.max().clamp_min(1e-30)))
    return gain / gain.square().mean().sqrt()


def pass_moments(feed: Callable[[Callable[[torch.Tensor], None]], object], block: nn.Module) -> Moments:
    """The block's output moments by running it on each of its inputs (``feed(fn)`` calls ``fn(x)`` per batch)."""
    m = Moments(block.out_channels)
    feed(lambda x: m.add(block.forward(x)))  # forward: the feeding pre-hook is on block itself
    return m


def set_statistics(norm: nn.modules.batchnorm._BatchNorm, m: Moments) -> bool:
    """Load ``m``'s mean and variance as ``norm``'s running statistics; False (unchanged) without 2 rows."""
    if m.n < 2 or norm.running_mean is None:
        return False
    mean, var = m.mean_var()
    norm.running_mean.copy_(mean.to(norm.running_mean.dtype))
    norm.running_var.copy_(var.to(norm.running_var.dtype))
    return True


def batch_inputs(batch: Any) -> torch.Tensor:
    """The inputs of a batch: ``x`` of ``(x, y)``, or the batch itself."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def take_batches(loader: Iterable, max_batches: int | None) -> Iterable:
    """The first ``max_batches`` batches of ``loader`` (None: all)."""
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


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
    first = next(iter(take_batches(loader, 1)), None)
    if first is None:
        raise DataError("the calibration data is empty")
    bns = affected_norms(model, batch_inputs(first)[:2])
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
            for batch in take_batches(loader, max_batches):
                x = batch_inputs(batch)
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
