"""Start-up time of training vs number of image files: from interpreter start to the first optimizer step.

Writes N tiny PNG files (one 32x32 PNG's bytes, N times) in ImageFolder layout (2 classes), then,
in a fresh Python process per measurement, times: importing dsdeploy, ``load_data`` (listing and
split), the first batch of the training loader, and one SGD step of a small CNN. Runs it against
this tree and, with ``--baseline DIR``, against another checkout (e.g. the code before the data
pipeline change, whose loader decoded every file of the split before the first batch).

    nice -n 19 python benchmarks/data_startup.py --sizes 1000 10000 100000 \
        --baseline /path/to/old/checkout --out benchmarks/RESULTS-data-startup.md
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from torch import nn
from dsdeploy.data.datasets import Preprocess, load_data
from dsdeploy.recover.epoch import train_loader
t_import = time.perf_counter()
pre = Preprocess(size=(32, 32), resize=None, mean=(0.5,), std=(0.25,), channels=3)
splits = load_data(sys.argv[1], pre, val_split=0.1, seed=0)
n = len(splits.train)  # the old loader decoded the whole split here
t_list = time.perf_counter()
x, y = next(iter(train_loader(splits.train, 64, 0)))
t_batch = time.perf_counter()
model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
nn.functional.cross_entropy(model(x), y).backward()
opt.step()
t_step = time.perf_counter()
print(json.dumps({"train": n, "import": t_import - t0, "load_data": t_list - t_import,
                  "first_batch": t_batch - t_list, "first_step": t_step - t0}))
"""


def make_folder(root: Path, n: int) -> None:
    """``root/{a,b}/*.png``: ``n`` copies of one 32x32 PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 30, 200)).save(buf, "PNG")
    png = buf.getvalue()
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    for i in range(n):
        with open(root / ("a", "b")[i % 2] / f"{i:07d}.png", "wb") as f:
            f.write(png)


def measure(tree: Path, data: Path) -> dict:
    """One fresh process timing start-up against the code in ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(data)], env=env, capture_output=True, text=True,
                         check=True, cwd=tree)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process"] = time.perf_counter() - t
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout to compare with")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs per size")
    ap.add_argument("--out", type=Path, default=None, help="markdown table to write")
    args = ap.parse_args()
    rows = []
    trees = [("this tree", HERE)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            make_folder(data, n)
            for name, tree in trees:
                best = min((measure(tree, data) for _ in range(args.repeats)), key=lambda r: r["first_step"])
                rows.append({"files": n, "code": name, **best})
                print(json.dumps(rows[-1]), flush=True)
    lines = ["# Start-up time vs number of image files", "",
             ("From interpreter start to the end of the first SGD step (import dsdeploy, `load_data` listing + "
             "split, first batch of `train_loader` (64 images, workers 0), one step of a small CNN); best of "
             f"{args.repeats} fresh processes. Files: one 32x32 PNG written N times, 2 class folders, val_split 0.1."),
             ("Run under `nice -n 19` on a shared 2-core machine while another benchmark ran: absolute numbers are "
             "pessimistic, the growth with N is the point."), "",
             "Command: `nice -n 19 python benchmarks/data_startup.py " + " ".join(sys.argv[1:]) + "`", "",
             "| files | code | train items | import s | load_data s | first batch s | to first step s |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['files']:,} | {r['code']} | {r['train']:,} | {r['import']:.2f} | {r['load_data']:.2f} | "
                     f"{r['first_batch']:.2f} | {r['first_step']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
