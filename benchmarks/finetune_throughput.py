"""Fine-tuning images/s: ``dsdeploy finetune`` vs a bare PyTorch loop, in 1 and N processes.

The student is a third-party CIFAR-10 ResNet (``../shared/data/pretrained/``; ``--model cifar_resnet32``)
or the project's ``sample:digits_cnn`` on the ``digits`` data (``--model digits_cnn``: no data to
download, 1x16x16 inputs) converted with ``dsdeploy convert --mac-budget``; the teacher is the
original model. Both sides train the same
student on the same images (``--data``, the first ``--limit`` of a seeded subset, decoded by the
same dsdeploy dataset and fed by the same DataLoader: :func:`dsdeploy.recover.epoch.train_loader`,
with a ``DistributedSampler`` when several processes train) with the same loss (KD on logits at
T=4 + 0.5 x cross-entropy, dsdeploy's defaults), SGD (Nesterov, lr 0.01, momentum 0.9, weight decay
5e-4), gradient clipping at 5, channels_last, and the same global batch split over the
processes. dsdeploy runs as a user runs it (``dsdeploy finetune --nproc P --json``, a subprocess);
the bare loop is written inline below with nothing but torch (DistributedDataParallel under
``torchrun`` when P > 1). Both figures are training batches only (images / seconds of the
training steps, the batches' loading included; validation, start-up and data decoding excluded):
dsdeploy's from its history (``images_per_s`` x ``train_seconds`` per epoch). Each process uses
``cores / P`` threads (``OMP_NUM_THREADS``). Rounds alternate the loops; medians are reported.
``--context`` adds two 1-process bare loops for reference: cross-entropy only (no teacher), and
KD + CE in the NCHW memory format instead of channels_last.

    python benchmarks/finetune_throughput.py --data /work/data/cifar10/train --limit 4096 --epochs 2 \\
        --nprocs 1,2 --rounds 3
    python benchmarks/finetune_throughput.py --model digits_cnn --batch-size 64 --nprocs 1 --rounds 5 --context \
        --out benchmarks/RESULTS-finetune.md
    python benchmarks/finetune_throughput.py --limit 256 --epochs 1 --rounds 1 --no-write   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _runner import PREPROCESS, PRETRAINED, ROOT, write_text

CHECKPOINT = PRETRAINED / "resnet32-d509ac18.th"
OUT = ROOT / "benchmarks" / "RESULTS-finetune-throughput.md"


@dataclass(frozen=True)
class Source:
    """A model the benchmark converts: its spec, weights, input shape, preprocessing flags and default data."""

    spec: str
    weights: Path | None
    input_shape: str
    preprocess: tuple[str, ...]
    data: str


SOURCES = {
    "cifar_resnet32": Source("cifar_resnet:resnet32", CHECKPOINT, "1,3,32,32", tuple(PREPROCESS),
                             "/work/data/cifar10/train"),
    "digits_cnn": Source("sample:digits_cnn", None, "1,1,16,16", (), "digits"),
}
# The reference loops --context adds (1 process): name -> extra bare-worker flags.
CONTEXT = {"bare torch loop (CE only), 1 process(es)": ["--ce-only"],
           "bare torch loop, NCHW, 1 process(es)": ["--nchw"]}


def env(nproc: int) -> dict[str, str]:
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    path = os.pathsep.join([str(ROOT), str(ROOT / "examples"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": path}


def run(cmd: list[str], nproc: int) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env(nproc), check=False)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc.stdout


def dsdeploy_ips(student: Path, args: argparse.Namespace, nproc: int, work: Path) -> float:
    out = run([sys.executable, "-m", "dsdeploy", "finetune", str(student), "--data", str(args.data), "-o",
               str(work / f"ft{nproc}.dsd"), "--limit", str(args.limit), "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--lr", "0.01", "--trust-code", "--nproc", str(nproc),
               "--json", *SOURCES[args.model].preprocess], nproc)
    hist = json.loads(out)["history"]
    return sum(h["images_per_s"] * h["train_seconds"] for h in hist) / sum(h["train_seconds"] for h in hist)


def bare_ips(student: Path, args: argparse.Namespace, nproc: int, extra: list[str] | None = None) -> float:
    me = [str(Path(__file__).resolve()), "--bare-worker", str(student), "--data", str(args.data), "--limit",
          str(args.limit), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), *(extra or [])]
    if nproc == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *me]
    return json.loads(run(cmd, nproc).strip().splitlines()[-1])["images_per_s"]


def bare_worker(args: argparse.Namespace) -> None:
    """The bare loop (one rank): plain torch on the same model, data, loader and loss; rank 0 prints images/s.

    ``--ce-only``: cross-entropy alone (no teacher forward); ``--nchw``: the default memory format."""
    sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DistributedSampler

    from dsdeploy.conversion.artifact import load_artifact, load_source_model
    from dsdeploy.data.datasets import load_data
    from dsdeploy.data.preprocessing import resolve
    from dsdeploy.recover.epoch import train_loader

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    art = load_artifact(args.bare_worker, trust_code=True)
    student, teacher = art.model, load_source_model(art, trust_code=True).eval()
    pre = resolve(art.metadata.get("preprocessing"), art.metadata.get("input_shape"), None, data=str(args.data),
                  model=student, augment=False)
    train = load_data(str(args.data), pre, seed=0, labelled=False, limit=args.limit, val_split=0.2,
                      model_labels=art.metadata.get("labels")).train
    len(train)  # decoded before timing, as dsdeploy does
    fmt = torch.contiguous_format if args.nchw else torch.channels_last
    student.train().to(memory_format=fmt)
    teacher.to(memory_format=fmt)
    for p in teacher.parameters():
        p.requires_grad_(False)
    model = DistributedDataParallel(student) if world > 1 else student
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)
    seen, secs = 0, 0.0
    for epoch in range(args.epochs):
        sampler = DistributedSampler(train, world, rank, seed=0, drop_last=True) if world > 1 else None
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader = train_loader(train, args.batch_size // world, epoch, sampler=sampler)
        t = time.perf_counter()
        for x, y in loader:
            x = x.contiguous(memory_format=fmt)
            logits = model(x)
            mask = y >= 0
            loss = 0.5 * F.cross_entropy(logits[mask], y[mask])
            if not args.ce_only:
                with torch.no_grad():
                    t_logits = teacher(x)
                loss = loss + F.kl_div(F.log_softmax(logits / 4, 1), F.log_softmax(t_logits / 4, 1),
                                       reduction="batchmean", log_target=True) * 16
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
            opt.step()
            seen += x.shape[0]
        secs += time.perf_counter() - t
    if world > 1:
        total = torch.tensor([float(seen)])
        dist.all_reduce(total)
        seen = int(total.item())
        dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({"images_per_s": seen / secs}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(SOURCES), default="cifar_resnet32",
                    help="the model converted and fine-tuned (digits_cnn: sample:digits_cnn on 'digits')")
    ap.add_argument("--data", type=Path, default=None,
                    help="default: /work/data/cifar10/train (cifar_resnet32), 'digits' (digits_cnn)")
    ap.add_argument("--checkpoint", type=Path, default=None, help=f"cifar_resnet32's weights (default: {CHECKPOINT})")
    ap.add_argument("--mac-budget", default="0.25")
    ap.add_argument("--limit", type=int, default=4096, help="images (a seeded subset; 80%% train)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128, help="the global batch (split over the processes)")
    ap.add_argument("--nprocs", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--context", action="store_true",
                    help="also time 1-process bare loops with cross-entropy only and in NCHW, for reference")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--bare-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ce-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--nchw", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_worker:
        bare_worker(args)
        return
    source = SOURCES[args.model]
    if args.data is None:
        args.data = Path(source.data)
    if args.checkpoint is None:
        args.checkpoint = source.weights
    elif source.weights is None:
        ap.error(f"--checkpoint: {source.spec} takes no weights file")
    nprocs = [int(n) for n in args.nprocs.split(",")]
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="ft-throughput-") as tmp:
        work = Path(tmp)
        student = work / "student.dsd"
        weights = ["--weights", str(args.checkpoint)] if args.checkpoint else []
        run([sys.executable, "-m", "dsdeploy", "convert", source.spec, *weights, "--input-shape", source.input_shape,
             "--mac-budget", args.mac_budget, "-o", str(student), *source.preprocess], 1)
        for r in range(args.rounds):
            for n in nprocs:
                rows.setdefault(f"bare torch loop, {n} process(es)", []).append(bare_ips(student, args, n))
                rows.setdefault(f"dsdeploy finetune --nproc {n}", []).append(dsdeploy_ips(student, args, n, work))
            for name, extra in CONTEXT.items() if args.context else ():
                rows.setdefault(name, []).append(bare_ips(student, args, 1, extra))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rows.items()), flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    import torch

    model = f"--model {args.model} " if args.model != "cifar_resnet32" else ""
    context = " --context" if args.context else ""
    command = (f"`python benchmarks/finetune_throughput.py {model}--data {args.data} --limit {args.limit} --epochs "
               f"{args.epochs} --batch-size {args.batch_size} --nprocs {args.nprocs} --rounds {args.rounds} "
               f"--mac-budget {args.mac_budget}{context}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
               f"{os.cpu_count()} CPU cores, torch {torch.__version__.split('+')[0]}; each process "
               f"{env(1)['OMP_NUM_THREADS']} / N threads.")
    named = args.checkpoint.name if args.checkpoint else source.spec
    setup = (f"Student: {named} converted at --mac-budget {args.mac_budget}; teacher: the "
             f"{'checkpoint' if args.checkpoint else 'original model'}. Loss KD (T=4) + 0.5 CE on both sides; same "
             "dataset, DataLoader and global batch; images/s over the training batches only.")
    if args.context:
        setup += (" Both sides train in channels_last (dsdeploy's default); the CE-only and NCHW bare loops "
                  "are shown for reference.")
    lines = ["# Fine-tuning throughput: dsdeploy vs a bare PyTorch loop, 1 and N processes", "", command, "", setup, "",
             "| loop | images/s (median) | rounds |", "|---|---:|---|",
             *[f"| {k} | {med[k]:.0f} | {', '.join(f'{v:.0f}' for v in rows[k])} |" for k in rows], ""]
    ours = {n: med[f"dsdeploy finetune --nproc {n}"] for n in nprocs}
    for n in nprocs:
        lines.append(f"- {n} process(es): dsdeploy / bare = **{ours[n] / med[f'bare torch loop, {n} process(es)']:.3f}**")
    if len(nprocs) > 1:
        a, b = nprocs[0], nprocs[-1]
        lines.append(f"- dsdeploy {b} vs {a} process(es): **{ours[b] / ours[a]:.2f}x**")
    text = "\n".join(lines) + "\n"
    if not args.no_write:
        write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
