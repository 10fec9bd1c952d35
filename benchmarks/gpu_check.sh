#!/usr/bin/env bash
# The prepared GPU check of issue 13 (one NVIDIA GPU, no internet, < 6 minutes):
#   1. ResNet-50 (torchvision, random init, 224x224) converted to DS blocks (--mac-budget 0.35) and fine-tuned
#      by `dsdeploy finetune --device cuda --precision fp32|bf16|fp16` on a generated ImageFolder of JPEGs:
#      images/s of the last epochs (training steps only), next to a bare torch loop on the same student,
#      teacher, loss, batch size, precision and memory format (synthetic batches already on the GPU: a ceiling);
#   2. torch inference latency of the original and the converted model on the device (eager, channels-last);
#   3. `dsdeploy bench` of the original and the converted model on the CPU, CUDA and TensorRT EPs
#      (EPs this onnxruntime lacks are skipped and listed).
# Writes $OUT/gpu_check.json, $OUT/gpu_check.md, $OUT/gpu_check.log (+ bench.json, bench.md).
#
#   OUT=gpu-out bash benchmarks/gpu_check.sh            # on the GPU machine (OUT defaults to ./gpu-out)
#   bash benchmarks/gpu_check.sh --dry-run              # the same steps on the CPU, tiny (checks the script)
#
# Installs: `pip install -e .[test]` (offline that fails on missing dependencies: then `--no-deps`, then
# PYTHONPATH=.); onnxruntime-gpu from ./wheels or the index into a private folder (never over the
# installed onnxruntime), used for the bench step only when it imports with the CUDA EP.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
exec > >(tee "$OUT/gpu_check.log") 2>&1
T0=$(date +%s)
say() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*"; }
PIP="timeout 90 $PY -m pip install -q --disable-pip-version-check --retries 0 --timeout 5"

if (( DRY )); then
  DEVICE=cpu; ARCH=resnet18; SIZE=64; CLASSES=4; PER_CLASS=16; EPOCHS=2; BATCH=16; STEPS=3
  PROVIDERS=cpu; BATCHES=1; ITERS=5; PRECISIONS="fp32 bf16"  # fp16 autocast on an AVX2 CPU: minutes per step
else
  DEVICE=cuda; ARCH=resnet50; SIZE=224; CLASSES=16; PER_CLASS=40; EPOCHS=5; BATCH=64; STEPS=20
  PROVIDERS=cpu,cuda,tensorrt; BATCHES=1,16; ITERS=30; PRECISIONS="fp32 bf16 fp16"
fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

say "install"
ONLINE=0
(( DRY )) || { timeout 15 "$PY" -m pip download -q --no-deps --retries 0 --timeout 5 -d "$WORK/probe" onnxsim \
  >/dev/null 2>&1 && ONLINE=1; }
if (( DRY )); then
  say "dry run: no installs; PYTHONPATH=$ROOT"
elif (( ONLINE )) && $PIP -e ".[test]"; then
  say "pip install -e .[test]: ok"
elif $PIP --no-deps --no-build-isolation -e .; then
  say "pip install -e .[test] not possible (offline: online=$ONLINE); installed --no-deps"
else
  say "pip install failed; using PYTHONPATH=$ROOT"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
ORT_GPU=""
if (( ! DRY )); then
  WHEELS=()
  [[ -d wheels ]] && WHEELS=(--no-index --find-links wheels)
  if (( ONLINE || ${#WHEELS[@]} )) && $PIP "${WHEELS[@]}" --target "$WORK/ortgpu" onnxruntime-gpu >/dev/null 2>&1; then
    ORT_GPU="$WORK/ortgpu"
    say "onnxruntime-gpu installed into a private folder"
  else
    say "onnxruntime-gpu not installable here (no index/wheel): CUDA/TensorRT EPs only if the installed onnxruntime has them"
  fi
fi

"$PY" - "$DEVICE" > "$WORK/system.json" <<'EOF' || { say "python/torch unusable"; exit 1; }
import json, platform, sys
import torch
dev = sys.argv[1]
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    info.update(gpu=torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported(),
                memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    torch.zeros(1, device="cuda")  # CUDA in use, as in a fine-tune: the loader's default worker count
    from dsdeploy.data.loader import default_workers
    info["loader_workers"] = default_workers()
try:
    import onnxruntime as ort
    info["onnxruntime"] = ort.__version__
    info["ort_providers"] = ort.get_available_providers()
except ImportError as exc:
    info["onnxruntime"] = f"missing ({exc})"
print(json.dumps(info))
if dev == "cuda" and not torch.cuda.is_available():
    print("no CUDA device visible to torch", file=sys.stderr)
EOF
cat "$WORK/system.json"
if [[ $DEVICE == cuda ]] && ! grep -q '"cuda_available": true' "$WORK/system.json"; then
  say "no CUDA device: nothing to measure"
  cp "$WORK/system.json" "$OUT/gpu_check.json"
  echo "# GPU check: no CUDA device visible to torch" > "$OUT/gpu_check.md"
  exit 0
fi
nvidia-smi -L 2>/dev/null || true

say "generate $((CLASSES * PER_CLASS)) JPEGs (${CLASSES} classes)"
"$PY" - "$WORK/images" "$CLASSES" "$PER_CLASS" "$SIZE" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root, classes, per, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
side = max(32, size * 8 // 7)  # a little larger than the crop, as photos are
for c in range(classes):
    (root / f"c{c:02d}").mkdir(parents=True)
    tint = rng.integers(0, 256, 3)
    for i in range(per):
        base = rng.integers(0, 256, (side // 8, side // 8, 3))
        img = Image.fromarray(((base * 0.6 + tint * 0.4)).astype(np.uint8)).resize((side, side), Image.BILINEAR)
        img.save(root / f"c{c:02d}" / f"{i:04d}.jpg", quality=90)
EOF

DSD="$WORK/student.dsd"
say "convert torchvision:$ARCH (random init) at --mac-budget 0.35"
timeout 180 "$PY" -m dsdeploy convert "torchvision:$ARCH" -o "$DSD" --mac-budget 0.35 \
  --input-shape "1,3,$SIZE,$SIZE" > "$WORK/convert.txt" || { tail -5 "$WORK/convert.txt"; say "convert failed"; exit 1; }
tail -2 "$WORK/convert.txt"

for p in $PRECISIONS; do
  say "dsdeploy finetune --device $DEVICE --precision $p"
  timeout 150 "$PY" -m dsdeploy finetune "$DSD" --data "$WORK/images" -o "$WORK/ft-$p.dsd" --epochs "$EPOCHS" \
    --batch-size "$BATCH" --device "$DEVICE" --precision "$p" --size "$SIZE" --lr 0.01 --json \
    > "$WORK/finetune-$p.json" 2> "$WORK/finetune-$p.err" || { tail -3 "$WORK/finetune-$p.err"; say "finetune $p failed"; }
  say "bare loop --precision $p"
  timeout 120 "$PY" - "$DSD" "$DEVICE" "$p" "$BATCH" "$SIZE" "$STEPS" > "$WORK/bare-$p.json" <<'EOF' || say "bare loop $p failed"
import json, sys, time
import torch, torch.nn.functional as F
from dsdeploy.conversion.artifact import load_artifact
from dsdeploy.recover.distill import kd_loss, load_teacher
from dsdeploy.recover.device import Precision, resolve_device
path, dev, prec, batch, size, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
device = resolve_device(dev)
art = load_artifact(path)
student, teacher = art.model.to(device), load_teacher(art).to(device).eval()
for m in (student, teacher):
    m.to(memory_format=torch.channels_last)
amp = Precision(device, prec)
opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (batch,), device=device)
student.train()
def step():
    with amp.autocast():
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        loss = kd_loss(s, t, 4.0) + 0.5 * F.cross_entropy(s, y)
    opt.zero_grad(set_to_none=True)
    amp.step(loss, opt, list(student.parameters()), 5.0)
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
for _ in range(3):
    step()
sync()
if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
for _ in range(steps):
    step()
sync()
secs = time.perf_counter() - t0
out = {"images_per_s": steps * batch / secs, "steps": steps}
if device.type == "cuda":
    out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
print(json.dumps(out))
EOF
done

say "torch inference latency on $DEVICE: original vs converted (eager, channels-last)"
timeout 120 "$PY" - "$DSD" "$DEVICE" "$ARCH" "$SIZE" "$BATCHES" > "$WORK/infer.json" <<'EOF' || say "inference timing failed"
import json, statistics, sys, time
import torch, torchvision
from dsdeploy.conversion.artifact import load_artifact
path, dev, arch, size, batches = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
device = torch.device(dev)
models = {"original": getattr(torchvision.models, arch)(), "converted": load_artifact(path).model}
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
rows = []
for prec, dtype in (("fp32", torch.float32), ("fp16", torch.float16) if device.type == "cuda" else ("bf16", torch.bfloat16)):
    for b in [int(v) for v in batches.split(",")] + ([64] if device.type == "cuda" else []):
        x = torch.randn(b, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        row = {"precision": prec, "batch": b}
        for name, m in models.items():
            m = m.to(device).eval().to(memory_format=torch.channels_last)
            times = []
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=prec != "fp32"):
                for i in range(60):
                    sync(); t0 = time.perf_counter(); m(x); sync()
                    if i >= 20:
                        times.append((time.perf_counter() - t0) * 1e3)
            row[name + "_ms"] = round(statistics.median(times), 3)
        row["speedup"] = round(row["original_ms"] / row["converted_ms"], 2)
        rows.append(row)
print(json.dumps(rows))
EOF
cat "$WORK/infer.json" 2>/dev/null

say "export the original and the converted model (CPU-EP parity gate)"
ORIG="$WORK/original.onnx"; CONV="$WORK/converted.onnx"
timeout 150 "$PY" -m dsdeploy export "torchvision:$ARCH" -o "$ORIG" --input-shape "1,3,$SIZE,$SIZE" --no-simplify \
  > "$WORK/export.txt" 2>&1 && \
timeout 150 "$PY" -m dsdeploy export "$DSD" -o "$CONV" --no-simplify >> "$WORK/export.txt" 2>&1 \
  || { tail -5 "$WORK/export.txt"; say "export failed"; }
if [[ -f $ORIG && -f $CONV ]]; then
  say "dsdeploy bench --providers $PROVIDERS"
  BENCH_PATH="$PYTHONPATH"
  [[ -n $ORT_GPU ]] && BENCH_PATH="$ORT_GPU:$PYTHONPATH"
  # torch first: its CUDA/cuDNN libraries (pip wheels) are then loaded for onnxruntime's CUDA EP
  PYTHONPATH="$BENCH_PATH" timeout 240 "$PY" -c 'import sys, torch, onnxruntime as o
getattr(o, "preload_dlls", lambda: None)()
from dsdeploy.cli import main
main(sys.argv[1:])' bench "$ORIG" "$CONV" --providers "$PROVIDERS" --skip-unavailable --batch "$BATCHES" \
    --iters "$ITERS" --json "$OUT/bench.json" --markdown "$OUT/bench.md" > "$WORK/bench.txt" 2>&1 \
    || say "bench failed"
  tail -25 "$WORK/bench.txt"
fi

say "summary"
"$PY" - "$WORK" "$OUT" "$DEVICE" "$ARCH" "$BATCH" "$SIZE" "$((CLASSES * PER_CLASS))" "$EPOCHS" <<'EOF'
import json, statistics, sys
from pathlib import Path
work, out, device, arch, batch, size, images, epochs = sys.argv[1:]
work, out = Path(work), Path(out)
def read(name):
    try:
        return json.loads((work / name).read_text())
    except (OSError, ValueError):
        return None
res = {"system": read("system.json"), "device": device, "model": f"torchvision:{arch} (random init) DS at mac_budget 0.35",
       "batch_size": int(batch), "size": int(size), "images": int(images), "epochs": int(epochs), "finetune": {}}
rows = []
for p in ("fp32", "bf16", "fp16"):
    ft, bare = read(f"finetune-{p}.json"), read(f"bare-{p}.json")
    ips = None
    if ft and ft.get("history"):
        later = [h["images_per_s"] for h in ft["history"][1:]] or [ft["history"][0]["images_per_s"]]
        ips = statistics.median(later)  # the first epoch pays for cuDNN autotuning and allocator warm-up
    b = bare.get("images_per_s") if bare else None
    res["finetune"][p] = {"dsdeploy_images_per_s": ips, "bare_images_per_s": b,
                          "ratio": ips / b if ips and b else None, "bare_peak_gib": (bare or {}).get("peak_gib"),
                          "seconds": ft.get("seconds") if ft else None,
                          "epochs": [round(h["images_per_s"], 1) for h in ft["history"]] if ft and ft.get("history") else None,
                          "error": None if ft else (work / f"finetune-{p}.err").read_text()[-300:] if (work / f"finetune-{p}.err").exists() else "not run"}
    f = lambda v, d=0: "-" if v is None else f"{v:.{d}f}"
    rows.append(f"| {p} | {f(ips)} | {f(b)} | {f(ips / b if ips and b else None, 2)} | {f((bare or {}).get('peak_gib'), 2)} |")
bench = None
try:
    bench = json.loads((out / "bench.json").read_text())
except (OSError, ValueError):
    pass
res["bench"] = "bench.json" if bench else "not run or failed (see gpu_check.log)"
res["torch_inference"] = read("infer.json")
(out / "gpu_check.json").write_text(json.dumps(res, indent=2))
s = res["system"] or {}
md = [f"# GPU check ({s.get('gpu', device)}; torch {s.get('torch')}, CUDA {s.get('cuda')}, onnxruntime {s.get('onnxruntime')})", "",
      f"Fine-tune throughput, {res['model']}, batch {batch}, {size}x{size}, {images} generated JPEGs, {epochs} epochs "
      f"(`dsdeploy finetune` with {s.get('loader_workers', 'the default')} loader workers, median images/s of epochs 2..; training steps only) vs a bare torch loop (same student, "
      "teacher, KD+CE loss, SGD, channels-last, autocast; synthetic batches on the device):", "",
      "| precision | dsdeploy img/s | bare loop img/s | ratio | bare peak GiB |", "|---|---|---|---|---|", *rows, "",
      "Torch inference latency (eager, channels-last, autocast for fp16/bf16; median of 40 after 20 warm-up; ms):", "",
      "| precision | batch | original ms | converted ms | speedup |", "|---|---|---|---|---|",
      *[f"| {r['precision']} | {r['batch']} | {r['original_ms']} | {r['converted_ms']} | {r['speedup']}x |"
        for r in (res["torch_inference"] or [])], "",
      f"ONNX Runtime EPs seen: {', '.join(s.get('ort_providers') or []) or '-'}; `dsdeploy bench`: see bench.md", ""]
(out / "gpu_check.md").write_text("\n".join(md))
print("\n".join(md))
EOF
say "done in $(( $(date +%s) - T0 ))s; results in $OUT"
