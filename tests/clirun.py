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
