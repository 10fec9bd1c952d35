"""The report of ``inspect`` and ``convert``: each conv's decision and the op counts before/after."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dsdeploy.conversion.opcount import Profile, profile_model, trace_calls
from dsdeploy.conversion.plan import Plan, Policy, make_plan
from dsdeploy.models.sources import LoadedModel
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
