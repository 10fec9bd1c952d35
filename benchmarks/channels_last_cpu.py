"""Does channels-last (NHWC) pay for fine-tuning on the CPU? dsdeploy's own loop, NHWC vs NCHW.

Two students: ``sample:digits_cnn`` (1x16x16 digits) and the third-party CIFAR ResNet-32
(``examples/cifar_resnet.py`` + ``resnet32-d509ac18.th``, 3x32x32 CIFAR-10 JPEGs), each converted
at ``--mac-budget 0.35``. Each round fine-tunes a fresh copy for one epoch with
``channels_last`` on, then off (the order alternates per round, so drift in the machine's load
falls on both); the figure is the history's ``images_per_s`` (training steps only), the median
over rounds. Results go to ``benchmarks/RESULTS-channels-last.md``.

    python benchmarks/channels_last_cpu.py [--rounds 3] [--images 1024] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from dsdeploy import api  # noqa: E402
from dsdeploy.data.datasets import Preprocess, load_data  # noqa: E402
from dsdeploy.fsutil import write_text  # noqa: E402
from dsdeploy.recover.config import FinetuneConfig  # noqa: E402
from dsdeploy.recover.finetune import finetune  # noqa: E402

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


def one_epoch(student, teacher, splits, channels_last: bool, batch_size: int) -> float:
    cfg = FinetuneConfig(epochs=1, batch_size=batch_size, channels_last=channels_last, progress=False, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        res = finetune(copy.deepcopy(student), teacher, splits, cfg, out_path=Path(tmp) / "o.dsd")
    return res.history[0]["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=1024, help="CIFAR images (train+val)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS-channels-last.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, student, teacher, splits in students(args.images):
        per = {True: [], False: []}
        for r in range(args.rounds):
            for cl in ((True, False) if r % 2 == 0 else (False, True)):
                per[cl].append(one_epoch(student, teacher, splits, cl, args.batch_size))
                print(f"{name} round {r + 1} channels_last={cl}: {per[cl][-1]:.0f} images/s", flush=True)
        nhwc, nchw = statistics.median(per[True]), statistics.median(per[False])
        rows.append(f"| {name} | {len(splits.train)} | {nhwc:.0f} | {nchw:.0f} | {nhwc / nchw:.2f} |")
    text = "\n".join([
        "# Channels-last (NHWC) vs NCHW for fine-tuning on the CPU", "",
        f"`python benchmarks/channels_last_cpu.py --rounds {args.rounds} --images {args.images} "
        f"--threads {args.threads}`; torch {torch.__version__}; dsdeploy's loop (distillation from the "
        "original, SGD, batch {0}); median images/s of one-epoch rounds, order alternating.".format(args.batch_size),
        "", "| student | train images | NHWC img/s | NCHW img/s | NHWC / NCHW |", "|---|---|---|---|---|", *rows, ""])
    write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
