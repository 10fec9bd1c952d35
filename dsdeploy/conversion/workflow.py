"""The library side of ``dsdeploy inspect`` and ``dsdeploy convert``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dsdeploy.conversion.artifact import save_artifact, source_record
from dsdeploy.conversion.opcount import Profile, profile_model, trace_calls
from dsdeploy.conversion.plan import Plan, Policy, make_plan
from dsdeploy.conversion.rewrite import convert
from dsdeploy.errors import DsdeployError
from dsdeploy.models.sources import LoadedModel
from dsdeploy.recover.config import CALIB_BATCHES
from dsdeploy.tables import format_table, human


@dataclass
class ModelReport:
    """What inspect/convert report: the plan and the profiles before (and after)."""

    spec: str
    input_shape: list[int]
    plan: Plan
    before: Profile
    after: Profile | None = None
    output: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        b, a = self.before, self.after
        out = {"params": b.total_params, "macs": b.total_macs, "conv_macs": b.conv_macs,
               "converted": len(self.plan.converted), "convs": len(self.plan.layers)}
        if a is not None:
            out.update(params_after=a.total_params, macs_after=a.total_macs, conv_macs_after=a.conv_macs,
                       mac_ratio=round(a.total_macs / max(1, b.total_macs), 4),
                       conv_mac_ratio=round(a.conv_macs / max(1, b.conv_macs), 4))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "input_shape": self.input_shape, "output": self.output,
                "summary": self.summary(), "layers": [asdict(d) for d in self.plan.layers],
                "policy": self.plan.policy, "layout": self.plan.layout, "history": self.history}

    def render(self) -> str:
        rows = [[d.name, d.type, f"{d.in_channels}->{d.out_channels}", "x".join(map(str, d.kernel_size)), d.groups,
                 human(d.macs), human(d.macs_after) if d.convert else "-", d.rank if d.convert else "-",
                 d.full_rank or "-", f"{d.error:.3f}" if d.error is not None else "-", d.reason]
                for d in self.plan.layers]
        table = format_table(["layer", "type", "channels", "kernel", "groups", "MACs", "MACs after", "rank",
                              "full", "rel.err", "decision"], rows)
        s = self.summary()
        lines = [table, "", f"convs: {s['convs']}, converting: {s['converted']}"]
        if self.after is None:
            lines.append(f"params {human(s['params'])}, MACs {human(s['macs'])} (conv {human(s['conv_macs'])})")
        else:
            lines.append(f"params {human(s['params'])} -> {human(s['params_after'])}, MACs {human(s['macs'])} -> "
                         f"{human(s['macs_after'])} (x{s['mac_ratio']:.3f}); conv MACs x{s['conv_mac_ratio']:.3f}")
        if self.output:
            lines.append(f"wrote {self.output}")
        return "\n".join(lines)


def inspect_model(loaded: LoadedModel, policy: Policy, input_shape: tuple[int, ...] | None = None) -> ModelReport:
    """Plan (without converting) and profile a model: what would convert and why not."""
    shape = loaded.shape_or_default(input_shape)
    policy.validate()
    calls = trace_calls(loaded.model, shape)
    plan = make_plan(loaded.model, policy, calls, shape)
    return ModelReport(loaded.spec, list(shape), plan, profile_model(loaded.model, shape, calls))


def convert_to_artifact(loaded: LoadedModel, out: str | Path, policy: Policy,
                        input_shape: tuple[int, ...] | None = None, calib_data: str | None = None,
                        calib_batches: int | None = CALIB_BATCHES, seed: int = 0,
                        preprocess: dict[str, Any] | None = None,
                        block_reconstruct: float | str | None = None) -> ModelReport:
    """Convert a loaded model, optionally calibrate it on data, and write the ``.dsd`` artifact.

    The artifact records the input shape and the resolved preprocessing
    (:func:`dsdeploy.data.preprocessing.resolve`: ``preprocess`` overrides > the model's own >
    derived from ``input_shape``), which every later command reads. ``block_reconstruct``: with
    ``calib_data``, the block-reconstruction budget (:class:`dsdeploy.recover.config.CalibrationParams`).
    """
    from dsdeploy.data.preprocessing import input_shape_for, resolve
    from dsdeploy.recover.config import block_budget

    block_reconstruct = block_budget(block_reconstruct)
    if loaded.artifact is not None:
        raise DsdeployError(f"{loaded.spec} is already converted; convert its source model instead")
    pre = resolve(loaded.preprocessing, input_shape or loaded.input_shape, preprocess, data=calib_data,
                  model=loaded.model)
    shape = input_shape_for(pre, input_shape, loaded.input_shape, bool(preprocess))
    loaded.preprocessing = pre.to_dict()
    res = convert(loaded.model, input_shape=shape, rank=policy.rank, energy=policy.energy,
                  mac_budget=policy.mac_budget, include=policy.include, exclude=policy.exclude,
                  convert_stem=policy.convert_stem, layout=policy.layout)
    history: list[dict[str, Any]] = [{"stage": "convert", "policy": res.plan.policy, "layout": res.plan.layout,
                                      "converted": len(res.plan.converted),
                                      "conv_mac_ratio": round(res.after.conv_macs / max(1, res.before.conv_macs), 4)}]
    model = res.model
    if calib_data:
        from dsdeploy.recover.reconstruct import calibrate_on_data

        model, entry = calibrate_on_data(model, loaded.model, res.plan, calib_data, pre,
                                         max_batches=calib_batches, seed=seed, labels=loaded.labels,
                                         block_reconstruct=block_reconstruct)
        history.append(entry)
    from dsdeploy.conversion.rewrite import verify_rebuild
    from dsdeploy.models.sources import build_source

    verify_rebuild(build_source(loaded.spec, loaded.model_kwargs).model, res.plan, model)
    metadata = {"input_shape": list(shape), "preprocessing": loaded.preprocessing, "labels": loaded.labels,
                "conv_macs_before": res.before.conv_macs, "conv_macs_after": res.after.conv_macs}
    save_artifact(out, model, res.plan, source_record(loaded.spec, loaded.model_kwargs, loaded.weights),
                  metadata, history)
    return ModelReport(loaded.spec, list(shape), res.plan, res.before, res.after, str(out), history)
