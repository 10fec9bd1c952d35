"""Deployment bundles of the converted CIFAR-10 sample model: fp32 vs INT8 (static QDQ) vs FP16.

Exports the converted model (a fine-tuned ``.dsd`` from benchmarks/recover_cifar.py when
present, else one converted + calibrated here, and the report says which), builds the
bundles with ``dsdeploy.export.bundle.deploy`` (the code behind ``dsdeploy deploy``), and writes
benchmarks/RESULTS-deploy.md: top-1 on the CIFAR-10 test split vs the fp32 model, CPU EP
latency vs fp32, and the CPU's flags (INT8 speed depends on VNNI/AMX).

    python benchmarks/bench_deploy.py                      # extracts ../shared/data/cifar10-jpg.tar.gz to /tmp
    python benchmarks/bench_deploy.py --data /tmp/cifar    # an extracted train/ + test/ folder
"""

from __future__ import annotations

import argparse
import platform
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARBALL = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
RECOVERED = [Path("/tmp/dsdeploy-recover/finetuned.dsd"), Path("/tmp/dsdeploy-recover/calibrated.dsd")]
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def extract(dest: Path) -> Path:
    """The folder holding train/ and test/ (extracting the tarball into ``dest`` once)."""
    for cand in (dest, *dest.glob("*")):
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            return cand
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(TARBALL) as tar:
        tar.extractall(dest, filter="data")
    return extract(dest)


def cpu() -> tuple[str, dict[str, bool]]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")),
                platform.processor())
    flags = set(next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), []))
    return name, {f: f in flags for f in FLAGS}


def converted_artifact(source: str, data: Path, work: Path, seed: int) -> tuple[Path, str]:
    """The converted model to deploy and how it was obtained."""
    for p in RECOVERED:
        if p.is_file():
            return p, f"`{p}` from benchmarks/recover_cifar.py ({p.stem})"
    import dsdeploy

    out = work / "converted_calibrated.dsd"
    cm = dsdeploy.convert(source, mac_budget=0.25, data=str(data))
    dsdeploy.calibrate(cm, str(data), max_batches=40, seed=seed)
    dsdeploy.save(cm, out)
    return out, (f"converted (--mac-budget 0.25) + calibrated here (40 batches); NOT fine-tuned "
                 f"(no fine-tuned artifact at {RECOVERED[0]})")


def optimized_ops(path: Path, out: Path) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime's CPU EP actually runs (optimization level ALL)."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(out)
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    counts: dict[str, int] = {}
    for n in onnx.load(str(out)).graph.node:
        key = n.op_type
        if key in ("Conv", "QLinearConv"):
            key += " depthwise" if next((a.i for a in n.attribute if a.name == "group"), 1) > 1 else " other"
        counts[key] = counts.get(key, 0) + 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/dsdeploy-cifar10"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/dsdeploy-bench-deploy"))
    ap.add_argument("--artifact", type=Path, default=None, help="converted .dsd to deploy (default: see RECOVERED)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--calib-items", type=int, default=512)
    ap.add_argument("--eval-items", type=int, default=None, help="cap on test images (default: all 10,000)")
    ap.add_argument("--source", default="sample:cifar_resnet", help="the original model spec")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS-deploy.md")
    args = ap.parse_args()

    import onnxruntime
    import torch

    from dsdeploy.export.bundle import deploy
    from dsdeploy.export.measure import latency
    from dsdeploy.export.onnx_export import export_model
    from dsdeploy.fsutil import write_text

    data = extract(args.data)
    args.work.mkdir(parents=True, exist_ok=True)
    art, how = (args.artifact, f"`{args.artifact}`") if args.artifact else converted_artifact(args.source, data, args.work, 0)
    t0 = time.time()
    exp = export_model(str(art), args.work / "model.onnx", data=str(data / "test"))
    orig = export_model(args.source, args.work / "original.onnx", data=str(data / "test"),
                        input_shape=tuple(exp.input_shape))
    fp32 = args.work / "model.onnx"
    rows, bundles = [], {}
    for mode in ("none", "int8", "int8-full-range", "fp16"):  # int8-full-range: 8-bit weights forced
        quant = "int8" if mode.startswith("int8") else mode
        rep = deploy(fp32, args.work / f"bundle-{mode}", quantize=quant, calib_data=str(data) if quant == "int8" else None,
                     calib_items=args.calib_items, eval_data=str(data), eval_items=args.eval_items,
                     latency_iters=args.iters, threads=args.threads,
                     reduce_range=False if mode == "int8-full-range" else None)
        bundles[mode] = rep
        b32 = latency(args.work / f"bundle-{mode}" / "model.onnx", "input", (32, 3, 32, 32),
                      iters=max(10, args.iters // 10), threads=args.threads)["p50"]
        rows.append((mode, rep, b32))
    fp32_b32 = latency(fp32, "input", (32, 3, 32, 32), iters=max(10, args.iters // 10), threads=args.threads)["p50"]
    orig_lat = latency(args.work / "original.onnx", "input", (1, 3, 32, 32), iters=args.iters, threads=args.threads)
    orig_b32 = latency(args.work / "original.onnx", "input", (32, 3, 32, 32), iters=max(10, args.iters // 10),
                       threads=args.threads)["p50"]
    name, flags = cpu()
    base = bundles["none"]
    lines = [
        "# Deployment bundles: CIFAR-10 sample model, converted (DS) — fp32 vs INT8 vs FP16", "",
        f"Generated by `python {' '.join(sys.argv)}` in {time.time() - t0:.0f} s. Equivalent CLI per bundle:", "",
        "```",
        f"dsdeploy export {art} -o model.onnx --data {data}/test",
        f"dsdeploy deploy model.onnx -o bundle-int8 --quantize int8 --calib-data {data} --eval-data {data} "
        f"--threads {args.threads}   # add --full-range for int8-full-range",
        f"dsdeploy deploy model.onnx -o bundle-fp16 --quantize fp16 --eval-data {data} --threads {args.threads}",
        "```", "",
        f"- Converted model: {how}.",
        f"- Export parity vs torch (random + 16 CIFAR test images): max abs "
        f"{max(p.max_abs_diff for p in exp.parity):.2e}; conv MACs/image {exp.conv_macs:,} vs original "
        f"{orig.conv_macs:,} (x{exp.conv_macs / orig.conv_macs:.2f}); DS structure check: "
        f"{'ok' if not exp.ds_problems else '; '.join(exp.ds_problems)}.",
        f"- Accuracy: top-1 on the CIFAR-10 test split ({base.accuracy['images']:,} images), bundle vs the fp32 "
        f"converted model on the same images; INT8 calibrated on {args.calib_items} train images (MinMax, QDQ, "
        f"per-channel int8 weights in {7 if bundles['int8'].reduce_range else 8} bits (reduce_range="
        f"{bundles['int8'].reduce_range}: automatic, this CPU {'lacks' if bundles['int8'].reduce_range else 'has'} "
        f"VNNI/AMX), int8 activations).",
        f"- Latency: ONNX Runtime {onnxruntime.__version__} CPU EP, {args.threads} intra-op threads, median of "
        f"{args.iters} runs at batch 1 (batch 32: median of {max(10, args.iters // 10)}); the machine is shared, "
        f"so treat differences under ~10% as noise. The fp32 column is re-measured next to each bundle.",
        f"- CPU: {name}; flags: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items()) + ".",
        f"- torch {torch.__version__}, Python {platform.python_version()}.", "",
        "| bundle | top-1 fp32 | top-1 bundle | drop (pts) | agreement | p50 fp32 b1 (ms) | p50 bundle b1 (ms) "
        "| speedup b1 | p50 bundle b32 (ms) | speedup b32 | model file (KB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, rep, b32 in rows:
        a, lat = rep.accuracy, rep.latency_ms
        size = (args.work / f"bundle-{mode}" / "model.onnx").stat().st_size / 1024
        lines.append(f"| {mode} | {a['fp32_top1']:.2f} | {a['bundle_top1']:.2f} | {a['drop_pts']:.2f} | "
                     f"{a['agreement']:.2f} | {lat['fp32']['p50']:.3f} | {lat['bundle']['p50']:.3f} | "
                     f"x{lat['fp32']['p50'] / lat['bundle']['p50']:.2f} | {b32:.2f} | x{fp32_b32 / b32:.2f} | {size:.0f} |")
    same = bundles["none"].latency_ms
    lines += ["", f"Noise check: the `none` row times the same model twice (fp32 and bundle); its ratio "
              f"(x{same['fp32']['p50'] / same['bundle']['p50']:.2f} at batch 1) shows how much of a difference "
              f"this shared machine produces by itself.", ""]
    lines += [f"fp32 converted model at batch 32: p50 {fp32_b32:.2f} ms. Original (unconverted) fp32 model for "
              f"reference: p50 {orig_lat['p50']:.3f} ms at batch 1, {orig_b32:.2f} ms at batch 32.", ""]
    ops = optimized_ops(args.work / "bundle-int8" / "model.onnx", args.work / "int8-optimized.onnx")
    keys = ("QLinearConv depthwise", "QLinearConv other", "Conv depthwise", "Conv other", "Transpose",
            "QuantizeLinear", "DequantizeLinear")
    lines += [f"INT8 graph as the CPU EP runs it (after ORT's fusions; a float Conv here runs between "
              f"DequantizeLinear and QuantizeLinear): " + ", ".join(f"{k} {ops.get(k, 0)}" for k in keys) + ".", ""]
    notes = [w for r in bundles.values() for w in r.warnings]
    if not flags["avx512_vnni"] and not flags["amx_int8"] and not flags["avx_vnni"]:
        notes.append("this CPU has no VNNI/AMX int8 dot-product instructions, so ORT's int8 kernels run on AVX2 "
                     "and INT8 need not be faster than fp32 here")
    lines += [f"Note: {n}." for n in dict.fromkeys(notes)]
    write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
