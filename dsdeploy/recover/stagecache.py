"""The inputs of each converted layer during calibration, from cached stage inputs (linear cost in depth).

Calibration fits layers in call order, each on the input it receives inside the partially
calibrated student. Rerunning the network prefix for every layer costs O(depth^2). Here a
probe forward finds the model's *stages*: the children of ``nn.Sequential`` containers
(nested ones expanded) that are called once, with one tensor, and that chain — stage i+1's
input IS stage i's output tensor (same object, same values).

One stage's inputs are kept for every calibration batch (the *anchor*; in the model's dtype,
at most ``cache_mb`` MiB: ``"auto"`` is half the memory available, :func:`cache_budget_mb`).
A layer in the anchor stage runs only that stage. A layer in a later stage whose inputs fit
moves the anchor there (each batch runs through the stages between, once, replacing the old
inputs batch by batch, so the peak is about the larger of the two); one whose inputs do not
fit (e.g. 64 x 224 x 224 activations of 2,048 images) is fed by running the stages between
the anchor and its own per batch, and the anchor stays. Where the chain is not verified, a
stage's inputs come from one full-prefix pass; a layer in no stage, or with no anchor to
start from, gets a full-prefix pass. Results equal the uncached ones up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

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
    per_image: int = 0  # input bytes per image

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
            e.per_image = args[0][0].numel() * args[0].element_size()
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


AUTO_FRACTION = 0.5  # cache_mb="auto": this share of the memory available when calibration starts
AUTO_FALLBACK_MB = 1024.0  # cache_mb="auto" where the available memory cannot be read


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def available_mb() -> float | None:
    """MiB of memory this process can still use: ``MemAvailable`` (``/proc/meminfo``), capped by the
    cgroup v2 limit minus its usage when one is set; None where neither can be read (not Linux)."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        avail = None
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        room = max(0.0, (limit - used) / 2 ** 20)
        avail = room if avail is None else min(avail, room)
    return avail


def cache_budget_mb(cache_mb: float | str) -> float:
    """The stage-cache size in MiB: ``cache_mb`` itself, or for ``"auto"`` ``AUTO_FRACTION`` (half) of
    :func:`available_mb` now (``AUTO_FALLBACK_MB`` where it cannot be read)."""
    if cache_mb == "auto":
        avail = available_mb()
        return AUTO_FALLBACK_MB if avail is None else AUTO_FRACTION * avail
    return float(cache_mb)


def _nbytes(xs: list[torch.Tensor]) -> int:
    return sum(x.numel() * x.element_size() for x in xs)


class LayerInputs:
    """Feeds each converted layer's inputs (one tensor per calibration batch) to a consumer, cheaply.

    Args:
        model: the student (eval mode; its layers are fitted in call order between calls).
        batches: a callable returning the calibration inputs, one tensor per batch, same every time.
        cache_mb: at most this many MiB of cached stage inputs (0: no cache, a full-prefix pass per
            layer), or ``"auto"`` (:func:`cache_budget_mb`).

    ``stats``: ``cache_mb`` (the size used), ``auto``, ``stages`` found, layers fed from the anchor
    stage (``stage_layers``), through the stages after it (``streamed_layers``) or by a full-prefix
    pass (``prefix_layers``), ``prefix_passes`` and ``peak_mb`` of cached inputs.
    """

    def __init__(self, model: nn.Module, batches: Callable[[], Iterable[torch.Tensor]], cache_mb: float | str) -> None:
        size = cache_budget_mb(cache_mb)
        self.model, self.batches, self.cap = model, batches, size * 2 ** 20
        self.stages: list[_Event] = []
        self.linked: list[bool] = []
        self.owner: dict[str, _Event] = {}
        self.cur: int | None = None
        self.inputs: list[torch.Tensor] = []
        self.images: int | None = None  # calibration images, once a pass has counted them
        self.stats = {"cache_mb": round(size, 1), "auto": cache_mb == "auto", "stages": 0, "stage_layers": 0,
                      "streamed_layers": 0, "prefix_layers": 0, "prefix_passes": 0, "peak_mb": 0.0}
        if size > 0:
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
        self.images = images
        return batches, images

    def _fits(self, stage: _Event, images: int | None) -> bool:
        return stage.per_image * (images or 1) <= self.cap

    def _peak(self, *sizes: int) -> None:
        self.stats["peak_mb"] = round(max(self.stats["peak_mb"], *(b / 2 ** 20 for b in sizes)), 1)

    def _path(self, s: int) -> range | None:
        """Stages to run from the anchor's inputs to stage ``s``'s (None when the chain is not verified)."""
        if self.cur is None or self.cur > s or not self.inputs:
            return None
        path = range(self.cur + 1, s + 1)
        return path if all(self.linked[j] for j in path) else None

    def _run(self, x: torch.Tensor, path: range) -> torch.Tensor:
        """``x`` (the anchor's input; consumed) through the stages before each stage in ``path``."""
        for j in path:
            x = self.stages[j - 1].module(x)
        return x

    def _source(self, s: int) -> str | None:
        """Make stage ``s``'s inputs reachable: "cached" (the anchor is ``s``), "streamed" (from the
        anchor through the stages between), or None (a full-prefix pass is needed)."""
        if self.cur == s:
            return "cached"
        stage, path = self.stages[s], self._path(s)
        if not self._fits(stage, self.images):
            return "streamed" if path else None
        if path:  # move the anchor: batch by batch, so old and new inputs are not both held in full
            old = _nbytes(self.inputs)
            for i, x in enumerate(self.inputs):
                self.inputs[i] = self._run(x, path)  # the old input may be changed in place: it is dropped
            self._peak(old, _nbytes(self.inputs))
        else:
            self.inputs, self.cur = [], None
            kept: list[torch.Tensor] = []
            room = [self.cap]

            def keep(x: torch.Tensor) -> None:
                room[0] -= x.numel() * x.element_size()
                if room[0] >= 0:
                    kept.append(x.detach().clone())
                else:
                    kept.clear()  # over the cap after all: keep nothing

            self._prefix(stage.module, keep)
            if room[0] < 0:
                return None
            self.inputs = kept
            self._peak(_nbytes(kept))
        self.cur = s
        return "cached"

    def feed(self, name: str, block: nn.Module, fn: Callable[[torch.Tensor], None], count: bool = True
             ) -> tuple[int, int]:
        """Call ``fn(x)`` with ``block``'s input for every calibration batch; returns (batches, images).

        ``count``: count the layer in ``stats`` (False for a second pass over the same layer)."""
        stage = self.owner.get(name)
        index = next((i for i, s in enumerate(self.stages) if s is stage), None)
        source = None if index is None else self._source(index)
        if source is None:
            self.stats["prefix_layers"] += count
            return self._prefix(block, fn)
        self.stats["stage_layers" if source == "cached" else "streamed_layers"] += count
        path = range(0) if source == "cached" else self._path(index)

        def hook(_mod, args):
            fn(args[0])
            raise _Stop

        handle = block.register_forward_pre_hook(hook)
        try:
            for x in self.inputs:
                try:
                    stage.module(self._run(x.clone(), path))  # a stage may change its input in place
                except _Stop:
                    pass
        finally:
            handle.remove()
        return len(self.inputs), sum(x.shape[0] for x in self.inputs)
