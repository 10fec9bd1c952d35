"""MAC ratios at rank 1 and `convert` wall time for a few torchvision models.

Usage: python benchmarks/convert_stats.py [--out benchmarks/RESULTS-convert.md]
Random-init weights (nothing is downloaded): MAC counts and conversion time do not
depend on weight values. `convert` time is the whole CLI command (process start,
model build, plan, SVDs, rewrite, profiles, artifact write) at 1,3,224,224.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from dsdeploy.conversion.loading import load_model
from dsdeploy.conversion.rewrite import convert
from dsdeploy.fsutil import write_text
from dsdeploy.tables import markdown_table

SHAPE = (1, 3, 224, 224)
CASES = [("resnet18", {}), ("mobilenet_v2", {}), ("mobilenet_v2", {"convert_stem": True}), ("vgg16", {}),
         ("resnet50", {})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/RESULTS-convert.md")
    args = ap.parse_args()
    rows = []
    for name, extra in CASES:
        model = load_model(f"torchvision:{name}").model
        try:
            res = convert(model, input_shape=SHAPE, rank=1, **extra)
        except Exception as exc:  # report, e.g. MobileNetV2 has nothing to convert without its stem
            rows.append([name, str(extra or "default"), "-", "-", "-", f"{type(exc).__name__}: {str(exc)[:80]}"])
            continue
        b, a = res.before, res.after
        rows.append([name, str(extra or "default"), len(res.plan.converted), f"{a.conv_macs / b.conv_macs:.3f}",
                     f"{a.total_params / b.total_params:.3f}", ""])
    timings = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("resnet50", "resnet18"):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "dsdeploy", "convert", f"torchvision:{name}", "-o",
                            os.path.join(tmp, f"{name}.dsd"), "--rank", "1"], check=True, capture_output=True)
            timings.append([name, f"{time.perf_counter() - t:.1f}"])
    text = "\n".join([
        "# Conversion: MAC ratios at rank 1 and convert time", "",
        f"Command: `python {' '.join(sys.argv)}` (input 1,3,224,224; CPU: {os.cpu_count()} cores)", "",
        markdown_table(["model", "policy", "converted convs", "conv MACs after/before", "params after/before",
                        "note"], rows), "",
        "`dsdeploy convert torchvision:NAME -o NAME.dsd --rank 1` wall time (s):", "",
        markdown_table(["model", "seconds"], timings), ""])
    write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
