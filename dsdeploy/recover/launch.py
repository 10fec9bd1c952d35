"""``finetune.nproc``: start N worker processes on this machine that fine-tune one model together.

:func:`launch` is what ``torchrun --standalone --nproc-per-node N`` does, in-process:
it runs torch's elastic agent (:func:`torch.distributed.launcher.api.elastic_launch`), which
sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` for each worker;
each worker calls :func:`dsdeploy.recover.artifact_steps.finetune_artifact` with the same arguments
and joins the process group there (:mod:`dsdeploy.recover.distributed`). Rank 0's result is
returned. A :class:`DsdeployError` in a worker (bad input, a refused resume, an interruption)
is raised again here, as the same class with the same one line; SIGINT/SIGTERM reach the
workers through the agent, which stop together at a step boundary (the last completed
epoch's checkpoint stays valid for ``resume``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsdeploy.errors import DsdeployError, TrainingInterrupted

SHUTDOWN_S = 60  # after a signal, the workers get this long to stop at a step boundary before SIGKILL
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _worker(fn: Callable[..., Any], kwargs: dict[str, Any], errdir: str, threads: int | None, announce: bool) -> Any:
    """One worker: ``fn(**kwargs)``; a DsdeployError is written to ``errdir`` and raised.

    ``announce``: rank 0 prints the preprocessing line as the launching process would have.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    if int(os.environ.get("RANK", "0")) == 0:
        if announce:
            pre = logging.getLogger("dsdeploy.data.preprocessing")
            pre.addHandler(logging.StreamHandler(sys.stderr))
            pre.setLevel(logging.INFO)
    else:
        logging.getLogger("dsdeploy").setLevel(logging.ERROR)  # rank 0 says it once
    try:
        result = fn(**kwargs)
    except DsdeployError as exc:
        rank = os.environ.get("RANK", "0")
        record = {"kind": type(exc).__name__, "message": str(exc), "exit_code": exc.exit_code}
        Path(errdir, f"rank{rank}.json").write_text(json.dumps(record), encoding="utf-8")
        raise
    return result if int(os.environ.get("RANK", "0")) == 0 else None


def _error_classes() -> dict[str, type[DsdeployError]]:
    """DsdeployError and its subclasses by name (what a worker's error record names)."""
    found, todo = {}, [DsdeployError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def _raise_recorded(errdir: Path, fallback: DsdeployError) -> None:
    """Raise the DsdeployError rank 0 recorded (else the lowest rank's), or ``fallback``."""
    files = sorted(errdir.glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    if not files:
        raise fallback
    rec = json.loads(files[0].read_text(encoding="utf-8"))
    cls = _error_classes().get(rec.get("kind", ""), DsdeployError)
    try:
        exc = cls(rec["message"])
    except TypeError:  # a subclass with another constructor
        exc = DsdeployError(rec["message"])
    exc.exit_code = int(rec.get("exit_code", exc.exit_code))
    raise exc


def _quiet_elastic_logs() -> dict[logging.Logger, int]:
    """Quiet torch's launcher loggers (their reports and tracebacks repeat our one line); their old levels."""
    for module in ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api"):
        importlib.import_module(module)  # creates the loggers to quiet

    names = [n for n in logging.root.manager.loggerDict if n.startswith(("torch.distributed", "torch.multiprocessing"))]
    old = {logging.getLogger(n): logging.getLogger(n).level for n in names}
    for logger in old:
        logger.setLevel(logging.CRITICAL)
    return old


def launch(nproc: int, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Run ``fn(**kwargs)`` in ``nproc`` worker processes on this machine; rank 0's result.

    ``fn`` is a module-level function (the workers import it by name: e.g.
    :func:`dsdeploy.recover.artifact_steps.finetune_artifact`) and ``kwargs`` are picklable.

    Each worker uses ``cpu_count // nproc`` threads unless ``OMP_NUM_THREADS`` is set; on CUDA
    machines worker ``i`` uses device ``i`` (more workers than GPUs share them round-robin).

    Raises:
        the DsdeployError a worker raised (same class and line), TrainingInterrupted on
        SIGINT/SIGTERM, DsdeployError when a worker died without one (its exit code named).
    """
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    threads = None if "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // nproc)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          start_method="spawn", shutdown_timeout=SHUTDOWN_S, monitor_interval=0.1)
    old = {s: signal.getsignal(s) for s in _SIGNALS}
    quiet = _quiet_elastic_logs()
    with tempfile.TemporaryDirectory(prefix="dsdeploy-workers-") as errdir:
        try:
            announce = logging.getLogger("dsdeploy.data.preprocessing").isEnabledFor(logging.INFO)
            results = elastic_launch(config, _worker)(fn, kwargs, errdir, threads, announce)
        except SignalException as exc:
            sig = signal.Signals(exc.sigval).name
            _raise_recorded(Path(errdir), TrainingInterrupted(
                f"interrupted by {sig}; rerun the same command with resume to continue from the last checkpoint"))
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            _raise_recorded(Path(errdir), DsdeployError(
                f"fine-tuning worker {rank} of {nproc} failed (exit code {failure.exitcode}): "
                f"{(str(failure.message).strip().splitlines() or ['no message'])[-1]}"))
        finally:
            for logger, level in quiet.items():
                logger.setLevel(level)
            if threading.current_thread() is threading.main_thread():  # the agent installed its own
                for s, handler in old.items():
                    signal.signal(s, handler)
    return results[0]
