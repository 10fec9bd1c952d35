"""Label-free block reconstruction: a short local Adam fit of each converted block to the original's output.

After least-squares calibration and BatchNorm re-estimation (:mod:`dsdeploy.recover.reconstruct`),
each *block* that holds converted DS layers (a residual block; else the single DSConv) is
optimised on its own, in network order, as in BRECQ (Li et al. 2021, "BRECQ: Pushing the limit
of post-training quantization by block reconstruction"): no labels, no backprop through the
whole network, only through one block at a time.

Per block, over the calibration batches (cached, memory bounded):
- input  = the block's input inside the student (blocks before it already reconstructed, so
  their remaining error is part of what this block sees);
- target = the ORIGINAL network's activation at the block's output for the same images
  (``target="original"``, the default). The layers after the block are the original's and
  expect the original's activations, so pulling the block's output onto them also absorbs the
  error left by the blocks before it, instead of passing it on. ``target="local"`` (the
  original block applied to the student's input) fits only the block's own approximation.
- trained: the DS layers' weights (depthwise and pointwise) and, by default, the affine
  parameters of the BatchNorm layers inside the block (running statistics are kept).

The time budget covers everything (caching included) and is split across blocks in
proportion to their MACs (re-split after each block); a block stops early when its error on
the cache has not improved for ``patience`` epochs. The best weights seen are kept, never
worse than the block's starting error. Results depend on the time budget (and so on the
machine's speed); with a fixed step count (``max_epochs``) they are reproducible per seed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from dsdeploy.conversion.block import DSConv
from dsdeploy.conversion.opcount import profile_model
from dsdeploy.errors import DsdeployError
from dsdeploy.progress import bar as progress_bar
from dsdeploy.recover.blockdata import Unsupported, batches_of, block_data, find_blocks, probe
from dsdeploy.recover.distill import call_order, evaluate
from dsdeploy.tables import format_table

MAX_CACHE_BYTES = 1 << 30  # inputs + targets cached per block (images are dropped beyond it)
NORMS = (nn.modules.batchnorm._BatchNorm,)


@dataclass
class BlockResult:
    """One block: relative output error ``||y_s - y_t||^2 / ||y_t||^2`` on the cache, before and after."""

    name: str
    layers: list[str]
    error_before: float | None
    error_after: float | None
    steps: int = 0
    epochs: int = 0
    seconds: float = 0.0
    stopped: str = "budget"  # converged | budget | max-epochs | skipped: <why>


@dataclass
class BlockReconReport:
    """What block reconstruction did: per-block errors, steps, seconds; totals and accuracy."""

    blocks: list[BlockResult] = field(default_factory=list)
    time_budget: float = 0.0
    target: str = "original"
    lr: float = 1e-3
    images: int = 0
    bn_layers: int = 0  # BatchNorm layers outside the blocks re-estimated at the end
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summed_error(self) -> tuple[float, float]:
        """Summed block errors (before, after) over the blocks that were measured."""
        done = [b for b in self.blocks if b.error_before is not None and b.error_after is not None]
        return sum(b.error_before for b in done), sum(b.error_after for b in done)

    def render(self) -> str:
        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.4f}"

        rows = [[b.name, f(b.error_before), f(b.error_after), b.steps, f"{b.seconds:.1f}", b.stopped]
                for b in self.blocks]
        lines = [format_table(["block", "rel.err before", "rel.err after", "steps", "s", "stopped"], rows), "",
                 (f"block reconstruction: {len(self.blocks)} blocks on {self.images} images in "
                 f"{self.seconds:.1f}s (budget {self.time_budget:.0f}s)")]
        if self.accuracy_before is not None and self.accuracy_after is not None:
            lines.append(f"accuracy {100 * self.accuracy_before:.2f}% -> {100 * self.accuracy_after:.2f}%")
        return "\n".join(lines)


def _error(block: nn.Module, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    """Relative squared error of ``block`` on the cache, and its outputs (the next block's inputs)."""
    num = den = 0.0
    outs = []
    with torch.no_grad():
        for x, y in zip(xs, ys):
            outs.append(block(x.clone()))
            num += float((outs[-1] - y).square().sum())
            den += float(y.square().sum())
    return num / max(den, 1e-30), outs


def _trainable(block: nn.Module, bn_affine: bool) -> list[nn.Parameter]:
    params = [p for m in block.modules() if isinstance(m, DSConv) for p in m.parameters()]
    if bn_affine:
        params += [p for m in block.modules() if isinstance(m, NORMS) for p in m.parameters(recurse=False)]
    return params


def _fit(block: nn.Module, xs: list[torch.Tensor], ys: list[torch.Tensor], outs: list[torch.Tensor],
         res: BlockResult, *, deadline: float, lr: float, bn_affine: bool, patience: int, max_epochs: int | None,
         seed: int) -> list[torch.Tensor]:
    """Adam on the block's MSE until ``deadline`` / convergence; loads the best weights seen (start included).

    ``outs``: the block's outputs at the start; returns its outputs with the weights kept.
    """
    params = _trainable(block, bn_affine)
    ids = {id(p) for p in params}
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in frozen:
        p.requires_grad_(id(p) in ids)
    best = res.error_before
    best_state = {k: v.detach().clone() for k, v in block.state_dict().items()}
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    t0, span, since = time.perf_counter(), max(deadline - time.perf_counter(), 1e-9), 0
    res.stopped = "budget"
    try:
        while time.perf_counter() < deadline:
            if max_epochs is not None and res.epochs >= max_epochs:
                res.stopped = "max-epochs"
                break
            for i in torch.randperm(len(xs), generator=gen).tolist():
                frac = min(1.0, (time.perf_counter() - t0) / span)
                for g in opt.param_groups:  # cosine decay over the block's time share
                    g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * frac))
                with torch.enable_grad():
                    y = ys[i]
                    loss = (block(xs[i].clone()) - y).square().mean() / y.square().mean().clamp_min(1e-30)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                res.steps += 1
                if time.perf_counter() >= deadline:
                    break
            res.epochs += 1
            err, now = _error(block, xs, ys)
            if math.isfinite(err) and err < best * (1 - 1e-3):
                best, since, outs = err, 0, now
                best_state = {k: v.detach().clone() for k, v in block.state_dict().items()}
            else:
                since += 1
                if since >= patience:
                    res.stopped = "converged"
                    break
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        block.load_state_dict(best_state)
    res.error_after = best
    return outs


def _reestimate_norms(model: nn.Module, batches: list[torch.Tensor], norms: list[nn.Module]) -> int:
    """Re-estimate the running statistics of ``norms`` on ``batches`` (cumulative average)."""
    saved = [(m, m.momentum) for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for x in batches:
                if x.shape[0] >= 2:
                    model(x)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.eval()
    return len(norms)


def reconstruct_blocks(student: nn.Module, teacher: nn.Module, loader: Iterable, *, time_budget_s: float,
                       lr: float = 1e-3, target: str = "original", bn_affine: bool = True, patience: int = 3,
                       max_batches: int | None = None, max_epochs: int | None = None,
                       max_cache_bytes: int = MAX_CACHE_BYTES, seed: int = 0, progress: bool = False,
                       eval_loader: Iterable | None = None) -> BlockReconReport:
    """Fit each converted block of ``student`` to ``teacher``'s activations, IN PLACE, within ``time_budget_s``.

    Args:
        student: the converted (and normally calibrated) model; its module names match
            ``teacher``'s (each DSConv sits where the original conv was). Left in eval mode.
        teacher: the original model (not modified).
        loader: calibration batches (``x`` or ``(x, y)``; labels unused), re-iterable.
        time_budget_s: seconds for the whole step, caching included (> 0; a block's last
            epoch and error check may run over by one step and one pass over its cache).
        lr: Adam's starting learning rate (cosine-decayed over each block's time share).
        target: ``"original"`` (the original network's activation at the block's output) or
            ``"local"`` (the original block applied to the student's input).
        bn_affine: also train the BatchNorm weights/biases inside each block.
        patience: epochs (passes over the cache) without a 0.1 % error gain before a block stops.
        max_batches: use at most this many batches of ``loader``.
        max_epochs: cap the epochs per block (None: the time share decides).
        max_cache_bytes: bound on one block's cached inputs + targets (float32); later images
            are dropped to fit. Peak memory is about twice this (the block's outputs, which
            feed the next block, are held too).
        seed: seed of the batch order.
        eval_loader: labelled batches to report top-1 accuracy before and after.

    Returns:
        A BlockReconReport: per block the relative output error before/after, steps, seconds.
        Every block's error after is <= its error before (its starting weights are kept
        otherwise). BatchNorm layers outside any multi-layer block are re-estimated at the end.

    Raises:
        DataError: the loader yields no batch; DsdeployError: an argument out of range.
    """
    if not (isinstance(time_budget_s, (int, float)) and math.isfinite(time_budget_s) and time_budget_s > 0):
        raise DsdeployError(f"time_budget_s must be a positive number of seconds, got {time_budget_s!r}")
    if target not in ("original", "local"):
        raise DsdeployError(f"target must be 'original' or 'local', got {target!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise DsdeployError(f"lr must be positive, got {lr!r}")
    t_start = time.perf_counter()
    deadline = t_start + time_budget_s
    report = BlockReconReport(time_budget=float(time_budget_s), target=target, lr=lr)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # torch's one-time optimizer import (seconds): counted
    batches = batches_of(loader, max_batches)
    was_teacher = teacher.training
    student.eval()
    teacher.eval()
    if eval_loader is not None:
        report.accuracy_before = evaluate(student, eval_loader)
    units = find_blocks(student)
    order = call_order(student, batches[0][:2])
    rank = {n: i for i, n in reversed(list(enumerate(order)))}
    units.sort(key=lambda u: min(rank.get(n, len(order)) for n in u[1]))
    calls, feeds = probe(student, [n for n, _ in units], batches[0][:2])
    macs = _unit_macs(student, units, batches[0][:1])
    queue = list(units)
    prev: tuple[str, list[torch.Tensor], list[torch.Tensor] | None] | None = None
    bar = progress_bar(total=len(queue), desc="block reconstruction", unit="block", show=progress)
    try:
        while queue:
            name, layers = queue.pop(0)
            res = BlockResult(name, layers, None, None)
            t_block = time.perf_counter()
            chained = prev is not None and feeds.get(name) == prev[0]
            prev_data, prev = (prev[1:] if chained else None), None
            skip = ("time budget spent" if t_block >= deadline else
                    "it runs more than once per pass" if calls.get(name, 1) > 1 or any(order.count(n) > 1
                                                                                      for n in layers) else None)
            if skip is None:
                block = student.get_submodule(name)
                try:
                    xs, ys = block_data(student, teacher, name, batches, target, max_cache_bytes, prev_data)
                except Unsupported:
                    if name not in layers:  # not tensor -> tensor: fit its layers one by one instead
                        queue[:0] = [(n, [n]) for n in layers]
                        bar.total += len(layers) - 1
                        continue
                    skip = "not called as tensor -> tensor"
            if skip is not None:
                res.stopped = f"skipped: {skip}"
                report.blocks.append(res)
                bar.update(1)
                continue
            report.images = max(report.images, sum(x.shape[0] for x in xs))
            t_eval = time.perf_counter()
            res.error_before, outs = _error(block, xs, ys)
            t_eval = time.perf_counter() - t_eval
            rest = sum(macs.get(n, 1) for n, _ in [(name, layers)] + queue)
            share = (deadline - time.perf_counter()) * macs.get(name, 1) / rest
            outs = _fit(block, xs, ys, outs, res, deadline=time.perf_counter() + share - t_eval, lr=lr,
                        bn_affine=bn_affine, patience=patience, max_epochs=max_epochs, seed=seed)
            prev = (name, outs, ys if target == "original" else None)
            res.seconds = time.perf_counter() - t_block
            report.blocks.append(res)
            bar.set_postfix(block=name, err=f"{res.error_before:.3f}->{res.error_after:.3f}")
            bar.update(1)
            del xs, ys, outs
    finally:
        bar.close()
        student.eval()
        teacher.train(was_teacher)
    inside = {id(m) for b in report.blocks if b.error_after is not None and b.name not in b.layers
              for m in student.get_submodule(b.name).modules()}
    outside = [m for m in _norms_after_first_ds(student, order) if id(m) not in inside]
    report.bn_layers = _reestimate_norms(student, batches, outside) if outside else 0
    if eval_loader is not None:
        report.accuracy_after = evaluate(student, eval_loader)
    report.seconds = time.perf_counter() - t_start
    return report


def _norms_after_first_ds(model: nn.Module, order: list[str]) -> list[nn.Module]:
    """BatchNorm layers (tracking statistics) called after the first DSConv, given the call ``order``."""
    first = next((i for i, n in enumerate(order) if isinstance(model.get_submodule(n), DSConv)), len(order))
    later = set(order[first:])
    return [m for n, m in model.named_modules() if n in later and isinstance(m, NORMS) and m.track_running_stats]


def _unit_macs(model: nn.Module, units: list[tuple[str, list[str]]], x: torch.Tensor) -> dict[str, int]:
    """MACs of each unit (and of each DS layer) for one image; at least 1."""
    prof = profile_model(model, tuple(x.shape))
    names = {n for _, layers in units for n in layers} | {n for n, _ in units}
    return {n: max(1, prof.macs_under(n)) for n in names}


def after_calibration(report: Any, student: nn.Module, teacher: nn.Module, loader: Iterable,
                      seconds: float | None, *, max_batches: int | None = None, eval_loader: Iterable | None = None,
                      progress: bool = False) -> None:
    """The calibrate paths' hook: when ``seconds`` (CalibrationParams.block_reconstruct) is set, run
    :func:`reconstruct_blocks` on the calibration ``loader`` and fold its result into the
    CalibrationReport ``report`` (``block_reconstruction``, ``accuracy_after``, ``seconds``). None: nothing.
    """
    if not seconds:
        return
    rep = reconstruct_blocks(student, teacher, loader, time_budget_s=seconds, max_batches=max_batches,
                             progress=progress)
    if eval_loader is not None:
        rep.accuracy_before = report.accuracy_after
        rep.accuracy_after = report.accuracy_after = evaluate(student, eval_loader)
    report.block_reconstruction = rep.to_dict()
    report.seconds += rep.seconds
