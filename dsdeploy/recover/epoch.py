"""One epoch of distillation training, and the pieces it is made of (loader, seeds, trainable modules).

Each epoch's data order and RNG state derive from the run's seed and the epoch number
(:func:`epoch_seed`), so an epoch replayed after a resume takes exactly the same steps.
While a time budget runs, every step's duration feeds :class:`dsdeploy.recover.budget.Budget`,
which re-sizes the schedule every few seconds.

Data-parallel (a :class:`dsdeploy.recover.distributed.Team` of several processes): each rank
reads its share of the epoch through a ``DistributedSampler`` seeded by the run's seed and
set to the epoch, takes ``batch_size / world`` images per step, follows rank 0's schedule
and agrees on stopping after every step, and the epoch's loss and accuracy are summed over
the ranks.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DistributedSampler

from dsdeploy.conversion.block import ds_blocks
from dsdeploy.data.loader import train_loader as data_train_loader
from dsdeploy.progress import bar as progress_bar
from dsdeploy.recover.budget import Budget
from dsdeploy.recover.config import FinetuneConfig
from dsdeploy.recover.device import Precision, to_device
from dsdeploy.recover.distill import Distiller, following_norms
from dsdeploy.recover.distributed import Team
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

    When the split (or this process's share of it, ``sampler``) holds more than one batch, the
    short last batch is dropped: a batch of one image cannot train BatchNorm (``BatchNorm1d``
    refuses it, 2d gets a zero variance).
    """
    return data_train_loader(dataset, batch_size, seed, workers=workers, sampler=sampler, shard=shard)


def rank_sampler(dataset: Any, team: Team, seed: int) -> DistributedSampler | None:
    """This rank's share of each epoch (None with one process): shuffled by ``seed`` + the epoch (``set_epoch``).

    Every rank gets the same number of images (the tail that does not divide is dropped), so
    all ranks take the same number of steps. One sampler per (world, rank, seed) is kept on the
    dataset, so a loader with worker processes (kept per sampler) persists across epochs.
    """
    if not team.active:
        return None
    key = ("_dsdeploy_rank_sampler", team.world, team.rank, seed)
    kept = getattr(dataset, "__dict__", None)
    if kept is not None and key in kept:
        return kept[key]
    sampler = DistributedSampler(dataset, num_replicas=team.world, rank=team.rank, shuffle=True, seed=seed,
                                 drop_last=True)
    if kept is not None:
        kept[key] = sampler
    return sampler


def epoch_steps(n: int, batch_size: int, team: Team) -> int:
    """Optimizer steps per epoch of ``n`` training images at a global ``batch_size`` split over ``team``."""
    if not team.active:
        return steps_per_epoch(n, batch_size)
    return steps_per_epoch(n // team.world, team.split_batch(batch_size))


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
                guard: SignalGuard, budget: Budget, sizing: dict[str, Any], team: Team | None = None, *,
                amp: Precision | None = None) -> dict[str, Any] | None:
    """One pass over the training data (or until the schedule/budget ends): the epoch record, None on a signal.

    ``sizing``: ``spe`` (steps per epoch), ``warmup`` (warmup steps wanted) and ``cap`` (the most
    steps the run may take, None: no cap) for the budget's re-sizing. ``team``: the processes
    training together (see the module notes; None: this one alone). With several, every rank
    returns None when any of them received a signal, at the same step. ``amp``: the device the
    models are on (batches are moved there) and the step's autocast/gradient scaler (None: CPU, fp32).
    """
    team = team or Team()
    amp = amp if amp is not None else Precision(torch.device("cpu"))
    spe = sizing["spe"]
    seed = epoch_seed(cfg.seed, st["epoch"])
    _seed_epoch(train, seed + team.rank)  # augmentation and dropout differ between ranks (rank 0: as alone)
    sampler = rank_sampler(train, team, cfg.seed)
    if sampler is not None:
        sampler.set_epoch(st["epoch"])
    loader = train_loader(train, team.split_batch(cfg.batch_size), seed, workers=cfg.workers,
                          sampler=sampler)
    set_train(distiller.student, modules)
    bar = progress_bar(loader, total=min(spe, sched.total_steps - st["step"]), desc=f"epoch {st['epoch'] + 1}",
                       unit="batch", show=bool(cfg.progress and team.main))
    loss_sum = correct = labelled = seen = steps = 0
    t_start = last = time.perf_counter()
    lr = sched.lr_at(st["step"])
    for x, y in bar:
        x, y = to_device(x, amp.device), to_device(y, amp.device)
        if cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = sched.lr_at(st["step"])
        for g in opt.param_groups:
            g["lr"] = lr
        with amp.autocast():
            loss, logits, _parts = distiller(x, y)
        opt.zero_grad(set_to_none=True)
        amp.step(loss, opt, params, cfg.clip_grad)  # backward, clip, step (fp16: scaled; a plain step otherwise)
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
        if budget.due() or st["step"] >= sched.total_steps:  # at the planned end: is there time for more?
            budget.resize(sched, st["step"], spe, steps, sizing["warmup"], sizing["cap"])
        if budget.over():  # the safety net: the sizing should have ended the run before this
            sched.resize(st["step"], st["step"])
        if team.follow_schedule(sched, guard.signum is not None):  # rank 0's plan; a signal to any rank stops all
            bar.close()
            return None
        bar.total = min(spe, sched.total_steps - st["step"] + steps)
        if st["step"] >= sched.total_steps:
            break
    bar.close()
    secs = time.perf_counter() - t_start
    loss_sum, correct, labelled, seen = team.sum([loss_sum, correct, labelled, seen])
    return {"epoch": st["epoch"] + 1, "train_loss": loss_sum / max(1, seen),
            "train_acc": correct / labelled if labelled else None, "val_acc": None, "lr": lr,
            "images_per_s": seen / max(secs, 1e-9), "seconds": 0.0, "train_seconds": round(secs, 3),
            "steps": steps, "step": st["step"], "planned_steps": sched.total_steps, **budget.record()}
