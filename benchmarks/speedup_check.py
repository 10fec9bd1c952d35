"""Does `convert --speedup X` deliver X? Convert, export, then time both ONNX files two ways.

The latency-true conversion promise (issue 14): ``dsdeploy convert torchvision:resnet18 --speedup 3
--provider cpu --batch 1`` then ``export`` gives a model measured within 5 % of 3x faster than the
original, or ``convert`` says 3x is out of reach and what the best reachable speedup is. This script
runs exactly those commands through the real CLI, then measures the two ONNX files

1. with ``dsdeploy bench`` (the tool's own protocol), and
2. with a plain onnxruntime loop written here from the onnxruntime API alone
   (``InferenceSession`` with ``intra_op_num_threads``, sequential execution, a warm-up, then rounds
   that alternate the two models so drift hits both equally; median per-run latency),

and writes a Markdown table with the command that made it. Run it on a quiet machine::

    python benchmarks/speedup_check.py --model resnet18 --speedup 3 --out benchmarks/RESULTS-speedup-check.md

Weights do not change latency: the torchvision builder's random initialisation is used (no download).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _runner import plain_ort_rounds


def cli(*args: str | Path) -> dict:
    """Run ``dsdeploy ARGS --json`` from this checkout and return its JSON (exit on failure)."""
    cmd = [sys.executable, "-m", "dsdeploy", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    print(f"[{time.perf_counter() - t:7.1f}s] dsdeploy {' '.join(map(shlex.quote, map(str, args)))}", flush=True)
    if proc.returncode != 0:
        sys.exit(f"failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18", help="torchvision model name")
    ap.add_argument("--speedup", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10, help="alternating rounds of the plain loop")
    ap.add_argument("--runs", type=int, default=10, help="runs per model per round")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS-speedup-check.md")
    args = ap.parse_args()
    spec = f"torchvision:{args.model}"
    with tempfile.TemporaryDirectory(prefix="dsdeploy-speedup-") as tmp:
        w = Path(tmp)
        conv = cli("convert", spec, "--speedup", args.speedup, "--provider", "cpu", "--batch", args.batch,
                   "--threads", args.threads, "-o", w / "ds.dsd", "--json")
        cli("export", spec, "-o", w / "orig.onnx")
        cli("export", w / "ds.dsd", "-o", w / "ds.onnx")
        bench = cli("bench", w / "orig.onnx", w / "ds.onnx", "--providers", "cpu", "--batch", args.batch,
                    "--threads", args.threads, "--duration", "15s", "--json", w / "bench.json")
        bench = json.loads((w / "bench.json").read_text()) if (w / "bench.json").is_file() else bench
        plain = plain_ort_rounds([w / "orig.onnx", w / "ds.onnx"], args.batch, args.threads, args.rounds, args.runs)
    policy = conv.get("policy") or {}
    lat = {k: policy.get(k) for k in ("latency", "verified") if policy.get(k) is not None} or sorted(conv)
    bench_ms = [r.get("stats", {}).get("p50_ms") for r in bench.get("results", [])][:2]
    rows = [("plain onnxruntime loop (this script)", plain[0], plain[1]),
            ("dsdeploy bench", *(bench_ms + [None, None])[:2])]
    lines = [(f"# Does `convert --speedup {args.speedup:g}` deliver? ({args.model}, CPU EP, batch {args.batch}, "
             f"{args.threads} threads)"), "",
             (f"Made by `python benchmarks/speedup_check.py {' '.join(map(shlex.quote, sys.argv[1:]))}` on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()}, {os.cpu_count()} CPU "
             f"cores; load average before the timing {os.getloadavg()[0]:.2f}."), "",
             f"`convert` predicted/measured: `{json.dumps(lat)[:400]}`", "",
             "| measured by | original ms (median) | converted ms (median) | speedup | within 5 % of the target |",
             "|---|---:|---:|---:|---|"]
    for name, a, b in rows:
        if a and b:
            s = a / b
            lines.append(f"| {name} | {a:.3f} | {b:.3f} | {s:.2f}x | "
                         f"{'yes' if abs(s - args.speedup) <= 0.05 * args.speedup else 'no'} |")
        else:
            lines.append(f"| {name} | - | - | - | - |")
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
