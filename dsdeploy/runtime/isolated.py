"""Timing in a fresh child process: a round of :func:`dsdeploy.runtime.timing.measure_samples` runs that no
state of the calling process can touch.

Why: on the 2-core VMs this project is measured on, one exported DS graph times within ~1 % from round to
round over a few seconds, but by 5-20 % differently between processes and over minutes (2.09x in ``convert``'s
own process against 2.29-2.57x in six fresh ones for the same ResNet-18 plan; within one process the graph
also stepped from 7.1 to 8.6 ms while the dense original held: ``benchmarks/RESULTS-speedup-check.md``).
A verification whose rounds all run back to back in the planning process sees one such state: its rounds
agree with each other and its confidence interval is too narrow. :func:`time_in_child` runs each
round in a new ``python -m dsdeploy.runtime.isolated`` that imports only onnxruntime, numpy and this
package's runtime modules (no torch), reads the graphs from files the caller wrote, and prints the samples
as JSON; so the spread between rounds includes the spread between processes.

Nothing in the child runs user code: it loads ONNX files and the EP named by the parent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsdeploy.errors import ProviderError
from dsdeploy.runtime.timing import Protocol

CHILD_TIMEOUT_S = 600.0


def time_in_child(graphs: Sequence[str | os.PathLike], *, ep_name: str, ep_options: dict[str, str] | None = None,
                  threads: int | None, protocol: Protocol, batch: int = 1,
                  timeout: float = CHILD_TIMEOUT_S) -> list[list[float]]:
    """Time each ONNX file of ``graphs`` in order (one timed session alive at a time) in a fresh child process.

    Args:
        graphs: paths of ONNX files; each is timed once, in this order, by ``protocol``
            (``warmup`` untimed runs, then ``iters`` timed ones) on standard-normal inputs (seed 0) whose
            dynamic first axis is ``batch``.
        ep_name / ep_options / threads: the execution provider as :func:`dsdeploy.runtime.providers.ep_config`
            takes it, and the intra-op threads.
        timeout: seconds before the child is killed.

    Returns:
        Per graph, the timed runs' latencies in ms (``len(graphs)`` lists of ``protocol.iters`` floats).

    Raises:
        ProviderError: the child failed (the EP cannot create a session, a file cannot be read) or timed out;
            the message is the child's last error line.
    """
    spec = {"graphs": [str(Path(g)) for g in graphs], "ep_name": ep_name, "ep_options": ep_options or {},
            "threads": threads, "protocol": dataclasses.asdict(protocol), "batch": int(batch)}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    try:
        proc = subprocess.run([sys.executable, "-m", "dsdeploy.runtime.isolated"], input=json.dumps(spec),
                              capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise ProviderError(f"timing in a child process took longer than {timeout:g} s") from None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise ProviderError(f"timing in a child process failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return [[float(v) for v in s] for s in json.loads(proc.stdout)["samples"]]


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    from dsdeploy.runtime.providers import ep_config
    from dsdeploy.runtime.timing import measure_samples

    cfg = ep_config(spec["ep_name"], spec["ep_options"] or None, spec["threads"])
    protocol = Protocol(**spec["protocol"])
    return {"samples": [measure_samples(g, ep=cfg, threads=spec["threads"], protocol=protocol, batch=spec["batch"])
                        for g in spec["graphs"]]}


if __name__ == "__main__":
    try:
        print(json.dumps(_child(json.loads(sys.stdin.read()))))
    except Exception as exc:  # noqa: BLE001  (the parent reports the one line)
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
