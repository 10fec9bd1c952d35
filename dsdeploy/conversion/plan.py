"""Which convs convert, at what rank, and why the others are skipped.

A plan is data (JSON-able): it is stored in the ``.dsd`` artifact and is enough,
with the source model's architecture, to rebuild the converted model.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from dsdeploy.conversion.allocate import InfeasibleBudget, allocate, greedy, totals
from dsdeploy.conversion.block import CONV_TYPES, LAYOUTS
from dsdeploy.conversion.decompose import (
    channel_svd,
    energy_curve,
    full_rank,
    rank_for_energy,
    relative_error,
)
from dsdeploy.conversion.latency_plan import plan_latency, record_latencies
from dsdeploy.errors import PlanError
from dsdeploy.export.config import PRECISIONS

TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
ALLOCATIONS = ("auto", "spectral", "data")


@dataclass
class LayerDecision:
    """The decision for one conv: convert at ``rank`` or skip with ``reason``."""

    name: str
    type: str
    in_channels: int
    out_channels: int
    kernel_size: list[int]
    groups: int
    convert: bool = False
    reason: str = ""
    rank: int | None = None
    full_rank: int | None = None
    energy: float | None = None
    error: float | None = None
    macs: int | None = None
    macs_after: int | None = None
    params: int = 0
    params_after: int | None = None
    cost: float | None = None  # the measured cost (plan.policy["cost"]) at ``rank`` when allocated on data
    layout: str | None = None  # this block's graph layout (None: the plan's ``layout``)
    dense_ms: float | None = None  # measured latency of the dense conv on the target (latency tables only)
    block_ms: float | None = None  # measured latency of the chosen block (None: kept dense or not measured)


@dataclass
class Plan:
    """Per-conv decisions plus the options that produced them."""

    layers: list[LayerDecision] = field(default_factory=list)
    layout: str = "branches"
    policy: dict[str, Any] = field(default_factory=dict)
    input_shape: list[int] = field(default_factory=list)

    @property
    def converted(self) -> list[LayerDecision]:
        return [d for d in self.layers if d.convert]

    def layout_of(self, d: LayerDecision) -> str:
        """The graph layout of ``d``'s block: its own ``layout``, else the plan's."""
        return d.layout or self.layout

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        layers = [LayerDecision(**d) for d in data.get("layers", [])]
        return cls(layers=layers, layout=data.get("layout", "branches"), policy=dict(data.get("policy", {})),
                   input_shape=list(data.get("input_shape", [])))

    def digest(self) -> str:
        """sha256 of the plan's canonical JSON (identifies a conversion)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


@dataclass
class Policy:
    """How ranks are chosen: exactly one of rank / energy / mac_budget / speedup / target_latency_ms (default rank 1).

    ``speedup`` (x faster than the original) or ``target_latency_ms`` plan each layer's rank and
    layout (or keep it dense) from latencies measured on ``provider`` (default "cpu") at ``batch``
    (default 1) with ``threads`` intra-op threads (default: the machine's physical cores, else 2)
    (:mod:`dsdeploy.conversion.latency_plan`). With a ``mac_budget``, giving ``provider`` also picks
    each converted layer's fastest measured layout. ``precision`` ("fp32", "int8", "int8-dynamic") is the
    precision the model will be deployed in (``deploy --quantize``): every latency, the table's and the
    verification's, is then timed on graphs quantized that way (INT8 depthwise convs run differently).

    ``allocation`` says how a ``mac_budget`` is shared out: "spectral" by the kernels' spectral
    energy; "data" by each layer's measured effect on the network's logits at each rank
    (:mod:`dsdeploy.recover.sensitivity`; needs calibration data); "auto": "data" when calibration
    data is given, else "spectral". The default is "spectral": on the third-party CIFAR ResNets
    (benchmarks/RESULTS-recover-pretrained.md) data-aware ranks gained 1-3 points at a MAC budget
    of 0.17 but lost up to 5 at 0.25 and 0.35, after the same alternating least squares.
    """

    rank: int | None = None
    energy: float | None = None
    mac_budget: float | None = None
    include: str | None = None
    exclude: str | None = None
    convert_stem: bool = False
    layout: str = "branches"
    require_gain: bool = True  # False: convert even where a DS block costs more (exactness checks)
    allocation: str = "spectral"  # spectral | data | auto (how a mac_budget / latency target is allocated)
    speedup: float | None = None
    target_latency_ms: float | None = None
    provider: str | None = None  # the EP latencies are measured on (None: cpu for a latency target)
    batch: int = 1  # the batch latencies are measured at
    threads: int | None = None  # intra-op threads (None: physical cores, else 2)
    precision: str | None = None  # the deployment's: latencies timed on graphs quantized so (None: fp32)

    @property
    def latency_target(self) -> bool:
        """Whether ranks come from a latency target (``speedup`` or ``target_latency_ms``)."""
        return self.speedup is not None or self.target_latency_ms is not None

    @property
    def measures_latency(self) -> bool:
        """Whether planning needs a latency table: a latency target, or a mac_budget with a provider."""
        return self.latency_target or (self.mac_budget is not None and self.provider is not None)

    def validate(self) -> None:
        """Raise PlanError naming the field (``convert.FIELD``) out of range; no policy chosen: rank 1."""
        chosen = [k for k in ("rank", "energy", "mac_budget", "speedup", "target_latency_ms")
                  if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise PlanError(f"convert: choose one of rank, energy, mac_budget, speedup, target_latency_ms "
                            f"(got {', '.join('convert.' + k for k in chosen)})")
        for name, low in (("speedup", 1), ("target_latency_ms", 0)):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > low):
                why = " (times faster than the original, which already runs at x1)" if low else ""
                raise PlanError(f"convert.{name} must be a number > {low}{why}, got {value}")
        if type(self.batch) is not int or self.batch < 1:
            raise PlanError(f"convert.batch must be an integer >= 1, got {self.batch}")
        if self.threads is not None and (type(self.threads) is not int or self.threads < 1):
            raise PlanError(f"convert.threads must be an integer >= 1, got {self.threads}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise PlanError(f"convert.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision not in (None, "fp32") and not self.measures_latency:
            raise PlanError("convert.precision times latencies for convert.speedup, convert.target_latency_ms or "
                            "convert.mac_budget with convert.provider: set one of them too")
        if self.provider is not None and not self.measures_latency:
            raise PlanError("convert.provider measures latencies for speedup, target_latency_ms or mac_budget: "
                            "set one of them too")
        if not chosen:
            self.rank = 1
        if self.rank is not None and self.rank < 1:
            raise PlanError(f"convert.rank must be >= 1, got {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise PlanError(f"convert.energy must be in (0, 1], got {self.energy}")
        if self.mac_budget is not None and not 0 < self.mac_budget <= 1:
            raise PlanError(f"convert.mac_budget must be in (0, 1], got {self.mac_budget}")
        if self.allocation not in ALLOCATIONS:
            raise PlanError(f"convert.allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.allocation == "data" and self.mac_budget is None and not self.latency_target:
            raise PlanError("convert.allocation = data shares out a mac_budget or a latency target: set "
                            "convert.mac_budget or convert.speedup too")
        if self.layout not in LAYOUTS:
            raise PlanError(f"convert.layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        for opt in ("include", "exclude"):
            pattern = getattr(self, opt)
            if pattern:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise PlanError(f"convert.{opt} is not a valid regular expression: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        hidden = ("layout", "require_gain", "allocation") + (() if self.measures_latency else ("batch",))
        return {k: v for k, v in asdict(self).items() if v is not None and k not in hidden}


def ds_mac_ratio(conv: nn.Module, rank: int) -> float:
    """MACs of a rank-``rank`` DS block relative to the dense conv (spatial size cancels)."""
    window = math.prod(conv.kernel_size)
    cin, cout, g = conv.in_channels, conv.out_channels, conv.groups
    return rank * (cin * window + cout * (cin // g)) / (cout * (cin // g) * window)


def max_gainful_rank(conv: nn.Module) -> int:
    """Largest rank whose DS block is cheaper than the conv (0 if none)."""
    r = full_rank(tuple(conv.weight.shape), conv.groups)
    while r > 0 and ds_mac_ratio(conv, r) >= 1.0:
        r -= 1
    return r


def skip_reason(name: str, mod: nn.Module, policy: Policy) -> str | None:
    """Why ``mod`` cannot or should not convert, before ranks are considered."""
    if isinstance(mod, TRANSPOSED):
        return "transposed conv"
    base = CONV_TYPES.get(len(getattr(mod, "kernel_size", ())))
    if type(mod) is not base:
        for attr in ("forward", "_conv_forward"):
            if getattr(type(mod), attr) is not getattr(base, attr):
                return f"{type(mod).__name__} has its own {attr} (a custom conv)"
    if math.prod(mod.kernel_size) == 1:
        return "1x1 kernel (already pointwise)"
    if mod.groups == mod.in_channels and mod.in_channels > 1:
        return "already depthwise"
    if policy.include and not re.search(policy.include, name):
        return "not matched by convert.include"
    if policy.exclude and re.search(policy.exclude, name):
        return "excluded by convert.exclude"
    if mod.in_channels <= 4 and not policy.convert_stem:
        return f"stem ({mod.in_channels} input channels; convert.convert_stem to convert)"
    return None


def conv_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All standard and transposed convs of ``model``, in module order."""
    kinds = tuple(CONV_TYPES.values()) + TRANSPOSED
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def make_plan(model: nn.Module, policy: Policy, calls: dict[str, tuple[list[int], list[int], int]],
              input_shape: tuple[int, ...], svd_cache: dict[str, tuple] | None = None,
              costs: Mapping[str, Mapping[int, float]] | None = None, cost_name: str | None = None,
              latency: Any = None) -> Plan:
    """Decide every conv of ``model`` under ``policy``.

    Args:
        model: the original model (read only).
        policy: rank policy and filters.
        calls: per-layer (in shape, out shape, MACs) from :func:`dsdeploy.conversion.opcount.trace_calls`.
        input_shape: the shape ``calls`` was traced at.
        svd_cache: when given, filled with each candidate's :func:`channel_svd` (name -> U, S, Vh).
        costs: with a ``mac_budget``, the measured cost of each candidate layer at each rank
            (layer -> rank -> cost, e.g. :meth:`dsdeploy.recover.sensitivity.Sensitivity.costs`): the
            budget then minimises their sum; each converted LayerDecision records its ``cost``.
            None: the spectral allocation. ``plan.policy`` records ``allocation`` ("spectral" |
            "data"), the ``solver``, ``cost_total`` (the plan's summed cost), ``spectral_cost_total``
            (what the spectral plan would cost) and, when given, ``cost_name`` as ``cost``.
            With a latency target, the cost that replaces the spectral error (allocation "data").
        latency: a :class:`dsdeploy.runtime.latency_table.LatencyTable` of ``model`` (required by a
            ``speedup``/``target_latency_ms``; with a ``mac_budget`` each converted layer takes its
            fastest measured layout). Each measured layer records ``dense_ms`` and ``block_ms``.

    Raises:
        PlanError: a field out of range; a latency target without ``latency`` or out of reach.
    """
    policy.validate()
    plan = Plan(layout=policy.layout, policy=policy.to_dict(), input_shape=list(input_shape))
    spectra: dict[str, torch.Tensor] = {}
    mods: dict[str, nn.Module] = {}
    for name, mod in conv_modules(model):
        d = LayerDecision(name=name, type=type(mod).__name__, in_channels=mod.in_channels,
                          out_channels=mod.out_channels, kernel_size=list(mod.kernel_size), groups=mod.groups,
                          params=sum(p.numel() for p in mod.parameters(recurse=False)))
        d.macs = calls[name][2] if name in calls else None
        plan.layers.append(d)
        reason = skip_reason(name, mod, policy)
        if reason is None and name not in calls:
            reason = "not run in a forward pass at this input shape"
        if reason is None and policy.require_gain and max_gainful_rank(mod) == 0:
            reason = "no gain at any rank (a DS block would cost more MACs)"
        if reason:
            d.reason = reason
            continue
        d.full_rank = full_rank(tuple(mod.weight.shape), mod.groups)
        svd = channel_svd(mod.weight, mod.groups)
        spectra[name] = svd[1]
        if svd_cache is not None:
            svd_cache[name] = svd
        mods[name] = mod
    layouts: dict[str, str] = {}
    if policy.latency_target:
        if latency is None:
            raise PlanError("convert.speedup / target_latency_ms need a latency table measured on the target")
        if policy.allocation == "data" and costs is None:
            raise PlanError("convert.allocation = data needs calibration data to measure each layer's cost on")
        ranks, layouts = plan_latency(plan, latency, spectra, policy, costs if policy.allocation != "spectral"
                                      else None, cost_name)
    elif policy.mac_budget is not None:
        if policy.allocation == "data" and costs is None:
            raise PlanError("convert.allocation = data needs calibration data to measure each layer's cost on")
        ranks, solver = _budget_ranks(plan, mods, spectra, policy.mac_budget, costs)
        plan.policy.update(allocation="data" if costs is not None else "spectral", solver=solver)
        if cost_name is not None and costs is not None:
            plan.policy["cost"] = cost_name
    else:
        ranks = {n: (min(policy.rank, plan_full(plan, n)) if policy.rank is not None
                     else rank_for_energy(s, policy.energy)) for n, s in spectra.items()}
    by_name = {d.name: d for d in plan.layers}
    for name, rank in ranks.items():
        d, mod = by_name[name], mods[name]
        if policy.require_gain and ds_mac_ratio(mod, rank) >= 1.0:
            d.reason = f"no gain at rank {rank} (DS block costs {ds_mac_ratio(mod, rank):.2f}x the conv's MACs)"
            continue
        d.convert, d.rank, d.reason = True, rank, "converted"
        d.error = round(relative_error(spectra[name], rank), 6)
        d.energy = round(1.0 - d.error ** 2, 6)
        d.macs_after = round(d.macs * ds_mac_ratio(mod, rank)) if d.macs is not None else None
        d.layout = layouts.get(name)
    if latency is not None:
        record_latencies(plan, latency, keep_layouts=policy.latency_target)
    return plan


def plan_full(plan: Plan, name: str) -> int:
    return next(d.full_rank for d in plan.layers if d.name == name)


def _budget_ranks(plan: Plan, mods: dict[str, nn.Module], spectra: dict[str, torch.Tensor], budget: float,
                  costs: Mapping[str, Mapping[int, float]] | None = None) -> tuple[dict[str, int], str]:
    """Ranks within ``budget`` x the candidates' MACs, and the solver that chose them.

    Spectral (``costs`` None): the Lagrangian greedy over rank steps on each kernel's squared
    relative error (:func:`dsdeploy.conversion.allocate.greedy`; the curves are convex, so this is
    the rank-by-rank greedy by error reduction per MAC). With ``costs`` (layer -> rank -> measured
    cost): :func:`dsdeploy.conversion.allocate.allocate` minimises the summed cost over the ranks
    measured (at most the largest gainful rank); the spectral plan is one of the candidates, so
    the result never costs more than it. A layer without measured costs stays at rank 1.
    """
    macs = {d.name: d.macs for d in plan.layers if d.name in mods}
    unit = {n: macs[n] * ds_mac_ratio(mods[n], 1) for n in mods}  # MACs per unit of rank
    limit = budget * sum(macs.values())
    cap = {n: max(1, max_gainful_rank(mods[n])) for n in mods}
    spectral = {}
    for n in mods:
        curve = energy_curve(spectra[n]).tolist()
        spectral[n] = {r: (max(0.0, 1.0 - curve[r - 1]), r * unit[n]) for r in range(1, cap[n] + 1)}
    try:
        ranks = greedy(spectral, limit)
    except InfeasibleBudget as exc:
        floor = exc.floor / max(1, sum(macs.values()))
        raise PlanError(f"convert.mac_budget {budget} is below what rank 1 everywhere costs ({floor:.3f}); "
                        f"raise it or exclude layers") from None
    if costs is None:
        return ranks, "greedy"
    items = {n: {r: (float(costs[n][r]), r * unit[n]) for r in range(1, cap[n] + 1) if r in costs.get(n, {})}
             or {1: (0.0, unit[n])} for n in mods}
    for n, opts in items.items():
        if 1 not in opts:
            raise PlanError(f"the measured costs of layer {n} lack rank 1; measure ranks 1..K")
    chosen, solver = allocate(items, limit, references=[ranks])
    for d in plan.layers:
        if d.name in items:
            d.cost = items[d.name][chosen[d.name]][0]
    plan.policy["cost_total"] = totals(items, chosen)[0]
    if all(ranks[n] in items[n] for n in items):
        plan.policy["spectral_cost_total"] = totals(items, ranks)[0]
    return chosen, solver
