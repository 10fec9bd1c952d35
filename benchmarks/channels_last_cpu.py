"""Does channels-last (NHWC) pay for fine-tuning on the CPU? dsdeploy's training step, NHWC vs NCHW (and bf16).

Two students: ``sample:digits_cnn`` (1x16x16 digits) and the third-party CIFAR ResNet-32
(``examples/cifar_resnet.py`` + ``resnet32-d509ac18.th``, 3x32x32 CIFAR-10 JPEGs), each converted
at ``--mac-budget 0.35``. One step is exactly the fine-tune loop's (:mod:`dsdeploy.recover.epoch`):
the :class:`Distiller` (teacher forward + student forward, KD + CE), then
:class:`dsdeploy.recover.device.Precision` backward/clip/SGD step, on one fixed batch of real
images. The configurations (NHWC/NCHW x fp32/bf16) take turns step by step, so a machine whose
load drifts slows them alike; the figure is the FASTEST step of each (the least disturbed; the
median is shown too). Results go to ``benchmarks/RESULTS-channels-last.md``.

    python benchmarks/channels_last_cpu.py [--steps 15] [--batch-size 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from dsdeploy import api
from dsdeploy.data.datasets import Preprocess, load_data, make_loader
from dsdeploy.fsutil import write_text
from dsdeploy.recover.device import Precision
from dsdeploy.recover.distill import Distiller, LossWeights

PRETRAINED = Path(os.environ.get("DSDEPLOY_PRETRAINED", ROOT.parent / "shared/data/pretrained"))
CIFAR = Path(os.environ.get("DSDEPLOY_CIFAR", "/work/data/cifar10"))


def students(images: int):
    """(name, converted model, original, data splits) for each student measured."""
    cm = api.convert("sample:digits_cnn", mac_budget=0.35)
    yield "digits_cnn 1x16x16", cm.model, cm.original, load_data("digits", Preprocess.from_dict(cm.preprocessing))
    weights = PRETRAINED / "resnet32-d509ac18.th"
    if weights.is_file() and (CIFAR / "train").is_dir():
        cm = api.convert("cifar_resnet:resnet32", weights=str(weights), input_shape=(1, 3, 32, 32), mac_budget=0.35,
                         trust_code=True)
        pre = Preprocess(size=(32, 32), resize=None, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), channels=3)
        yield "CIFAR ResNet-32 3x32x32", cm.model, cm.original, load_data(str(CIFAR / "train"), pre, limit=images)


CONFIGS = [("NHWC", "fp32"), ("NCHW", "fp32"), ("NHWC", "bf16"), ("NCHW", "bf16")]


def step_times(student, teacher, splits, steps: int, batch_size: int) -> dict[tuple[str, str], list[float]]:
    """Seconds per training step of each configuration, the configurations taking turns."""
    x, y = next(iter(make_loader(splits.train, batch_size, shuffle=False)))
    runs = {}
    for fmt, prec in CONFIGS:
        s, t = copy.deepcopy(student).train(), copy.deepcopy(teacher).eval()
        mf = torch.channels_last if fmt == "NHWC" else torch.contiguous_format
        s.to(memory_format=mf)
        t.to(memory_format=mf)
        params = [p for p in s.parameters() if p.requires_grad]
        runs[fmt, prec] = (Distiller(s, t, LossWeights()), torch.optim.SGD(params, lr=1e-3, momentum=0.9), params,
                           Precision(torch.device("cpu"), prec), x.contiguous(memory_format=mf))
    times: dict[tuple[str, str], list[float]] = {c: [] for c in CONFIGS}
    for i in range(steps + 2):  # 2 warm-up turns
        for c in CONFIGS:
            dist, opt, params, amp, xb = runs[c]
            t0 = time.perf_counter()
            with amp.autocast():
                loss, _logits, _parts = dist(xb, y)
            opt.zero_grad(set_to_none=True)
            amp.step(loss, opt, params, 5.0)
            if i >= 2:
                times[c].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--images", type=int, default=1024, help="CIFAR images loaded (the batch is the first ones)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS-channels-last.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, student, teacher, splits in students(args.images):
        times = step_times(student, teacher, splits, args.steps, args.batch_size)
        best = {c: args.batch_size / min(v) for c, v in times.items()}
        med = {c: args.batch_size / statistics.median(v) for c, v in times.items()}
        for c in CONFIGS:
            print(f"{name} {c}: best {best[c]:.0f} images/s, median {med[c]:.0f}", flush=True)
        rows.append(f"| {name} | " + " | ".join(f"{best[c]:.0f} ({med[c]:.0f})" for c in CONFIGS) +
                    f" | {best['NHWC', 'fp32'] / best['NCHW', 'fp32']:.2f} |")
    head = " | ".join(f"{f} {p} img/s" for f, p in CONFIGS)
    text = "\n".join([
        "# Channels-last (NHWC) vs NCHW, fp32 vs bf16 autocast, for fine-tuning on the CPU", "",
        (f"`python benchmarks/channels_last_cpu.py --steps {args.steps} --batch-size {args.batch_size} "
        f"--threads {args.threads}`; torch {torch.__version__}; {platform.processor() or platform.machine()}. "
        "dsdeploy's training step (teacher + student forward, KD + CE, backward, clip, SGD) on one batch of "
        "real images; the configurations take turns step by step; best step (median in brackets)."), "",
        f"| student | {head} | NHWC/NCHW fp32 |", "|---|---|---|---|---|---|", *rows, ""])
    write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
