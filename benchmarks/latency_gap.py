"""Where a latency plan's prediction and the exported model part: table sums vs whole graphs, per exporter.

Usage (issue 14; run it on a quiet machine for wall-clock figures):
    python benchmarks/latency_gap.py --model resnet18 --speedup 3 --threads 2 \\
        --out benchmarks/RESULTS-latency-gap.md

Plans ``convert --speedup X`` for a torchvision model (random init) on the CPU EP from the latency
table (cached; ``--cache`` picks the folder), then exports the original and the converted model two
ways: as ``dsdeploy export`` writes them (:func:`dsdeploy.export.onnx_export.export_bytes`: dynamo,
BatchNorm folded into summed DS branches, onnxsim, dynamic batch) and as the old TorchScript twin
(:func:`dsdeploy.export.small_graphs.to_onnx`: opset 17, static shape). It times the four whole graphs
and every table graph of the plan (each candidate's dense conv and chosen block) in alternating rounds,
one session alive at a time, and reports the prediction (whole original - sum of dense entries + sum
of chosen entries) against each measured converted graph, plus each graph's op counts after ONNX
Runtime's optimisation (fusions, NCHWc reorders).

``--clock cpu`` times the calling thread's CPU time (``time.thread_time``) at 1 intra-op thread: a
figure a loaded machine barely disturbs (spinning is off, so only work is counted). ``--clock wall``
(default) times wall-clock at ``--threads``, as ``bench`` does.
"""

from __future__ import annotations

import argparse
import collections
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torchvision

from dsdeploy.conversion.latency_convert import convert_planned
from dsdeploy.conversion.opcount import trace_calls
from dsdeploy.conversion.plan import Policy, conv_modules
from dsdeploy.export.onnx_export import export_bytes
from dsdeploy.export.small_graphs import ConvSpec, layer_graph, to_onnx
from dsdeploy.fsutil import write_text


def session(graph: bytes, threads: int, spinning: bool, optimized: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    if optimized:
        so.optimized_model_filepath = optimized
    return ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])


def median_ms(graph: bytes, batch: int, threads: int, clock: str, runs: int) -> float:
    """Median ms of ``runs`` runs after 3 warm-ups; one session alive at a time."""
    s = session(graph, threads, spinning=clock == "wall")
    inp = s.get_inputs()[0]
    shape = [d if isinstance(d, int) else (batch if i == 0 else 1) for i, d in enumerate(inp.shape)]
    feed = {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    tick = time.thread_time_ns if clock == "cpu" else time.perf_counter_ns
    for _ in range(3):
        s.run(None, feed)
    out = []
    for _ in range(runs):
        t = tick()
        s.run(None, feed)
        out.append((tick() - t) / 1e6)
    del s
    return statistics.median(out)


def optimized_ops(graph: bytes, threads: int) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "opt.onnx")
        session(graph, threads, spinning=False, optimized=path)
        return dict(collections.Counter(n.op_type for n in onnx.load(path).graph.node).most_common())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--speedup", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="the plan's threads (and the timing's, --clock wall)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--cache", default=None, help="latency cache folder (default: dsdeploy's)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    threads = 1 if args.clock == "cpu" else args.threads
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)().eval()
    shape = (args.batch, 3, 224, 224)
    res, _ = convert_planned(model, shape, Policy(speedup=args.speedup, provider="cpu", batch=args.batch,
                                                  threads=args.threads), cache_dir=args.cache, verify=False)
    conv = res.model.eval()
    wholes = {"original, export": export_bytes(model, shape), "original, TorchScript twin": to_onnx(model, shape),
              "converted, export": export_bytes(conv, shape), "converted, TorchScript twin": to_onnx(conv, shape)}
    calls, mods = trace_calls(model, shape), dict(conv_modules(model))
    entries: dict[tuple[str, str], bytes] = {}
    for d in res.plan.layers:
        if d.dense_ms is None:
            continue
        spec = ConvSpec.of(mods[d.name], calls[d.name][0])
        entries[("dense", d.name)] = layer_graph(spec)
        if d.convert:
            entries[("block", d.name)] = layer_graph(spec, d.rank, res.plan.layout_of(d))
    samples: dict = {k: [] for k in [*wholes, *entries]}
    for _ in range(args.rounds):
        for k, g in [*wholes.items(), *entries.items()]:
            samples[k].append(median_ms(g, args.batch, threads, args.clock, args.runs))
    med = {k: statistics.median(v) for k, v in samples.items()}
    dense = sum(v for k, v in med.items() if isinstance(k, tuple) and k[0] == "dense")
    chosen = sum(med[("block", d.name)] if d.convert else med[("dense", d.name)]
                 for d in res.plan.layers if d.dense_ms is not None)
    clock = ("CPU time of the calling thread, 1 intra-op thread, spinning off" if args.clock == "cpu" else
             f"wall clock, {threads} intra-op threads, spinning on")
    lines = [f"# Table sums vs whole graphs: {args.model}, `convert --speedup {args.speedup:g}`, batch {args.batch}",
             "", (f"Made by `python benchmarks/latency_gap.py {' '.join(map(shlex.quote, sys.argv[1:]))}` on "
                  f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs, load average "
                  f"{os.getloadavg()[0]:.2f}; {clock}; medians of {args.rounds} alternating rounds of {args.runs} "
                  f"runs."),
             "", f"Plan's own prediction: `{res.plan.policy['latency']}`", "",
             f"Sum of the dense entries {dense:.3f} ms; sum of the chosen entries {chosen:.3f} ms.", "",
             ("| remainder from | remainder ms | predicted converted ms | measured converted | ms | error | "
              "predicted x | measured x |"), "|---|---:|---:|---|---:|---:|---:|---:|"]
    for o in ("original, export", "original, TorchScript twin"):
        rem = med[o] - dense
        for c in ("converted, export", "converted, TorchScript twin"):
            pred = rem + chosen
            lines.append(f"| {o} | {rem:.3f} | {pred:.3f} | {c} | {med[c]:.3f} | {pred / med[c] - 1:+.1%} | "
                         f"{med[o] / pred:.2f} | {med[o] / med[c]:.2f} |")
    lines += ["", "| graph | ms | ops after ONNX Runtime's optimisation |", "|---|---:|---|"]
    for k, g in wholes.items():
        lines.append(f"| {k} | {med[k]:.3f} | {optimized_ops(g, threads)} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
