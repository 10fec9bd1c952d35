"""Reading user checkpoints safely: ``weights_only=True`` unless the user opts in.

Accepts the shapes real checkpoints come in: a bare state_dict; one nested under
``state_dict``, ``model``, ``model_state_dict`` or ``net`` (other entries ignored);
keys prefixed ``module.`` (DataParallel/DDP) or ``_orig_mod.`` (torch.compile).
"""

from __future__ import annotations

import pickle
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
                               f"refusing to load it. If you trust the file, pass --trust-pickle") from None
        raise WeightsError(f"{p} is corrupt or not a PyTorch {what}") from None
    except Exception as exc:  # garbage bytes fail in many ways (zip, struct, unicode, EOF...): all mean corrupt
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"{p} is corrupt, truncated or not a PyTorch {what}: {first[:200]}") from None


def extract_state_dict(obj: Any, path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the state_dict inside a loaded checkpoint object and strip wrapper prefixes."""
    for _ in range(3):
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        if isinstance(obj, dict):
            nested = next((obj[k] for k in NESTED_KEYS if k in obj), None)
            if nested is not None:
                obj = nested
                continue
        raise WeightsError(f"{path}: no state_dict found (expected tensors, or one nested under "
                           f"{', '.join(NESTED_KEYS)})")
    state = dict(obj)
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | Path, *, trust_pickle: bool = False) -> nn.Module:
    """Load a checkpoint file into ``model`` strictly; one clear error on any mismatch."""
    state = extract_state_dict(torch_load(path, trust_pickle=trust_pickle), path)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True)
    return model


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Raise WeightsError naming the first missing/unexpected keys or mismatched shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
        raise WeightsError(f"{origin} does not fit the model: keys {'; '.join(parts)}")
    wrong = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise WeightsError(f"{origin} does not fit the model: {len(wrong)} shape mismatches (first: {wrong[0]})")
