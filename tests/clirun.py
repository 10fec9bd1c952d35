"""Run the real ``dsdeploy`` CLI in a subprocess (as a user would)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dsdeploy(*args: str, cwd: str | Path | None = None, timeout: float = 600, env: dict | None = None
             ) -> subprocess.CompletedProcess:
    """``python -m dsdeploy ARGS`` with the repo importable; returns the completed process."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                **(env or {})}
    return subprocess.run([sys.executable, "-m", "dsdeploy", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout, env=full_env)


_MARK = "\x1edsdeploy-chain-exit "
_CHAIN = f"""
import json, sys
from dsdeploy.cli import main
for args in json.loads(sys.argv[1]):
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
        stream.write({_MARK!r} + str(code) + "\\n")
        stream.flush()
    if code and sys.argv[2] != "keep-going":
        break
"""


def dsdeploy_chain(*runs: tuple, cwd: str | Path | None = None, timeout: float = 600, env: dict | None = None,
                   keep_going: bool = False) -> list[subprocess.CompletedProcess]:
    """Several CLI commands one after another in ONE real subprocess (``dsdeploy.cli.main``, what
    ``python -m dsdeploy`` runs), stopping after the first that exits non-zero unless ``keep_going``:
    one interpreter start (seconds on 2 cores) instead of one per command. For commands whose test
    is not about a fresh process (a cache across runs, determinism across processes, signals, or
    what a command imports keep their own processes); returns one completed process per command
    run (its own returncode, stdout and stderr; an uncaught exception ends the chain there, with
    the interpreter's exit status and the traceback on that command's stderr)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                **(env or {})}
    argv = json.dumps([[str(a) for a in run] for run in runs])
    proc = subprocess.run([sys.executable, "-c", _CHAIN, argv, "keep-going" if keep_going else "stop"],
                          capture_output=True, text=True, cwd=cwd or ROOT, timeout=timeout, env=full_env, check=False)
    outs, errs = proc.stdout.split(_MARK), proc.stderr.split(_MARK)
    codes = [int(part.split("\n", 1)[0]) for part in errs[1:]]  # each part after a mark starts "CODE\n"
    outs = outs[:1] + [part.split("\n", 1)[-1] for part in outs[1:]]
    errs = errs[:1] + [part.split("\n", 1)[-1] for part in errs[1:]]
    if len(codes) < len(runs) and (keep_going or not codes or codes[-1] == 0):  # the interpreter died in a command
        codes.append(proc.returncode or 1)
    return [subprocess.CompletedProcess(["dsdeploy", *map(str, run)], code, outs[i], errs[i])
            for i, (run, code) in enumerate(zip(runs, codes))]


def json_out(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def invoke(*args: str):
    """Run the CLI in-process (click's CliRunner): same commands and error handling,
    without a new interpreter per call. Returns an object with returncode/stdout/stderr."""
    from types import SimpleNamespace

    from click.testing import CliRunner

    from dsdeploy.cli import load_commands

    result = CliRunner().invoke(load_commands(), list(map(str, args)), prog_name="dsdeploy")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=result.stderr)
