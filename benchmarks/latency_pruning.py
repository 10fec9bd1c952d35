"""Accuracy at equal measured latency: DS latency-planned vs DS MAC-planned vs Torch-Pruning (issue 14).

On the third-party pretrained CIFAR-10 ResNets (``../shared/data/pretrained/``), CPU EP, ``--threads``
intra-op threads, batch ``--batch``, for each requested ``--speedups`` X:

1. ``ds-latency``: ``dsdeploy convert CKPT --speedup X --provider cpu --batch B --threads T --allocation data
   --calib-data CALIB --block-reconstruct 60s`` (the real CLI). Its MEASURED latency is the target of the others.
2. ``ds-mac``: the same command with ``--mac-budget m`` instead of ``--speedup`` (layouts still picked from the
   latency table; ranks from the MAC budget); m is searched in-process (ranks planned on the same data
   costs, no calibration) until the measured latency matches, then the CLI makes that model.
3. ``torch-pruning``: Torch-Pruning's ``MetaPruner`` with ``GroupMagnitudeImportance(p=1)`` (L1), one
   uniform ratio r over the blocks' inner channels (conv1 outputs = conv2 inputs; the stem, the blocks'
   output channels and the fc are ignored: the option-A shortcut pads a fixed channel count, so the residual
   channels cannot be pruned); r searched until the measured latency matches; then the BatchNorm statistics
   re-estimated on the calibration images (dsdeploy's ``recalibrate_bn``) as its training-free step.

Latency (one function, :func:`latency`): each model exported as ``dsdeploy export`` writes it
(``export_bytes``), timed alternately with the original (``measure_samples``, ``--rounds`` rounds, medians);
speedup = original / model. Recovery (the same for all three): dsdeploy's own fine-tune
(``dsdeploy.recover.finetune.finetune``, KD+CE from the original, SGD + cosine, augmentation) for exactly
``--steps`` steps of ``--ft-batch`` images (steps, not wall time: load cannot change the budget).
Accuracy: top-1 on the CIFAR-10 test JPEGs, the same evaluation for all, after the training-free step and
after the fine-tune. Records accumulate in ``benchmarks/results/latency_pruning.json``; ``--render`` writes
``benchmarks/RESULTS-latency-pruning.md`` and ``benchmarks/latency_pruning.png``::

    python benchmarks/latency_pruning.py --data /work/data/cifar10 --calib-dir /work/data/cifar10-calib/train \\
        --speedups 1.5,2,3 --batch 32 --steps 300 --work /tmp/lp && python benchmarks/latency_pruning.py --render
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _runner import PREPROCESS, PRETRAINED, ROOT, Runner, write_text

RESULTS = ROOT / "benchmarks" / "results" / "latency_pruning.json"
TABLE = ROOT / "benchmarks" / "RESULTS-latency-pruning.md"
PLOT = ROOT / "benchmarks" / "latency_pruning.png"
METHODS = ("ds-latency", "ds-mac", "torch-pruning")
SHAPE = (1, 3, 32, 32)
_EXPORTED: dict[tuple, bytes] = {}


def latency(original, model, args) -> tuple[float, float]:
    """(original ms, model ms): medians over ``args.rounds`` alternating rounds of ``args.runs`` runs each,
    both exported as ``dsdeploy export`` writes them, one timed session alive at a time."""
    from dsdeploy.export.onnx_export import export_bytes
    from dsdeploy.runtime.providers import ep_config
    from dsdeploy.runtime.timing import Protocol, measure_samples

    shape = (args.batch, *SHAPE[1:])
    if (id(original), shape) not in _EXPORTED:  # the original's graph is the same every time: export it once
        _EXPORTED[(id(original), shape)] = export_bytes(original, shape)
    graphs = [_EXPORTED[(id(original), shape)], export_bytes(model, shape)]
    cfg, proto = ep_config("CPUExecutionProvider", None, args.threads), Protocol(warmup=5, iters=args.runs)
    samples: list[list[float]] = [[], []]
    for _ in range(args.rounds):
        for i, g in enumerate(graphs):
            samples[i] += measure_samples(g, ep=cfg, threads=args.threads, protocol=proto, batch=args.batch)
    return statistics.median(samples[0]), statistics.median(samples[1])


def search(make, lo: float, hi: float, start: float, target: float, args, original, faster_when_up: bool,
           geometric: bool = False):
    """Find the knob in [lo, hi] whose model's measured speedup is within ``args.match`` of ``target``
    (bisection, arithmetic or ``geometric``, at most ``args.search_steps`` measurements); returns
    (knob, model, orig ms, ms, tries) of the closest match."""
    tries, best, x = [], None, start
    for _ in range(args.search_steps):
        model = make(x)
        o, ms = latency(original, model, args)
        s = o / ms
        tries.append({"knob": round(x, 5), "speedup": round(s, 4), "ms": round(ms, 4)})
        print(f"    knob {x:.4f}: x{s:.3f} (target x{target:.3f})", flush=True)
        if best is None or abs(s / target - 1) < abs(best[3] / target - 1):
            best = (x, model, o, s, ms)
        if abs(s / target - 1) <= args.match:
            break
        if (s > target) == faster_when_up:
            hi = x
        else:
            lo = x
        x = math.sqrt(lo * hi) if geometric else (lo + hi) / 2
    x, model, o, s, ms = best
    return x, model, o, ms, tries


def tp_prune(original, ratio: float, round_to: int | None):
    """A copy of ``original`` with each block's inner channels L1-pruned by ``ratio`` (Torch-Pruning), the
    kept counts multiples of ``round_to`` (ONNX Runtime's NCHWc convs want multiples of 4: measured here,
    ratio 0.735 (4 of 16 kept) ran x4.0 where 0.72 (5 of 16) ran x1.8)."""
    import torch
    import torch_pruning as tp

    m = copy.deepcopy(original).eval()
    if ratio <= 0:
        return m
    blocks = [b for name, b in m.named_modules() if re.fullmatch(r"layer\d\.\d+", name)]
    ignored = [m.conv1, m.linear] + [b.conv2 for b in blocks]
    tp.pruner.MetaPruner(m, torch.randn(2, *SHAPE[1:]), importance=tp.importance.GroupMagnitudeImportance(p=1),
                         pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to).step()
    return m.eval()


class Bench:
    """Shared state of one checkpoint: the original, preprocessing, data splits, teacher; runs each step."""

    def __init__(self, th: Path, args, run: Runner, work: Path) -> None:
        from dsdeploy.conversion.loading import load_model

        self.th, self.args, self.run, self.work = th, args, run, work
        depth = re.search(r"resnet(\d+)", th.name)
        if not depth:
            sys.exit(f"{th.name}: cannot tell the depth from the file name (expected resnetNN...)")
        self.spec = f"cifar_resnet:resnet{depth.group(1)}"
        self.loaded = load_model(self.spec, weights=str(th))
        self.original = self.loaded.model.eval()
        self.pre = None  # the recorded preprocessing, read from the first .dsd made
        self.splits = None
        self.orig_ms: list[float] = []  # the original's median ms of every measurement against ds-latency

    def convert(self, name: str, plan: list[str]):
        """``dsdeploy convert`` with the shared flags; (model, command, seconds) or (None, error line, seconds)."""
        from dsdeploy.conversion.loading import load_model
        from dsdeploy.data.preprocessing import Preprocess

        a, out = self.args, self.work / f"{self.th.stem}-b{self.args.batch}-{name}.dsd"
        if a.work is not None and out.is_file():  # made by an earlier run with this --work: reuse it
            loaded = load_model(str(out), trust_code=True)
            self.pre = self.pre or Preprocess.from_dict(loaded.preprocessing)
            return loaded.model.eval(), f"(reused {out})", 0.0
        try:
            ran = self.run("convert", self.spec, "--weights", self.th, *PREPROCESS, "--input-shape", "1,3,32,32",
                           *plan, "--provider", "cpu", "--batch", a.batch, "--threads", a.threads,
                           "--allocation", "data", "--calib-data", a.calib_dir, "--calib-batches", a.calib_batches,
                           "--block-reconstruct", a.block_budget, "--calib-eval-images", "0", "--seed", "0", "-o", out, "--json")
        except SystemExit as exc:  # the Runner exits on a failed command: an unreachable target is a result
            return None, str(exc).strip().splitlines()[-1], 0.0
        loaded = load_model(str(out), trust_code=True)
        self.pre = self.pre or Preprocess.from_dict(loaded.preprocessing)
        return loaded.model.eval(), ran.command, ran.seconds

    def top1(self, model) -> float:
        """Top-1 on the test JPEGs (all, or a seeded ``--limit``), the same call for every model."""
        from dsdeploy.recover.evaluate import evaluate

        res = evaluate(model, str(self.args.data / "test"), split="train", val_split=0, limit=self.args.limit,
                       preprocess=self.pre, input_shape=SHAPE, batch_size=256)
        return res["models"][0]["metrics"]["top1"]

    def finetune(self, model) -> dict:
        """dsdeploy's fine-tune of ``model`` (in place) for exactly ``--steps`` steps; its summary."""
        from dataclasses import replace

        from dsdeploy.data.datasets import DataSplits, load_data
        from dsdeploy.recover.config import FinetuneConfig
        from dsdeploy.recover.finetune import finetune

        a = self.args
        epochs = max(1, math.ceil(a.steps * a.ft_batch / 40000))  # at most 40,000 images an epoch
        per_epoch = a.steps // epochs * a.ft_batch
        if self.splits is None:  # train: a seeded subset of per_epoch images; val: --val-images held out of train
            train_dir, aug = str(a.data / "train"), replace(self.pre, augment=True)
            tr = load_data(train_dir, aug, val_split=0.1, seed=0, limit=per_epoch)
            va = load_data(train_dir, self.pre, val_split=0.1, seed=0, limit=a.val_images)
            self.splits = DataSplits(tr.train, va.val, tr.classes, aug)
        if len(self.splits.train) < per_epoch:
            sys.exit(f"--steps {a.steps} x --ft-batch {a.ft_batch} needs {per_epoch} training images an epoch")
        cfg = FinetuneConfig(epochs=epochs, batch_size=a.ft_batch, lr=a.lr, augment=True, init="none", seed=0,
                             progress=False, warmup_epochs=0.1)
        with tempfile.TemporaryDirectory(prefix="dsdeploy-lp-") as tmp:
            res = finetune(model, self.original, self.splits, cfg, out_path=Path(tmp) / "ft.dsd")
        return {"steps": res.steps, "epochs": res.epochs, "best_epoch": res.best_epoch, "train_seconds":
                res.train_seconds, "seconds": round(res.seconds, 1), "val_before": res.accuracy_before,
                "val_best": res.best_accuracy, "lr": a.lr, "batch": a.ft_batch}

    def bn_reestimate(self, model) -> None:
        """TP's training-free step: BatchNorm statistics re-estimated on the calibration images."""
        from dsdeploy.data.datasets import make_loader
        from dsdeploy.data.given import calibration_images
        from dsdeploy.recover.bnfit import recalibrate_bn

        _, calib = calibration_images(str(self.args.calib_dir), self.pre, max_batches=self.args.calib_batches,
                                      batch_size=64, seed=0, val_split=0.2, limit=None, labels=None)
        recalibrate_bn(model, make_loader(calib, 64, shuffle=False))

    def mac_model(self, costs):
        """m -> the in-process plan of ``--mac-budget m`` on the data costs (no calibration: latency only)."""
        from dsdeploy.conversion.latency_convert import convert_planned
        from dsdeploy.conversion.plan import Policy

        def make(m: float):
            policy = Policy(mac_budget=round(m, 4), allocation="data", provider="cpu", batch=self.args.batch,
                            threads=self.args.threads)
            policy.validate()
            return convert_planned(self.original, SHAPE, policy, costs=costs.costs(), cost_name="logit")[0].model
        return make

    def costs(self):
        from dsdeploy.conversion.plan import Policy
        from dsdeploy.conversion.workflow import measure_costs

        return measure_costs(self.loaded, Policy(mac_budget=0.5, allocation="data"), SHAPE, self.pre,
                             str(self.args.calib_dir), seed=0, calib_batches=self.args.calib_batches)


def record(bench: Bench, speedup: float, method: str, model, orig_ms: float, ms: float, **extra) -> dict:
    from dsdeploy.conversion.opcount import profile_model

    prof, base = profile_model(model, SHAPE), profile_model(bench.original, SHAPE)
    return {"checkpoint": bench.th.name, "batch": bench.args.batch, "threads": bench.args.threads,
            "target": speedup, "method": method, "original_ms": round(orig_ms, 4), "ms": round(ms, 4),
            "speedup": round(orig_ms / ms, 4), "conv_mac_ratio": round(prof.conv_macs / base.conv_macs, 4),
            "params": prof.total_params, "limit": bench.args.limit, "run": bench.args.line,
            "load": round(os.getloadavg()[0], 2), **extra}


def bench_speedup(bench: Bench, speedup: float, rows: list[dict], costs_cache: dict) -> None:
    a = bench.args
    print(f"== {bench.th.name} batch {a.batch}: x{speedup:g}", flush=True)
    t = time.perf_counter()
    ds, command, secs = bench.convert(f"latency-x{speedup:g}", ["--speedup", speedup])
    if ds is None:
        upsert(rows, {"checkpoint": bench.th.name, "batch": a.batch, "target": speedup, "method": "ds-latency",
                      "error": command})
        save(rows)  # an unreachable target is a result too
        return
    o, ms = latency(bench.original, ds, a)
    bench.orig_ms.append(o)
    target = o / ms  # the others match what ds-latency measures, not what was asked
    made = {"ds-latency": (ds, o, ms, {"command": command, "convert_seconds": round(secs, 1)})}
    if "ds-mac" in a.methods:
        if "c" not in costs_cache:
            costs_cache["c"] = bench.costs()
        start = record(bench, speedup, "", ds, o, ms)["conv_mac_ratio"]  # ds-latency's MACs: a close start
        m, _, _, _, tries = search(bench.mac_model(costs_cache["c"]), 0.02, 1.0, start, target, a, bench.original,
                                   faster_when_up=False, geometric=True)
        mac, command, secs = bench.convert(f"mac-x{speedup:g}", ["--mac-budget", f"{m:.4f}"])
        if mac is not None:
            o2, ms2 = latency(bench.original, mac, a)
            made["ds-mac"] = (mac, o2, ms2, {"command": command, "convert_seconds": round(secs, 1),
                                            "mac_budget": round(m, 4), "search": tries})
    if "torch-pruning" in a.methods:
        ts = time.perf_counter()
        r, pruned, _, _, tries = search(lambda r: tp_prune(bench.original, r, a.tp_round_to or None), 0.0, 0.97,
                                        0.5, target, a, bench.original, faster_when_up=True)
        bench.bn_reestimate(pruned)
        o3, ms3 = latency(bench.original, pruned, a)
        made["torch-pruning"] = (pruned, o3, ms3, {"ratio": round(r, 4), "round_to": a.tp_round_to, "search": tries,
                                                   "convert_seconds": round(time.perf_counter() - ts, 1)})
    for method, (model, o, ms, extra) in made.items():
        if method not in a.methods:
            continue
        te = time.perf_counter()
        free = bench.top1(model)
        eval_s = time.perf_counter() - te
        ft = bench.finetune(model) if a.steps else None
        row = record(bench, speedup, method, model, o, ms, top1_free=free, eval_seconds=round(eval_s, 1),
                     **extra, finetune=ft, top1_ft=bench.top1(model) if ft else None)
        print(f"  {method}: x{row['speedup']:.2f} ({row['ms']:.2f} ms) top-1 {100 * free:.2f} -> "
              f"{100 * row['top1_ft']:.2f}" if ft else f"  {method}: x{row['speedup']:.2f} top-1 {100 * free:.2f}",
              flush=True)
        upsert(rows, row)
        save(rows)
    print(f"   x{speedup:g} done in {time.perf_counter() - t:.0f} s", flush=True)


def upsert(rows: list[dict], row: dict) -> None:
    key = lambda r: (r["checkpoint"], r["batch"], r["target"], r["method"])
    rows[:] = [r for r in rows if key(r) != key(row)] + [row]


def save(rows: list[dict]) -> None:
    write_text(ARGS.results, json.dumps(rows, indent=1) + "\n")


def render(rows: list[dict], table: Path, plot: Path) -> None:
    """The Markdown table and the accuracy-vs-latency plot from the records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Accuracy at equal measured latency: DS latency-planned vs DS MAC-planned vs Torch-Pruning", "",
             (f"Rendered {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from `{ARGS.results.name}`; "
             f"{platform.machine()}, {os.cpu_count()} CPU cores. Each record's command line, load average and "
             "settings are in the JSON. Latency: exported ONNX, CPU EP, alternating with the original "
             "(medians); top-1 on the CIFAR-10 test JPEGs (--limit shown when not all 10,000)."), ""]
    lines += [f"Made by: `{r['run']}` (load average {r.get('load', '-')})" for r in
              {r["run"]: r for r in rows if r.get("run")}.values()] + [""]
    groups = sorted({(r["checkpoint"], r["batch"]) for r in rows})
    for ck, b in groups:
        orig = next((r for r in rows if (r["checkpoint"], r["batch"], r["method"]) == (ck, b, "original")), {})
        lines += [f"## {ck}, batch {b}" + (f" (original {100 * orig['top1_free']:.2f} %, "
                                             f"{orig['ms']:.2f} ms)" if orig else ""), "",
                  ("| method | target | measured speedup | ms | conv MACs | params | top-1 training-free | "
                  "top-1 fine-tuned | knob |"), "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in sorted((r for r in rows if (r["checkpoint"], r["batch"]) == (ck, b) and r["method"] != "original"),
                        key=lambda r: (r["target"], METHODS.index(r["method"]))):
            if r.get("error"):
                lines.append(f"| {r['method']} | x{r['target']:g} | {r['error']} | | | | | | |")
                continue
            knob = (f"mac_budget {r['mac_budget']}" if "mac_budget" in r else f"ratio {r['ratio']}"
                    if "ratio" in r else "")
            ft = f"{100 * r['top1_ft']:.2f}" if r.get("top1_ft") is not None else "-"
            lines.append(f"| {r['method']} | x{r['target']:g} | x{r['speedup']:.2f} | {r['ms']:.2f} | "
                         f"x{r['conv_mac_ratio']:.3f} | {r['params']:,} | {100 * r['top1_free']:.2f} | {ft} | {knob} |")
        lines.append("")
    lines += ["Fine-tune (all methods): " + "; ".join(sorted({json.dumps(r["finetune"], sort_keys=True)[:200]
                                                             for r in rows if r.get("finetune")})[:1]), "",
              f"![top-1 vs measured latency]({plot.name})", ""]
    old = table.read_text(encoding="utf-8") if table.is_file() else ""
    kept = old[old.find("<!-- keep:reading -->"):old.find("<!-- /keep:reading -->")] if "<!-- keep:reading -->" in old else ""
    lines += ["", (kept or "<!-- keep:reading -->\n") + "<!-- /keep:reading -->", ""]  # the hand-written reading survives
    write_text(table, "\n".join(lines))
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(6 * max(1, len(groups)), 4.5), squeeze=False)
    for ax, (ck, b) in zip(axes[0], groups):
        for i, m in enumerate(METHODS):
            pts = sorted((r["ms"], r.get("top1_free"), r.get("top1_ft")) for r in rows
                         if (r["checkpoint"], r["batch"], r["method"]) == (ck, b, m) and not r.get("error"))
            if not pts:
                continue
            ms = [p[0] for p in pts]
            ax.plot(ms, [100 * p[1] for p in pts], ls="--", marker="o", color=f"C{i}", alpha=0.7,
                    label=f"{m} (training-free)")
            if all(p[2] is not None for p in pts):
                ax.plot(ms, [100 * p[2] for p in pts], ls="-", marker="o", color=f"C{i}", label=f"{m} (fine-tuned)")
        orig = next((r for r in rows if (r["checkpoint"], r["batch"], r["method"]) == (ck, b, "original")), None)
        if orig:
            ax.axhline(100 * orig["top1_free"], color="k", ls=":", lw=1, label=f"original ({orig['ms']:.1f} ms)")
        ax.set(title=f"{ck}, batch {b}", xlabel="measured latency (ms per batch, CPU EP)", ylabel="top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plot, dpi=110)
    print(f"wrote {table} and {plot}")


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="a CIFAR-10 folder with train/ and test/ class folders")
    ap.add_argument("--calib-dir", type=Path, help="class folders to calibrate on (default: DATA/train)")
    ap.add_argument("--checkpoints", type=Path, nargs="*", help=f"default: {PRETRAINED}/resnet32-*.th")
    ap.add_argument("--speedups", default="1.5,2,3", help="comma-separated requested speedups")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    ap.add_argument("--batch", type=int, default=32, help="inference batch the latencies are measured at")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--steps", type=int, default=300, help="fine-tune steps for every method (0: none)")
    ap.add_argument("--ft-batch", type=int, default=128, help="fine-tune batch")
    ap.add_argument("--lr", type=float, default=0.01, help="fine-tune peak learning rate (SGD, cosine)")
    ap.add_argument("--val-images", type=int, default=2000, help="held-out train images that pick the best epoch")
    ap.add_argument("--calib-batches", type=int, default=10, help="x 64 calibration images")
    ap.add_argument("--block-budget", default="60s", help="convert --block-reconstruct of both DS methods")
    ap.add_argument("--rounds", type=int, default=6, help="alternating timing rounds per latency measurement")
    ap.add_argument("--runs", type=int, default=30, help="timed runs per model per round")
    ap.add_argument("--match", type=float, default=0.03, help="relative latency match of ds-mac/torch-pruning")
    ap.add_argument("--search-steps", type=int, default=7, help="latency measurements per search at most")
    ap.add_argument("--tp-round-to", type=int, default=4, help="torch-pruning keeps multiples of this (0: any)")
    ap.add_argument("--limit", type=int, help="score at most N test images (a smoke run, not for the table)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--work", type=Path, help="keep the .dsd files here and reuse them on a later run "
                                              "(default: a temporary folder)")
    ap.add_argument("--render", action="store_true", help="only render the table and plot from --results")
    ap.add_argument("--table", type=Path, default=TABLE, help="where --render writes the Markdown")
    ap.add_argument("--plot", type=Path, default=PLOT, help="where --render writes the plot")
    ARGS = args = ap.parse_args()
    rows = json.loads(args.results.read_text()) if args.results.is_file() else []
    if args.render:
        return render(rows, args.table, args.plot)
    if args.data is None or not ((args.data / "train").is_dir() and (args.data / "test").is_dir()):
        sys.exit("--data: expected a folder with train/ and test/ class folders")
    args.methods = [m for m in args.methods.split(",") if m]
    if set(args.methods) - set(METHODS) or "ds-latency" not in args.methods:
        sys.exit(f"--methods: a subset of {', '.join(METHODS)} with ds-latency in it (it sets the target)")
    if "torch-pruning" in args.methods:
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            sys.exit("torch-pruning is not installed (pip install torch-pruning): it is needed for the "
                     "torch-pruning method only, not by dsdeploy; or leave it out of --methods")
    args.calib_dir = (args.calib_dir or args.data / "train").resolve()
    args.data = args.data.resolve()
    checkpoints = args.checkpoints or sorted(PRETRAINED.glob("resnet32-*.th"))
    if not checkpoints:
        sys.exit(f"no checkpoints: none in {PRETRAINED}")
    sys.path.insert(0, str(ROOT / "examples"))  # cifar_resnet, as the CLI commands get it
    run = Runner(args.threads)
    args.line = "python benchmarks/latency_pruning.py " + " ".join(map(shlex.quote, sys.argv[1:]))
    with tempfile.TemporaryDirectory(prefix="dsdeploy-lp-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for th in checkpoints:
            bench = Bench(th.resolve(), args, run, work)
            costs: dict = {}
            for s in [float(x) for x in args.speedups.split(",") if x]:
                bench_speedup(bench, s, rows, costs)
            if bench.pre is not None and bench.orig_ms:
                upsert(rows, {"checkpoint": th.name, "batch": args.batch, "target": None, "method": "original",
                              "ms": round(statistics.median(bench.orig_ms), 4), "top1_free": bench.top1(bench.original),
                              "limit": args.limit, "run": args.line, "load": round(os.getloadavg()[0], 2)})
                save(rows)
    render(rows, args.table, args.plot)


ARGS: argparse.Namespace

if __name__ == "__main__":
    main()
