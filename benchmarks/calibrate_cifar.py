"""Training-free calibration of the third-party CIFAR ResNet-32 at --mac-budget 0.17: pointwise-only vs alternating.

    PYTHONPATH=.:examples python benchmarks/calibrate_cifar.py --weights resnet32-d509ac18.th --data CIFAR10_DIR

Converts ``cifar_resnet:resnet32`` (examples/) at a MAC budget, calibrates on ``--batches`` x 64 training
images (a seeded subset of ``--limit`` train images) with ``rounds=0, cache_mb=0`` (the previous
calibration: pointwise weights only, a network-prefix pass per layer) and with the defaults
(alternating rounds, stage cache), and scores top-1 on ``--limit`` test images. Prints one JSON line per setting.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import time

import torch
from torch.utils.data import Subset

from dsdeploy import api
from dsdeploy.conversion.plan import Policy
from dsdeploy.data.datasets import load_data, make_loader
from dsdeploy.data.preprocessing import Preprocess
from dsdeploy.recover.distill import evaluate
from dsdeploy.recover import als
from dsdeploy.recover.reconstruct import calibrate

ROWS_MIN = getattr(als, "PATCH_ROWS_MIN", None)

PRE = {"size": [32, 32], "resize": None, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "channels": 3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--mac-budget", type=float, default=0.17)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--settings", default="0:0,3:1024",
                    help="comma-separated rounds:cache_mb[:flag...]; flags: nobn (no final BatchNorm pass), "
                         "noint (no interleaved BatchNorm re-estimation), w (bn_weight: post-BN channel weights), "
                         "full (patch statistics on every row, no subsampling)")
    args = ap.parse_args()
    cm = api.convert("cifar_resnet:resnet32", policy=Policy(mac_budget=args.mac_budget), input_shape=(1, 3, 32, 32),
                     weights=args.weights, model_kwargs={"num_classes": 10}, preprocess=PRE, trust_code=True)
    splits = load_data(args.data, Preprocess.from_dict(PRE), limit=max(args.limit, 64 * args.batches))
    n = min(len(splits.train), 64 * args.batches)
    calib = Subset(splits.train, torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))[:n].tolist())
    loader = make_loader(calib, 64, shuffle=False)
    batches = list(loader)  # decoded once, so the timings below are calibration only
    test = make_loader(Subset(splits.val, range(min(args.limit, len(splits.val)))), 250, shuffle=False)
    print(json.dumps({"original": evaluate(cm.original, test), "naive": evaluate(cm.model, test),
                      "calib_images": n, "test_images": min(args.limit, len(splits.val))}), flush=True)
    for setting in args.settings.split(","):
        rounds, cache_mb, *rest = setting.split(":")
        rounds, cache_mb, bn, inter = int(rounds), float(cache_mb), "nobn" not in rest, "noint" not in rest
        known = inspect.signature(calibrate).parameters
        opts = {k: v for k, v in (("interleave_bn", inter), ("bn_weight", "w" in rest)) if k in known}
        als.PATCH_ROWS_MIN = 1 << 60 if "full" in rest else ROWS_MIN
        model = copy.deepcopy(cm.model)
        t0 = time.perf_counter()
        rep = calibrate(model, cm.original, cm.plan, batches, progress=False, rounds=rounds, cache_mb=cache_mb, bn=bn,
                        **opts)
        print(json.dumps({"setting": setting, "rounds": rounds, "cache_mb": cache_mb, "bn": bn, **opts, "seconds": round(time.perf_counter() - t0, 1),
                          "fit_seconds": round(rep.fit_seconds, 1), "top1": evaluate(model, test), "cache": rep.cache,
                          "sum_error_after": round(sum(c.error_after for c in rep.layers), 4),
                          "sum_error_bn": round(sum(c.error_bn or 0 for c in rep.layers), 4)}), flush=True)
        print(rep.render(), flush=True)


if __name__ == "__main__":
    main()
