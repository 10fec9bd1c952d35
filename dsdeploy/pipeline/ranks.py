"""``dsdeploy run`` under a multi-process launcher: rank 0 runs the pipeline, the other ranks join its fine-tune.

``torchrun --nproc-per-node N -m dsdeploy run RECIPE`` (or any launcher that sets ``WORLD_SIZE`` > 1)
starts the same command N times. Only the fine-tune stage trains data-parallel; every other stage
(inspect, convert, calibrate, evaluate, export, deploy, bench, report) is one process's work, and
N processes writing one run folder would collide. So rank 0 owns the run folder (its lock, state
and outputs) and runs every stage, exactly as one process does; the other ranks hold no lock and
write nothing. They wait for rank 0's messages, small JSON files in ``OUT/.ranks/`` named after
the launch (``TORCHELASTIC_RUN_ID``, else ``MASTER_ADDR:MASTER_PORT``, so files of another launch
are never read):

- ``<launch>.call-K.json``: "fine-tune with these arguments" — every rank then calls
  :func:`dsdeploy.api.finetune` with them, and the ranks train as one DistributedDataParallel job
  (its process group is created and destroyed by that call, as ``torchrun -m dsdeploy finetune``
  does); a :class:`DsdeployError` there is rank 0's to report, the others go back to waiting;
- ``<launch>.done.json``: the run ended (rank 0 writes it also when the run failed); the others return.

Files, not a process-group collective, carry the wait: rank 0 may convert and calibrate for hours
before the fine-tune, longer than a collective's timeout, and a rank-0 failure can never leave the
others blocked in a collective that does not match. Rank 0 removes its files when the run ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dsdeploy.errors import DsdeployError
from dsdeploy.fsutil import write_json
from dsdeploy.recover import distributed
from dsdeploy.recover.config import FinetuneConfig

FOLDER = ".ranks"
POLL_SECONDS = 0.2
LEAVE_SECONDS = 60.0  # how long rank 0 waits for the others to confirm they left before tidying up


def launch_id() -> str:
    """A short id of this launch, the same on every rank (from the launcher's environment; a torchrun
    restart of the workers is a new launch, so it never reads the files of the attempt before)."""
    raw = (f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '')}/"
           f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}")
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


class Lead:
    """Rank 0's side: announces each fine-tune call to the other ranks, and the end of the run.

    ``out``: the run folder (rank 0 holds its lock).
    """

    def __init__(self, out: Path) -> None:
        self.folder = Path(out) / FOLDER
        self.prefix = launch_id()
        self.calls = 0

    def finetune(self, student: str | Path, data: Any, **opts: Any) -> Any:
        """:func:`dsdeploy.api.finetune` on rank 0, with the same call announced to the other ranks first.

        ``opts``: ``out``, ``config`` (a :class:`FinetuneConfig`), ``val_split``, ``limit``, ``resume``
        (JSON-able values; ``out`` a path).
        """
        from dsdeploy import api

        if not self.calls and self.folder.is_dir():  # left by a killed launch (we hold the run's lock now)
            for f in self.folder.iterdir():
                if not f.name.startswith(self.prefix):
                    f.unlink(missing_ok=True)
        self.calls += 1
        message = {"student": str(student), "data": data, **opts, "out": str(opts["out"]),
                   "config": dataclasses.asdict(opts["config"])}
        self.folder.mkdir(exist_ok=True)
        write_json(self.folder / f"{self.prefix}.call-{self.calls}.json", message)
        return api.finetune(student, data, **opts)

    def done(self, ok: bool, *, wait: float = LEAVE_SECONDS) -> None:
        """Tell the other ranks the run ended (``ok``: whether it succeeded), then tidy up.

        Waits up to ``wait`` seconds for each of them to confirm it left (a one-line file each),
        then removes this launch's files (and ``OUT/.ranks`` when empty). Writes nothing where
        the run never got a run folder (e.g. it refused the folder): there the launcher stops the
        others when rank 0 exits with the error.
        """
        if not (self.folder.parent / "state.json").is_file():
            return
        self.folder.mkdir(exist_ok=True)
        write_json(self.folder / f"{self.prefix}.done.json", {"ok": ok})
        others = max(0, int(os.environ.get("WORLD_SIZE", "1")) - 1)
        deadline = time.monotonic() + wait
        while len(list(self.folder.glob(f"{self.prefix}.left-*"))) < others and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
        for f in self.folder.glob(f"{self.prefix}.*"):
            f.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.folder.rmdir()


def follow(out: Path, *, poll: float = POLL_SECONDS) -> bool:
    """The other ranks' side: run every fine-tune call rank 0 announces in ``out`` until it says the run ended.

    Returns whether rank 0's run succeeded. The only file written is ``<launch>.left-RANK`` (empty),
    when leaving, so that rank 0 can tidy up.
    """
    from dsdeploy import api

    folder, prefix, k = Path(out) / FOLDER, launch_id(), 1
    while True:
        call, done = folder / f"{prefix}.call-{k}.json", folder / f"{prefix}.done.json"
        if call.is_file():
            m = json.loads(call.read_text(encoding="utf-8"))
            k += 1
            config = FinetuneConfig(**m.pop("config"))
            with contextlib.suppress(DsdeployError):  # raised on rank 0 too, which reports it
                api.finetune(m.pop("student"), m.pop("data"), config=config, **m)
            continue
        if done.is_file():
            try:
                ok = bool(json.loads(done.read_text(encoding="utf-8")).get("ok"))
            except (ValueError, OSError):
                ok = False
            with contextlib.suppress(OSError):
                (folder / f"{prefix}.left-{distributed.env_rank()}").touch()
            return ok
        time.sleep(poll)


@contextlib.contextmanager
def ranked(out: Path) -> Iterator[Lead | None]:
    """Around one ``run``: yields a :class:`Lead` on rank 0 of a launch, None without a launcher.

    On the other ranks of a launch it does not yield to the run at all: it follows rank 0
    (:func:`follow`) and then raises :class:`Followed` for the caller to catch.
    """
    if not distributed.launched():
        yield None
        return
    if not distributed.is_main():
        raise Followed(follow(out))
    lead = Lead(out)
    ok = False
    try:
        yield lead
        ok = True
    finally:
        with contextlib.suppress(OSError):
            lead.done(ok)


class Followed(Exception):
    """Raised on ranks > 0 when the run they followed ended; ``ok``: whether rank 0's run succeeded."""

    def __init__(self, ok: bool) -> None:
        super().__init__("followed rank 0's run")
        self.ok = ok

