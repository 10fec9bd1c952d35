"""What the benchmarks that drive the real ``dsdeploy`` CLI share: paths, the pretrained checkpoints'
preprocessing, :class:`Runner` (runs one command, times it, records it) and :func:`write_text`.

Imported by ``benchmarks/pretrained_cifar.py`` and ``benchmarks/recover_pretrained.py`` (run as scripts,
so ``benchmarks/`` is on ``sys.path``); light: no torch import. Also :func:`plain_ort_rounds`, the
independent onnxruntime timing loop of ``latency_models.py`` and ``speedup_check.py``.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DSDEPLOY_SHARED") or ROOT.parent / "shared")
PRETRAINED = SHARED / "data" / "pretrained"
EXAMPLES = ROOT / "examples"
# What the checkpoints were trained with (their README): 32x32 RGB in [0, 1], ImageNet mean/std, no resize.
PREPROCESS = ["--size", "32", "--resize", "none", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from dsdeploy.fsutil import write_text  # noqa: F401  (re-exported: temp name, renamed into place)


@dataclass
class Ran:
    """One finished command: its parsed ``--json`` output, the command line as shown, wall seconds,
    and the ``preprocessing:`` lines it printed on stderr."""

    result: dict
    command: str
    seconds: float
    preprocessing: list[str] = field(default_factory=list)


class Runner:
    """Runs dsdeploy commands (user code in ``examples/`` importable), records each command line and wall time.

    ``threads`` sets ``OMP_NUM_THREADS`` for the commands (None: the environment's). Every finished
    command is appended to :attr:`log`; a failing one ends the script with its exit status and stderr tail.
    """

    def __init__(self, threads: int | None) -> None:
        self.log: list[Ran] = []
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES), str(ROOT),
                                                                 os.environ.get("PYTHONPATH", "")])}
        if threads:
            self.env["OMP_NUM_THREADS"] = str(threads)

    def __call__(self, *args: str | Path, allow_fail: bool = False) -> Ran:
        """Run ``dsdeploy ARGS`` (ARGS must include ``--json``) from the repository root; print and return it.

        ``allow_fail``: a failing command returns a :class:`Ran` whose result is ``{"error": its last
        stderr line, "exit": status}`` instead of ending the script (e.g. an out-of-reach ``--speedup``)."""
        cmd = [str(a) for a in args]
        shown = "dsdeploy " + " ".join(shlex.quote(c) for c in cmd)
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "dsdeploy", *cmd], cwd=ROOT, env=self.env, capture_output=True,
                              text=True, check=False)
        secs = time.perf_counter() - t
        print(f"[{secs:7.1f}s] {shown}", flush=True)
        if proc.returncode != 0 and allow_fail:
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            ran = Ran({"error": lines[-1] if lines else "", "exit": proc.returncode}, shown, secs)
            self.log.append(ran)
            return ran
        if proc.returncode != 0:
            sys.exit(f"failed (exit {proc.returncode}): {shown}\n{proc.stderr[-3000:]}")
        printed = [line.split("\r")[-1].strip() for line in proc.stderr.splitlines() if "preprocessing:" in line]
        ran = Ran(json.loads(proc.stdout), shown, secs, printed)
        self.log.append(ran)
        return ran


def top1(result: dict) -> float:
    """Top-1 of the first model in an ``evaluate --json`` result."""
    return result["models"][0]["metrics"]["top1"]


def plain_ort_rounds(paths: list[Path], batch: int, threads: int, rounds: int, runs: int) -> list[float]:
    """Median ms per run of each ONNX file: ``rounds`` rounds cycling through ``paths``, each a fresh
    ``InferenceSession`` (CPU EP, ``intra_op_num_threads=threads``, sequential) with 3 warm-up runs and
    ``runs`` timed ones; one session alive at a time (an idle one's spinning threads would steal cores)."""
    import numpy as np
    import onnxruntime as ort

    samples: list[list[float]] = [[] for _ in paths]
    for _ in range(rounds):
        for i, p in enumerate(paths):
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            s = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
            inp = s.get_inputs()[0]
            shape = [batch] + [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
            feed = {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
            for _ in range(3):
                s.run(None, feed)
            for _ in range(runs):
                t = time.perf_counter()
                s.run(None, feed)
                samples[i].append((time.perf_counter() - t) * 1e3)
            del s
    return [statistics.median(v) for v in samples]
