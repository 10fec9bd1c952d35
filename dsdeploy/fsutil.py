"""Crash-safe, owner-safe file output: everything dsdeploy writes goes through here.

Every file goes to a temporary name first and is renamed into place: a failure at any
point (exception, disk full, permission denied, kill) leaves any previous file at the
destination intact and no partial file under the final name. And a command writes only
what it owns: :func:`check_output` refuses an output that is also an input, has the
wrong suffix for its format, or would replace a file of another kind or a text file dsdeploy
did not write (:func:`written_by_dsdeploy`); :func:`atomic_path`
refuses (at rename time) to replace a file whose content is of another kind than the one
written; :func:`owned_dir` writes a folder of outputs without touching files it did not
write. Temporary names (``.NAME.XXXXXXXX.tmp``) are recognisable: :func:`remove_stale_temps`
deletes the ones a killed process left, and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from dsdeploy.errors import DsdeployError, OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask



def show(path: str | os.PathLike) -> str:
    """``path`` printable in one line on any terminal (undecodable bytes shown as ``\\xNN``)."""
    text = utf8(os.fspath(path)) if not isinstance(path, bytes) else path.decode("utf-8", "backslashreplace")
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def utf8(text: str) -> str:
    """``text`` as valid UTF-8 (a path's undecodable bytes as ``\\xNN``): for ONNX metadata, JSON, bindings."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def ort_model(path: str | os.PathLike) -> str | bytes:
    """``path`` as onnxruntime's ``InferenceSession`` takes it.

    The path itself, or the file's bytes when its name is not valid UTF-8 (the binding
    accepts only UTF-8 strings; a model with external data must have a UTF-8 name).
    """
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return Path(path).read_bytes()


def _check_parent(path: Path) -> None:
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DsdeployError(f"cannot create folder {show(parent)}: {exc.strerror or exc}") from None
    if not parent.is_dir():
        raise DsdeployError(f"cannot write to {show(parent)}: not a folder")
    if not os.access(parent, os.W_OK):
        raise DsdeployError(f"cannot write to {show(parent)}: permission denied")


# ----------------------------------------------------------------------------------------------
# what kind of file is there (so a command never replaces a file of another kind)
# ----------------------------------------------------------------------------------------------

KIND_NAMES = {"torch": "a PyTorch file", "onnx": "an ONNX model", "png": "a PNG image",
              "text": "a text file", "binary": "a binary file of unknown kind"}


def sniff(path: str | os.PathLike) -> str | None:
    """The kind of an existing file from its first bytes: torch, onnx, png, text or binary.

    None when the file is absent or empty (nothing to lose). ``torch`` = a zip or a legacy
    pickle (``torch.save``); ``onnx`` = protobuf starting with the ``ir_version`` field (what
    ``onnx.save`` writes first); ``text`` = UTF-8 without NUL bytes (JSON, CSV, Markdown).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except (FileNotFoundError, IsADirectoryError):
        return None
    except OSError:
        return "binary"
    if not head:
        return None
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:1] == b"\x08":
        return "onnx"
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "text"
        except UnicodeDecodeError as exc:
            if exc.start >= len(head) - 3:  # a character cut by the 8 KiB window
                return "text"
    return "binary"


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
    _check_kind(p, kind, what)
    if kind == "text" and sniff(p) == "text" and not written_by_dsdeploy(p):
        raise OutputError(f"{what} {name} exists and was not written by dsdeploy: choose another path")
    return p


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


def _check_kind(dest: Path, kind: str | None, what: str = "output") -> None:
    if kind is None:
        return
    old = sniff(dest)
    if old is not None and (old != kind or kind == "binary"):
        raise OutputError(f"{what} {show(dest)} exists and holds {KIND_NAMES[old]}, not {KIND_NAMES[kind]}; "
                          f"refusing to replace it: choose another path (or move that file away)")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched. An
    existing ``path`` is replaced only by content of the same kind (:func:`sniff`): a
    report never lands on a model, ONNX never on an artifact (OutputError otherwise).
    """
    dest = Path(path)
    _check_parent(dest)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as exc:
        raise DsdeployError(f"cannot write {show(dest)}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        if dest.is_dir():
            raise OutputError(f"output {show(dest)} is a folder: give a file name")
        _check_kind(dest, sniff(tmp_path))
        os.replace(tmp_path, dest)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise DsdeployError(f"cannot write {show(dest)}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; swap it into place on success.

    For folders dsdeploy owns whole (a run's stage folders): an existing folder at ``path``
    is replaced only after everything was written. Folders a user names go through
    :func:`owned_dir`.
    """
    dest = Path(path)
    _check_parent(dest)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    except OSError as exc:
        raise DsdeployError(f"cannot write {show(dest)}: {exc.strerror or exc}") from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DsdeployError(f"cannot write {show(dest)}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# folders a user names: write only what the tool owns
# ----------------------------------------------------------------------------------------------

TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # what mkstemp/mkdtemp make above


def remove_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files/folders a killed dsdeploy left directly in ``folder``.

    Only names of the form ``.NAME.XXXXXXXX.tmp`` (this module's) and ``.NAME.old`` whose
    ``NAME`` also exists (:func:`atomic_dir`'s swap) are touched. Returns the names removed.
    Call it only while holding the folder's lock (no live writer can own them).
    """
    root = Path(folder)
    removed = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        name = entry.name
        old = name.startswith(".") and name.endswith(".old") and (root / name[1:-4]).exists()
        if TEMP_NAME.match(name) or old:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(name)
    return removed


def _children(folder: Path) -> list[Path]:
    return [c for c in folder.iterdir() if not TEMP_NAME.match(c.name)]


def check_dir(path: str | os.PathLike, *, owned: Callable[[Path], set[str] | None], overwrite: bool = False,
              what: str = "output folder") -> set[str]:
    """The checks of :func:`owned_dir`, to run before any work: the names it may replace in ``path``.

    Raises:
        OutputError: ``path`` is a file, or a non-empty folder not written by the tool, or one
            written by it without ``overwrite``.
    """
    dest = Path(path)
    name = show(dest) if dest.name else f"{show(dest)} ({show(os.path.abspath(dest))})"  # "." names where it is
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"{what} {name} is a file, not a folder: choose a folder name")
    if not dest.exists() or not _children(dest):
        return set()
    mine = owned(dest)
    if mine is None:
        raise OutputError(f"{what} {name} is not empty and was not written by dsdeploy: choose a new or "
                          f"empty folder (nothing in {name} was changed)")
    if not overwrite:
        raise OutputError(f"{what} {name} holds earlier dsdeploy output: allow overwrite (--overwrite) to "
                          f"replace those files (other files in it are kept), or choose another folder")
    return {n for n in mine if n and Path(n).name == n and n not in (".", "..")}  # names directly inside only


@contextlib.contextmanager
def owned_dir(path: str | os.PathLike, *, owned: Callable[[Path], set[str] | None], overwrite: bool = False,
              what: str = "output folder") -> Iterator[Path]:
    """Yield an empty temporary folder; on success its files land in ``path``, touching nothing else.

    ``path`` may be new, an empty folder (``.`` included), or a folder this tool wrote before:
    ``owned(path)`` returns the names it wrote there (recognised by its own marker file), or
    None when the folder is not one of its own. Such a folder is replaced only with
    ``overwrite``, and then only the names it owns: other files stay, and a new file whose
    name a foreign file holds is refused. A new folder is renamed into place whole; in an
    existing one each file is renamed in (files under the marker-file name last). A failure
    before the renames leaves ``path`` as it was.

    Raises:
        OutputError: a file, a non-empty folder not written by the tool, or one without
            ``overwrite`` (one line naming the folder and the fix).
    """
    dest = Path(path)
    name = show(dest)
    old = check_dir(dest, owned=owned, overwrite=overwrite, what=what)
    if not dest.exists():
        with atomic_dir(dest) as tmp:
            yield tmp
        return
    if not os.access(dest, os.W_OK):
        raise OutputError(f"cannot write to {what} {name}: permission denied")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".dsdeploy.", suffix=".tmp", dir=dest))
    except OSError as exc:
        raise DsdeployError(f"cannot write {name}: {exc.strerror or exc}") from None
    try:
        yield tmp
        new = sorted(p.name for p in tmp.iterdir())
        foreign = [n for n in new if (dest / n).exists() and n not in old]
        if foreign:
            raise OutputError(f"{what} {name} already holds {foreign[0]}, which dsdeploy did not write: move it "
                              f"away or choose another folder")
        for n in sorted(new, key=lambda n: n in ("manifest.json", "state.json")):
            if (dest / n).is_dir() and not (dest / n).is_symlink():
                shutil.rmtree(dest / n)
            os.replace(tmp / n, dest / n)
        for n in sorted(old - set(new)):
            target = dest / n
            if target.is_file() or target.is_symlink():
                target.unlink()
    except OSError as exc:
        raise DsdeployError(f"cannot write {name}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically, as UTF-8 (undecodable path bytes in it as ``\\xNN``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(utf8(text), encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest_tree(path: str | os.PathLike) -> str:
    """A content digest of a file (sha256) or a folder (relative names and sizes of its files).

    Independent of where the folder lives and of file times, so the same data copied or
    spelled differently digests the same. "missing" when nothing is there.
    """
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if not p.is_dir():
        return "missing"
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(os.fsencode(f.relative_to(p)) + f"\0{f.stat().st_size}\n".encode())
    return "dir:" + h.hexdigest()


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Return ``Path(path)`` or raise a one-line error if it is not an existing file."""
    p = Path(path)
    if not p.exists():
        raise DsdeployError(f"{what} not found: {show(p)}")
    if not p.is_file():
        raise DsdeployError(f"{what} is not a file: {show(p)}")
    return p
