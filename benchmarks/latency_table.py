"""How long a latency table takes to build (cold and warm), what it says, and how well it predicts.

Usage (the command behind benchmarks/RESULTS-latency-table.md):
    python benchmarks/latency_table.py --model resnet18 --batch 1 --threads 2 \\
        --out benchmarks/RESULTS-latency-table.md

Builds :func:`dsdeploy.runtime.latency_table.latency_table` for a torchvision model (random
init: latency does not depend on weight values) at 3x224x224 on the CPU EP, in a fresh cache
folder (cold), then again (warm: everything from the cache). Then it predicts the latency of
the rank-1 conversion (every candidate at rank 1, ``branches`` layout: the table's remainder +
each layer's rank-1 ms) and measures that converted model, exported whole, by the same timing
protocol: the prediction error says how far single-layer graphs are from the layers in a model.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import tempfile
import time

import torch
import torchvision

from dsdeploy.conversion.rewrite import convert
from dsdeploy.export.onnx_export import export_bytes
from dsdeploy.fsutil import write_text
from dsdeploy.runtime.latency_table import TABLE_PROTOCOL, latency_table
from dsdeploy.runtime.timing import Protocol, measure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-rank", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)().eval()
    shape = (args.batch, 3, 224, 224)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dsdeploy-lat-") as cache:
        kw = {"threads": args.threads, "cache_dir": cache, "max_rank": args.max_rank, "name": args.model}
        t0 = time.perf_counter()
        cold = latency_table(model, shape, **kw)
        t_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = latency_table(model, shape, **kw)
        t_warm = time.perf_counter() - t0
        low = latency_table(model, shape, protocol=dataclasses.replace(TABLE_PROTOCOL, statistic="min"), **kw)
    conv = convert(model, input_shape=shape, rank=1, layout="branches").model.eval()
    proto = Protocol(warmup=5, iters=50)
    whole = measure(export_bytes(model, shape), threads=args.threads, protocol=proto, batch=shape[0])
    measured = measure(export_bytes(conv, shape), threads=args.threads, protocol=proto, batch=shape[0])
    predicted = {t.protocol: t.remainder_ms + sum(lt.block(1, "branches").ms for lt in t.candidates)
                 for t in (cold, low)}
    seen, rows = set(), []
    for lt in cold.candidates:
        if lt.key in seen:
            continue
        seen.add(lt.key)
        b = lt.fastest(1)
        lo = next(x for x in low.candidates if x.name == lt.name)
        rows.append(f"| {lt.name} | {'x'.join(map(str, lt.spec['input_shape']))} | {lt.spec['out_channels']} | "
                    f"{lt.spec['stride']} | {lt.dense_ms:.3f} / {lo.dense_ms:.3f} | {lt.block(1, 'branches').ms:.3f} / "
                    f"{lo.block(1, 'branches').ms:.3f} | {b.ms:.3f} ({b.layout}) | {lt.dense_ms / b.ms:.2f}x / "
                    f"{lo.dense_ms / lo.fastest(1).ms:.2f}x |")
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    text = f"""# Latency table: build time and prediction ({args.model}, batch {args.batch}, {args.threads} threads, CPU EP)

Produced by:

```
{cmd}
```

Environment: {cold.environment['device']}, onnxruntime {cold.environment['onnxruntime']}; load average
(1/5/15 min) before: {[round(v, 2) for v in load]} (the machine is shared: absolute numbers are noisy).
Protocol: {cold.protocol}.

- Cold build (fresh cache): {t_cold:.1f} s, {cold.measured} graphs measured ({len(cold.candidates)} candidate
  convs, {len(seen)} distinct shapes).
- Warm build (same cache): {t_warm:.1f} s, {warm.measured} graphs measured, {warm.reused} read from the cache
  (the time is loading + tracing the model).
- Whole model (table): {cold.model_ms:.3f} ms; not converted (whole - dense convs): {cold.remainder_ms:.3f} ms.

## Dense vs rank 1, one row per distinct layer shape

| first layer | input | Cout | stride | dense ms (median / min) | rank-1 branches ms (median / min) | rank-1 fastest ms (median) | speedup (median / min) |
|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + f"""

## Predicted vs measured: the rank-1 conversion (branches), whole model exported

| | median ms | min ms |
|---|---|---|
| original, whole model exported ({proto.describe()} / min) | {whole.p50_ms:.3f} | {whole.min_ms:.3f} |
| original, whole model in the table | {cold.model_ms:.3f} | {low.model_ms:.3f} |
| rank 1, predicted (table remainder + sum of rank-1 layer ms) | {predicted[cold.protocol]:.3f} | {predicted[low.protocol]:.3f} |
| rank 1, measured whole | {measured.p50_ms:.3f} | {measured.min_ms:.3f} |
| prediction error | {100 * (predicted[cold.protocol] - measured.p50_ms) / measured.p50_ms:+.1f} % | {100 * (predicted[low.protocol] - measured.min_ms) / measured.min_ms:+.1f} % |
| speedup measured (predicted) | {whole.p50_ms / measured.p50_ms:.2f}x ({cold.model_ms / predicted[cold.protocol]:.2f}x) | {whole.min_ms / measured.min_ms:.2f}x ({low.model_ms / predicted[low.protocol]:.2f}x) |
"""
    print(text)
    if args.out:
        write_text(args.out, text)


if __name__ == "__main__":
    main()
