"""Per-layer sensitivity on calibration data: what converting ONE layer at each rank does.

For each convertible layer and each candidate rank ``r`` (1 .. the largest gainful rank,
capped at ``max_rank``):

- ``output_error``: the layer's relative squared output error
  ``||y_block - y_conv||^2 / ||y_conv||^2`` after converting it at rank ``r`` with its
  pointwise weights fitted by least squares to the original conv's outputs, on the ORIGINAL
  network's inputs to that layer (:class:`dsdeploy.recover.reconstruct.NormalEquations`). One
  forward pass of the original model per batch, with hooks, accumulates every layer's normal
  equations at every rank.
- ``logit_error``: the network-level effect, the mean KL divergence ``KL(softmax(original) ||
  softmax(converted))`` per image (for outputs that are not ``(N, classes)`` logits: the relative
  squared error of all output tensors) when only that layer is converted (at rank ``r``, fitted
  as above), on the first ``logit_batches`` batches. One forward per (layer, rank, batch).

The MAC-budget planner (:func:`dsdeploy.conversion.plan.make_plan` with ``costs``) minimises
the sum of ``logit_error`` over layers; the latency planner can use the same table.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from dsdeploy.conversion.block import DSConv
from dsdeploy.conversion.decompose import channel_svd
from dsdeploy.conversion.opcount import run_model, trace_calls
from dsdeploy.conversion.plan import Policy, conv_modules, ds_mac_ratio, make_plan, max_gainful_rank
from dsdeploy.conversion.rewrite import _set_submodule, copy_model
from dsdeploy.data.datasets import make_loader
from dsdeploy.data.given import calibration_images
from dsdeploy.data.preprocessing import resolve
from dsdeploy.errors import DataError
from dsdeploy.export.parity import flatten_outputs
from dsdeploy.progress import bar as progress_bar
from dsdeploy.recover.bnfit import batch_inputs
from dsdeploy.recover.config import CALIB_BATCHES
from dsdeploy.recover.device import on_device, resolve_device
from dsdeploy.recover.reconstruct import NormalEquations
from dsdeploy.tables import format_table, human

MAX_RANK = 8  # ranks measured per layer at most (a 3x3 kernel has full rank 9, never gainful)
BATCHES = 8  # batches for the normal equations
LOGIT_BATCHES = 1  # batches for the network-level effect: one forward per (layer, rank, batch)


@dataclass
class Sensitivity:
    """The sensitivity table: ``layers[name][rank] = {"output_error", "logit_error", "macs"}``.

    ``macs`` is the DS block's MACs at the traced input shape; ``metric`` names what
    ``logit_error`` is ("kl": mean KL divergence of softmax per image; "relative_mse").
    ``seconds`` splits the time into the normal-equation pass and the logit passes.
    """

    layers: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    dense_macs: dict[str, int] = field(default_factory=dict)
    metric: str = "kl"
    batches: int = 0
    images: int = 0
    logit_batches: int = 0
    evaluations: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def costs(self, key: str = "logit_error") -> dict[str, dict[int, float]]:
        """``layer -> rank -> cost`` for :func:`dsdeploy.conversion.plan.make_plan` (``key``: a column)."""
        return {n: {r: row[key] for r, row in ranks.items()} for n, ranks in self.layers.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (rank keys become strings in JSON)."""
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """The history record: sizes and times, not the table."""
        return {"metric": self.metric, "layers": len(self.layers), "batches": self.batches, "images": self.images,
                "logit_batches": self.logit_batches, "evaluations": self.evaluations,
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()}}

    def render(self) -> str:
        """A text table: layer, rank, output error, logit error, MACs (and x the dense conv)."""
        rows = []
        for name, ranks in self.layers.items():
            for r, row in ranks.items():
                dense = self.dense_macs.get(name) or 0
                rows.append([name, r, float(row["output_error"]), float(row["logit_error"]), human(row["macs"]),
                             f"x{row['macs'] / dense:.3f}" if dense else "-"])
        head = ["layer", "rank", "output err", f"logit err ({self.metric})", "MACs", "vs dense"]
        t = self.seconds
        return "\n".join([format_table(head, rows), "",
                          (f"sensitivity of {len(self.layers)} layers on {self.images} images: normal equations "
                          f"{t.get('normal_equations', 0):.1f}s, {self.evaluations} one-layer forwards on "
                          f"{self.logit_batches} batch(es) {t.get('logits', 0):.1f}s")])


def _is_logits(out: Any) -> bool:
    return isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] > 1 and out.is_floating_point()


def output_change(reference: Any, out: Any) -> float:
    """Mean KL(softmax(reference) || softmax(out)) per row for ``(N, C)`` logits, else the relative
    squared error over all output tensors."""
    if _is_logits(reference):
        p = torch.log_softmax(reference.cpu().double(), dim=1)
        q = torch.log_softmax(out.cpu().double(), dim=1)
        return float((p.exp() * (p - q)).sum(dim=1).mean().clamp_min(0))
    ref, got = flatten_outputs(reference), flatten_outputs(out)
    ref, got = [r.cpu().double() for r in ref], [g.cpu().double() for g in got]
    num = sum(float((g - r).square().sum()) for r, g in zip(ref, got))
    den = sum(float(r.square().sum()) for r in ref)
    return num / max(den, 1e-30)


def truncated(eq: NormalEquations, block: DSConv) -> NormalEquations:
    """The normal equations of ``block`` (rank r) cut out of ``eq``'s (same conv, rank >= r).

    The rank-r block's depthwise filters are the first r of the larger block's (the SVD
    factors are nested), so its system is the sub-matrix of the features of ranks 1..r (the
    columns ``add`` lays out rank-major) plus the bias column.
    """
    eq.host()
    sub = NormalEquations(block, eq.conv)
    keep = list(range(block.rank * eq.cin_g)) + ([eq.ata.shape[-1] - 1] if eq.bias else [])
    idx = torch.tensor(keep)
    sub.ata = eq.ata[:, idx][:, :, idx].clone()
    sub.atb = eq.atb[:, idx].clone()
    sub.btb = eq.btb.clone()
    sub.rows = eq.rows
    return sub


def candidates(model: nn.Module, policy: Policy, input_shape: tuple[int, ...], max_rank: int = MAX_RANK
               ) -> dict[str, tuple[nn.Module, int, list[int]]]:
    """The convs ``policy`` may convert: ``name -> (conv, dense MACs, ranks to measure)``.

    The ranks are ``1 .. min(max_rank, largest gainful rank)`` (``1 .. full rank`` capped when
    ``policy.require_gain`` is False); the filters (include/exclude/stem) are the policy's.
    """
    probe = Policy(rank=1, include=policy.include, exclude=policy.exclude, convert_stem=policy.convert_stem,
                   layout=policy.layout, require_gain=policy.require_gain)
    calls = trace_calls(model, input_shape)
    plan = make_plan(model, probe, calls, input_shape)
    mods = dict(conv_modules(model))
    out = {}
    for d in plan.layers:
        if d.full_rank is None or d.macs is None:
            continue  # skipped before ranks were considered
        conv = mods[d.name]
        cap = max_gainful_rank(conv) if policy.require_gain else d.full_rank
        out[d.name] = (conv, d.macs, list(range(1, max(1, min(cap, max_rank)) + 1)))
    return out


def measure_sensitivity(model: nn.Module, policy: Policy, loader: Iterable, input_shape: tuple[int, ...], *,
                        max_rank: int = MAX_RANK, batches: int = BATCHES, logit_batches: int = LOGIT_BATCHES,
                        ridge: float = 1e-6, progress: bool = False, device: str | torch.device = "auto") -> Sensitivity:
    """Measure the sensitivity table of ``model`` (never modified) on ``loader``'s first batches.

    Args:
        model: the original model.
        policy: which convs are candidates (its filters and ``require_gain``; ranks are ignored).
        loader: batches ``x`` or ``(x, y)`` (labels unused), re-iterable, fixed order.
        input_shape: the shape MACs are counted at (as the plan's).
        max_rank: measure ranks ``1..max_rank`` at most per layer (bounds the cost).
        batches: batches accumulated into the normal equations.
        logit_batches: batches each one-layer-converted forward runs on (capped at ``batches``).
        ridge: relative ridge of the least squares (as calibration's).
        progress: a tqdm bar on stderr for the logit passes.
        device: where the forward passes run (auto | cpu | cuda | cuda:N | mps); the solves run on the CPU.

    Returns:
        A :class:`Sensitivity`; its ``evaluations`` = number of one-layer forwards (sum of ranks x
        ``logit_batches``).

    Raises:
        DataError: the loader yields no batch.
    """
    for what, v in (("max_rank", max_rank), ("batches", batches), ("logit_batches", logit_batches)):
        if int(v) < 1:
            raise ValueError(f"{what} must be >= 1, got {v}")
    t0 = time.perf_counter()
    net = copy_model(model).eval()
    cands = candidates(net, policy, input_shape, max_rank)
    table = Sensitivity(dense_macs={n: c[1] for n, c in cands.items()})
    blocks: dict[str, dict[int, DSConv]] = {}
    eqs: dict[str, NormalEquations] = {}
    for name, (conv, _, ranks) in cands.items():
        svd = channel_svd(conv.weight, conv.groups)
        blocks[name] = {r: DSConv.from_conv(conv, r, "multiplier", svd).eval() for r in ranks}  # fewest torch calls
        # one system at the largest rank (one grouped depthwise conv computes all its features)
        eqs[name] = NormalEquations(DSConv.from_conv(conv, ranks[-1], "multiplier", svd).eval(), conv)
    dev = resolve_device(device, "calibrate.device")
    for m in [net, *(b for per in blocks.values() for b in per.values()), *(eq.block for eq in eqs.values())]:
        m.to(dev)  # copies (the model itself is never modified)
    loader = on_device(loader, dev)
    busy: set[str] = set()

    def hook(_mod: nn.Module, args: tuple, name: str) -> None:
        if name in busy:  # NormalEquations.add calls the conv itself
            return
        busy.add(name)
        try:
            eqs[name].add(args[0])
        finally:
            busy.discard(name)

    handles = [cands[n][0].register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in cands]
    logit_batches = min(logit_batches, batches)
    kept: list[torch.Tensor] = []
    references: list[Any] = []
    try:
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if i >= batches:
                    break
                x = batch_inputs(batch)
                out = run_model(net, x)
                table.batches, table.images = table.batches + 1, table.images + int(x.shape[0])
                if i < logit_batches:
                    kept.append(x)
                    references.append(out)
    finally:
        for h in handles:
            h.remove()
    if not kept:
        raise DataError("the calibration data is empty")
    table.logit_batches = len(kept)
    table.metric = "kl" if _is_logits(references[0]) else "relative_mse"
    with torch.no_grad():
        for name, big in eqs.items():
            if big.rows == 0:
                continue  # the forward never reached this layer
            conv, dense, _ = cands[name]
            for r, block in blocks[name].items():
                eq = truncated(big, block)
                w = eq.solve(ridge)
                eq.load(w)
                table.layers.setdefault(name, {})[r] = {"output_error": eq.error(w), "logit_error": 0.0,
                                                        "macs": round(dense * ds_mac_ratio(conv, r))}
    t1 = time.perf_counter()
    total = sum(len(v) for v in table.layers.values())
    bar = progress_bar(total=total, desc="sensitivity", unit="rank", show=progress)
    with torch.no_grad():
        for name, per_rank in table.layers.items():
            conv = cands[name][0]
            try:
                for r, row in per_rank.items():
                    _set_submodule(net, name, blocks[name][r])
                    row["logit_error"] = sum(output_change(ref, run_model(net, x))
                                             for x, ref in zip(kept, references)) / len(kept)
                    table.evaluations += len(kept)
                    bar.update(1)
            finally:
                _set_submodule(net, name, conv)
    bar.close()
    table.seconds = {"normal_equations": t1 - t0, "logits": time.perf_counter() - t1}
    return table


def sensitivity_on_data(model: nn.Module, policy: Policy, data: str, preprocessing: Any,
                        input_shape: tuple[int, ...], *, seed: int = 0, batch_size: int = 64,
                        max_batches: int | None = CALIB_BATCHES, val_split: float = 0.2, limit: int | None = None,
                        labels: list[str] | None = None, **options: Any) -> Sensitivity:
    """:func:`measure_sensitivity` on a data spec (``digits`` or a folder), on the images calibration uses.

    The images are those :func:`dsdeploy.recover.reconstruct.calibrate_data` draws with the same
    arguments (the training split of ``load_data(data, val_split=, seed=, limit=)``, no
    augmentation, the seeded subset of ``max_batches * batch_size`` images), in the same order;
    the first ``options["batches"]`` (default :data:`BATCHES`) of its batches are measured.
    ``options``: :func:`measure_sensitivity`'s keywords (``batches``, ``max_rank``,
    ``logit_batches``, ``ridge``, ``progress``).
    """
    pre = resolve(preprocessing, data=data, model=model)
    _, calib = calibration_images(data, pre, max_batches=max_batches, batch_size=batch_size, seed=seed,
                                  val_split=val_split, limit=limit, labels=labels)
    loader = make_loader(calib, batch_size, shuffle=False)
    return measure_sensitivity(model, policy, loader, input_shape, **options)
