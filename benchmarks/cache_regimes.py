"""Why a DS graph's multi-threaded latency jumps on a cloud VM: the two vCPUs share a cache, or not.

On the 2-vCPU VM this project is developed on, the same DS ResNet-18 graph (2 intra-op threads) runs
in one of two regimes that switch every few seconds, while the dense original holds still. This script
tests one explanation: the host places the two vCPUs on cores that share a last-level cache (an AMD CCX)
at some times and on cores that do not at others. Before each block it measures the core-to-core round
trip with ``core_pingpong.c`` (compiled here with gcc; two threads pinned to CPUs 0 and 1 bounce one
cache line), with no onnxruntime session alive (their spinning threads would distort it), then times a
fresh session of each model (ABBA order, ``--runs`` runs each, median). Then it repeats the blocks with
1 intra-op thread, where no data crosses between cores. Writes a Markdown table with the command::

    python benchmarks/cache_regimes.py --blocks 40 --out benchmarks/RESULTS-cache-regimes.md

Without ``--orig/--ds`` it converts ``torchvision:resnet18 --speedup 3`` (random weights; no download).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from speedup_check import cli

NEAR_NS = 200.0  # round trips below this: the two cores share a last-level cache


def pingpong(exe: Path, n: int = 100_000) -> float:
    """Mean core-to-core round trip (ns) between CPUs 0 and 1."""
    return float(subprocess.run([str(exe), str(n)], capture_output=True, text=True, check=True).stdout)


def block(paths: list[Path], threads: int, runs: int, first: int) -> list[float]:
    """Median ms of ``runs`` runs of a fresh session of each model, ``first`` timed first; one session alive."""
    import numpy as np
    import onnxruntime as ort

    out = [0.0, 0.0]
    for i in ((0, 1) if first == 0 else (1, 0)):
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        s = ort.InferenceSession(str(paths[i]), so, providers=["CPUExecutionProvider"])
        feed = {s.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, 3, 224, 224), np.float32)}
        for _ in range(5):
            s.run(None, feed)
        ts = []
        for _ in range(runs):
            t = time.perf_counter()
            s.run(None, feed)
            ts.append((time.perf_counter() - t) * 1e3)
        out[i] = statistics.median(ts)
        del s
    return out


def summary(rows: list[tuple[float, float, float]], label: str) -> str:
    """One table row per regime: blocks, median round trip, original ms, DS ms, speedup."""
    lines = []
    for name, keep in ((f"{label}, cores share a cache (< {NEAR_NS:g} ns)", lambda r: r[0] < NEAR_NS),
                       (f"{label}, cores do not (>= {NEAR_NS:g} ns)", lambda r: r[0] >= NEAR_NS)):
        sel = [r for r in rows if keep(r)]
        if not sel:
            lines.append(f"| {name} | 0 | - | - | - | - |")
            continue
        med = [statistics.median(c) for c in zip(*sel)]
        lines.append(f"| {name} | {len(sel)} | {med[0]:.0f} | {med[1]:.2f} | {med[2]:.2f} | "
                     f"{med[1] / med[2]:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orig", type=Path, help="the original ONNX file (default: export resnet18)")
    ap.add_argument("--ds", type=Path, help="the converted ONNX file (default: convert resnet18 --speedup 3)")
    ap.add_argument("--blocks", type=int, default=40, help="blocks per thread count")
    ap.add_argument("--runs", type=int, default=40, help="timed runs per model per block")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS-cache-regimes.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dsdeploy-regimes-") as tmp:
        w = Path(tmp)
        exe = w / "core_pingpong"
        subprocess.run(["gcc", "-O2", "-pthread", str(ROOT / "benchmarks" / "core_pingpong.c"), "-o", str(exe)],
                       check=True)
        if not (args.orig and args.ds):
            cli("convert", "torchvision:resnet18", "--speedup", 3, "--provider", "cpu", "--batch", 1,
                "--threads", 2, "-o", w / "ds.dsd", "--json")
            cli("export", "torchvision:resnet18", "-o", w / "orig.onnx")
            cli("export", w / "ds.dsd", "-o", w / "ds.onnx")
        paths = [args.orig or w / "orig.onnx", args.ds or w / "ds.onnx"]
        load = os.getloadavg()[0]
        rows: dict[int, list[tuple[float, float, float]]] = {2: [], 1: []}
        for threads in (2, 1):
            for b in range(args.blocks):
                ns = pingpong(exe)
                o, d = block(paths, threads, args.runs, b % 2)
                rows[threads].append((ns, o, d))
                print(f"threads {threads} block {b:2d}: round trip {ns:6.1f} ns  original {o:6.2f} ms  "
                      f"DS {d:6.2f} ms  x{o / d:.2f}", flush=True)
    lines = ["# Two latency regimes of a DS graph on a 2-vCPU VM: do the two cores share a cache?", "",
             (f"Made by `python benchmarks/cache_regimes.py {' '.join(map(shlex.quote, sys.argv[1:]))}` on "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs; load average before the timing {load:.2f}. Blocks grouped by the core-to-core "
              "round trip measured just before each block."), "",
             "| threads, regime | blocks | round trip ns | original ms | DS ms | speedup |",
             "|---|---:|---:|---:|---:|---:|",
             summary(rows[2], "2 threads"), summary(rows[1], "1 thread"), "",
             "Every block (threads, round trip ns, original ms, DS ms):", "",
             "    " + "\n    ".join(f"{t} {ns:6.1f} {o:6.2f} {d:6.2f}" for t in (2, 1) for ns, o, d in rows[t])]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines[:8]))


if __name__ == "__main__":
    main()
