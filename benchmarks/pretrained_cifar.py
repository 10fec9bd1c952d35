"""Third-party pretrained CIFAR-10 ResNets through the real CLI and through a recipe, on CIFAR-10.

The checkpoints are ``../shared/data/pretrained/*.th`` (ResNet-32/44 of He et al. 2016 as
their author published them); the architecture is user code, ``examples/cifar_resnet.py``.
For each checkpoint, with the real ``dsdeploy`` commands in subprocesses:

1. ``evaluate`` the original on the CIFAR-10 test split (10,000 JPEGs);
2. ``convert --mac-budget B --calib-data`` (a seeded subset of the training split);
3. ``evaluate`` the converted artifact on the same test split;
4. ``run converters/cifar10_resnet_pretrained.toml`` on the same data (fine-tuning off unless
   ``--finetune DURATION``; the recipe's own bench settings);

then writes ``benchmarks/RESULTS-pretrained.md`` with the accuracies and the exact commands.
The JPEG test images score a few points below the published (PNG) figures.

    python benchmarks/pretrained_cifar.py                          # extracts ../shared/data/cifar10-jpg.tar.gz
    python benchmarks/pretrained_cifar.py --data /tmp/cifar10      # a folder with train/ and test/
    python benchmarks/pretrained_cifar.py --limit 500 --no-recipe --out /tmp/r.md   # a quick check
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import shlex
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from _runner import PREPROCESS, PRETRAINED, ROOT, SHARED, Runner, top1, write_text

TARBALL = SHARED / "data" / "cifar10-jpg.tar.gz"
RECIPE = ROOT / "converters" / "cifar10_resnet_pretrained.toml"


def extract(dest: Path, calib_images: int, seed: int) -> Path:
    """Extract test/ and a seeded ``calib_images`` subset of train/ (equal per class) into ``dest``."""
    if not TARBALL.is_file():
        sys.exit(f"CIFAR-10 not found: pass --data DIR or put the tarball at {TARBALL}")
    with tarfile.open(TARBALL) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith((".jpg", ".png"))]
    by_class: dict[str, list[tarfile.TarInfo]] = {}
    for m in members:
        parts = Path(m.name).parts
        if parts[0] == "train":
            by_class.setdefault(parts[1], []).append(m)
    rng = random.Random(seed)
    per_class = calib_images // max(1, len(by_class))
    keep = {m.name for m in members if Path(m.name).parts[0] == "test"}
    for name in sorted(by_class):
        files = sorted(by_class[name], key=lambda m: m.name)
        keep.update(m.name for m in rng.sample(files, min(per_class, len(files))))
    with tarfile.open(TARBALL) as tar:
        tar.extractall(dest, members=[m for m in tar.getmembers() if m.name in keep], filter="data")
    return dest


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def bench_checkpoint(th: Path, data: Path, work: Path, args: argparse.Namespace, run: Runner) -> dict:
    """CLI path then recipe path for one checkpoint; returns the figures for the table."""
    m = re.search(r"resnet(\d+)", th.name)
    if not m:
        sys.exit(f"{th.name}: cannot tell the depth from the file name (expected resnetNN...)")
    spec = f"cifar_resnet:resnet{m.group(1)}"
    limit = ["--limit", str(args.limit)] if args.limit else []
    row: dict = {"checkpoint": th.name, "spec": spec}
    orig = run("evaluate", spec, "--weights", th, "--data", data, *PREPROCESS, *limit, "--json").result
    row["original"], row["images"] = top1(orig), orig["images"]
    dsd = work / f"{th.stem}.dsd"
    conv = run("convert", spec, "--weights", th, "--input-shape", "1,3,32,32", *PREPROCESS,
               "--mac-budget", args.mac_budget, "--calib-data", data, "--calib-batches", str(args.calib_batches),
               "--seed", str(args.seed), "-o", dsd, "--json").result
    row["conv_mac_ratio"] = conv["summary"]["conv_mac_ratio"]
    row["converted_layers"] = f"{conv['summary']['converted']}/{conv['summary']['convs']}"
    row["calibration"] = next((h for h in conv.get("history", []) if h.get("stage") == "calibrate"), None)
    after = run("evaluate", dsd, "--trust-code", "--data", data, *limit, "--json").result
    row["calibrated"] = top1(after)
    if not args.no_recipe:
        sets = ["--set", f'model.spec="{spec}"']
        if args.finetune == "none":
            sets += ["--set", 'finetune.mode="none"']
        else:
            sets += ["--set", f'finetune.time_budget="{args.finetune}"']
        if args.limit:
            sets += ["--set", f"data.limit={args.limit}"]
        summary = run("run", RECIPE, "--weights", th, "--data", data, "--out", work / f"run-{th.stem}", *sets,
                      "--json").result
        row["recipe"] = summary
    return row


def write_results(rows: list[dict], run: Runner, args: argparse.Namespace, out: Path) -> None:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    threads = run.env.get("OMP_NUM_THREADS", "torch default")
    lines = [
        "# Third-party pretrained CIFAR-10 ResNets (shared/data/pretrained)", "",
        (f"Written by `python benchmarks/pretrained_cifar.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}` on "
        f"{when}; {platform.machine()}, {os.cpu_count()} CPU cores, OMP_NUM_THREADS={threads}."), "",
        ("Architecture: `examples/cifar_resnet.py` (user code, He et al. 2016, option-A shortcuts); checkpoints as "
        "published (legacy format, `module.` keys, no `num_batches_tracked`). Data: CIFAR-10 as JPEG "
        f"(`cifar10-jpg.tar.gz`): test split for accuracy, {args.calib_images} seeded training images for "
        "calibration. JPEG compression costs a few points against the published PNG figures."), "",
        f"## Through the CLI (`convert --mac-budget {args.mac_budget} --calib-data`)", "",
        ("| checkpoint | test images | original top-1 (%) | converted + calibrated top-1 (%) | change (points) "
        "| conv MACs | converted convs |"),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['checkpoint']} | {r['images']} | {pct(r['original'])} | {pct(r['calibrated'])} "
                     f"| {100 * (r['calibrated'] - r['original']):+.2f} | x{r['conv_mac_ratio']:.3f} "
                     f"| {r['converted_layers']} |")
    recipe_rows = [r for r in rows if r.get("recipe")]
    if recipe_rows:
        ft = "off" if args.finetune == "none" else f"time budget {args.finetune}"
        lines += ["", f"## Through the recipe (`converters/{RECIPE.name}`, fine-tuning {ft})", "",
                  "| checkpoint | stage | top-1 (%) |", "|---|---|---:|"]
        for r in recipe_rows:
            for stage in r["recipe"].get("accuracy_stages") or []:
                lines.append(f"| {r['checkpoint']} | {stage['name']} | {pct(stage.get('top1'))} |")
        lines += ["", "| checkpoint | EP | batch | original ms | converted ms | speedup |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in recipe_rows:
            for lat in r["recipe"].get("latency") or []:
                if lat.get("original_ms"):
                    lines.append(f"| {r['checkpoint']} | {lat['provider']} | {lat.get('batch', '-')} "
                                 f"| {lat['original_ms']:.3f} | {lat['converted_ms']:.3f} | {lat['speedup']:.2f}x |")
    lines += ["", "## Commands", "", "PYTHONPATH holds `examples/` (the user's code) and the repository.", "", "```"]
    lines += [f"{c.command}    # {round(c.seconds, 1)} s" for c in run.log]
    lines += ["```"]
    printed = sorted({p for c in run.log for p in c.preprocessing})
    if printed:
        lines += ["", "Preprocessing the commands printed:", "", "```", *printed, "```"]
    write_text(out, "\n".join(lines) + "\n")
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="a CIFAR-10 folder with train/ and test/ (default: extract the "
                                              "tarball's test split + a training subset to a temp folder)")
    ap.add_argument("--checkpoints", type=Path, nargs="*", help=f"default: {PRETRAINED}/*.th")
    ap.add_argument("--mac-budget", default="0.5")
    ap.add_argument("--calib-images", type=int, default=2000, help="training images extracted for calibration")
    ap.add_argument("--calib-batches", type=int, default=32, help="x 64 images")
    ap.add_argument("--finetune", default="none", help="'none' or the recipe's fine-tuning time budget, e.g. 10m")
    ap.add_argument("--no-recipe", action="store_true", help="skip the `dsdeploy run` part")
    ap.add_argument("--limit", type=int, help="score at most N test images (a quick check, not for the table)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the commands")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS-pretrained.md")
    args = ap.parse_args()
    checkpoints = args.checkpoints or sorted(PRETRAINED.glob("*.th"))
    if not checkpoints:
        sys.exit(f"no checkpoints: none in {PRETRAINED}")
    temp = Path(tempfile.mkdtemp(prefix="dsdeploy-pretrained-"))
    try:
        data = args.data or extract(temp / "cifar10", args.calib_images, args.seed)
        if not ((data / "train").is_dir() and (data / "test").is_dir()):
            sys.exit(f"{data}: expected train/ and test/ class folders")
        run = Runner(args.threads)
        rows = [bench_checkpoint(th.resolve(), data, temp, args, run) for th in checkpoints]
        write_results(rows, run, args, args.out)
    finally:
        shutil.rmtree(temp)  # the temp folder this script made, nothing else


if __name__ == "__main__":
    main()
