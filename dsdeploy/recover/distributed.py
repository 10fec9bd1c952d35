"""Multi-process data-parallel fine-tuning: the process group, and what the ranks must agree on.

A fine-tune runs data-parallel when it is started by a launcher that sets the standard
environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` (``torchrun``, ``accelerate launch``, SLURM scripts that export them) with
``WORLD_SIZE`` > 1; :func:`dsdeploy.recover.launch.launch` is such a launcher for
one machine. :func:`team` joins (or reuses) the process group: ``gloo`` for CPU tensors, plus
``nccl`` for CUDA tensors when CUDA is present (one backend per device type, so the small
control messages below stay on the CPU while gradients of a model on a GPU use NCCL).

A :class:`Team` is what the training loop talks to; with one process every method is a
no-op returning its input, so the single-process path runs exactly as before. Rank 0 is
the one that decides (time budget, scores, the fine-tune-never-worse choice) and writes
(checkpoints, history, artifact); the others follow its decisions, broadcast to them, so
every rank takes the same number of steps and no rank waits forever in a collective.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dsdeploy.errors import ConfigError, DsdeployError

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether this process was started by a multi-process launcher (``WORLD_SIZE`` > 1 in the environment)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def env_rank() -> int:
    """This process's rank from the environment (0 when not launched by one); no torch.distributed needed."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_main() -> bool:
    """Whether this process is rank 0 (the one that writes and prints); True outside a launcher."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return env_rank() == 0


def backend() -> str:
    """The process-group backend: ``gloo`` for CPU tensors, with ``nccl`` for CUDA tensors where CUDA is present."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


@dataclass
class Team:
    """The processes training one model together (``world`` 1: this process alone; every call a no-op).

    Attributes:
        rank / world / local_rank: this process's rank, the number of processes, the rank on this machine.
        owns_group: this Team created the process group (:meth:`close` destroys it).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Whether this process is rank 0."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether more than one process takes part."""
        return self.world > 1

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object; a broadcast)."""
        if not self.active:
            return value
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` run on rank 0 only, its result on every rank; a DsdeployError it raises, raised on every rank."""
        if not self.active:
            return fn(*args)
        got: Any = None
        if self.main:
            try:
                got = fn(*args)
            except DsdeployError as exc:  # shared, so no rank waits for a result that never comes
                got = exc
        got = self.share(got)
        if isinstance(got, DsdeployError):
            raise got
        return got

    def sum(self, values: list[float]) -> list[float]:
        """The element-wise sum of ``values`` over the ranks (float64, on the CPU)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def agree(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank (an all_reduce MAX of a stop flag)."""
        if not self.active:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def follow_schedule(self, sched: Any, stop: bool) -> bool:
        """Give every rank rank 0's schedule length and shape, and agree on ``stop`` (any rank's).

        One all_reduce MAX per call: rank 0 contributes ``total_steps``, ``warmup_steps``,
        ``anchor_step`` and ``anchor_frac`` of ``sched`` (the time budget sizes the schedule on rank
        0 only), the others -1; every rank contributes its stop flag (e.g. a signal it received).
        Returns the agreed stop flag; ``sched`` is updated in place on the other ranks.
        """
        if not self.active:
            return bool(stop)
        mine = [float(sched.total_steps), float(sched.warmup_steps), float(sched.anchor_step),
                float(sched.anchor_frac)] if self.main else [-1.0] * 4
        t = torch.tensor(mine + [1.0 if stop else 0.0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        total, warm, anchor, frac, flag = t.tolist()
        sched.total_steps, sched.warmup_steps, sched.anchor_step = int(total), int(warm), int(anchor)
        sched.anchor_frac = frac
        return flag > 0

    def barrier(self) -> None:
        """Wait until every rank gets here (e.g. the others while rank 0 writes files)."""
        if self.active:
            dist.barrier()

    def split_batch(self, batch_size: int) -> int:
        """Images per process per step: the global ``batch_size`` split evenly over the ranks.

        Raises ConfigError when it does not divide (one line naming ``finetune.batch_size``).
        """
        if batch_size % self.world:
            raise ConfigError(f"finetune.batch_size {batch_size} is not divisible by the {self.world} processes "
                              f"(the batch is split over them); use a multiple of {self.world}")
        return batch_size // self.world

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` as trained by this team: DistributedDataParallel when ``active`` (else ``model`` itself).

        Its parameters are on the device they already are (CUDA: this process's ``LOCAL_RANK`` device);
        DDP broadcasts rank 0's weights and buffers at construction, so every rank starts equal.
        """
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        dev = next(model.parameters()).device
        ids = [dev] if dev.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def close(self) -> None:
        """Destroy the process group when this Team created it (after a last barrier)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def team() -> Team:
    """Join the launcher's process group (created here when none exists yet), or this process alone.

    ``WORLD_SIZE`` unset or 1: a one-process Team, nothing initialised. Otherwise the group is
    initialised from the environment (``init_method="env://"``); on CUDA machines this process's
    device is set to ``LOCAL_RANK``. Raises ConfigError when the environment is incomplete.
    """
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        return Team(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")), owns_group=False)
    if not launched():
        return Team()
    missing = [k for k in ENV if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not set: start the processes with torchrun "
                          f"(or a launcher that sets {', '.join(ENV)})")
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed: run with WORLD_SIZE unset (one process)")
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local % max(1, torch.cuda.device_count()))
    dist.init_process_group(backend=backend(), init_method="env://")
    return Team(dist.get_rank(), dist.get_world_size(), local, owns_group=True)
