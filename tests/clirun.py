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
