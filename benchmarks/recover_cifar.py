"""Accuracy recovery on CIFAR-10: original -> naive SVD -> calibration -> fine-tuning under a time budget.

Runs the real CLI commands (convert, calibrate, finetune) on ``sample:cifar_resnet`` and
the CIFAR-10 JPEG folder, then writes ``benchmarks/RESULTS-recover.md`` with the
accuracies (CIFAR-10 test split, 10,000 images) and the exact commands.

    python benchmarks/recover_cifar.py                       # extracts ../shared/data/cifar10-jpg.tar.gz
    python benchmarks/recover_cifar.py --data /tmp/cifar10   # an extracted train/ + test/ folder
    python benchmarks/recover_cifar.py --data /tmp/cifar --threads 1   # the committed run (shared 2-core machine)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARBALL = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


def extract(dest: Path) -> Path:
    """Extract the CIFAR-10 JPEG tarball once; return the folder holding train/ and test/."""
    for cand in (dest, *dest.glob("*")):
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            return cand
    if not TARBALL.is_file():
        sys.exit(f"CIFAR-10 not found: pass --data DIR or put the tarball at {TARBALL}")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(TARBALL) as tar:
        tar.extractall(dest, filter="data")
    return extract(dest)


def run(cmd: list[str], log: list[dict], threads: int | None) -> dict:
    """Run one dsdeploy command (JSON output), record its command line and wall time."""
    t = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, "-m", "dsdeploy", *cmd], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    secs = time.perf_counter() - t
    shown = "dsdeploy " + " ".join(shlex.quote(c) for c in cmd)
    print(f"[{secs:7.1f}s] {shown}", flush=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {shown}\n{proc.stderr[-2000:]}")
    log.append({"command": shown, "seconds": round(secs, 1)})
    return json.loads(proc.stdout)


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/dsdeploy-cifar10"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/dsdeploy-recover"))
    ap.add_argument("--mac-budget", default="0.25")
    ap.add_argument("--calib-batches", default="50")
    ap.add_argument("--time-budget", default="10m")
    ap.add_argument("--finetune-args", help="extra finetune options (quoted)",
                    default="--lr 0.05 --warmup-epochs 0.2 --batch-size 128 --augment --feature-weight 0.5 --ce-weight 0.5")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for the commands (default: torch's own choice)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS-recover.md")
    args = ap.parse_args()
    data = extract(args.data)
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []
    t0 = time.perf_counter()
    conv = run(["convert", "sample:cifar_resnet", "--mac-budget", args.mac_budget, "-o", str(w / "naive.dsd"),
                "--json"], log, args.threads)
    cal = run(["calibrate", str(w / "naive.dsd"), "--data", str(data), "-o", str(w / "calibrated.dsd"),
               "--max-batches", args.calib_batches, "--json"], log, args.threads)
    ft = run(["finetune", str(w / "calibrated.dsd"), "--data", str(data), "-o", str(w / "finetuned.dsd"),
              "--time-budget", args.time_budget, *shlex.split(args.finetune_args), "--json"], log, args.threads)
    total = time.perf_counter() - t0
    orig = ft["teacher_accuracy"]
    rows = [("original (sample:cifar_resnet)", orig), ("naive SVD (convert only)", cal["accuracy_before"]),
            ("after calibration", cal["accuracy_after"]),
            (f"after finetune --time-budget {args.time_budget}", ft["best_accuracy"])]
    s = conv["summary"]
    lines = [
        "# Accuracy recovery on CIFAR-10 (sample:cifar_resnet)", "",
        f"Written by `python benchmarks/recover_cifar.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{'OMP_NUM_THREADS=' + str(args.threads) if args.threads else 'default torch threads'}.", "",
        f"Conversion: `--mac-budget {args.mac_budget}`: {s['converted']} of {s['convs']} convs converted, "
        f"conv MACs x{s['conv_mac_ratio']:.3f}, all MACs x{s['mac_ratio']:.3f}, "
        f"params {s['params']} -> {s['params_after']}.", "",
        "| model | top-1 (%) on CIFAR-10 test (10,000) | vs original (points) |", "|---|---:|---:|",
        *[f"| {name} | {pct(v)} | {'' if v is None or orig is None else f'{100 * (v - orig):+.2f}'} |"
          for name, v in rows], "",
        f"Calibration: {cal['images']} training images, {len(cal['layers'])} layers, {cal['seconds']:.0f} s; "
        f"re-estimated {cal['bn_layers']} BatchNorm layers.", "",
        "| layer | rel. output error before | after |", "|---|---:|---:|",
        *[f"| {c['name']} | {c['error_before']:.4f} | {c['error_after']:.4f} |" for c in cal["layers"]], "",
        f"Fine-tuning: {ft['epochs']} epochs, {ft['steps']} steps, stopped: {ft['stopped']}, {ft['seconds']:.0f} s "
        f"inside the command; best epoch {ft['best_epoch']}. The validation split that picks the best epoch is "
        f"the test/ folder (the only held-out split in the data).", "",
        "| epoch | train loss | train acc | val acc | lr | images/s | seconds |", "|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {h['epoch']} | {h['train_loss']:.4f} | {pct(h['train_acc'])} | {pct(h['val_acc'])} | {h['lr']:.5f} | "
          f"{h['images_per_s']:.0f} | {h['seconds']:.0f} |" for h in ft["history"]], "",
        f"Total wall time {total / 60:.1f} min. Commands (DATA = the extracted CIFAR-10 folder):", "",
        "```", *[f"{c['command'].replace(str(data), 'DATA')}    # {c['seconds']} s" for c in log], "```", "",
    ]
    from dsdeploy.fsutil import write_text

    write_text(args.out, "\n".join(lines))
    print("\n".join(lines[:14]))


if __name__ == "__main__":
    main()
