"""Spectral vs data-aware rank allocation on a third-party pretrained CIFAR ResNet, both calibrated.

    PYTHONPATH=.:examples python benchmarks/allocation_pretrained.py \
        --weights ../shared/data/pretrained/resnet32-d509ac18.th --data /work/data/cifar10 \
        --budget 0.17 0.25 --calib-batches 8 --train-limit 4000 --test-limit 1000

``--data`` holds ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``. Calibration and the
sensitivity pass use a seeded subset of ``train/`` (``--train-limit`` images, ``--calib-batches``
batches of 64); accuracy is on the first ``--test-limit`` of a seeded subset of ``test/``.
Prints one JSON line per allocation and the sensitivity pass's time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

import torch

from dsdeploy.conversion.loading import load_model
from dsdeploy.conversion.plan import Policy
from dsdeploy.conversion.rewrite import convert
from dsdeploy.data.datasets import load_data, make_loader
from dsdeploy.data.preprocessing import resolve
from dsdeploy.recover.distill import evaluate
from dsdeploy.recover.reconstruct import calibrate_data
from dsdeploy.recover.sensitivity import sensitivity_on_data

PRE = {"size": [32, 32], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "channels": 3}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="cifar_resnet:resnet32")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--budget", type=float, nargs="+", default=[0.17], help="one or more MAC budgets")
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--sens-batches", type=int, default=4)
    ap.add_argument("--logit-batches", type=int, default=1)
    ap.add_argument("--train-limit", type=int, default=4000)
    ap.add_argument("--test-limit", type=int, default=1000)
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.spec, args.weights, {"num_classes": 10}, trust_code=True)
    shape = (1, 3, 32, 32)
    train, test = str(Path(args.data) / "train"), str(Path(args.data) / "test")
    pre = resolve(None, shape, PRE, data=train, model=loaded.model)
    test_split = load_data(test, pre, val_split=0.0, limit=args.test_limit, seed=0)
    test_loader = make_loader(test_split.train, 250, shuffle=False)
    out = {"spec": args.spec, "original": evaluate(loaded.model, test_loader)}
    print(json.dumps(out), flush=True)
    t0 = time.perf_counter()
    table = sensitivity_on_data(loaded.model, Policy(mac_budget=min(args.budget)), train, pre, shape, batch_size=64,
                                max_batches=args.calib_batches, limit=args.train_limit, batches=args.sens_batches,
                                logit_batches=args.logit_batches)
    print(json.dumps({"sensitivity_seconds": round(time.perf_counter() - t0, 1), **table.summary()}), flush=True)
    for budget, allocation in ((b, a) for b in args.budget for a in ("spectral", "data")):
        costs = table.costs() if allocation == "data" else None
        res = convert(loaded.model, input_shape=shape, mac_budget=budget, costs=costs, cost_name="kl")
        ranks = {d.name: d.rank for d in res.plan.converted}
        summed = sum(table.layers[n][r]["logit_error"] for n, r in ranks.items() if r in table.layers[n])
        naive = evaluate(res.model, test_loader)
        t1 = time.perf_counter()
        cal = calibrate_data(res.model, loaded.model, res.plan, train, pre, max_batches=args.calib_batches,
                             limit=args.train_limit, progress=False)
        row = {"budget": budget, "allocation": allocation,
               "conv_mac_ratio": round(res.after.conv_macs / res.before.conv_macs, 4),
               "summed_logit_kl": round(summed, 4), "naive": naive, "calibrated": evaluate(res.model, test_loader),
               "calib_seconds": round(time.perf_counter() - t1, 1), "ranks": ranks,
               "solver": res.plan.policy.get("solver"),
               "layer_errors_after_calibration": {c.name: round(c.error_after, 4) for c in cal.layers}}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
