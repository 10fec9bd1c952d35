"""Progress bars: tqdm's (the library), on stderr, drawn only where they can be redrawn in place."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


def bar(iterable: Iterable | None = None, *, show: bool = True, **kwargs: Any) -> tqdm:
    """A transient tqdm bar (``leave=False``) over ``iterable`` (or updated by hand with ``total=``).

    ``show`` False hides it; True shows it only when stderr is a terminal (tqdm's ``disable=None``), so a log
    file or a pipe never fills with carriage-return redraws. Other ``kwargs`` go to :class:`tqdm.tqdm`.
    """
    return tqdm(iterable, disable=None if show else True, leave=False, **kwargs)
