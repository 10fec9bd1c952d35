"""One epoch of distillation training, and the pieces it is made of (loader, seeds, trainable modules).

Each epoch's data order and RNG state derive from the run's seed and the epoch number
(:func:`epoch_seed`), so an epoch replayed after a resume takes exactly the same steps.
While a time budget runs, every step's duration feeds :class:`dsdeploy.recover.budget.Budget`,
which re-sizes the schedule every few seconds.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from dsdeploy.conversion.block import ds_blocks
from dsdeploy.data.loader import train_loader as data_train_loader
from dsdeploy.recover.budget import Budget
from dsdeploy.recover.config import FinetuneConfig
from dsdeploy.recover.distill import Distiller, following_norms
from dsdeploy.recover.resume import SignalGuard
from dsdeploy.recover.schedule import Schedule


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's data order, augmentation and dropout."""
    return (seed * 1_000_003 + epoch) % (2 ** 63)


def _seed_epoch(dataset: Any, seed: int) -> None:
    torch.manual_seed(seed)
    if hasattr(dataset, "set_epoch_seed"):
        dataset.set_epoch_seed(seed)
    elif isinstance(getattr(dataset, "_gen", None), torch.Generator):  # dsdeploy.data.datasets.ImageDataset augmentation
        dataset._gen.manual_seed(seed)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps in one epoch of :func:`train_loader` (a short last batch is dropped)."""
    return max(1, n // batch_size) if n > batch_size else 1


def train_loader(dataset: Any, batch_size: int, seed: int, *, workers: int | None = 0, sampler: Any = None,
                 shard: tuple[int, int] | None = None) -> Any:
    """The shuffled training loader of one epoch (order and augmentation fixed by ``seed``, whatever
    ``workers``): :func:`dsdeploy.data.loader.train_loader` (``sampler``: e.g. a DistributedSampler;
    ``shard=(rank, world)``: this rank's share of the seeded order).

    When the split holds more than one batch, the short last batch is dropped: a batch of
    one image cannot train BatchNorm (``BatchNorm1d`` refuses it, 2d gets a zero variance).
    """
    return data_train_loader(dataset, batch_size, seed, workers=workers, sampler=sampler, shard=shard)


def trainable_modules(student: nn.Module, mode: str, example: torch.Tensor) -> list[nn.Module]:
    """The modules trained in ``mode``: everything (full) or the DS blocks plus the norms right after them."""
    if mode == "full":
        return [student]
    norms = following_norms(student, example)
    names = list(norms) + list(norms.values())
    names += [n for n in ds_blocks(student) if n not in norms]
    return [student.get_submodule(n) for n in sorted(set(names))]


def set_train(student: nn.Module, modules: list[nn.Module]) -> None:
    """Put ``student`` in eval mode except ``modules`` (frozen norms keep their running statistics)."""
    student.eval()
    for m in modules:
        m.train()


def make_optimizer(params: list[nn.Parameter], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names (SGD with Nesterov momentum, or AdamW) over ``params``."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def train_epoch(distiller: Distiller, modules: list[nn.Module], params: list[nn.Parameter],
                opt: torch.optim.Optimizer, sched: Schedule, train: Any, st: dict[str, Any], cfg: FinetuneConfig,
                guard: SignalGuard, budget: Budget, sizing: dict[str, Any]) -> dict[str, Any] | None:
    """One pass over the training data (or until the schedule/budget ends): the epoch record, None on a signal.

    ``sizing``: ``spe`` (steps per epoch), ``warmup`` (warmup steps wanted) and ``cap`` (the most
    steps the run may take, None: no cap) for the budget's re-sizing.
    """
    spe = sizing["spe"]
    seed = epoch_seed(cfg.seed, st["epoch"])
    _seed_epoch(train, seed)
    loader = train_loader(train, cfg.batch_size, seed, workers=cfg.workers)
    set_train(distiller.student, modules)
    bar = tqdm(loader, total=min(spe, sched.total_steps - st["step"]), desc=f"epoch {st['epoch'] + 1}",
               unit="batch", disable=not cfg.progress, leave=False)
    loss_sum = correct = labelled = seen = steps = 0
    t_start = last = time.perf_counter()
    lr = sched.lr_at(st["step"])
    for x, y in bar:
        if cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = sched.lr_at(st["step"])
        for g in opt.param_groups:
            g["lr"] = lr
        loss, logits, _parts = distiller(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        opt.step()
        st["step"] += 1
        steps += 1
        n = x.shape[0]
        seen += n
        loss_sum += float(loss.detach()) * n
        mask = y >= 0
        labelled += int(mask.sum())
        correct += int((logits.detach().argmax(1)[mask] == y[mask]).sum())
        now = time.perf_counter()
        budget.step_took(now - last)  # the batch's loading included: it is part of every step
        last = now
        if cfg.progress:
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / max(1, labelled):.3f}",
                            ips=f"{seen / (now - t_start):.0f}", refresh=False)
        if guard.signum is not None:
            bar.close()
            return None
        if budget.due() or st["step"] >= sched.total_steps:  # at the planned end: is there time for more?
            budget.resize(sched, st["step"], spe, steps, sizing["warmup"], sizing["cap"])
            bar.total = min(spe, sched.total_steps - st["step"] + steps)
        if budget.over():  # the safety net: the sizing should have ended the run before this
            sched.resize(st["step"], st["step"])
        if st["step"] >= sched.total_steps:
            break
    bar.close()
    secs = time.perf_counter() - t_start
    return {"epoch": st["epoch"] + 1, "train_loss": loss_sum / max(1, seen),
            "train_acc": correct / labelled if labelled else None, "val_acc": None, "lr": lr,
            "images_per_s": seen / max(secs, 1e-9), "seconds": 0.0, "train_seconds": round(secs, 3),
            "steps": steps, "step": st["step"], "planned_steps": sched.total_steps, **budget.record()}
