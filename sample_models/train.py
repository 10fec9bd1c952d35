"""Train the shipped sample models (``sample:digits_cnn``, ``sample:cifar_resnet``).

Usage (from the repository root)::

    python sample_models/train.py digits  --out sample_models [--epochs 30] [--seed 0]
    python sample_models/train.py cifar10 --out sample_models [--epochs 6] [--seed 0] [--data DIR]

CIFAR-10 comes from ``--data DIR`` (ImageFolder with train/ and test/) or is extracted
from ``../shared/data/cifar10-jpg.tar.gz`` into a temporary folder (never into the repo).
Writes ``NAME.pt`` (state_dict) and ``NAME.json`` (arch, input shape, preprocessing,
labels, test accuracy, sha256, command, train time, torch version).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsdeploy.data.datasets import DIGITS_PREPROCESS, Preprocess, load_data, make_loader  # noqa: E402
from dsdeploy.fsutil import atomic_path, sha256_file, write_json  # noqa: E402
from dsdeploy.models.samples import SAMPLES, sample_arch  # noqa: E402

DEFAULT_TAR = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
CIFAR_PRE = Preprocess(size=(32, 32), resize=None, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                       channels=3)
# name -> (sample, dataset preprocessing, augment, epochs, batch, peak lr, weight decay, label smoothing)
RECIPES = {
    "digits": ("digits_cnn", DIGITS_PREPROCESS, False, 30, 64, 0.05, 5e-4, 0.0),
    "cifar10": ("cifar_resnet", CIFAR_PRE, True, 6, 256, 0.4, 5e-4, 0.1),
}


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x.contiguous(memory_format=torch.channels_last)).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def _cifar_dir(data: str | None, tmp: Path) -> str:
    if data:
        return data
    if not DEFAULT_TAR.is_file():
        sys.exit(f"error: {DEFAULT_TAR} not found; pass --data DIR (CIFAR-10 ImageFolder with train/ and test/)")
    with tarfile.open(DEFAULT_TAR) as tar:
        tar.extractall(tmp, filter="data")
    roots = [p.parent for p in tmp.rglob("train") if p.is_dir() and (p.parent / "test").is_dir()]
    return str(roots[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", choices=sorted(RECIPES))
    ap.add_argument("--out", default=str(ROOT / "sample_models"))
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="CIFAR-10 ImageFolder (default: extract the shared tarball)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    name, base_pre, augment, epochs, batch, lr, wd, smoothing = RECIPES[args.dataset]
    epochs = args.epochs or epochs
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="dsdeploy-train-"))
    try:
        spec = "digits" if args.dataset == "digits" else _cifar_dir(args.data, tmp)
        t0 = time.time()
        pre = Preprocess.from_dict(base_pre.to_dict(), augment=augment)
        splits = load_data(spec, pre, seed=args.seed)
        print(f"data: {len(splits.train)} train / {len(splits.val)} test, skipped {splits.skipped}, "
              f"{time.time() - t0:.0f}s", flush=True)
        model = sample_arch(name).to(memory_format=torch.channels_last)
        params_bn = [p for n, p in model.named_parameters() if p.ndim <= 1]
        params_w = [p for n, p in model.named_parameters() if p.ndim > 1]
        opt = torch.optim.SGD([{"params": params_w, "weight_decay": wd}, {"params": params_bn, "weight_decay": 0}],
                              lr=lr, momentum=0.9, nesterov=True)
        train_loader = make_loader(splits.train, batch, shuffle=True, seed=args.seed)
        test_loader = make_loader(splits.val, 512, shuffle=False)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(train_loader),
                                                    pct_start=0.25)
        t_train = time.time()
        for epoch in range(epochs):
            model.train()
            te, loss_sum, correct, seen = time.time(), 0.0, 0, 0
            for x, y in train_loader:
                out = model(x.contiguous(memory_format=torch.channels_last))
                loss = F.cross_entropy(out, y, label_smoothing=smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += float(loss.detach()) * len(y)
                correct += int((out.argmax(1) == y).sum())
                seen += len(y)
            print(f"epoch {epoch + 1}/{epochs}: loss {loss_sum / seen:.4f} train acc {correct / seen:.4f} "
                  f"({time.time() - te:.0f}s)", flush=True)
        train_s = time.time() - t_train
        acc = accuracy(model, test_loader)
        print(f"test accuracy {acc:.4f}; train time {train_s:.0f}s", flush=True)
        model = model.to(memory_format=torch.contiguous_format).eval()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        out = Path(args.out)
        with atomic_path(out / f"{name}.pt") as p:
            torch.save(state, p)
        digest = sha256_file(out / f"{name}.pt")
        write_json(out / f"{name}.json", {
            "name": name, "arch": f"dsdeploy.models.samples.{type(model).__name__}",
            "description": SAMPLES[name].description, "dataset": args.dataset,
            "input_shape": list(pre.input_shape(1)), "preprocessing": base_pre.to_dict(),
            "labels": splits.classes, "accuracy": round(acc, 4),
            "eval": {"data": "digits" if args.dataset == "digits" else "cifar10 test/ (10,000 images)",
                     "split": "val", "val_split": 0.2, "seed": args.seed, "images": len(splits.val)},
            "params": sum(p.numel() for p in model.parameters()), "sha256": digest,
            "command": "python sample_models/train.py " + " ".join(sys.argv[1:]),
            "epochs": epochs, "train_seconds": round(train_s, 1), "torch": torch.__version__,
            "recipe": {"optimizer": "SGD nesterov momentum 0.9", "schedule": "OneCycleLR pct_start 0.25",
                       "batch": batch, "max_lr": lr, "weight_decay": wd, "label_smoothing": smoothing,
                       "augment": "random crop (pad size//8) + horizontal flip" if augment else "none"},
        })
        print(f"wrote {out / name}.pt ({digest[:12]}) and .json", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not math.isfinite(acc):
        sys.exit(1)


if __name__ == "__main__":
    main()
