"""The inputs of each converted layer during calibration, from cached stage inputs (linear cost in depth).

Calibration fits layers in call order, each on the input it receives inside the partially
calibrated student. Rerunning the network prefix for every layer costs O(depth^2). Here a
probe forward finds the model's *stages*: the children of ``nn.Sequential`` containers
(nested ones expanded) that are called once, with one tensor, and that chain — stage i+1's
input IS stage i's output tensor (same object, same values). The inputs of the current
stage are kept for every calibration batch (float32, at most ``cache_mb``); a layer inside
it runs only that stage, and the next stage's inputs are the current stage's outputs once
its layers are fitted. Where the chain is not verified, a stage's inputs come from one
full-prefix pass; where they would not fit in ``cache_mb`` (or a layer is in no stage),
that layer gets the full-prefix pass of before. Results equal the uncached ones up to
float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import pairwise

import torch
from torch import nn

from dsdeploy.conversion.block import DSConv


class _Stop(Exception):
    """Raised by a capture hook to skip the rest of a forward pass."""


@dataclass(eq=False)
class _Event:
    name: str
    module: nn.Module
    parent: _Event | None
    input: torch.Tensor | None = None
    in_value: torch.Tensor | None = None
    output: torch.Tensor | None = None
    out_value: torch.Tensor | None = None
    children: list[_Event] = field(default_factory=list)
    per_image: int = 0  # input elements per image

    @property
    def ok(self) -> bool:
        return self.input is not None and self.output is not None


def _linked(a: _Event, b: _Event) -> bool:
    return b.input is a.output and torch.equal(b.in_value, a.out_value)


def _refine(e: _Event, calls: dict[int, int]) -> list[_Event]:
    """An ``nn.Sequential`` stage replaced by its children when they chain from its input to its output."""
    kids = e.children
    if (isinstance(e.module, nn.Sequential) and kids and len(kids) == len(e.module)
            and all(k.ok and calls[id(k.module)] == 1 for k in kids) and kids[0].input is e.input
            and all(_linked(a, b) for a, b in pairwise(kids)) and kids[-1].output is e.output):
        return [s for k in kids for s in _refine(k, calls)]
    return [e]


def probe_stages(model: nn.Module, x: torch.Tensor) -> tuple[list[_Event], list[bool], dict[str, _Event]]:
    """Run ``model(x)`` once; return the stages in call order, whether each is linked to the one before,
    and the stage each DSConv's first call happens in."""
    seq_children = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Sequential):
            for cname, child in m.named_children():
                seq_children[id(child)] = (f"{name}.{cname}" if name else cname, child)
    stack: list[_Event] = []
    top: list[_Event] = []
    calls: dict[int, int] = {}
    where: dict[str, list[_Event]] = {}
    handles = []

    def pre(mod, args, kwargs):
        e = _Event(seq_children[id(mod)][0], mod, stack[-1] if stack else None)
        calls[id(mod)] = calls.get(id(mod), 0) + 1
        if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
            e.input, e.in_value = args[0], args[0].detach().clone()
            e.per_image = args[0][0].numel()
        (e.parent.children if e.parent else top).append(e)
        stack.append(e)

    def post(mod, args, kwargs, out):
        e = stack.pop()
        if isinstance(out, torch.Tensor):
            e.output, e.out_value = out, out.detach().clone()

    def block_pre(name):
        def hook(_mod, _args):
            where.setdefault(name, list(stack))
        return hook

    try:
        for name, child in seq_children.values():
            handles.append(child.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(child.register_forward_hook(post, with_kwargs=True))
        for name, m in model.named_modules():
            if isinstance(m, DSConv):
                handles.append(m.register_forward_pre_hook(block_pre(name)))
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    stages = [s for e in top for s in _refine(e, calls) if e.ok and calls[id(e.module)] == 1]
    stages = [s for s in stages if s.ok and calls[id(s.module)] == 1]
    linked = [i > 0 and _linked(stages[i - 1], s) for i, s in enumerate(stages)]
    ids = {id(s): s for s in stages}
    owner = {n: next((ids[id(e)] for e in st if id(e) in ids), None) for n, st in where.items()}
    return stages, linked, {n: s for n, s in owner.items() if s is not None}


class LayerInputs:
    """Feeds each converted layer's inputs (one tensor per calibration batch) to a consumer, cheaply.

    Args:
        model: the student (eval mode; its layers are fitted in call order between calls).
        batches: a callable returning the calibration inputs, one tensor per batch, same every time.
        cache_mb: at most this many MiB of cached stage inputs (0: no cache, a full-prefix pass per layer).
    """

    def __init__(self, model: nn.Module, batches: Callable[[], Iterable[torch.Tensor]], cache_mb: float) -> None:
        self.model, self.batches, self.cap = model, batches, cache_mb * 2 ** 20
        self.stages: list[_Event] = []
        self.linked: list[bool] = []
        self.owner: dict[str, _Event] = {}
        self.cur: int | None = None
        self.inputs: list[torch.Tensor] = []
        self.stats = {"cache_mb": cache_mb, "stages": 0, "stage_layers": 0, "prefix_layers": 0,
                      "prefix_passes": 0, "peak_mb": 0.0}
        if cache_mb > 0:
            first = next(iter(self.batches()), None)
            if first is not None:
                self.stages, self.linked, self.owner = probe_stages(model, first[:2])
                self.stats["stages"] = len(self.stages)

    def _prefix(self, module: nn.Module, fn: Callable[[torch.Tensor], None]) -> tuple[int, int]:
        """One pass over the batches, stopped at ``module``'s input, calling ``fn`` on it."""
        def hook(_mod, args):
            fn(args[0])
            raise _Stop

        handle = module.register_forward_pre_hook(hook)
        batches = images = 0
        try:
            for x in self.batches():
                try:
                    self.model(x)
                except _Stop:
                    pass
                batches, images = batches + 1, images + x.shape[0]
        finally:
            handle.remove()
        self.stats["prefix_passes"] += 1
        return batches, images

    def _fits(self, stage: _Event, images: int) -> bool:
        return stage.per_image * images * 4 <= self.cap

    def _stage_inputs(self, s: int) -> bool:
        """Make ``self.inputs`` the inputs of stage ``s``; False when they would exceed the cap."""
        if self.cur == s:
            return True
        images = sum(x.shape[0] for x in self.inputs)
        path = range(self.cur + 1, s + 1) if self.cur is not None and self.cur < s else range(0)
        if path and all(self.linked[j] and self._fits(self.stages[j], images) for j in path):
            for j in path:  # advance through fitted stages: stage j's input is stage j-1's output
                mod = self.stages[j - 1].module
                self.inputs = [mod(x) for x in self.inputs]
        else:
            self.inputs, self.cur = [], None
            stage = self.stages[s]
            if not self._fits(stage, 1):
                return False
            kept: list[torch.Tensor] = []
            self._prefix(stage.module, lambda x: kept.append(x.detach().clone()))
            if not self._fits(stage, sum(x.shape[0] for x in kept)):
                return False
            self.inputs = kept
        self.cur = s
        mb = sum(x.numel() * x.element_size() for x in self.inputs) / 2 ** 20
        self.stats["peak_mb"] = round(max(self.stats["peak_mb"], mb), 1)
        return True

    def feed(self, name: str, block: nn.Module, fn: Callable[[torch.Tensor], None], count: bool = True
             ) -> tuple[int, int]:
        """Call ``fn(x)`` with ``block``'s input for every calibration batch; returns (batches, images).

        ``count``: count the layer in ``stats`` (False for a second pass over the same layer)."""
        stage = self.owner.get(name)
        index = next((i for i, s in enumerate(self.stages) if s is stage), None)
        if index is None or not self._stage_inputs(index):
            self.stats["prefix_layers"] += count
            return self._prefix(block, fn)
        self.stats["stage_layers"] += count

        def hook(_mod, args):
            fn(args[0])
            raise _Stop

        handle = block.register_forward_pre_hook(hook)
        try:
            for x in self.inputs:
                try:
                    stage.module(x.clone())  # the stage may change its input in place
                except _Stop:
                    pass
        finally:
            handle.remove()
        return len(self.inputs), sum(x.shape[0] for x in self.inputs)
