"""Requested vs measured speedup per model, and MAC-planned vs latency-planned at equal measured latency (issue 14).

For each ``--models`` M and ``--batches`` B, on the CPU EP with ``--threads`` T, through the real CLI:

1. ``dsdeploy latency M --batch B --threads T``: the latency table is built, or read from the cache
   (``DSDEPLOY_CACHE``); its wall seconds are recorded (a cold build is the cost of planning on latency);
2. ``dsdeploy convert M --speedup X --provider cpu --batch B --threads T`` for each ``--speedups`` X: the
   predicted speedup, the speedup ``convert`` itself measured (its verification), or the one-line
   out-of-reach answer with the best reachable speedup;
3. ``dsdeploy convert M --mac-budget F --provider cpu --batch B --threads T`` for each ``--mac-budgets`` F
   (ranks from the MAC budget; each layer's layout from the table);
4. every ``.dsd`` and the original exported (``dsdeploy export``), then timed here by a plain onnxruntime loop
   written from the onnxruntime API alone: ``--rounds`` rounds, each cycling through all the files (one
   session alive at a time, ``--runs`` timed runs after 3 warm-up runs), so a drift in the machine's speed hits
   every file alike; a file's figure is the median of all its runs;
5. equal measured latency: the MAC sweep's conv-MAC ratio interpolated (linear in log MACs vs log measured
   speedup) at each latency plan's measured speedup: the conv MACs each planner keeps for the same measured speed.

Weights do not change latency: the builders' random initialisation (no download). Records accumulate in
``benchmarks/results/latency_models.json`` (one per model x batch x plan); ``--render`` rewrites
``benchmarks/RESULTS-latency-models.md`` from them.

    DSDEPLOY_CACHE=/tmp/latcache python benchmarks/latency_models.py --models torchvision:resnet18 --batches 1
    python benchmarks/latency_models.py --render
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _runner import ROOT, Runner, plain_ort_rounds, write_text

RESULTS = ROOT / "benchmarks" / "results" / "latency_models.json"
TABLE = ROOT / "benchmarks" / "RESULTS-latency-models.md"


def run_one(run: Runner, model: str, batch: int, args: argparse.Namespace, work: Path) -> list[dict]:
    """Steps 1-4 for one model and batch: the records (the original's first)."""
    common = ["--provider", "cpu", "--batch", batch, "--threads", args.threads]
    t = run("latency", model, "--batch", batch, "--threads", args.threads, "--json")
    table_s = round(t.seconds, 1)
    stamp = {"model": model, "batch": batch, "threads": args.threads, "table_seconds": table_s,
             "table_graphs_measured": t.result.get("measured"), "load_before": round(os.getloadavg()[0], 2),
             "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
             platform.machine()}
    tag = model.replace(":", "_")
    plans: list[tuple[dict, Path | None]] = []
    for kind, values, flag in (("speedup", args.speedups, "--speedup"), ("mac", args.mac_budgets, "--mac-budget")):
        for v in values:
            out = work / f"{tag}-b{batch}-{kind}{v}.dsd"
            r = run("convert", model, flag, v, *common, "-o", out, "--json", allow_fail=True)
            rec = {**stamp, "kind": kind, "value": v, "command": r.command}
            if "error" in r.result:
                rec["error"] = r.result["error"]
                plans.append((rec, None))
                continue
            pol, summ = r.result.get("policy", {}), r.result.get("summary", {})
            ver = pol.get("verified") or {}
            chosen = (ver.get("attempts") or [{}])[ver.get("chosen", 0)] if ver.get("attempts") else {}
            rec.update(conv_mac_ratio=summ.get("conv_mac_ratio"), params_after=summ.get("params_after"),
                       predicted_speedup=(pol.get("latency") or {}).get("predicted_speedup"),
                       convert_measured_speedup=chosen.get("measured_speedup"),
                       convert_attempts=[{k: a.get(k) for k in ("predicted_speedup", "measured_speedup",
                                                                 "block_factor", "op_counts")}
                                         for a in ver.get("attempts", [])],
                       convert_chosen=ver.get("chosen"), convert_met=ver.get("met"), convert_seconds=round(r.seconds, 1))
            onnx = out.with_suffix(".onnx")
            run("export", out, "-o", onnx, "--json")
            plans.append((rec, onnx))
    orig = work / f"{tag}-b{batch}-original.onnx"
    shape = ["--input-shape", f"{batch},3,{args.size},{args.size}"] if args.size else []
    run("export", model, "-o", orig, *shape, "--json")
    timed = [orig] + [p for _, p in plans if p is not None]
    ms = plain_ort_rounds(timed, batch, args.threads, args.rounds, args.runs)
    records = [{**stamp, "kind": "original", "value": None, "measured_ms": round(ms[0], 4)}]
    it = iter(ms[1:])
    for rec, p in plans:
        if p is not None:
            m = next(it)
            rec.update(measured_ms=round(m, 4), original_ms=round(ms[0], 4), measured_speedup=round(ms[0] / m, 3))
            if rec.get("predicted_speedup"):
                rec["prediction_error"] = round((rec["measured_speedup"] / rec["predicted_speedup"]) - 1, 4)
        records.append(rec)
    return records


def equal_latency_macs(mac_rows: list[dict], speedup: float) -> float | None:
    """The MAC plans' conv-MAC ratio at ``speedup`` measured: linear in (log speedup, log MAC ratio) between
    the two nearest MAC plans (None outside their measured range)."""
    pts = sorted((r["measured_speedup"], r["conv_mac_ratio"]) for r in mac_rows
                 if r.get("measured_speedup") and r.get("conv_mac_ratio"))
    for (s0, m0), (s1, m1) in itertools.pairwise(pts):
        if s0 <= speedup <= s1 and s1 > s0:
            w = (np.log(speedup) - np.log(s0)) / (np.log(s1) - np.log(s0))
            return float(np.exp(np.log(m0) + w * (np.log(m1) - np.log(m0))))
    return None


def render(records: list[dict]) -> str:
    """The Markdown results: one section per model, batch and thread count (newest records for each plan)."""
    latest: dict[tuple, dict] = {}
    for r in records:
        latest[(r["model"], r["batch"], r.get("threads"), r["kind"], r["value"])] = r
    groups: dict[tuple, list[dict]] = {}
    for r in latest.values():
        groups.setdefault((r["model"], r["batch"], r.get("threads")), []).append(r)
    out = ["# `convert --speedup X`: requested vs measured, and MAC- vs latency-planned at equal measured latency", "",
           (f"Rendered by `python benchmarks/latency_models.py --render` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
           " from `benchmarks/results/latency_models.json`; each section gives the command that made it."),
           ("CPU EP; measured = the plain onnxruntime loop of this script (rounds cycling through all files, medians); "
           "`convert` measured = convert's own verification (the attempt it kept); prediction error = measured / "
           "predicted speedup - 1 (negative: slower than predicted)."), "",
           "<!-- keep:reading -->", "<!-- /keep:reading -->", ""]
    for (model, batch, _), rows in groups.items():
        orig = next((r for r in rows if r["kind"] == "original"), {})
        macs = sorted((r for r in rows if r["kind"] == "mac"), key=lambda r: r["value"])
        spd = sorted((r for r in rows if r["kind"] == "speedup"), key=lambda r: r["value"])
        head = spd[0] if spd else orig
        out += [f"## {model}, batch {batch}, {head.get('threads')} threads", "",
                (f"Made {head.get('when')} on {head.get('machine')}, load average before {head.get('load_before')}; "
                f"latency table: {head.get('table_seconds')} s ({head.get('table_graphs_measured')} graphs measured, "
                f"0 = read from the cache). Original: {orig.get('measured_ms')} ms."), "",
                ("| plan | predicted x | `convert` measured x | measured x | prediction error | conv MACs | "
                "MAC plan's conv MACs at the same measured x |"), "|---|---:|---:|---:|---:|---:|---:|"]
        for r in spd + macs:
            name = f"--speedup {r['value']:g}" if r["kind"] == "speedup" else f"--mac-budget {r['value']:g}"
            if r.get("error"):
                out.append(f"| {name} | {r['error'][:160]} | | | | | |")
                continue
            eq = equal_latency_macs(macs, r["measured_speedup"]) if r["kind"] == "speedup" else None

            def f(v, fmt):
                return "-" if v is None else format(v, fmt)
            out.append(f"| {name} | {f(r.get('predicted_speedup'), '.2f')} | {f(r.get('convert_measured_speedup'), '.2f')}"
                       f" | {f(r.get('measured_speedup'), '.2f')} | {f(r.get('prediction_error'), '+.1%')} | "
                       f"x{f(r.get('conv_mac_ratio'), '.3f')} | {'x' + format(eq, '.3f') if eq else '-'} |")
        cmds = sorted({r["command"] for r in rows if r.get("command")})
        out += ["", "<details><summary>commands</summary>", "", *[f"    {c}" for c in cmds], "", "</details>", ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="torchvision:resnet18", help="comma-separated model specs")
    ap.add_argument("--batches", default="1", help="comma-separated batch sizes")
    ap.add_argument("--speedups", default="2,3,4", help="comma-separated requested speedups")
    ap.add_argument("--mac-budgets", default="0.15,0.25,0.4,0.6", help="comma-separated MAC budgets")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=None, help="input side (default: the model's own)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--render", action="store_true", help="only rewrite the Markdown from the records")
    args = ap.parse_args()
    records = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    if not args.render:
        args.speedups = [float(v) for v in args.speedups.split(",") if v]
        args.mac_budgets = [float(v) for v in args.mac_budgets.split(",") if v]
        run = Runner(threads=None)
        for model in args.models.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                with tempfile.TemporaryDirectory(prefix="dsdeploy-latmodels-") as tmp:
                    new = run_one(run, model, batch, args, Path(tmp))
                for r in new:
                    r["script"] = "python benchmarks/latency_models.py " + " ".join(map(shlex.quote, sys.argv[1:]))
                records += new
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                write_text(RESULTS, json.dumps(records, indent=1) + "\n")
    text = render(records)
    old = TABLE.read_text(encoding="utf-8") if TABLE.is_file() else ""
    if "<!-- keep:reading -->" in old:  # the hand-written reading survives a re-render
        kept = old.split("<!-- keep:reading -->", 1)[1].split("<!-- /keep:reading -->", 1)[0]
        text = text.replace("<!-- keep:reading -->\n<!-- /keep:reading -->",
                            f"<!-- keep:reading -->{kept}<!-- /keep:reading -->", 1)
    write_text(TABLE, text)
    print(text)


if __name__ == "__main__":
    main()
