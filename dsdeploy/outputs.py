"""Which output paths a command may write, checked before any work: not an input, the right suffix, not another's file.

:func:`check_output` refuses an output that is also an input, has the wrong suffix for its
format, or would replace a file of another kind (:func:`dsdeploy.fsutil.sniff`) or a text
file dsdeploy did not write (:func:`written_by_dsdeploy`); :func:`check_distinct` refuses
two outputs of one command naming the same file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

from dsdeploy.errors import OutputError
from dsdeploy.fsutil import KIND_NAMES, _check_kind, show, sniff

REPORT_MARK = "<!-- written by dsdeploy -->"
"""First line of every Markdown report dsdeploy writes to a path the user names."""
CSV_HEADER_START = "model,ep,alias,"
"""How the header line of a bench CSV (``bench_report.render_csv``) starts."""


def written_by_dsdeploy(path: str | os.PathLike) -> bool:
    """Whether the existing text file ``path`` is one of dsdeploy's own reports (so a rerun may replace it).

    Recognised: JSON objects whose ``schema`` starts ``dsdeploy.`` (bench results), a JSON list of
    fine-tuning epoch records (objects with ``epoch`` and ``train_loss``: the ``--history`` file),
    a first line :data:`REPORT_MARK` (Markdown reports) or starting :data:`CSV_HEADER_START` (bench CSV).
    Anything else (notes, configs, other data) is the user's.
    """
    try:
        if os.path.getsize(path) > (256 << 20):
            return False
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    first = text.split("\n", 1)[0].strip()
    if first == REPORT_MARK or first.startswith(CSV_HEADER_START):
        return True
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    if isinstance(obj, dict):
        return str(obj.get("schema", "")).startswith("dsdeploy.")
    return isinstance(obj, list) and bool(obj) and all(
        isinstance(r, dict) and "epoch" in r and "train_loss" in r for r in obj)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _same_path(a: Path, b: Path) -> bool:
    return _same_file(a, b) or os.path.abspath(a) == os.path.abspath(b)


def check_output(path: str | os.PathLike, *, kind: str, suffixes: Iterable[str] = (),
                 inputs: Iterable[tuple[str, str | os.PathLike | None]] = (), what: str = "output") -> Path:
    """Refuse, before any work, an output path the command must not write; return it as a Path.

    Args:
        path: the file to write.
        kind: what will be written (a :data:`KIND_NAMES` key); an existing file there of
            another kind is refused, one of the same kind (a previous output) may be replaced;
            an existing ``text`` file only when :func:`written_by_dsdeploy`.
        suffixes: accepted name endings where the format is fixed (e.g. ``(".onnx",)``).
        inputs: ``(role, path)`` of everything the command reads; the output may be none of them
            (checked with ``os.path.samefile``, so links and other spellings count).
        what: the output's role in messages.

    Raises:
        OutputError: one line naming the path and the fix.
    """
    p = Path(path)
    name = show(p)
    suffixes = tuple(suffixes)
    for role, src in inputs:
        if src is not None and str(src) != "" and _same_path(p, Path(src)):
            raise OutputError(f"{what} {name} is also the {role} this command reads; writing it would destroy "
                              f"the input: choose another path")
    if suffixes and not p.name.lower().endswith(suffixes):
        raise OutputError(f"{what} {name} must end in {' or '.join(suffixes)}: it will hold {KIND_NAMES[kind]}; "
                          f"choose a name with that suffix")
    if p.is_dir():
        raise OutputError(f"{what} {name} is a folder: give a file name")
    _check_folder(p, what)
    _check_kind(p, kind, what)
    if kind == "text" and sniff(p) == "text" and not written_by_dsdeploy(p):
        raise OutputError(f"{what} {name} exists and was not written by dsdeploy: choose another path")
    return p


def _check_folder(p: Path, what: str) -> None:
    """Refuse, before any work, an output whose folder cannot take a new file: the nearest existing folder above
    ``p`` (missing ones are created when the file is written) is probed with a temporary file, removed at once, so
    the reason is the operating system's (read-only file system, permission, not a folder)."""
    folder = next((a for a in p.absolute().parents if a.exists()), None)
    if folder is None:
        return
    if not folder.is_dir():
        raise OutputError(f"{what} {show(p)}: {show(folder)} is a file, not a folder: choose another path")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".dsdeploy-probe-")
    except OSError as exc:
        raise OutputError(f"cannot write {what} {show(p)}: {show(folder)}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


def check_distinct(outputs: Iterable[tuple[str, str | os.PathLike | None]]) -> None:
    """Refuse two outputs of one command that name the same file (one line naming both roles)."""
    seen: list[tuple[str, Path]] = []
    for role, path in outputs:
        if path is None:
            continue
        for other, q in seen:
            if _same_path(Path(path), q):
                raise OutputError(f"{role} and {other} are the same file {show(path)}: give each its own path")
        seen.append((role, Path(path)))
