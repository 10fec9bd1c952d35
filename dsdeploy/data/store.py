"""What is known about each listed image file: unread, decoded (and cached), or unreadable.

One :class:`DecodedStore` serves every dataset over the same listing and geometry (folder,
channels, size, resize, interpolation): the train and val splits of one ``load_data`` call, and, while
they live or inside :func:`keep_decoded`, the splits later ``load_data`` calls make of the
same folder — so calibrate, fine-tune and evaluate in one ``dsdeploy run`` decode each
image once. Its tensors move to shared memory before DataLoader workers start
(:meth:`DecodedStore.share`), so what a worker decodes or finds unreadable is seen by the
main process and by the other workers.

The uint8 cache holds the evaluation-geometry image of every file when all of them fit in
:data:`CACHE_BYTES` (CIFAR-10: 180 MB); it is filled item by item as loaders read the files
(never up front), and its pages are only committed as they are written.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import weakref
from collections.abc import Iterator, Sequence

import torch

from dsdeploy.data.preprocessing import Preprocess

CACHE_BYTES = 2 << 30  # cache decoded images of a listing when they all fit in this many bytes
UNREAD, CACHED, BAD, READABLE = 0, 1, 2, 3  # status of one file

_REGISTRY: weakref.WeakValueDictionary[tuple, DecodedStore] = weakref.WeakValueDictionary()
_KEPT: list[list[DecodedStore]] = []  # strong references while keep_decoded() is active


def _shared_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory whose pages are committed only when written."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    storage = torch.UntypedStorage._new_shared(max(1, nbytes))
    return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))


class DecodedStore:
    """Per-file decode state (``status``) and, when it fits, the decoded uint8 images (``images``).

    ``files``: the listed paths (strings); ``pre``: the geometry (channels, size, resize) the cache holds.
    """

    def __init__(self, files: Sequence[str], pre: Preprocess) -> None:
        self.files = files
        self.pre = pre
        self.shape = (pre.channels, *pre.size)
        self.cacheable = len(files) * math.prod(self.shape) <= CACHE_BYTES
        self.status = torch.zeros(len(files), dtype=torch.int8)
        self.images: torch.Tensor | None = None
        self.shared = False

    def share(self) -> None:
        """Move the state to shared memory (before DataLoader workers start; idempotent)."""
        if self.shared:
            return
        self.status.share_memory_()
        if self.images is not None:
            self.images.share_memory_()
        elif self.cacheable:
            self.images = _shared_empty((len(self.files), *self.shape), torch.uint8)
        self.shared = True

    def cached(self, j: int) -> torch.Tensor | None:
        """The decoded image of file ``j`` when cached, else None."""
        return self.images[j] if self.status[j] == CACHED and self.images is not None else None

    def put(self, j: int, img: torch.Tensor | None) -> None:
        """Record file ``j`` as decoded to ``img`` (cached when the store caches) or unreadable (None)."""
        if img is None:
            self.status[j] = BAD
            return
        if self.cacheable:
            if self.images is None:  # workers == 0: plain memory, committed page by page as it fills
                self.images = torch.empty((len(self.files), *self.shape), dtype=torch.uint8)
            self.images[j] = img
            self.status[j] = CACHED
        else:
            self.status[j] = READABLE

    def unreadable(self, j: int) -> bool:
        """Whether file ``j`` was found unreadable."""
        return bool(self.status[j] == BAD)


def _key(root: str, files: Sequence[str], pre: Preprocess) -> tuple:
    h = hashlib.sha1()
    for f in files:
        h.update(f.encode("utf-8", "surrogateescape") + b"\0")
    return (root, pre.channels, pre.size, pre.resize, pre.interpolation, len(files), h.hexdigest())


def store_for(root: str, files: Sequence[str], pre: Preprocess) -> DecodedStore:
    """The store of this listing and geometry: the live one when there is one, else a new one."""
    key = _key(root, files, pre)
    store = _REGISTRY.get(key)
    if store is None:
        store = DecodedStore(files, pre)
        _REGISTRY[key] = store
    if _KEPT:
        _KEPT[-1].append(store)
    return store


@contextlib.contextmanager
def keep_decoded() -> Iterator[None]:
    """While active, every store made or reused stays alive, so later ``load_data`` calls of the same
    folder and geometry reuse what earlier ones decoded (``dsdeploy run`` wraps its stages in this)."""
    _KEPT.append([])
    try:
        yield
    finally:
        _KEPT.pop()
