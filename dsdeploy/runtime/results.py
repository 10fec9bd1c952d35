"""The results of a benchmark (one measurement per model, EP and batch; the whole report) as plain data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dsdeploy.runtime.inputs import ModelInfo
from dsdeploy.runtime.timing import Stats

SCHEMA = "dsdeploy.bench/1"


@dataclass
class EPResult:
    """One (model, EP, batch) measurement; ``status`` is ``ok``, ``skipped`` or ``error`` (with ``note``)."""

    model: str
    ep: str
    alias: str
    batch: int
    status: str = "ok"
    note: str = ""
    device: str = ""
    precision: str = ""
    ep_options: dict[str, str] = field(default_factory=dict)
    threads: int | None = None
    session_create_ms: float | None = None
    first_inference_ms: float | None = None
    stats: Stats | None = None
    throughput_items_s: float | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    fallback: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] | None = None
    samples_ms: list[float] = field(default_factory=list)
    regimes: list[dict[str, Any]] | None = None  # [faster, slower] when the runs ran at two speeds (runtime.regimes)


@dataclass
class BenchReport:
    """Everything one ``bench`` call measured, plus the environment and the config."""

    models: list[ModelInfo]
    results: list[EPResult]
    environment: dict[str, Any]
    config: dict[str, Any]
    providers: list[dict[str, Any]]
    skipped_providers: list[dict[str, str]] = field(default_factory=list)
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"schema": SCHEMA, **d}

    def ok(self) -> list[EPResult]:
        return [r for r in self.results if r.status == "ok"]
