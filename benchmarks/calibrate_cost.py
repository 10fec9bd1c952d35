"""Calibration cost on a torchvision model (random weights, synthetic images): seconds per layer and in all.

    PYTHONPATH=. python benchmarks/calibrate_cost.py [--model resnet18] [--rounds N] [--cache-mb MB|auto]
        [--batches 32] [--batch-size 8] [--rank 1 | --mac-budget 0.5] [--size 224] [--eval-images 0]

Converts ``--model`` (3 x ``--size`` x ``--size``) at ``--rank`` (or ``--mac-budget``, spectral allocation),
then times :func:`dsdeploy.recover.reconstruct.calibrate` on ``--batches`` batches of ``--batch-size``
random images (timing only; the errors are not meaningful for random weights). ``--eval-images N`` also
scores N random images before and after (as the CLI's default 2,000 does; random labels). Prints one JSON
line: total, fit / final BatchNorm / scoring seconds, each layer's seconds (flat in depth = linear cost;
growing = the network prefix rerun per layer) and the stage-cache use. Options the code in use does not
know are not passed (to time the old code).

The issue-11 case (ResNet-50 at 224 on 2,048 images, what ``convert --calib-batches 32`` does):
``--model resnet50 --mac-budget 0.5 --batches 32 --batch-size 64``.
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
    ap.add_argument("--model", default="resnet18", help="a torchvision.models builder name")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--cache-mb", default=None, help="MiB or auto (default: the code's default)")
    ap.add_argument("--batches", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--mac-budget", type=float, default=None, help="instead of --rank: all conv MACs x this")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--eval-images", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(0)
    teacher = getattr(torchvision.models, args.model)(num_classes=1000).eval()
    shape = (1, 3, args.size, args.size)
    t0 = time.perf_counter()
    policy = {"mac_budget": args.mac_budget, "allocation": "spectral"} if args.mac_budget else {"rank": args.rank}
    res = convert(teacher, input_shape=shape, **policy)
    convert_seconds = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    loader = [torch.randn(args.batch_size, *shape[1:], generator=g) for _ in range(args.batches)]
    known = inspect.signature(calibrate).parameters
    cache = args.cache_mb if args.cache_mb in (None, "auto") else float(args.cache_mb)
    extra = {k: v for k, v in (("rounds", args.rounds), ("cache_mb", cache)) if v is not None and k in known}
    if args.eval_images and "eval_images" in known:
        images = [torch.randn(min(64, args.eval_images - i), *shape[1:], generator=g)
                  for i in range(0, args.eval_images, 64)]
        extra["eval_loader"] = [(x, torch.randint(0, 1000, (x.shape[0],), generator=g)) for x in images]
        extra["eval_images"] = args.eval_images
    t0 = time.perf_counter()
    report = calibrate(res.model, teacher, res.plan, loader, progress=False, **extra)
    seconds = time.perf_counter() - t0
    out = {"model": args.model, "images": args.batches * args.batch_size, "size": args.size,
           "threads": torch.get_num_threads(), "layers": len(report.layers), "convert_seconds": round(convert_seconds, 1),
           "seconds": round(seconds, 1), **{k: round(getattr(report, k), 1) for k in
                                            ("fit_seconds", "bn_seconds", "eval_seconds") if hasattr(report, k)},
           "options": {k: v for k, v in extra.items() if k != "eval_loader"}, "cache": getattr(report, "cache", None),
           "layer_seconds": {c.name: round(getattr(c, "seconds", 0.0), 1) for c in report.layers},
           "mean_error_after": sum(c.error_after for c in report.layers) / max(1, len(report.layers))}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
