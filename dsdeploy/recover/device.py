"""Where the recovery stages run and in what precision: device names, autocast, the fp16 gradient scaler.

A device is named ``auto`` (``DSDEPLOY_DEVICE`` when set, else CUDA when torch sees one, else
the CPU; MPS only when named),
``cpu``, ``cuda``, ``cuda:N`` or ``mps``; :func:`resolve_device` turns the name into a
``torch.device`` or refuses, in one line, a device this machine does not have. A precision
is ``fp32``, ``bf16`` or ``fp16``: training and scoring run the forward pass (and the loss)
under ``torch.autocast`` with that dtype while the parameters stay float32, so every
artifact written is float32; ``fp16`` adds a ``torch.amp.GradScaler`` (a pass-through for
the other two, so ``fp32`` steps are exactly the plain ones). Least-squares statistics
are accumulated in float64 on the device when it has float64 (CPU, CUDA) and on the CPU
otherwise (MPS has no float64: the chunk products run there in float32, the sums in
float64 on the CPU; :func:`lsq_placement`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from dsdeploy.errors import DeviceError

log = logging.getLogger(__name__)

DEVICE_NAMES = "auto, cpu, cuda, cuda:N, mps"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_NAME = re.compile(r"^(auto|cpu|mps|cuda(?::(\d+))?)$")


def resolve_device(name: str | torch.device | None = "auto", field: str = "device") -> torch.device:
    """The ``torch.device`` that ``name`` stands for on this machine.

    ``auto`` (or None): the device the environment variable ``DSDEPLOY_DEVICE`` names when it is
    set, else ``cuda`` (the current CUDA device) when torch sees a CUDA device, else ``cpu``.
    ``cuda:N`` must be below the number of CUDA devices.

    Raises:
        DeviceError: an unknown name, or a device this machine (or this torch build) does not
            have; one line naming ``field`` and what there is.
    """
    if isinstance(name, torch.device):
        name = str(name)
    text = "auto" if name is None else str(name).strip().lower()
    m = _NAME.match(text)
    if m is None:
        raise DeviceError(f"{field} must be one of {DEVICE_NAMES}, got {name!r}")
    if text == "auto":
        pinned = os.environ.get("DSDEPLOY_DEVICE", "").strip()
        if pinned and pinned.lower() != "auto":
            return resolve_device(pinned, "DSDEPLOY_DEVICE")
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not torch.backends.mps.is_available():
            why = "this torch build has no MPS support" if not torch.backends.mps.is_built() else \
                "no Apple-silicon GPU is available (macOS 12.3+ needed)"
            raise DeviceError(f"{field} 'mps' is not available: {why}; use 'cpu' or 'auto'")
        return torch.device("mps")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise DeviceError(f"{field} {text!r} is not available: {why} (torch {torch.__version__}); use 'cpu' or 'auto'")
    count = torch.cuda.device_count()
    if m.group(2) is not None and int(m.group(2)) >= count:
        raise DeviceError(f"{field} {text!r} is not available: {count} CUDA device(s) visible "
                          f"(cuda:0..cuda:{count - 1}); check CUDA_VISIBLE_DEVICES")
    return torch.device(text)


def check_precision(precision: str, device: torch.device, field: str = "precision") -> None:
    """Refuse, in one line, a precision the device cannot run under autocast (bf16 on a pre-Ampere GPU).

    fp16 on the CPU runs (torch's CPU autocast supports it; slow on CPUs without fp16 units).
    """
    if precision not in PRECISIONS:
        raise DeviceError(f"{field} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return
    if not torch.amp.is_autocast_available(device.type):
        raise DeviceError(f"{field} {precision!r} needs torch.autocast on {device.type}, which this torch "
                          f"({torch.__version__}) does not have; use 'fp32'")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"{field} 'bf16' is not supported by {torch.cuda.get_device_name(device)}; "
                          f"use 'fp16' or 'fp32'")


def autocast(device: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (a no-op for ``fp32``)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class Precision:
    """One training step's precision machinery: autocast plus, for fp16, a gradient scaler.

    Use ``with amp.autocast(): loss = ...`` then :meth:`step`. The scaler's state belongs in
    checkpoints (:meth:`state_dict` / :meth:`load_state_dict`) so a resumed fp16 run
    continues with the same loss scale.
    """

    def __init__(self, device: torch.device, precision: str = "fp32", field: str = "precision") -> None:
        check_precision(precision, device, field)
        self.device, self.precision = device, precision
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's autocast context."""
        return autocast(self.device, self.precision)

    def step(self, loss: torch.Tensor, opt: torch.optim.Optimizer, params: list[nn.Parameter],
             clip_grad: float | None) -> None:
        """Backward ``loss``, clip the (unscaled) gradients to ``clip_grad``, step ``opt`` (skipped on inf/NaN in fp16)."""
        self.scaler.scale(loss).backward()
        if clip_grad:
            self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        self.scaler.step(opt)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (empty when there is no scaler)."""
        return self.scaler.state_dict() if self.scaler.is_enabled() else {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict`'s result (nothing for an empty one)."""
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)


def supports_float64(device: torch.device) -> bool:
    """Whether ``device`` computes in float64 (every device but MPS)."""
    return device.type != "mps"


_warned: set[str] = set()


def lsq_placement(device: torch.device) -> tuple[torch.device, torch.dtype]:
    """Where least-squares sums live and the dtype of the chunk products computed on ``device``.

    ``(device, float64)`` when the device has float64; otherwise ``(cpu, float32)`` with a
    warning (once): the products in float32 on the device, their sums in float64 on the CPU.
    """
    if supports_float64(device):
        return device, torch.float64
    if device.type not in _warned:
        _warned.add(device.type)
        log.warning("%s has no float64: least-squares products run in float32 there (sums in float64 on the CPU)",
                    device.type)
    return torch.device("cpu"), torch.float32


def module_device(model: nn.Module | None) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); the CPU for a model with neither."""
    if model is not None:
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, or a tuple/list of them) on ``device`` (non-blocking from pinned memory)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True) if batch.device != device else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch


class OnDevice:
    """A re-iterable view of ``loader`` whose batches are moved to ``device`` as they are read."""

    def __init__(self, loader: Iterable, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self) -> Iterator:
        for batch in self.loader:
            yield to_device(batch, self.device)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # batch_size, dataset, ... of the wrapped loader
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


def on_device(loader: Iterable | None, device: torch.device) -> Iterable | None:
    """``loader`` as is on the CPU, else wrapped in :class:`OnDevice` (None stays None)."""
    if loader is None or device.type == "cpu":
        return loader
    return OnDevice(loader, device)


@contextlib.contextmanager
def placed(device: torch.device, *models: nn.Module | None) -> Iterator[None]:
    """Move ``models`` to ``device`` for the block; put each back where it was afterwards (also on error)."""
    homes = [(m, module_device(m)) for m in models if m is not None]
    for m, _ in homes:
        m.to(device)
    try:
        yield
    finally:
        for m, home in homes:
            m.to(home)
