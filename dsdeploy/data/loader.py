"""DataLoaders for every stage: worker processes, pinned memory, seeded order, unreadable images dropped.

* ``workers``: DataLoader worker processes (None: :func:`default_workers`). Workers share the
  datasets' decode state (:mod:`dsdeploy.data.store`) and are persistent across the epochs of
  a training run (:func:`train_loader` keeps one loader per dataset).
* Order: :class:`SeededSampler` permutes with a generator seeded by the epoch's seed only, and
  each item's augmentation is seeded by (epoch seed, index) in the dataset, so the batches are
  the same for any number of workers, and an epoch replayed after a resume is the same epoch.
* An item that is ``None`` (an unreadable image, :class:`dsdeploy.data.datasets.ImageDataset`)
  is dropped by the collate; a batch left empty is not yielded. A pass that yields nothing
  although the dataset is not empty raises DataError; new unreadable files are logged once a
  pass ends.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate

from dsdeploy.errors import DataError
from dsdeploy.ranges import check_number

log = logging.getLogger("dsdeploy.data.datasets")


def default_workers() -> int:
    """Loader worker processes by default.

    0 on 1-2 CPUs (a worker then only competes with the training step). When this process already
    uses CUDA (a model was moved there), the step runs on the GPU and the CPUs are free to decode:
    this process's share of the CPUs (``os.sched_getaffinity`` / torchrun's ``LOCAL_WORLD_SIZE``)
    less one, at most 16 (torchvision's ImageNet reference recipe uses 16 per GPU): a GPU step of a
    ResNet-50-size student at batch 64 takes ~50 ms on an H200 (``benchmarks/RESULTS-gpu-check.md``),
    about the time 4 workers need to decode and augment 64 ImageNet-size JPEGs. Otherwise (CPU
    training, where workers take cores from the step) ``min(4, cpus - 1)``.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    if cpus <= 2:
        return 0
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        share = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        return max(1, min(16, share - 1))
    return min(4, cpus - 1)


def resolve_workers(workers: int | None, field: str = "workers") -> int:
    """``workers`` checked (an int >= 0, named ``field`` in the error), None -> :func:`default_workers`."""
    if workers is None:
        return default_workers()
    check_number(workers, field, low=0, integer=True)
    return int(workers)


def collate(batch: Sequence[Any]) -> Any:
    """``default_collate`` of the items that are not None; None when none is left."""
    items = [b for b in batch if b is not None]
    return default_collate(items) if items else None


def _images(dataset: Any) -> Any:
    """The dsdeploy ImageDataset under ``dataset`` (through Subsets), or None."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset if hasattr(dataset, "share") and hasattr(dataset, "skipped") else None


class SeededSampler(Sampler[int]):
    """A random permutation of ``range(n)`` from ``seed`` alone (set :attr:`seed` before each pass).

    With ``shard=(rank, world)`` each rank takes every ``world``-th index of the permutation from
    ``rank``, over the first ``n - n % world`` (equal shares, as DistributedSampler with drop_last).
    """

    def __init__(self, n: int, seed: int = 0, shard: tuple[int, int] | None = None) -> None:
        self.n, self.seed = n, seed
        self.rank, self.world = shard if shard is not None else (0, 1)
        if not 0 <= self.rank < self.world:
            raise DataError(f"shard rank must be in [0, {self.world}), got {self.rank}")

    def __iter__(self) -> Iterator[int]:
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(int(self.seed)))
        if self.world > 1:
            perm = perm[:self.n - self.n % self.world][self.rank::self.world]
        return iter(perm.tolist())

    def __len__(self) -> int:
        return self.n if self.world == 1 else self.n // self.world


class SkippingLoader(DataLoader):
    """A DataLoader that skips empty batches (every item unreadable) and reports unreadable files."""

    def __iter__(self) -> Iterator[Any]:
        images = _images(self.dataset)
        before = images.skipped if images is not None else 0
        yielded = 0
        for batch in super().__iter__():
            if batch is None:
                continue
            yielded += 1
            yield batch
        if images is None:
            return
        found = images.skipped - before
        if found:
            log.warning("skipped %d corrupt image files in %s", found, images.where or "the data")
        if not yielded and len(self.dataset):
            raise DataError(f"no readable images in {images.where or 'the data'} ({images.skipped} corrupt files)")


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, workers: int | None = 0,
                sampler: Sampler | None = None, drop_last: bool = False, pin_memory: bool | None = None
                ) -> DataLoader:
    """A DataLoader over ``dataset`` whose batches depend only on ``seed`` (not on ``workers``).

    Args:
        dataset: any map-style dataset; dsdeploy image datasets share their decode state with the workers.
        batch_size: items per batch (>= 1); a batch may be shorter by the unreadable items dropped.
        shuffle: permute with :class:`SeededSampler` (``seed``); the dataset's augmentation is seeded
            with ``seed`` too (``set_epoch_seed``). False: dataset order.
        workers: DataLoader worker processes (0: in this process; None: :func:`default_workers`);
            persistent while the loader lives. A dataset of in-memory images (digits) always uses 0.
        sampler: an explicit sampler (e.g. a DistributedSampler; its order is the caller's), instead of ``shuffle``.
        pin_memory: pin batches for fast copies to a GPU (None: when this process already uses CUDA,
            i.e. a model was moved there; pinning would otherwise start a CUDA context for nothing).

    Raises:
        DsdeployError: ``batch_size`` or ``workers`` out of range.
    """
    check_number(batch_size, "batch_size", low=1, integer=True)
    workers = resolve_workers(workers)
    images = _images(dataset)
    if images is not None and images.store is None:  # images already in memory: nothing for a worker to decode
        workers = 0
    if shuffle and sampler is None:
        sampler = SeededSampler(len(dataset), seed)
        if hasattr(dataset, "set_epoch_seed"):
            dataset.set_epoch_seed(seed)
    if images is not None and workers > 0:
        images.share()
    if pin_memory is None:
        pin_memory = torch.cuda.is_available() and torch.cuda.is_initialized()
    return SkippingLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                          drop_last=drop_last, pin_memory=pin_memory, persistent_workers=workers > 0,
                          generator=torch.Generator().manual_seed(seed))


def train_loader(dataset: Any, batch_size: int, seed: int, *, workers: int | None = 0,
                 sampler: Sampler | None = None, shard: tuple[int, int] | None = None) -> DataLoader:
    """The shuffled training loader of one epoch: order and augmentation fixed by ``seed`` alone.

    When the split holds more than one batch, the short last batch is dropped: a batch of one
    image cannot train BatchNorm. With ``workers`` > 0 one loader per (dataset, batch size,
    workers, sampler) is kept on the dataset and re-seeded each epoch, so its worker processes
    persist across epochs. ``shard=(rank, world)``: this rank's share of the seeded permutation
    (:class:`SeededSampler`); ``sampler``: an explicit sampler instead (the caller seeds it,
    e.g. ``DistributedSampler.set_epoch``).
    """
    workers = resolve_workers(workers)
    if hasattr(dataset, "set_epoch_seed"):
        dataset.set_epoch_seed(seed)
    n = len(sampler) if sampler is not None else len(dataset) if shard is None else len(dataset) // shard[1]
    key = (batch_size, workers, id(sampler), shard)
    kept = getattr(dataset, "_dsdeploy_loaders", None) if workers > 0 else None
    if kept is not None and key in kept:
        loader = kept[key]
    else:
        own = sampler if sampler is not None else SeededSampler(len(dataset), seed, shard)
        loader = make_loader(dataset, batch_size, shuffle=False, seed=seed, workers=workers, sampler=own,
                             drop_last=n > batch_size)
        if workers > 0:
            try:
                kept = dataset.__dict__.setdefault("_dsdeploy_loaders", {})
                kept[key] = loader
            except AttributeError:  # a dataset without a __dict__: a new loader each epoch
                pass
    if isinstance(loader.sampler, SeededSampler):
        loader.sampler.seed = seed
    return loader


def release_loaders(dataset: Any) -> int:
    """Let go of the loaders :func:`train_loader` keeps on ``dataset`` so that their worker processes
    end now (a later :func:`train_loader` call starts new ones); returns how many were kept.

    Kept loaders and their dataset form a reference cycle: left to the garbage collector, torch's
    DataLoader shutdown then waits out its 5-second join timeout for each worker (measured with
    torch 2.14: 2 workers, 11 s), in whatever the process is doing at that moment.
    """
    kept = vars(dataset).pop("_dsdeploy_loaders", None) if hasattr(dataset, "__dict__") else None
    return len(kept or {})


def readable_images(dataset: Any, count: int) -> torch.Tensor:
    """The first ``count`` readable images of ``dataset`` in order (unreadable ones skipped and counted),
    repeated cyclically when it holds fewer: a (count, C, H, W) tensor.

    Raises DataError when none is readable."""
    got: list[torch.Tensor] = []
    for x, _ in make_loader(dataset, min(64, count), shuffle=False):
        got.append(x)
        if sum(len(t) for t in got) >= count:
            break
    x = torch.cat(got)
    return x[torch.arange(count) % len(x)]


def first_item(dataset: Any) -> tuple[torch.Tensor, Any]:
    """The first readable item of ``dataset`` (unreadable images are skipped and counted).

    Raises DataError when none is readable."""
    getitems = getattr(dataset, "__getitems__", None)
    for start in range(0, len(dataset), 64):
        idx = list(range(start, min(start + 64, len(dataset))))
        items = getitems(idx) if getitems is not None else [dataset[i] for i in idx]
        for item in items:
            if item is not None:
                return item
    raise DataError("no readable images in the data")
