"""A generic staged pipeline with content-hash caching; knows nothing about models.

Each :class:`Stage` writes its files into its own folder ``OUT/<stage>/`` (built in a
temporary folder and swapped in on success) plus a record ``OUT/<stage>/stage.json``.
A stage's cache key hashes its recipe section(s), the sha256 of its input files and the
dsdeploy version; ``OUT/state.json`` keeps every completed stage's key and output
hashes. On a re-run a stage whose key and outputs are unchanged is reported "cached" and
not run. A failing stage raises :class:`StageError` (one line naming the stage); the
earlier stages' outputs and state are kept.

The output folder belongs to the run: it must be new, empty, or a run folder (recognised by
its ``state.json``). A run holds ``OUT/run.lock`` (``filelock``) for its whole
length, so a second run on the same folder fails at once; under the lock it removes the
temporary folders a killed run left. Stages keep resume state in ``OUT/resume/`` (see
:meth:`Context.resume_path`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

from filelock import FileLock, Timeout

from dsdeploy.errors import DsdeployError, OutputError, StageError
from dsdeploy.fsutil import (
    atomic_dir,
    check_dir,
    remove_stale_temps,
    sha256_file,
    show,
    write_json,
)
from dsdeploy.version import __version__

STATE_FILE = "state.json"
STATE_FORMAT = "dsdeploy-run"
RECORD_FILE = "stage.json"
LOCK_FILE = "run.lock"
RESUME_DIR = "resume"



@dataclass
class StageOutput:
    """What a stage returns: JSON-able results and its files (role -> name inside the stage folder)."""

    result: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)


@dataclass
class Context:
    """What stages see: the config object, the output folder and the records of earlier stages.

    ``hooks``: callables a stage may use instead of its default (e.g. ``"finetune"``: a fine-tune that
    other processes join, :mod:`dsdeploy.pipeline.ranks`); empty by default.
    """

    config: Any
    out: Path
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: bool = False
    hooks: dict[str, Callable[..., Any]] = field(default_factory=dict)

    def output(self, stage: str, role: str) -> Path | None:
        """The file ``role`` written by ``stage`` in this run (run or cached), or None."""
        rec = self.records.get(stage)
        if not rec or rec["status"] not in ("done", "cached") or role not in rec["outputs"]:
            return None
        return self.out / stage / rec["outputs"][role]

    def resume_path(self, stage: str, name: str) -> Path:
        """A stable file for ``stage``'s resume state (``OUT/resume/<stage>.<name>``); survives a failed stage."""
        folder = self.out / RESUME_DIR
        folder.mkdir(exist_ok=True)
        return folder / f"{stage}.{name}"

    def result(self, stage: str) -> dict[str, Any] | None:
        """The result dict of ``stage`` when it ran or was cached, else None."""
        rec = self.records.get(stage)
        return rec["result"] if rec and rec["status"] in ("done", "cached") else None


@dataclass
class Stage:
    """One step: which config sections and input files it depends on, and what it runs.

    ``sections(ctx)`` -> JSON-able config the stage depends on; ``inputs(ctx)`` -> files or
    folders whose content enters the key; ``skip(ctx)`` -> a reason to skip, or None;
    ``run(ctx, folder)`` writes into ``folder`` and returns a :class:`StageOutput`.
    """

    name: str
    run: Callable[[Context, Path], StageOutput]
    sections: Callable[[Context], Any] = lambda ctx: None
    inputs: Callable[[Context], Iterable[Path | str | None]] = lambda ctx: ()
    skip: Callable[[Context], str | None] = lambda ctx: None


@dataclass
class PipelineResult:
    """The records of every stage, in order, and the output folder.

    ``main``: False on the ranks > 0 of a multi-process launch, which only joined rank 0's
    fine-tune (their ``records`` are empty; rank 0 reports).
    """

    out: Path
    records: dict[str, dict[str, Any]]
    seconds: float
    main: bool = True


def digest_path(path: Path | str | None) -> str:
    """sha256 of a file; for a folder, of its listing (relative names, sizes, mtimes); "missing" if absent."""
    if path is None:
        return "none"
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return "dir:" + h.hexdigest()
    return "missing"


def stage_key(stage: Stage, ctx: Context) -> str:
    """The cache key: stage name + its config sections + input content hashes + dsdeploy version."""
    payload = {"stage": stage.name, "version": __version__, "config": stage.sections(ctx),
               "inputs": [digest_path(p) for p in stage.inputs(ctx)]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _read_state(out: Path) -> Any:
    try:
        return json.loads((out / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def load_state(out: Path) -> dict[str, Any]:
    """``OUT/state.json`` (empty when absent, unreadable, or written by another version)."""
    state = _read_state(out)
    if not isinstance(state, dict) or state.get("version") != __version__ or not isinstance(state.get("stages"), dict):
        return {"format": STATE_FORMAT, "version": __version__, "stages": {}}
    return {"format": STATE_FORMAT, **state}


def run_folder_files(out: Path) -> set[str] | None:
    """Everything in ``out`` when it is a run folder (its ``state.json`` says so), else None."""
    names = {p.name for p in out.iterdir()}
    if names <= {LOCK_FILE}:  # a run killed between taking the lock and writing its state
        return names
    if {STATE_FILE, LOCK_FILE} <= names:  # a run held it: even a damaged state.json is ours (rebuilt from scratch)
        return names
    state = _read_state(out)
    if not isinstance(state, dict) or not isinstance(state.get("stages"), dict) or \
            state.get("format", STATE_FORMAT) != STATE_FORMAT:
        return None
    return names


@contextlib.contextmanager
def run_folder(out: Path) -> Iterator[dict[str, Any]]:
    """Own ``out`` for one run: check it is new, empty or a run folder, lock it, clean stale temps.

    Yields the loaded state (already written to ``OUT/state.json``, which marks the folder as a
    run folder from the first moment).

    Raises:
        OutputError: ``out`` is a file or a non-empty folder that is not a run folder, cannot be
            written, or another run holds its lock.
    """
    check_dir(out, owned=run_folder_files, overwrite=True, what="run folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(out / LOCK_FILE), timeout=0)
        lock.acquire()
    except Timeout:
        raise OutputError(f"another dsdeploy run is using {show(out)} (it holds {LOCK_FILE}): wait for it to end "
                          f"or choose another output folder") from None
    except OSError as exc:
        raise OutputError(f"cannot write to run folder {show(out)}: {exc.strerror or exc}") from None
    try:
        remove_stale_temps(out)
        state = load_state(out)
        write_json(out / STATE_FILE, state)
        yield state
    finally:
        lock.release()


def _outputs_intact(out: Path, rec: dict[str, Any]) -> bool:
    folder = out / rec["stage"]
    return all((folder / name).is_file() and sha256_file(folder / name) == digest
               for name, digest in rec.get("hashes", {}).items())


def _cached(stage: Stage, key: str, ctx: Context, state: dict[str, Any]) -> dict[str, Any] | None:
    prev = state["stages"].get(stage.name)
    if not prev or prev.get("key") != key or prev.get("status") not in ("done", "cached"):
        return None
    return prev if _outputs_intact(ctx.out, prev) else None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _execute(stage: Stage, ctx: Context, key: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    folder = ctx.out / stage.name
    try:
        with atomic_dir(folder) as tmp:
            output = stage.run(ctx, tmp)
            missing = [n for n in output.outputs.values() if not (tmp / n).is_file()]
            if missing:
                raise DsdeployError(f"did not write {', '.join(missing)}")
            record = {"stage": stage.name, "status": "done", "key": key, "seconds": 0.0,
                      "outputs": dict(output.outputs), "result": output.result,
                      "hashes": {n: sha256_file(tmp / n) for n in output.outputs.values()}}
            record["seconds"] = round(time.perf_counter() - t0, 2)
            write_json(tmp / RECORD_FILE, record)
    except DsdeployError as exc:
        raise StageError(stage.name, _one_line(exc), exc.exit_code) from exc
    except Exception as exc:  # a library bug still ends as one line naming the stage (--debug shows the cause)
        raise StageError(stage.name, f"{type(exc).__name__}: {_one_line(exc)}", 70) from exc
    return record


def run_pipeline(stages: list[Stage], ctx: Context, *, log: TextIO | None = None) -> PipelineResult:
    """Run ``stages`` in order into ``ctx.out``, skipping the ones whose key is unchanged.

    Prints one line per stage to ``log`` (default stderr): ``[3/8] finetune ... done in 41.2s``,
    ``... cached`` or ``... skipped (reason)``.

    Raises:
        OutputError: ``ctx.out`` is not new, empty or a run folder, or another run holds it (see :func:`run_folder`).
        StageError: the first stage that fails (the state of earlier stages is saved first).
    """
    log = log or sys.stderr
    t_start = time.perf_counter()
    with run_folder(ctx.out) as state:
        _run_stages(stages, ctx, state, log)
    return PipelineResult(ctx.out, dict(ctx.records), round(time.perf_counter() - t_start, 2))


def _run_stages(stages: list[Stage], ctx: Context, state: dict[str, Any], log: TextIO) -> None:
    n = len(stages)
    for i, stage in enumerate(stages, 1):
        prefix = f"[{i}/{n}] {stage.name} ..."
        reason = stage.skip(ctx)
        if reason:
            ctx.records[stage.name] = {"stage": stage.name, "status": "skipped", "reason": reason, "outputs": {},
                                       "result": {}, "seconds": 0.0}
            state["stages"].pop(stage.name, None)
            print(f"{prefix} skipped ({reason})", file=log, flush=True)
            continue
        key = stage_key(stage, ctx)
        prev = _cached(stage, key, ctx, state)
        if prev is not None:
            ctx.records[stage.name] = {**prev, "status": "cached"}
            print(f"{prefix} cached", file=log, flush=True)
            continue
        try:
            record = _execute(stage, ctx, key)
        except StageError:
            state["stages"].pop(stage.name, None)
            write_json(ctx.out / STATE_FILE, state)
            print(f"{prefix} failed", file=log, flush=True)
            raise
        ctx.records[stage.name] = record
        state["stages"][stage.name] = record
        write_json(ctx.out / STATE_FILE, state)
        print(f"{prefix} done in {record['seconds']:.1f}s", file=log, flush=True)
        warning = (record.get("result") or {}).get("warning")
        if warning:  # e.g. a fine-tune that kept its input because training made it worse
            print(f"warning: {stage.name}: {warning}", file=log, flush=True)
    write_json(ctx.out / STATE_FILE, state)
