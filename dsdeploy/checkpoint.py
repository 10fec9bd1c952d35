"""Training checkpoints: atomic writes, ``weights_only=True`` loads, full RNG capture.

A checkpoint is a plain dict of tensors and Python scalars/containers (model,
optimizer, schedule step, RNG states, epoch, best score and best weights), so it loads
with ``torch.load(weights_only=True)``. Writes go to a temporary file renamed into
place: a kill at any moment leaves the previous checkpoint intact.
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

from dsdeploy.errors import DsdeployError
from dsdeploy.fsutil import atomic_path

CHECKPOINT_FORMAT = "dsdeploy-finetune-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(DsdeployError):
    """A training checkpoint that is missing, corrupt, or from a different run."""


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
        raise CheckpointError(f"no checkpoint to resume from at {p}; run without --resume to start afresh")
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
                              f"this dsdeploy reads {CHECKPOINT_VERSION}; start afresh without --resume")
    return payload


class TrainingInterrupted(DsdeployError):
    """SIGINT/SIGTERM during training: nothing partial was saved."""

    exit_code = 130


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
                               f"{where}: rerun the same command with --resume to continue")
