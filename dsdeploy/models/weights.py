"""Reading user checkpoints safely: ``weights_only=True`` unless the user opts in.

Accepts the shapes real checkpoints come in: a bare state_dict; one nested under
``state_dict``, ``model``, ``model_state_dict`` or ``net`` (other entries ignored);
keys prefixed ``module.`` (DataParallel/DDP) or ``_orig_mod.`` (torch.compile). A
``.safetensors`` file (named so, or recognised by its header) is read with the ``safetensors``
package: tensors only, no code, so it needs no ``trust_pickle``.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsdeploy.errors import WeightsError
from dsdeploy.fsutil import require_file

NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net")
PREFIXES = ("module.", "_orig_mod.")


def torch_load(path: str | Path, *, trust_pickle: bool = False, what: str = "checkpoint") -> Any:
    """``torch.load`` on CPU with ``weights_only=True`` (or full unpickling when trusted).

    Raises WeightsError for a missing, truncated or corrupt file, and for a file that
    holds pickled code when ``trust_pickle`` is False.
    """
    p = require_file(path, what)
    try:
        return torch.load(p, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) and not trust_pickle:  # a class/function reference: pickled code
            raise WeightsError(f"{p} holds pickled Python objects (e.g. a whole model), which can run code; "
                               f"refusing to load it. If you trust the file, pass trust_pickle=True") from None
        raise WeightsError(f"{p} is corrupt or not a PyTorch {what}") from None
    except Exception as exc:  # garbage bytes fail in many ways (zip, struct, unicode, EOF...): all mean corrupt
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"{p} is corrupt, truncated or not a PyTorch {what}: {first[:200]}") from None


def is_safetensors(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file: named ``*.safetensors``, or starting with the format's
    header (an 8-byte little-endian length, then a JSON object of that length)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return True
    try:
        with p.open("rb") as fh:
            head = fh.read(9)
            if len(head) < 9 or head[8:9] != b"{":
                return False
            (size,) = struct.unpack("<Q", head[:8])
            if size > min(p.stat().st_size - 8, 100 * 1024**2):
                return False
            json.loads(b"{" + fh.read(size - 1))
            return True
    except (OSError, ValueError, struct.error):
        return False


def safetensors_load(path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (on CPU).

    Raises WeightsError for a missing, truncated or corrupt file, and when the ``safetensors``
    package is not installed (one line: how to install it).
    """
    p = require_file(path, what)
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise WeightsError(f"{p} is a safetensors file, which needs the safetensors package: "
                           f"pip install safetensors") from None
    try:
        return load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:  # all mean a damaged file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"{p} is corrupt, truncated or not a safetensors file: {first[:200]}") from None


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """The object a weights file holds: a safetensors file's tensors, else :func:`torch_load`."""
    if is_safetensors(path):
        return safetensors_load(path)
    return torch_load(path, trust_pickle=trust_pickle)


def extract_state_dict(obj: Any, path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the state_dict inside a loaded checkpoint object and strip wrapper prefixes.

    A dict holding tensors is the state_dict unless it nests one under a known key
    (``{"state_dict": ..., "best_prec1": ...}``). Raises WeightsError when none is found,
    and (see :func:`check_entries`) for entries that are not dense, real, finite tensors.
    """
    for _ in range(3):
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if isinstance(obj, dict):
            nested = next((obj[k] for k in NESTED_KEYS if isinstance(obj.get(k), (dict, nn.Module))), None)
            if nested is not None:
                obj = nested
                continue
            if obj and any(isinstance(v, torch.Tensor) for v in obj.values()):
                break
        raise WeightsError(f"{path}: no state_dict found (expected tensors, or one nested under "
                           f"{', '.join(NESTED_KEYS)})")
    state = {str(k): v for k, v in obj.items()}
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    check_entries(state, str(path))
    return state


def check_entries(state: dict[str, Any], origin: str) -> None:
    """Raise WeightsError (one line, naming the entry) for an entry torch cannot use as weights.

    Refused: non-tensor values (except ``*_extra_state``, which modules define themselves),
    sparse or quantized layouts, tensors on the ``meta`` device (shapes without data), and
    floating/complex tensors holding NaN or infinity.
    """
    for key, v in state.items():
        if not isinstance(v, torch.Tensor):
            if key.endswith("_extra_state"):
                continue
            raise WeightsError(f"{origin}: entry {key!r} is a {type(v).__name__}, not a tensor; "
                               f"a state_dict maps names to tensors")
        if v.layout != torch.strided:
            raise WeightsError(f"{origin}: tensor {key!r} is {str(v.layout).replace('torch.', '')}, "
                               f"not dense; save it with .to_dense()")
        if v.is_meta:
            raise WeightsError(f"{origin}: tensor {key!r} is on the meta device (a shape without data); "
                               f"save real weights")
        if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise WeightsError(f"{origin}: tensor {key!r} holds {bad} NaN/infinite value(s) of {v.numel()}; "
                               f"the weights are damaged (check how they were trained or saved)")


def load_weights(model: nn.Module, path: str | Path, *, trust_pickle: bool = False) -> nn.Module:
    """Load a checkpoint file (PyTorch or ``.safetensors``) into ``model`` as ``load_state_dict(strict=True)`` would.

    Accepts exactly what torch accepts (e.g. old BatchNorm state without
    ``num_batches_tracked``, which BatchNorm fills in). Raises WeightsError with one line
    on missing/unexpected keys, shape mismatches or damaged entries; ``model`` is then
    left as it was.
    """
    state = extract_state_dict(read_checkpoint(path, trust_pickle=trust_pickle), path)
    load_state_checked(model, state, str(path))
    return model


def load_state_checked(model: nn.Module, state: dict[str, Any], origin: str) -> None:
    """``model.load_state_dict(state)`` with torch's strict rules, one-line WeightsError on a mismatch.

    Shapes are compared first; then torch itself loads (so its per-module upgrade hooks,
    such as BatchNorm filling a missing ``num_batches_tracked``, apply) and any key it
    reports missing or unexpected is refused, restoring ``model``'s previous weights.
    """
    check_entries(state, origin)
    expected = model.state_dict()
    wrong = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
             if k in state and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise WeightsError(f"{origin} does not fit the model: {len(wrong)} shape mismatches (first: {wrong[0]})")
    backup = {k: v.detach().clone() for k, v in expected.items()}
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        model.load_state_dict(backup, strict=False)
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
        raise WeightsError(f"{origin} does not fit the model: keys {'; '.join(parts)}")


def check_state_dict(model: nn.Module, state: dict[str, Any], origin: str) -> None:
    """Deprecated name kept for callers: validates and LOADS ``state`` (see :func:`load_state_checked`)."""
    load_state_checked(model, state, origin)
