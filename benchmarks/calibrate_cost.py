"""Calibration cost on a torchvision ResNet-18 (random weights, synthetic images): seconds and per-layer errors.

    PYTHONPATH=. python benchmarks/calibrate_cost.py [--rounds N] [--cache-mb MB] [--batches 32] [--batch-size 8]

Converts resnet18 (3x224x224) at rank 1, then times :func:`dsdeploy.recover.reconstruct.calibrate` on
``--batches`` batches of ``--batch-size`` random images (timing only; the errors are not meaningful
for random weights). Options the code in use does not know are not passed (to time the old code).
"""

from __future__ import annotations

import argparse
import inspect
import json
import time

import torch
import torchvision

from dsdeploy.conversion.rewrite import convert
from dsdeploy.recover.reconstruct import calibrate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--cache-mb", type=float, default=None)
    ap.add_argument("--batches", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(0)
    teacher = torchvision.models.resnet18(num_classes=1000).eval()
    res = convert(teacher, input_shape=(1, 3, 224, 224), rank=args.rank)
    g = torch.Generator().manual_seed(0)
    loader = [torch.randn(args.batch_size, 3, 224, 224, generator=g) for _ in range(args.batches)]
    known = inspect.signature(calibrate).parameters
    extra = {k: v for k, v in (("rounds", args.rounds), ("cache_mb", args.cache_mb)) if v is not None and k in known}
    t0 = time.perf_counter()
    report = calibrate(res.model, teacher, res.plan, loader, progress=False, **extra)
    seconds = time.perf_counter() - t0
    out = {"threads": torch.get_num_threads(), "layers": len(report.layers), "seconds": round(seconds, 1),
           "fit_seconds": round(getattr(report, "fit_seconds", seconds), 1),
           "options": extra, "cache": getattr(report, "cache", None),
           "mean_error_after": sum(c.error_after for c in report.layers) / max(1, len(report.layers))}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
