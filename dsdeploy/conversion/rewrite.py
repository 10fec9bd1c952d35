"""Apply a plan to a copy of a model: every converted conv becomes a ``DSConv``.

``convert`` deep-copies its input and never mutates it. The rewrite walks modules by
name (no tracing), so it works on any ``nn.Module``: data-dependent control flow,
detection and segmentation models included.
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from dsdeploy.conversion.block import DSConv
from dsdeploy.conversion.opcount import Profile, profile_model, run_model, trace_calls
from dsdeploy.conversion.plan import Plan, Policy, make_plan
from dsdeploy.errors import DsdeployError, ModelError, NothingToConvertError
from dsdeploy.models.weights import load_state_checked


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


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that works for every module torch can run.

    Plain tensor attributes computed from parameters (non-leaf tensors, e.g. the ``weight``
    that the old ``torch.nn.utils.weight_norm`` hook recomputes before each forward) cannot
    be deep-copied; they are copied detached (the hook recomputes them on the next call).
    The input is never modified. Raises ModelError when the model holds something that
    cannot be copied at all.
    """
    memo: dict[int, object] = {}
    for mod in model.modules():
        for value in vars(mod).values():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    try:
        return copy.deepcopy(model, memo)
    except (RuntimeError, TypeError, pickle.PicklingError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"the model cannot be copied (copy.deepcopy failed: {first[:160]}); "
                         f"keep tensors, locks and handles out of module attributes") from None


def check_finite_model(model: nn.Module) -> None:
    """Raise ModelError naming the first layer whose numbers make a conversion meaningless.

    Refused: NaN/infinite parameters or buffers anywhere, and BatchNorm running variances
    that are NaN or negative (a variance cannot be; the exported graph would disagree).
    """
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelError(f"{name} holds {int((~torch.isfinite(t)).sum())} NaN/infinite value(s): the weights "
                             f"are damaged; fix or retrain them before converting")
    for name, mod in model.named_modules():
        var = getattr(mod, "running_var", None)
        if isinstance(mod, nn.modules.batchnorm._NormBase) and isinstance(var, torch.Tensor):
            if bool((var < 0).any()):
                raise ModelError(f"{name}.running_var has {int((var < 0).sum())} negative value(s): a variance "
                                 f"cannot be negative; re-estimate the BatchNorm statistics")


def apply_plan(model: nn.Module, plan: Plan, *, init_from_weights: bool = True,
               svd_cache: dict[str, tuple] | None = None) -> nn.Module:
    """A copy of ``model`` with each converted conv of ``plan`` replaced by a DSConv.

    Args:
        model: the original model (not modified).
        plan: decisions from :func:`dsdeploy.conversion.plan.make_plan` (or loaded from an artifact).
        init_from_weights: initialise blocks by SVD of the conv kernels; False builds the
            structure only (weights are loaded afterwards, e.g. from an artifact).
        svd_cache: per-conv SVDs already computed by :func:`make_plan`.
    """
    svd_cache = svd_cache or {}
    new = copy_model(model)
    for d in plan.converted:
        conv = new.get_submodule(d.name)
        layout = plan.layout_of(d)  # the layer's own layout (latency plans), else the plan's
        block = (DSConv.from_conv(conv, d.rank, layout, svd_cache.get(d.name)) if init_from_weights
                 else DSConv(conv, d.rank, layout))
        block.train(conv.training)
        _set_submodule(new, d.name, block)
    return new


def verify_rebuild(fresh: nn.Module, plan: Plan, converted: nn.Module) -> None:
    """Check that an artifact of ``converted`` will load: rebuild it as loading does.

    ``fresh`` is a newly built source model (as :func:`dsdeploy.conversion.artifact.load_artifact`
    builds it); the plan's structure is applied to it and ``converted``'s state_dict loaded
    strictly, then both models run once on the plan's input shape and must agree. Raises
    ModelError naming the step that failed, so no unloadable artifact is ever written.
    """
    try:
        rebuilt = apply_plan(fresh, plan, init_from_weights=False)
        load_state_checked(rebuilt, converted.state_dict(), "the converted model")
    except DsdeployError as exc:
        raise ModelError(f"the converted model could not be rebuilt from its source as loading does ({exc}); "
                         f"nothing was written") from None
    if not plan.input_shape:
        return
    param = next(converted.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.randn(*plan.input_shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    was = converted.training
    converted.eval()
    rebuilt.eval()
    try:
        with torch.no_grad():
            want, got = run_model(converted, x), run_model(rebuilt, x)
    finally:
        converted.train(was)
    if isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor):
        scale = float(want.abs().max()) if want.numel() else 0.0
        if want.shape != got.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-5 + 1e-3 * scale):
            raise ModelError("the converted model rebuilt from its source gives different outputs (the factory "
                             "is not deterministic, or the model keeps state outside its state_dict); "
                             "nothing was written")


def nothing_to_convert_message(plan: Plan) -> str:
    reasons: dict[str, list[str]] = {}
    for d in plan.layers:
        reasons.setdefault(d.reason, []).append(d.name)
    if not reasons:
        return "nothing to convert: the model has no convolutions"
    parts = [f"{r}: {len(n)} ({', '.join(n[:3])}{', ...' if len(n) > 3 else ''})" for r, n in reasons.items()]
    return "nothing to convert: " + "; ".join(parts)


def convert(model: nn.Module, *, input_shape: tuple[int, ...], policy: Policy | None = None,
            costs: dict[str, dict[int, float]] | None = None, cost_name: str | None = None,
            latency: Any = None, **options: Any) -> ConversionResult:
    """Plan and apply the DS rewrite to a copy of ``model`` (the input is never mutated).

    ``policy`` (a :class:`Policy`; default rank 1) and/or ``options`` (its fields by name, e.g.
    ``rank=2``, ``mac_budget=0.5``) choose the ranks and layers. Raises PlanError for an option out
    of range (naming the field) and NothingToConvertError (listing each conv's reason) when no conv converts.
    ``costs`` (layer -> rank -> measured cost, named ``cost_name``) makes a ``mac_budget`` minimise
    their sum (:func:`dsdeploy.conversion.plan.make_plan`). ``latency``: the model's measured
    :class:`dsdeploy.runtime.latency_table.LatencyTable` (needed by a speedup / target_latency_ms).
    """
    unknown = sorted(set(options) - {f.name for f in fields(Policy)})
    if unknown:
        raise TypeError(f"convert() got an unexpected keyword argument {unknown[0]!r}")
    policy = replace(policy, **options) if policy is not None else Policy(**options)
    policy.validate()
    check_finite_model(model)
    calls = trace_calls(model, input_shape)
    svds: dict[str, tuple] = {}
    plan = make_plan(model, policy, calls, input_shape, svds, costs=costs, cost_name=cost_name,
                     latency=latency)
    if not plan.converted:
        raise NothingToConvertError(nothing_to_convert_message(plan))
    new = apply_plan(model, plan, svd_cache=svds)
    before = profile_model(model, input_shape, calls)
    after = profile_model(new, input_shape)
    for d in plan.converted:
        d.macs_after = after.macs_under(d.name)
        d.params_after = sum(p.numel() for p in new.get_submodule(d.name).parameters())
    return ConversionResult(model=new, plan=plan, before=before, after=after)


def original_convs(model: nn.Module, plan: Plan) -> dict[str, nn.Module]:
    """The convs of the ORIGINAL ``model`` that ``plan`` converts, by name."""
    return {d.name: model.get_submodule(d.name) for d in plan.converted}
