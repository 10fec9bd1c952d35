"""Accuracy recovery on the third-party pretrained CIFAR-10 ResNets, step by step, through the real CLI.

For each checkpoint in ``../shared/data/pretrained/`` and each ``--mac-budget``, with the real
``dsdeploy`` commands in subprocesses (so every wall time includes start-up and data loading):

1. ``evaluate`` the original on the CIFAR-10 test split (10,000 JPEGs);
2. each training-free step (:data:`STEPS`): naive SVD, then least-squares recovery variants,
   each written as a ``.dsd`` and evaluated on the test split;
3. ``finetune`` the training-free result for each ``--finetune`` duration (the time budget is
   the command's; the validation split is held out of ``train/``: the test split is never used to
   choose anything), optionally with a second CPU-bound job running beside it (``--busy``).

Results accumulate in a JSON file (``--results``; one record per checkpoint x budget x step, so a
later run can add budgets or durations) and are rendered to ``benchmarks/RESULTS-recover-pretrained.md``
with a plot of accuracy vs conv MACs per step (``benchmarks/recover_pretrained.png``).

    python benchmarks/recover_pretrained.py --data /work/data/cifar10 --budgets 0.17 --finetune 3m,10m
    python benchmarks/recover_pretrained.py --data DIR --budgets 0.25,0.35 --finetune none     # add rows
    python benchmarks/recover_pretrained.py --render                                           # table + plot only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _runner import PREPROCESS, PRETRAINED, ROOT, Runner, top1, write_text

RESULTS = ROOT / "benchmarks" / "results" / "recover_pretrained.json"
TABLE = ROOT / "benchmarks" / "RESULTS-recover-pretrained.md"
PLOT = ROOT / "benchmarks" / "recover_pretrained.png"

# Training-free steps, cheapest first. Each is (name, description, how it is made):
#   ("convert", extra convert args)            -> convert from the checkpoint
#   ("calibrate", base step, extra args)       -> calibrate the base step's .dsd
STEPS: list[tuple[str, str, tuple]] = [
    ("naive", "SVD initialisation only (spectral rank allocation)", ("convert", [])),
    ("ls-pointwise", "least-squares pointwise weights + BatchNorm re-estimation (the previous calibration)",
     ("calibrate", "naive", ["--rounds", "0"])),
    ("als", "alternating least squares (depthwise and pointwise) + BatchNorm re-estimation",
     ("calibrate", "naive", [])),
    ("data-ranks", "ranks allocated from measured per-layer sensitivity, then alternating least squares",
     ("convert", ["--allocation", "data", "--calib-data", "{calib}"])),
    ("block-recon", "data-ranks + label-free block reconstruction (the training-free total)",
     ("convert", ["--allocation", "data", "--calib-data", "{calib}", "--block-reconstruct", "{block}"])),
]


def load_results(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def save_results(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(rows, indent=1) + "\n")


def upsert(rows: list[dict], row: dict) -> None:
    key = (row["checkpoint"], row["budget"], row["step"])
    rows[:] = [r for r in rows if (r["checkpoint"], r["budget"], r["step"]) != key] + [row]


def evaluate(run: Runner, model: str | Path, data: Path, extra: list[str], limit: list[str]) -> tuple[float, float]:
    ran = run("evaluate", model, *extra, "--data", data / "test", *limit, "--json")
    return top1(ran.result), ran.seconds


def busy_job() -> subprocess.Popen:
    """A second CPU-bound job (one core spinning), as on a shared machine."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def bench_checkpoint(th: Path, args: argparse.Namespace, run: Runner, rows: list[dict], work: Path) -> None:
    m = re.search(r"resnet(\d+)", th.name)
    if not m:
        sys.exit(f"{th.name}: cannot tell the depth from the file name (expected resnetNN...)")
    spec, data = f"cifar_resnet:resnet{m.group(1)}", args.data
    limit = ["--limit", str(args.limit)] if args.limit else []
    src = ["--weights", str(th), *PREPROCESS]
    acc, secs = evaluate(run, spec, data, src, limit)
    upsert(rows, {"checkpoint": th.name, "budget": None, "step": "original", "top1": acc, "mac_ratio": 1.0,
                  "seconds": None, "eval_seconds": round(secs, 1), "command": None})
    save_results(args.results, rows)
    calib_dir = args.calib_dir or data / "train"
    subs = {"calib": str(calib_dir), "block": args.block_budget}
    calib = ["--calib-batches", str(args.calib_batches), "--seed", "0"]
    for budget in args.budgets:
        made: dict[str, Path] = {}
        for name, desc, how in STEPS:
            if args.steps and name not in args.steps:
                continue
            out = work / f"{th.stem}-{budget}-{name}.dsd"
            if out.is_file() and rows_ratio(rows, th.name, budget, name) is not None:
                made[name] = out  # made by an earlier run with the same --work folder: reuse, keep its record
                continue
            if how[0] == "convert":
                extra = [a.format(**subs) for a in how[1]]
                extra += calib if "--calib-data" in extra else []
                ran = run("convert", spec, *src, "--input-shape", "1,3,32,32", "--mac-budget", budget, *extra,
                          "-o", out, "--json")
                ratio = ran.result["summary"]["conv_mac_ratio"]
            else:
                base = made.get(how[1])
                if base is None:
                    print(f"skip {name}: its base step {how[1]} was not run", file=sys.stderr)
                    continue
                extra = [a.format(**subs) for a in how[2]]
                ran = run("calibrate", base, "--trust-code", "--data", calib_dir,
                          "--max-batches", str(args.calib_batches), *extra, "-o", out, "--json")
                ratio = rows_ratio(rows, th.name, budget, how[1])
            made[name] = out
            acc, esecs = evaluate(run, out, data, ["--trust-code"], limit)
            upsert(rows, {"checkpoint": th.name, "budget": float(budget), "step": name, "description": desc,
                          "top1": acc, "mac_ratio": ratio, "seconds": round(ran.seconds, 1),
                          "eval_seconds": round(esecs, 1), "command": ran.command})
            save_results(args.results, rows)
        free_step = args.finetune_from if args.finetune_from in made else (list(made)[-1] if made else None)
        free = made.get(free_step) if free_step else None
        for duration in args.finetune:
            for busy in {"no": [False], "also": [False, True], "only": [True]}[args.busy]:
                if free is None:
                    continue
                name = f"finetune-{duration}" + ("-busy" if busy else "")
                out = work / f"{th.stem}-{budget}-{name}.dsd"
                job = busy_job() if busy else None
                try:
                    ran = run("finetune", free, "--trust-code", "--data", data / "train",
                              "--time-budget", duration, *args.finetune_args, "-o", out, "--json")
                finally:
                    if job is not None:
                        job.kill()
                acc, esecs = evaluate(run, out, data, ["--trust-code"], limit)
                upsert(rows, {"checkpoint": th.name, "budget": float(budget), "step": name,
                              "description": f"fine-tune from the training-free result, {duration} budget"
                                             + (" with a second CPU-bound job running" if busy else ""),
                              "top1": acc, "mac_ratio": rows_ratio(rows, th.name, budget, free_step),
                              "seconds": round(ran.seconds, 1), "eval_seconds": round(esecs, 1),
                              "command": ran.command,
                              "result": {k: ran.result.get(k) for k in ("kept_input", "stopped", "steps", "epochs",
                                                                 "decode_seconds", "train_seconds",
                                                                 "eval_seconds") if k in ran.result}})
                save_results(args.results, rows)


def rows_ratio(rows: list[dict], ckpt: str, budget: str | float, step: str) -> float | None:
    return next((r["mac_ratio"] for r in rows if r["checkpoint"] == ckpt and r["budget"] == float(budget)
                 and r["step"] == step), None)


def kept_notes(text: str) -> dict[str, str]:
    """The hand-written blocks of an earlier table, ``<!-- keep:NAME -->`` ... ``<!-- /keep:NAME -->``, by NAME."""
    return {m.group(1): m.group(0) for m in re.finditer(r"<!-- keep:(\w+) -->.*?<!-- /keep:\1 -->", text, re.S)}


def render(rows: list[dict], args_line: str) -> None:
    """Write the Markdown table and the accuracy-vs-MACs plot from the accumulated records.

    Hand-written notes survive a re-render: the blocks ``keep:runs`` (how the records were made,
    placed after the header) and ``keep:after`` (placed at the end) are carried over from the
    table being replaced.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Accuracy recovery on third-party pretrained CIFAR-10 ResNets", "",
             (f"Rendered by `python benchmarks/recover_pretrained.py {args_line}` on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()}, {os.cpu_count()} CPU "
             "cores. Each record's command is below; records accumulate in "
             f"`{RESULTS.relative_to(ROOT)}`. Top-1 on the 10,000 CIFAR-10 test JPEGs (unless a command "
             "shows --limit). Seconds: wall time of the command (start-up and data loading included)."), ""]
    notes = kept_notes(TABLE.read_text(encoding="utf-8")) if TABLE.is_file() else {}
    lines += [notes["runs"], ""] if "runs" in notes else []
    ckpts = sorted({r["checkpoint"] for r in rows})
    for ck in ckpts:
        orig = next((r for r in rows if r["checkpoint"] == ck and r["step"] == "original"), None)
        lines += [f"## {ck}" + (f" (original {100 * orig['top1']:.2f} %)" if orig else ""), "",
                  "| MAC budget | step | conv MACs | top-1 (%) | vs original (points) | seconds |",
                  "|---:|---|---:|---:|---:|---:|"]
        for r in sorted((r for r in rows if r["checkpoint"] == ck and r["budget"] is not None),
                        key=lambda r: (r["budget"], r.get("order", 0))):
            delta = f"{100 * (r['top1'] - orig['top1']):+.2f}" if orig else "-"
            ratio = f"x{r['mac_ratio']:.3f}" if r.get("mac_ratio") else "-"
            lines.append(f"| {r['budget']} | {r['step']} | {ratio} | {100 * r['top1']:.2f} | {delta} "
                         f"| {r['seconds']} |")
        lines.append("")
    lines += ["## Steps", ""] + [f"- `{n}`: {d}" for n, d, _ in STEPS]
    lines += [("- `finetune-D`: `dsdeploy finetune` of the training-free result with `--time-budget D` on "
              "`train/` (its validation split is held out of `train/`); `-busy`: with a second CPU-bound job "
              "running."), "", "## Commands", "", "```"]
    lines += [f"{r['command']}    # {r['seconds']} s" for r in rows if r.get("command")]
    lines += ["```", "", f"![accuracy vs conv MACs]({PLOT.name})", ""]
    lines += [notes["after"], ""] if "after" in notes else []
    write_text(TABLE, "\n".join(lines))
    fig, axes = plt.subplots(1, max(1, len(ckpts)), figsize=(6 * max(1, len(ckpts)), 4.5), squeeze=False)
    for ax, ck in zip(axes[0], ckpts):
        steps = [s for s in dict.fromkeys(r["step"] for r in rows if r["checkpoint"] == ck and r["budget"])]
        for s in steps:
            pts = sorted((r["mac_ratio"], 100 * r["top1"]) for r in rows
                         if r["checkpoint"] == ck and r["step"] == s and r.get("mac_ratio"))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=s)
        orig = next((r for r in rows if r["checkpoint"] == ck and r["step"] == "original"), None)
        if orig:
            ax.axhline(100 * orig["top1"], color="k", ls="--", lw=1, label="original")
        ax.set(title=ck, xlabel="conv MACs (fraction of the original)", ylabel="top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    print(f"wrote {TABLE} and {PLOT}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="a CIFAR-10 folder with train/ and test/ class folders")
    ap.add_argument("--checkpoints", type=Path, nargs="*", help=f"default: {PRETRAINED}/*.th")
    ap.add_argument("--budgets", default="0.17,0.25,0.35", help="comma-separated --mac-budget values")
    ap.add_argument("--steps", default="", help="comma-separated step names to run (default: all)")
    ap.add_argument("--calib-dir", type=Path, help="a folder of class folders to calibrate on (default: DATA/train; "
                                                   "a subset makes start-up faster)")
    ap.add_argument("--calib-batches", type=int, default=10, help="x 64 calibration images")
    ap.add_argument("--block-budget", default="90s", help="time budget of block reconstruction")
    ap.add_argument("--finetune", default="3m,10m", help="comma-separated fine-tune budgets, or 'none'")
    ap.add_argument("--finetune-from", default="block-recon", help="the step whose .dsd is fine-tuned")
    ap.add_argument("--finetune-args", default="--augment --batch-size 128", help="extra finetune arguments")
    ap.add_argument("--busy", choices=["no", "also", "only"], default="no",
                    help="fine-tune with a second CPU-bound job running: not, also, or only that way")
    ap.add_argument("--limit", type=int, help="score at most N test images (a quick check, not for the table)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the commands")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--work", type=Path, help="keep the .dsd files here and reuse them on a later run "
                                              "(default: a temporary folder)")
    ap.add_argument("--render", action="store_true", help="only render the table and plot from --results")
    args = ap.parse_args()
    args_line = " ".join(shlex.quote(a) for a in sys.argv[1:])
    rows = load_results(args.results)
    if not args.render:
        if args.data is None or not ((args.data / "train").is_dir() and (args.data / "test").is_dir()):
            sys.exit("--data: expected a folder with train/ and test/ class folders")
        args.budgets = [b for b in args.budgets.split(",") if b]
        args.steps = [s for s in args.steps.split(",") if s]
        args.finetune = [] if args.finetune == "none" else [d for d in args.finetune.split(",") if d]
        args.finetune_args = shlex.split(args.finetune_args)
        checkpoints = args.checkpoints or sorted(PRETRAINED.glob("*.th"))
        if not checkpoints:
            sys.exit(f"no checkpoints: none in {PRETRAINED}")
        run = Runner(args.threads)
        if args.work is not None:
            args.work.mkdir(parents=True, exist_ok=True)
            for th in checkpoints:
                bench_checkpoint(th.resolve(), args, run, rows, args.work)
        else:
            with tempfile.TemporaryDirectory(prefix="dsdeploy-recover-") as work:
                for th in checkpoints:
                    bench_checkpoint(th.resolve(), args, run, rows, Path(work))
    order = {n: i for i, (n, _, _) in enumerate(STEPS)}
    for r in rows:
        r["order"] = order.get(r["step"], len(order) + (1 if "busy" in r["step"] else 0))
    render(rows, args_line)


if __name__ == "__main__":
    main()
