"""Listing image folders by name only: no file is opened or stat'ed beyond what ``os.scandir`` gives.

Start-up cost is one directory walk: a 1.28M-file ImageNet folder is listed, not read.
Unreadable images are found later, when a loader reads them (:mod:`dsdeploy.data.datasets`).
The order is the sort of the path components (as ``sorted(Path.rglob(...))`` gives), so a
folder always lists the same way and seeded splits are reproducible.
"""

from __future__ import annotations

import os
from pathlib import Path

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS


def list_files(folder: str | Path) -> tuple[list[str], int]:
    """All non-hidden files below ``folder``: (image-extension paths as strings, in component order;
    count of other files). Hidden files and folders (a leading dot) are ignored; symlinked folders
    are not followed; an unreadable sub-folder lists nothing."""
    images: list[str] = []
    other = 0

    def walk(top: str) -> None:
        nonlocal other
        try:
            with os.scandir(top) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                walk(e.path)
            elif e.is_file():
                if _is_image(e.name):
                    images.append(e.path)
                else:
                    other += 1

    walk(os.fspath(folder))
    return images, other


def class_folders(folder: Path) -> list[str]:
    """The class names of ``folder``: every non-hidden sub-folder, sorted (empty ones included).

    The label rule everywhere: a class's index is its position in this list, as torchvision's
    ``ImageFolder.find_classes`` does, so an empty class folder never shifts later labels."""
    return sorted(d.name for d in os.scandir(folder) if d.is_dir() and not d.name.startswith("."))


def scan_tree(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[int], list[str], int]:
    """Scan ``folder/<class>/**``: files, labels (index in ``classes``, default :func:`class_folders`),
    class names, non-image files skipped."""
    classes = class_folders(folder) if classes is None else classes
    files: list[str] = []
    labels: list[int] = []
    skipped = 0
    for index, name in enumerate(classes):
        if not (folder / name).is_dir():
            continue
        found, other = list_files(folder / name)
        skipped += other
        labels += [index] * len(found)
        files += found
    return files, labels, classes, skipped


def scan(root: Path) -> tuple[list[str], list[int], list[str | None], list[str] | None, int]:
    """Find images under ``root``: (files, labels, split of each file or None, classes, non-images skipped).

    ``root/train`` with ``root/test`` or ``root/val``: the splits are the folders; else
    ``root/<class>/**``; else the images directly in ``root`` (unlabelled: label -1, classes None).
    """
    held = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if (root / "train").is_dir() or held is not None:
        folders = [(name, folder) for name, folder in (("train", root / "train"), ("val", held))
                   if folder is not None and folder.is_dir()]
        names = sorted({c for _, folder in folders for c in class_folders(folder)})
        files, labels, which, skipped = [], [], [], 0
        for name, folder in folders:
            f, lab, _, s = scan_tree(folder, names)
            files += f
            labels += lab
            which += [name] * len(f)
            skipped += s
        return files, labels, which, names, skipped
    files, labels, classes, skipped = scan_tree(root)
    if not files:  # a flat folder of images: unlabelled
        loose = sorted((e for e in os.scandir(root) if e.is_file() and not e.name.startswith(".")),
                       key=lambda e: e.name)
        files = [e.path for e in loose if _is_image(e.name)]
        labels, classes, skipped = [-1] * len(files), None, skipped + len(loose) - len(files)
    return files, labels, [None] * len(files), classes, skipped
