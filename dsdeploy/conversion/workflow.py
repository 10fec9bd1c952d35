"""The report of ``inspect`` and ``convert``: each conv's decision and the op counts before/after."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dsdeploy.conversion.latency_attempts import TOLERANCE
from dsdeploy.conversion.latency_convert import measure_table
from dsdeploy.conversion.opcount import Profile, profile_model, trace_calls
from dsdeploy.conversion.plan import Plan, Policy, make_plan
from dsdeploy.data.preprocessing import input_shape_for, resolve
from dsdeploy.models.sources import LoadedModel
from dsdeploy.recover.config import CALIB_BATCHES
from dsdeploy.recover.sensitivity import sensitivity_on_data
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
    sensitivity: Any = None  # dsdeploy.recover.sensitivity.Sensitivity when measured on data

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
                "policy": self.plan.policy, "layout": self.plan.layout, "history": self.history,
                "sensitivity": self.sensitivity.to_dict() if self.sensitivity is not None else None}

    def render(self) -> str:
        timed = any(d.dense_ms is not None for d in self.plan.layers)

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        rows = [[d.name, d.type, f"{d.in_channels}->{d.out_channels}", "x".join(map(str, d.kernel_size)), d.groups,
                 human(d.macs), human(d.macs_after) if d.convert else "-", d.rank if d.convert else "-",
                 d.full_rank or "-", f"{d.error:.3f}" if d.error is not None else "-",
                 *([self.plan.layout_of(d) if d.convert else "-", ms(d.dense_ms), ms(d.block_ms)] if timed else []),
                 d.reason]
                for d in self.plan.layers]
        table = format_table(["layer", "type", "channels", "kernel", "groups", "MACs", "MACs after", "rank",
                              "full", "rel.err", *(["layout", "dense ms", "block ms"] if timed else []), "decision"],
                             rows)
        s = self.summary()
        lines = [table, "", f"convs: {s['convs']}, converting: {s['converted']}"]
        if self.after is None:
            lines.append(f"params {human(s['params'])}, MACs {human(s['macs'])} (conv {human(s['conv_macs'])})")
        else:
            lines.append(f"params {human(s['params'])} -> {human(s['params_after'])}, MACs {human(s['macs'])} -> "
                         f"{human(s['macs_after'])} (x{s['mac_ratio']:.3f}); conv MACs x{s['conv_mac_ratio']:.3f}")
        pol = self.plan.policy
        if pol.get("allocation") == "data":
            ref = pol.get("spectral_cost_total")
            lines.append(f"ranks allocated on data ({pol.get('cost', 'measured cost')}, {pol.get('solver')}): summed "
                         f"cost {pol['cost_total']:.4g}" + (f" (spectral allocation: {ref:.4g})" if ref is not None
                                                            else ""))
        lines += latency_lines(pol)
        if self.sensitivity is not None and self.after is None:  # inspect shows the table
            lines[:0] = [self.sensitivity.render(), ""]
        if self.output:
            lines.append(f"wrote {self.output}")
        return "\n".join(lines)


def latency_lines(policy: dict[str, Any]) -> list[str]:
    """The latency plan's lines of a report: target and prediction, then each measured attempt."""
    plan, where, verified = policy.get("latency"), policy.get("latency_table"), policy.get("verified")
    out = []
    if where:
        prec = "" if where.get("precision", "fp32") == "fp32" else f", graphs quantized {where['precision']}"
        out.append(f"latency measured on {where['ep']} at batch {where['batch']}, {where['threads']} threads{prec} "
                   f"(whole model {where['model_ms']:.3f} ms; {where['protocol']})")
    if where and where.get("precision", "fp32") != "fp32":
        searched = " (the plan is searched by measuring whole quantized models)" if (verified or {}).get("search") else ""
        out.append(f"note: {where['precision']} small graphs predict a whole quantized model poorly (int8 on ResNet-18: "
                   f"a fastest plan predicted x1.32 measured x3.7); the measured lines below are what counts{searched}")
    if plan:
        out.append(f"latency plan: target {plan['target_ms']:.3f} ms, predicted {plan['predicted_ms']:.3f} ms "
                   f"(x{plan['predicted_speedup']:.2f}; not converted {plan['remainder_ms']:.3f} ms)")
    if (verified or {}).get("fastest_instead"):
        out.append(f"predicted out of reach ({verified['fastest_instead']}); quantized predictions are unreliable, so "
                   f"the fastest plan was measured instead")
    corr = (verified or {}).get("correction")
    if corr:
        out.append(f"planned on the table corrected by its stored measurement (dense x{corr['dense_factor']:.2f}, "
                   f"DS blocks x{corr['block_factor']:.2f}, from {corr.get('rounds', '?')} rounds; refresh drops it)")
    for i, a in enumerate((verified or {}).get("attempts", [])):
        if "why" in a:  # the measured search of a quantized target
            what = f"attempt {i + 1} ({a['why']}), measured"
        elif i == 0:
            what = "measured"
        else:
            what = (f"re-planned on the table corrected from the measurements (dense x{a.get('dense_factor', 1):.2f}, "
                    f"DS blocks x{a.get('block_factor', 1):.2f}), measured")
        ci = f", 95 % CI x{a['ci95'][0]:.2f}-x{a['ci95'][1]:.2f} over {a['rounds']} rounds" if "ci95" in a else ""
        kept = "; kept" if len(verified["attempts"]) > 1 and verified.get("chosen") == i else ""
        out.append(f"{what}: original {a['original_ms']:.3f} ms, converted {a['measured_ms']:.3f} ms "
                   f"(x{a['measured_speedup']:.2f}{ci}); predicted {a['predicted_ms']:.3f} ms, prediction error "
                   f"{100 * a['prediction_error']:+.1f}%{kept}")
        if a.get("regimes"):
            out.append(regimes_line(a["regimes"], a["target_ms"] if not policy.get("speedup") else None,
                                    policy.get("speedup"), (verified or {}).get("threads")))
    attempts = (verified or {}).get("attempts")
    if not attempts:
        return out
    chosen = attempts[verified.get("chosen", len(attempts) - 1)]
    if chosen.get("resolved") is False:  # noise wider than the tolerance: say what the interval does tell
        tail = {"met": "though the whole interval meets the target",
                "missed": "though the whole interval misses the target"}.get(
            chosen.get("interval"), "so the target can be neither confirmed nor refuted here")
        out.append(f"measured x{chosen['measured_speedup']:.2f} (95 % CI x{chosen['ci95'][0]:.2f}-"
                   f"x{chosen['ci95'][1]:.2f} over {chosen['rounds']} rounds): this machine's run-to-run noise is "
                   f"larger than the 5 % tolerance, {tail}")
    elif verified.get("met") and len(attempts) > 1:
        out.append(kept_line(verified, policy))
    elif not verified.get("met"):
        out.append(f"warning: measured {chosen['measured_ms']:.3f} ms (x{chosen['measured_speedup']:.2f}) misses the "
                   f"target {chosen['target_ms']:.3f} ms by more than 5% after {len(attempts)} "
                   f"measurement(s); x{chosen['measured_speedup']:.2f} is the best measured here")
    return out


def kept_line(verified: dict[str, Any], policy: dict[str, Any]) -> str:
    """Which measured attempt is kept and the tolerance it meets the target within (a speedup a little under the
    one asked, or a latency a little over, still meets it)."""
    i = verified.get("chosen", len(verified["attempts"]) - 1)
    a = verified["attempts"][i]
    if policy.get("speedup"):
        goal, got = f"{policy['speedup']:g}x", f"x{a['measured_speedup']:.2f}"
        bound = f"x{policy['speedup'] / (1 + TOLERANCE):.2f} or faster counts"
    else:
        goal, got = f"{a['target_ms']:.3f} ms", f"{a['measured_ms']:.3f} ms"
        bound = f"{a['target_ms'] * (1 + TOLERANCE):.3f} ms or less counts"
    return (f"kept attempt {i + 1} of {len(verified['attempts'])}: {got} meets {goal} within the "
            f"{100 * TOLERANCE:.0f} % tolerance ({bound}); the slowest attempt that surely meets it is kept (it "
            f"converts least)")


def regimes_line(regimes: list[dict[str, Any]], target_ms: float | None, speedup: float | None,
                 threads: int | None = None) -> str:
    """One line on an attempt whose rounds ran at two speeds: each regime's speedup and ms, whether the target
    holds in each (within 5 %, or faster), and the likely cause: other load when the original slowed too (by
    more than 5 %), else at several ``threads`` the cores' shared cache (README "Two speeds"), else other load."""
    def holds(r: dict[str, Any]) -> bool:
        if speedup:
            return r["measured_speedup"] >= speedup * (1 - TOLERANCE)
        return target_ms is not None and r["measured_ms"] <= target_ms * (1 + TOLERANCE)

    fast, slow = regimes
    parts = [f"x{r['measured_speedup']:.2f} in {r['rounds']} rounds ({r['measured_ms']:.3f} ms)" for r in regimes]
    verdict = ("the target holds in both" if holds(slow) else "the target holds in the faster only" if holds(fast)
               else "the target holds in neither")
    if slow["original_ms"] > (1 + TOLERANCE) * fast["original_ms"]:
        cause = "the original slowed too in those rounds: other work loaded the machine"
    elif threads is not None and threads > 1:
        cause = ("only the converted graph slowed: a multi-threaded DS graph runs slower while its threads' cores share "
                 "no cache, which a cloud VM's vCPUs do only part of the time (--threads 1 holds still; README "
                 "'Two speeds')")
    else:
        cause = "only the converted graph slowed, at one thread: other work on the machine is the likely cause"
    return f"  two speed regimes in these rounds: {parts[0]}, {parts[1]}; {verdict}; {cause}"


def measure_costs(loaded: LoadedModel, policy: Policy, shape: tuple[int, ...], pre: Any, data: str, *,
                  seed: int = 0, calib_batches: int | None = CALIB_BATCHES, batch_size: int = 64,
                  val_split: float = 0.2, limit: int | None = None, progress: bool = False, device: str = "auto"):
    """The sensitivity table of ``loaded.model`` on the images calibration would use
    (:func:`dsdeploy.recover.sensitivity.sensitivity_on_data`; ``device`` runs its forward passes)."""
    return sensitivity_on_data(loaded.model, policy, data, pre, tuple(shape), seed=seed, batch_size=batch_size,
                               max_batches=calib_batches, val_split=val_split, limit=limit, labels=loaded.labels,
                               progress=progress, device=device)


def allocates_on_data(policy: Policy, data: str | None) -> bool:
    """Whether ``policy`` shares out its mac_budget or latency target by measured costs given calibration ``data``."""
    return ((policy.mac_budget is not None or policy.latency_target) and policy.allocation != "spectral"
            and bool(data))


def cost_name(table: Any) -> str | None:
    """What a sensitivity table's costs are called in ``plan.policy["cost"]``."""
    return f"logit_error ({table.metric})" if table is not None else None


def inspect_model(loaded: LoadedModel, policy: Policy, input_shape: tuple[int, ...] | None = None,
                  calib_data: str | None = None, calib_batches: int | None = CALIB_BATCHES,
                  seed: int = 0, preprocess: dict[str, Any] | None = None, device: str = "auto") -> ModelReport:
    """Plan (without converting) and profile a model: what would convert and why not.

    With ``calib_data``, also measure the per-layer sensitivity table (``report.sensitivity``)
    on ``device`` and, for a ``mac_budget`` (allocation not "spectral"), plan on it; ``preprocess``
    overrides the model's preprocessing of those images.
    """
    shape = loaded.shape_or_default(input_shape)
    art = loaded.artifact
    if art is not None and not calib_data:  # a .dsd: the plan it was converted with (per-layer latencies too)
        shape = tuple(art.plan.input_shape) or shape
        return ModelReport(loaded.spec, list(shape), art.plan, profile_model(loaded.model, shape),
                           history=list(art.history))
    policy.validate()
    table = None
    if calib_data:
        pre = resolve(loaded.preprocessing, input_shape or loaded.input_shape, preprocess, data=calib_data,
                      model=loaded.model)
        shape = tuple(input_shape_for(pre, input_shape, loaded.input_shape, bool(preprocess)))
        table = measure_costs(loaded, policy, shape, pre, calib_data, seed=seed, calib_batches=calib_batches,
                              device=device)
    calls = trace_calls(loaded.model, shape)
    costs = table.costs() if table is not None and allocates_on_data(policy, calib_data) else None
    latency = None
    if policy.measures_latency:
        latency = measure_table(loaded.model, policy, shape, name=loaded.spec or "model")
    plan = make_plan(loaded.model, policy, calls, shape, costs=costs, cost_name=cost_name(table), latency=latency)
    return ModelReport(loaded.spec, list(shape), plan, profile_model(loaded.model, shape, calls), sensitivity=table)
