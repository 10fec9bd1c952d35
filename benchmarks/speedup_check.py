"""Does `convert --speedup X` deliver X? Convert, export, then time both ONNX files two ways.

The latency-true conversion promise (issue 14): ``dsdeploy convert torchvision:resnet18 --speedup 3
--provider cpu --batch 1`` then ``export`` gives a model measured within 5 % of 3x faster than the
original, or ``convert`` says 3x is out of reach and what the best reachable speedup is. This script
runs exactly those commands through the real CLI at each ``--threads`` count, records ``convert``'s own
verification (its chosen attempt, and the two speed regimes it found, if any), then measures the two ONNX files

1. with ``dsdeploy bench`` (the tool's own protocol), and
2. with a plain onnxruntime loop written here from the onnxruntime API alone
   (``InferenceSession`` with ``intra_op_num_threads``, sequential execution, a warm-up, then rounds
   that alternate the two models so drift hits both equally; median per-run latency),

and writes a Markdown table with the command that made it. Run it on a quiet machine::

    python benchmarks/speedup_check.py --model resnet18 --speedup 3 --threads 1 2 --out benchmarks/RESULTS-speedup-check.md

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


def cli(*args: str | Path, allow_fail: bool = False) -> dict:
    """Run ``dsdeploy ARGS --json`` from this checkout and return its JSON (exit on failure; with
    ``allow_fail``, ``{"error": its last stderr line}``)."""
    cmd = [sys.executable, "-m", "dsdeploy", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    print(f"[{time.perf_counter() - t:7.1f}s] dsdeploy {' '.join(map(shlex.quote, map(str, args)))}", flush=True)
    if proc.returncode != 0 and allow_fail:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    if proc.returncode != 0:
        sys.exit(f"failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}


def check(args: argparse.Namespace, threads: int) -> tuple[list[str], str]:
    """Convert, export, bench and time with a plain loop at ``threads``; table rows and a note on the regimes."""
    spec = f"torchvision:{args.model}"
    with tempfile.TemporaryDirectory(prefix="dsdeploy-speedup-") as tmp:
        w = Path(tmp)
        conv = cli("convert", spec, "--speedup", args.speedup, "--provider", "cpu", "--batch", args.batch,
                   "--threads", threads, "--precision", args.precision, "-o", w / "ds.dsd", "--json", allow_fail=True)
        if "error" in conv:  # e.g. out of reach: convert's one-line answer is the result
            return [f"| {threads} | `convert` | {conv['error']} | | | |"], f"{threads} thread(s): {conv['error']}"
        cli("export", spec, "-o", w / "orig.onnx")
        cli("export", w / "ds.dsd", "-o", w / "ds.onnx")
        if args.precision != "fp32":  # both files as `deploy --quantize` writes them (random calibration:
            from dsdeploy.export.quantize import quantize_bytes  # an INT8 graph's speed does not depend on scales)

            for f in ("orig.onnx", "ds.onnx"):
                (w / f).write_bytes(quantize_bytes((w / f).read_bytes(), args.precision, (args.batch, 3, 224, 224)))
        bench = cli("bench", w / "orig.onnx", w / "ds.onnx", "--providers", "cpu", "--batch", args.batch,
                    "--threads", threads, "--duration", "15s", "--json", w / "bench.json")
        bench = json.loads((w / "bench.json").read_text()) if (w / "bench.json").is_file() else bench
        plain = plain_ort_rounds([w / "orig.onnx", w / "ds.onnx"], args.batch, threads, args.rounds, args.runs)
    verified = (conv.get("policy") or {}).get("verified") or {}
    chosen = (verified.get("attempts") or [{}])[verified.get("chosen", -1)]
    results = bench.get("results", [])[:2]
    bench_ms = [r.get("stats", {}).get("p50_ms") for r in results]
    rows = [("`convert`'s own verification (chosen attempt)", chosen.get("original_ms"), chosen.get("measured_ms")),
            ("plain onnxruntime loop (this script)", *plain),
            ("dsdeploy bench", *(bench_ms + [None, None])[:2])]
    lines = []
    for name, a, b in rows:
        if a and b:
            sp = a / b
            ok = "yes" if abs(sp - args.speedup) <= 0.05 * args.speedup else "no"
            lines.append(f"| {threads} | {name} | {a:.3f} | {b:.3f} | {sp:.2f}x | {ok} |")
        else:
            lines.append(f"| {threads} | {name} | - | - | - | - |")
    two = [f"convert: {r['measured_speedup']:.2f}x in {r['rounds']} rounds" for r in chosen.get("regimes") or []]
    two += [f"bench {r.get('model')}: p50 {g['p50_ms']:.3f} ms in {100 * g['share']:.0f} % of the runs"
            for r in results for g in (r.get("regimes") or [])]
    trail = [(f"planned at {a['planned_ms']:.2f} ms: " if "planned_ms" in a else "")
             + f"predicted x{a['predicted_speedup']:.2f}, measured x{a['measured_speedup']:.2f}"
             + (" (kept)" if i == verified.get("chosen") else "") for i, a in enumerate(verified.get("attempts") or [])]
    note = (f"{threads} thread(s): convert's interval x{chosen.get('ci95', ['?', '?'])[0]}-x"
            f"{chosen.get('ci95', ['?', '?'])[1]} over {chosen.get('rounds')} rounds; two speeds: "
            + ("; ".join(two) if two else "none found") + "; convert's attempts"
            + (" (searched by measurement)" if verified.get("search") else "") + ": " + "; ".join(trail))
    return lines, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18", help="torchvision model name")
    ap.add_argument("--speedup", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, nargs="+", default=[2], help="intra-op thread counts to check")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8", "int8-dynamic"],
                    help="convert --precision; both exported files are then quantized so before timing")
    ap.add_argument("--rounds", type=int, default=10, help="alternating rounds of the plain loop")
    ap.add_argument("--runs", type=int, default=10, help="runs per model per round")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS-speedup-check.md")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    rows, notes = [], []
    for threads in args.threads:
        r, n = check(args, threads)
        rows += r
        notes.append(n)
    prec = "" if args.precision == "fp32" else f", {args.precision}"
    lines = [(f"# Does `convert --speedup {args.speedup:g}` deliver? ({args.model}, CPU EP, batch {args.batch}{prec})"),
             "",
             (f"Made by `python benchmarks/speedup_check.py {' '.join(map(shlex.quote, sys.argv[1:]))}` on "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()}, {os.cpu_count()} CPU "
              f"cores; load average before the timing {load:.2f}."), "",
             "| threads | measured by | original ms (median) | converted ms (median) | speedup | within 5 % of the target |",
             "|---:|---|---:|---:|---:|---|", *rows, "", *[f"- {n}" for n in notes]]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
