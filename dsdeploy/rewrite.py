"""Apply a plan to a copy of a model: every converted conv becomes a ``DSConv``.

``convert`` deep-copies its input and never mutates it. The rewrite walks modules by
name (no tracing), so it works on any ``nn.Module``: data-dependent control flow,
detection and segmentation models included.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from dsdeploy.errors import NothingToConvertError
from dsdeploy.layers import DSConv
from dsdeploy.plan import Plan, Policy, make_plan
from dsdeploy.profile import Profile, profile_model, trace_calls


@dataclass
class ConversionResult:
    """The converted model, its plan, and profiles before/after at the plan's input shape."""

    model: nn.Module
    plan: Plan
    before: Profile
    after: Profile


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def apply_plan(model: nn.Module, plan: Plan, *, init_from_weights: bool = True,
               svd_cache: dict[str, tuple] | None = None) -> nn.Module:
    """A copy of ``model`` with each converted conv of ``plan`` replaced by a DSConv.

    Args:
        model: the original model (not modified).
        plan: decisions from :func:`dsdeploy.plan.make_plan` (or loaded from an artifact).
        init_from_weights: initialise blocks by SVD of the conv kernels; False builds the
            structure only (weights are loaded afterwards, e.g. from an artifact).
        svd_cache: per-conv SVDs already computed by :func:`make_plan`.
    """
    svd_cache = svd_cache or {}
    new = copy.deepcopy(model)
    for d in plan.converted:
        conv = new.get_submodule(d.name)
        block = DSConv.from_conv(conv, d.rank, plan.layout, svd_cache.get(d.name)) if init_from_weights else DSConv(conv, d.rank, plan.layout)
        block.train(conv.training)
        _set_submodule(new, d.name, block)
    return new


def nothing_to_convert_message(plan: Plan) -> str:
    reasons: dict[str, list[str]] = {}
    for d in plan.layers:
        reasons.setdefault(d.reason, []).append(d.name)
    if not reasons:
        return "nothing to convert: the model has no convolutions"
    parts = [f"{r}: {len(n)} ({', '.join(n[:3])}{', ...' if len(n) > 3 else ''})" for r, n in reasons.items()]
    return "nothing to convert: " + "; ".join(parts)


def convert(model: nn.Module, *, input_shape: tuple[int, ...], rank: int | None = None, energy: float | None = None,
            mac_budget: float | None = None, include: str | None = None, exclude: str | None = None,
            convert_stem: bool = False, layout: str = "branches", require_gain: bool = True) -> ConversionResult:
    """Plan and apply the DS rewrite to a copy of ``model`` (the input is never mutated).

    Exactly one of ``rank`` / ``energy`` / ``mac_budget`` picks ranks (default: rank 1).
    Raises NothingToConvertError (listing each conv's reason) when no conv converts.
    """
    policy = Policy(rank=rank, energy=energy, mac_budget=mac_budget, include=include, exclude=exclude,
                    convert_stem=convert_stem, layout=layout, require_gain=require_gain)
    policy.validate()
    calls = trace_calls(model, input_shape)
    svds: dict[str, tuple] = {}
    plan = make_plan(model, policy, calls, input_shape, svds)
    if not plan.converted:
        raise NothingToConvertError(nothing_to_convert_message(plan))
    new = apply_plan(model, plan, svd_cache=svds)
    before = profile_model(model, input_shape, calls)
    after = profile_model(new, input_shape)
    for d in plan.converted:
        d.macs_after = after.macs_under(d.name)
        d.params_after = sum(p.numel() for p in new.get_submodule(d.name).parameters())
    return ConversionResult(model=new, plan=plan, before=before, after=after)


def ds_blocks(model: nn.Module) -> dict[str, DSConv]:
    """Every DSConv in ``model``, by module name, in network order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DSConv)}


def original_convs(model: nn.Module, plan: Plan) -> dict[str, nn.Module]:
    """The convs of the ORIGINAL ``model`` that ``plan`` converts, by name."""
    return {d.name: model.get_submodule(d.name) for d in plan.converted}
