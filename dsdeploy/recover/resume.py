"""Training checkpoints: atomic writes, ``weights_only=True`` loads, full RNG capture.

A checkpoint is a plain dict of tensors and Python scalars/containers (model,
optimizer, schedule step, RNG states, epoch, best score and best weights), so it loads
with ``torch.load(weights_only=True)``. Writes go to a temporary file renamed into
place: a kill at any moment leaves the previous checkpoint intact. It records the run's
identity (digests of the student, data, split, teacher and preprocessing: :func:`run_identity`) next to
the options, and a resume with any of them changed is refused (:func:`check_resumable`).
"""

from __future__ import annotations

import io
import random
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsdeploy.errors import CheckpointError, TrainingInterrupted
from dsdeploy.fsutil import atomic_path, digest_tree, sha256_file, show

CHECKPOINT_FORMAT = "dsdeploy-finetune-checkpoint"
CHECKPOINT_VERSION = 3  # 2: records the run identity; 3: the input is epoch 0 (scores, resizable schedule, times)



def rng_state() -> dict[str, Any]:
    """The states of every RNG training touches (torch CPU, Python, NumPy) as safe-to-load data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


def cpu_state_dict(module_or_state: Any) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state_dict (or of a state_dict)."""
    state = module_or_state.state_dict() if hasattr(module_or_state, "state_dict") else module_or_state
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically to ``path`` (tagged with the checkpoint format)."""
    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **state}
    buf = io.BytesIO()
    torch.save(payload, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return Path(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises CheckpointError when the file is missing, corrupt or not a checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no checkpoint to resume from at {p}; run without resume=True to start afresh")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file; all mean the same to the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"checkpoint {p} is corrupt or unreadable ({first}); delete it and start afresh") \
            from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p} is not a dsdeploy fine-tuning checkpoint")
    if payload.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {p} has format version {payload.get('format_version')}, "
                              f"this dsdeploy reads {CHECKPOINT_VERSION}; start afresh without resume=True")
    return payload


def run_identity(*, student: str | Path, data: str, limit: int | None, val_split: float,
                 teacher: str | None = None, teacher_weights: str | None = None,
                 preprocessing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Digests of everything besides the options that determines a fine-tuning trajectory.

    ``student``: the artifact's sha256 (it also fixes the default teacher, its source model);
    ``data``: ``digits`` or the digest of the folder's file names and sizes (not its path);
    ``split``: limit and held-out fraction; ``teacher``: an explicit teacher spec and its weights' sha256;
    ``preprocessing``: the resolved size, resize, mean, std and channels the images become inputs by
    (``Preprocess.to_dict()``; other keys are ignored).
    """
    pre = None if preprocessing is None else {k: preprocessing.get(k)
                                              for k in ("size", "resize", "mean", "std", "channels")}
    return {"student": sha256_file(student),
            "data": data if data == "digits" else digest_tree(data),
            "split": {"limit": limit, "val_split": val_split},
            "teacher": None if not teacher else {"spec": teacher,
                                                 "weights": sha256_file(teacher_weights) if teacher_weights else None},
            "preprocessing": pre}


def check_resumable(ck: dict[str, Any], options: dict[str, Any], identity: dict[str, Any] | None, path: Path) -> None:
    """Refuse a checkpoint written by a run with other inputs or trajectory options (one line naming them).

    ``identity`` None (a caller that passes data in memory and cannot digest it) compares the options only.
    """
    saved = ck.get("identity") or {}
    inputs = [] if identity is None else [k for k in sorted(set(saved) | set(identity))
                                          if saved.get(k) != identity.get(k)]
    if inputs:
        raise CheckpointError(f"checkpoint {show(path)} is from a different run: its {', '.join(inputs)} "
                              f"differ{'s' if len(inputs) == 1 else ''} from this one's; rerun with the same inputs "
                              f"or start afresh without resume")
    old = ck.get("config") or {}
    diff = [f"{k}: {old.get(k)!r} vs {options.get(k)!r}" for k in sorted(set(old) | set(options))
            if old.get(k) != options.get(k)]
    if diff:
        raise CheckpointError(f"checkpoint {show(path)} was written with different options ({'; '.join(diff[:3])});"
                              f" rerun with the same options or start afresh without resume")



def check_world(ck: dict[str, Any], world: int, path: Path) -> None:
    """Refuse to resume a checkpoint written by another number of processes (one line naming both).

    Each rank's share of every epoch depends on the number of processes, so a run resumes exactly
    only with the number it started with. Checkpoints that record none were written by one process.
    """
    saved = int(ck.get("world_size") or 1)
    if saved != world:
        raise CheckpointError(f"checkpoint {show(path)} was written by {saved} process{'es' if saved > 1 else ''} "
                              f"and this run has {world}: resume with finetune.nproc (or WORLD_SIZE) = {saved}, "
                              f"or start afresh without resume")


class SignalGuard:
    """Turn SIGINT/SIGTERM into a flag checked between steps (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def interrupted(signum: int, epoch: int, ckpt: Path | None) -> TrainingInterrupted:
    """The one-line error for a signal during epoch ``epoch + 1`` (how to resume, when possible)."""
    name = signal.Signals(signum).name
    if epoch == 0:
        return TrainingInterrupted(f"interrupted by {name} during epoch 1; nothing was saved: rerun the command")
    where = f" ({ckpt})" if ckpt else ""
    return TrainingInterrupted(f"interrupted by {name} during epoch {epoch + 1}; epoch {epoch} is checkpointed"
                               f"{where}: rerun the same command with resume=True to continue")
