"""The data side of block reconstruction: which modules are blocks, and their cached inputs/targets.

A block's inputs come from the student, its targets from the original network. When a
block receives the previous block's output object itself (a chain, as in an
``nn.Sequential`` stage), both are derived from the previous block's cache by running one
block, so caching costs one pass over the network in all; otherwise the network prefix is
run up to the block (stopped there by a hook).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from dsdeploy.conversion.block import ds_blocks
from dsdeploy.errors import DataError

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class Unsupported(Exception):
    """A module is not called as ``tensor -> tensor`` once per pass (its layers are fitted one by one)."""


class _Stop(Exception):
    """Raised by a capture hook to skip the rest of a forward pass."""


def find_blocks(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Reconstruction units as ``(module name, [DSConv names inside])``, in module order.

    A DSConv's unit is its shallowest ancestor that is not the root, not a container
    (Sequential/ModuleList/ModuleDict) and does not hold every DS layer of the model (a
    residual block in a ResNet stage); the DSConv itself when there is none. Units are disjoint.
    """
    ds = list(ds_blocks(model))
    modules = dict(model.named_modules())
    units: dict[str, list[str]] = {}
    for name in ds:
        parts, unit = name.split("."), name
        for i in range(1, len(parts)):
            anc = ".".join(parts[:i])
            inside = sum(d.startswith(anc + ".") for d in ds)
            if not isinstance(modules[anc], CONTAINERS) and inside < len(ds):
                unit = anc
                break
        units.setdefault(unit, []).append(name)
    return list(units.items())


def batches_of(loader: Iterable, max_batches: int | None) -> list[torch.Tensor]:
    """The input tensors of the first ``max_batches`` batches (``x`` or ``(x, y)``); DataError when none."""
    out: list[torch.Tensor] = []
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        out.append(batch[0] if isinstance(batch, (list, tuple)) else batch)
    if not out:
        raise DataError("the calibration data is empty")
    return out


def probe(model: nn.Module, names: list[str], x: torch.Tensor) -> tuple[dict[str, int], dict[str, str]]:
    """One pass on ``x``: how often each module in ``names`` runs, and which unit's output each one receives.

    Returns ``(calls, feeds)``: ``feeds[b] = a`` when ``b``'s single input IS ``a``'s output tensor.
    """
    calls = {n: 0 for n in names}
    ins: dict[str, Any] = {}
    outs: dict[str, Any] = {}
    handles = []
    for n in names:
        mod = model.get_submodule(n)

        def pre(_m, args, kwargs, n=n):
            calls[n] += 1
            if calls[n] == 1 and not kwargs and len(args) == 1:
                ins[n] = args[0]

        def post(_m, _args, out, n=n):
            outs.setdefault(n, out)

        handles += [mod.register_forward_pre_hook(pre, with_kwargs=True), mod.register_forward_hook(post)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    feeds = {}
    for b, xin in ins.items():
        for a, out in outs.items():
            if a != b and isinstance(out, torch.Tensor) and out is xin:
                feeds[b] = a
    return calls, feeds


def capture(model: nn.Module, module: nn.Module, batches: list[torch.Tensor], what: str) -> list[torch.Tensor]:
    """``module``'s input (``what="input"``) or output on each batch, stopping each pass there.

    Raises Unsupported when the module is not called as ``tensor -> tensor`` or never runs.
    """
    got: list[torch.Tensor] = []

    def pre(_m, args, kwargs):
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise Unsupported
        got.append(args[0].detach().clone())
        raise _Stop

    def post(_m, _args, out):
        if not isinstance(out, torch.Tensor):
            raise Unsupported
        got.append(out.detach().clone())
        raise _Stop

    handle = (module.register_forward_pre_hook(pre, with_kwargs=True) if what == "input"
              else module.register_forward_hook(post))
    try:
        with torch.no_grad():
            for x in batches:
                try:
                    model(x)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if len(got) != len(batches):
        raise Unsupported
    return got


def run(module: nn.Module, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``module`` on each cached batch (no grad); Unsupported unless each output is a tensor."""
    with torch.no_grad():
        ys = [module(x.clone()) for x in xs]
    if not all(isinstance(y, torch.Tensor) for y in ys):
        raise Unsupported
    return ys


def truncate(xs: list[torch.Tensor], images: int) -> list[torch.Tensor]:
    """The first ``images`` images of a list of batches."""
    out, total = [], 0
    for x in xs:
        if total >= images:
            break
        out.append(x[:images - total])
        total += out[-1].shape[0]
    return out


def block_data(student: nn.Module, teacher: nn.Module, name: str, batches: list[torch.Tensor], target: str,
               max_bytes: int, prev: tuple[list[torch.Tensor], list[torch.Tensor] | None] | None
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Inputs (from the student) and targets of the block ``name``, at most ``max_bytes`` of float32 together.

    ``prev``: when the block receives the previous block's output, that block's student outputs
    and its targets (the original's activations; None for ``target="local"``).
    """
    block, original = student.get_submodule(name), teacher.get_submodule(name)
    if prev is not None:
        first_x = prev[0][0][:1]
    else:
        first_x = capture(student, block, [batches[0][:1]], "input")[0]
    first_y = run(block, [first_x])[0]
    keep = max(2, max_bytes // max(4 * (first_x[0].numel() + first_y[0].numel()), 1))
    if prev is not None:
        xs = truncate(prev[0], keep)
        ys = run(original, xs if target == "local" or prev[1] is None else truncate(prev[1], keep))
    else:
        use = truncate(batches, keep)
        xs = capture(student, block, use, "input")
        ys = run(original, xs) if target == "local" else capture(teacher, original, use, "output")
    if ys[0].shape[1:] != first_y.shape[1:]:
        raise Unsupported
    return xs, ys
