"""Latency of torchvision CNNs, original vs depthwise-separable, on ONNX Runtime EPs.

Usage (the command behind benchmarks/RESULTS-bench.md):
    python benchmarks/bench_eps.py --providers cpu,openvino --batch 1,8 --threads 2 \\
        --out benchmarks/RESULTS-bench.md

For each of ResNet-18, MobileNetV2 and VGG-16 (torchvision, random init: nothing can be
downloaded here, and latency does not depend on weight values) it builds three ONNX
files at 3x224x224 with a dynamic batch axis: the original, the DS conversion at rank 1,
and the DS conversion under ``--mac-budget 0.25`` (``dsdeploy.conversion.rewrite.convert``), each
carrying its conv MACs in the ``dsdeploy.conv_macs`` metadata. MobileNetV2's only
standard conv is its stem, so it converts with ``convert_stem=True``. Then
``dsdeploy.runtime.bench.bench`` measures each family (original first = baseline) on every EP
and batch size, and one Markdown file collects the tables.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

import torch

from dsdeploy.conversion.rewrite import convert
from dsdeploy.errors import DsdeployError
from dsdeploy.fsutil import write_json, write_text
from dsdeploy.runtime.bench import BenchConfig, bench
from dsdeploy.runtime.bench_report import method_notes, model_notes, render_markdown
from dsdeploy.runtime.inputs import META_CONV_MACS, META_PREPROCESSING
from dsdeploy.runtime.providers import parse_ep_options

ITERS = {"resnet18": 30, "mobilenet_v2": 50, "vgg16": 10}  # VGG-16 batch 8 is ~1-2 s per run on 2 cores
EXTRA = {"mobilenet_v2": {"convert_stem": True}}
VARIANTS = (("rank1", {"rank": 1}), ("mac0.25", {"mac_budget": 0.25}))
PREPROCESSING = {"size": [224, 224], "resize": 256, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                 "channels": 3, "layout": "NCHW"}


def export(model: torch.nn.Module, path: Path, size: int, conv_macs: int) -> str:
    """ONNX (opset 17, dynamic batch) with conv-MAC and preprocessing metadata."""
    import json

    import onnx

    torch.onnx.export(model, torch.randn(1, 3, size, size), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    m = onnx.load(str(path))
    pre = dict(PREPROCESSING, size=[size, size])
    for key, value in ((META_CONV_MACS, str(conv_macs)), (META_PREPROCESSING, json.dumps(pre))):
        m.metadata_props.add(key=key, value=value)
    onnx.save(m, str(path))
    return str(path)


def build_family(name: str, workdir: Path, size: int) -> list[str]:
    """The original and its two DS conversions as ONNX files; the original first."""
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    shape = (1, 3, size, size)
    paths = []
    for tag, policy in VARIANTS:
        res = convert(model, input_shape=shape, **policy, **EXTRA.get(name, {}))
        if not paths:
            paths.append(export(model, workdir / f"{name}.onnx", size, res.before.conv_macs))
        paths.append(export(res.model.eval(), workdir / f"{name}-{tag}.onnx", size, res.after.conv_macs))
        print(f"{name}-{tag}: {len(res.plan.converted)} convs converted, conv MACs x"
              f"{res.after.conv_macs / res.before.conv_macs:.3f}", file=sys.stderr)
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2,vgg16")
    ap.add_argument("--providers", default="cpu,openvino")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=None, help="Timed runs for every model (default: per model).")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--ep-option", action="append", default=[], metavar="EP:KEY=VALUE")
    ap.add_argument("--skip-unavailable", action="store_true", help="Skip EPs not available here.")
    ap.add_argument("--workdir", default=None, help="Keep the ONNX files here (default: a temporary folder).")
    ap.add_argument("--out", default="benchmarks/RESULTS-bench.md")
    ap.add_argument("--json", default=None, help="Also write every report (raw samples included) as JSON.")
    ap.add_argument("--note", default="", help="A caveat printed under the command (e.g. other load on the CPU).")
    args = ap.parse_args(argv)
    command = "python benchmarks/bench_eps.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    with tempfile.TemporaryDirectory(prefix="bench-eps-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        sections, reports = [], []
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            paths = build_family(name, workdir, args.size)
            load_before = [round(v, 2) for v in os.getloadavg()]
            cfg = BenchConfig(providers=args.providers.split(","), batches=[int(b) for b in args.batch.split(",")],
                              threads=args.threads, warmup=args.warmup, iters=args.iters or ITERS.get(name, 20),
                              ep_options=parse_ep_options(args.ep_option), skip_unavailable=args.skip_unavailable)
            report = bench(paths, cfg, progress=lambda what: print(f"  {what}", file=sys.stderr))
            reports.append(report)
            sections.append(render_markdown(report, f"{name}: original vs DS (rank 1, MAC budget 0.25)",
                                            f"{cfg.iters} timed runs after {cfg.warmup} warm-up runs per "
                                            f"EP and batch. Load average (1/5/15 min) before: {load_before}.",
                                            level=2, notes=False))
    preamble = (f"Produced by:\n\n```\n{command}\n```\n\n" + (f"**Note:** {args.note}\n\n" if args.note else "") +
                "Models: torchvision ResNet-18, MobileNetV2 and VGG-16 with random initialisation (no weights "
                "can be downloaded here; latency does not depend on weight values), "
                f"3x{args.size}x{args.size} input, exported "
                "with torch.onnx.export (opset 17, dynamic batch). `-rank1` = every eligible conv at rank 1; "
                "`-mac0.25` = ranks chosen so converted convs keep <= 25% of their MACs. MobileNetV2's only "
                "standard (non-depthwise, non-1x1) conv is its 3-channel stem, converted with convert_stem. "
                "Speedup = baseline p50 / model p50; MAC limit = baseline conv MACs / model conv MACs; "
                "'of limit' = how much of that limit the speedup reaches.")
    notes = method_notes(reports[-1]) + [n for r in reports for n in model_notes(r)]
    body = "\n".join(sections) + "\n## Environment and method\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    write_text(args.out, f"# ONNX Runtime EP benchmark: original vs depthwise-separable\n\n{preamble}\n\n{body}")
    if args.json:
        write_json(args.json, {"command": command, "reports": [r.to_dict() for r in reports]})
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except DsdeployError as exc:
        sys.exit(f"error: {exc}")
