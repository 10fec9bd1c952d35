"""Bench results as a terminal table, JSON, CSV, Markdown and a PNG plot, plus side-by-side comparisons.

Side by side: the first model is the baseline; for each other model, per EP and batch,
the speedup (baseline p50 / model p50) is set against the conv-MAC limit (baseline conv
MACs / model conv MACs), i.e. the speedup if latency scaled with conv MACs alone.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from dsdeploy.fsutil import atomic_path, utf8, write_json, write_text
from dsdeploy.outputs import REPORT_MARK
from dsdeploy.runtime.results import BenchReport, EPResult
from dsdeploy.tables import format_table, markdown_table

RESULT_HEADERS = ["model", "EP", "device", "precision", "batch", "create ms", "first ms", "mean ms", "p50 ms",
                  "p90 ms", "p99 ms", "items/s", "peak MB (+run)", "fallback", "nodes EP/all", "max abs diff", "top1 agree"]
COMPARE_HEADERS = ["model", "vs", "EP", "precision", "batch", "baseline p50 ms", "model p50 ms", "speedup",
                   "conv-MAC ratio", "MAC limit", "of limit"]


def compare(report: BenchReport) -> list[dict[str, Any]]:
    """Per (model, EP, batch) with a baseline result: latencies, speedup, conv-MAC ratio, fraction of the limit;
    ``two_speeds`` when either model's runs ran at two speeds (its ``regimes``: the speedup depends on which)."""
    if len(report.models) < 2:
        return []
    base = report.models[0]
    ok = {(r.model, r.ep, r.batch): r for r in report.ok()}
    rows = []
    for m in report.models[1:]:
        for (name, ep, batch), r in ok.items():
            b = ok.get((base.name, ep, batch))
            if name != m.name or b is None:
                continue
            speedup = b.stats.p50_ms / r.stats.p50_ms
            ratio = m.conv_macs / base.conv_macs if m.conv_macs and base.conv_macs else None
            limit = 1 / ratio if ratio else None
            rows.append({"baseline": base.name, "model": m.name, "ep": ep, "alias": r.alias, "batch": batch,
                         "two_speeds": bool(b.regimes or r.regimes),
                         "precision": r.precision, "baseline_p50_ms": b.stats.p50_ms, "model_p50_ms": r.stats.p50_ms,
                         "baseline_mean_ms": b.stats.mean_ms, "model_mean_ms": r.stats.mean_ms, "speedup": speedup,
                         "conv_mac_ratio": ratio, "mac_limit_speedup": limit,
                         "fraction_of_limit": speedup / limit if limit else None})
    return rows


def _p99(r: EPResult) -> str:
    return f"{r.stats.p99_ms:.3g}" + ("" if r.stats.p99_reliable else "*")


def _result_row(r: EPResult) -> list[Any]:
    if r.status != "ok":
        return [r.model, r.alias, "-", "-", r.batch] + ["-"] * 8 + [f"{r.status}: {r.note}"] + ["-"] * 3
    fb, par = r.fallback, r.parity or {}
    top1 = par.get("top1_agreement")
    return [r.model, r.alias, r.device, r.precision, r.batch, round(r.session_create_ms, 1),
            round(r.first_inference_ms, 2), round(r.stats.mean_ms, 3), round(r.stats.p50_ms, 3),
            round(r.stats.p90_ms, 3), _p99(r), round(r.throughput_items_s, 1) if r.throughput_items_s < 1000 else int(round(r.throughput_items_s)), f"{r.memory.get('peak_rss_mb', 0):.0f} (+{r.memory.get('delta_mb', 0):.0f})",
            fb.get("status"), f"{fb.get('nodes_on_requested')}/{fb.get('nodes_total')}",
            f"{par['max_abs_diff']:.2e}" if par else "-", f"{top1:.3f}" if top1 is not None else "-"]


def _compare_row(c: dict[str, Any]) -> list[Any]:
    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    return [c["model"], c["baseline"], c["alias"], c["precision"], c["batch"], round(c["baseline_p50_ms"], 3),
            round(c["model_p50_ms"], 3), f(c["speedup"], ".2f") + "x" + ("*" if c.get("two_speeds") else ""),
            f(c["conv_mac_ratio"], ".3f"),
            f(c["mac_limit_speedup"], ".2f") + "x", f(c["fraction_of_limit"], ".0%")]


def method_notes(report: BenchReport) -> list[str]:
    """How the numbers were taken: machine, threads, timer, memory method, parity, node counts, skipped EPs."""
    mem = next((r.memory.get("method") for r in report.ok()), "")
    env = report.environment
    cpu, pkgs = env.get("cpu", {}), env.get("packages", {})
    notes = [f"CPU: {cpu.get('model')} ({cpu.get('summary')}), {cpu.get('usable_cpus')} usable cores; "
             f"onnxruntime {pkgs.get('onnxruntime')}, OpenVINO plugin "
             f"{pkgs.get('onnxruntime-ep-openvino') or 'not installed'}; "
             f"intra-op threads: {report.config.get('intra_op_threads')}; load average (1/5/15 min) when the "
             f"report was written: {env.get('load_average_1_5_15m')}.",
             f"Latencies from time.perf_counter_ns around session.run; protocol: "
             f"{report.config.get('protocol', 'not recorded')}; p99 marked * when fewer than 100 samples.",
             f"Peak memory: process RSS peak during session creation and runs (+ growth over the RSS before the "
             f"session was created); {mem}.",
             "Parity: max abs diff against the CPU EP on the same inputs; top1 agree = argmax agreement of output 0.",
             "nodes EP/all: graph nodes (after ORT graph optimisation; a compiled subgraph counts once) run by the "
             "requested EP, from ORT profiling; fallback full/partial = nodes silently run by the CPU EP."]
    return notes + [f"Skipped {s['ep']}: {s['reason']}" for s in report.skipped_providers]


def model_notes(report: BenchReport) -> list[str]:
    """One line per model: conv MACs per item and their source, file hash."""
    return [f"{m.name}: conv MACs/item {m.conv_macs if m.conv_macs is not None else '?'} ({m.conv_macs_source}); "
            f"sha256 {m.sha256[:12]}" for m in report.models]


def regime_notes(report: BenchReport) -> list[str]:
    """One line per result whose runs ran at two speeds (:func:`dsdeploy.runtime.regimes.window_regimes`)."""
    out = []
    for r in report.ok():
        if r.regimes:
            fast, slow = r.regimes
            out.append(f"{r.model} on {r.alias}, batch {r.batch}: ran at two speeds while timed, p50 "
                       f"{fast['p50_ms']:.3f} ms in {100 * fast['share']:.0f} % of the runs and {slow['p50_ms']:.3f} "
                       f"ms in {100 * slow['share']:.0f} % (by time windows); its p50 and a speedup marked * depend on "
                       f"which it met. Other work on the machine, or on a cloud VM with several threads the cores "
                       f"sharing a cache only part of the time (README 'Two speeds'), are the usual causes")
    return out


def _notes(report: BenchReport) -> list[str]:
    return method_notes(report) + model_notes(report) + regime_notes(report)


def render_text(report: BenchReport) -> str:
    """The terminal report: results table, side-by-side table, notes."""
    parts = [format_table(RESULT_HEADERS, [_result_row(r) for r in report.results])]
    if report.comparisons:
        parts.append(format_table(COMPARE_HEADERS, [_compare_row(c) for c in report.comparisons]))
    parts.append("\n".join(f"- {n}" for n in _notes(report)))
    return "\n\n".join(parts)


def render_markdown(report: BenchReport, title: str = "Benchmark results", preamble: str = "", *, level: int = 1,
                    notes: bool = True) -> str:
    """Markdown: heading ``title`` at ``level``, optional preamble, results and side-by-side tables, notes."""
    h = "#" * level
    parts = [f"{h} {title}"] + ([preamble.strip()] if preamble.strip() else [])
    parts += [f"Run {report.created}.", f"{h}# Latency per model, EP and batch",
              markdown_table(RESULT_HEADERS, [_result_row(r) for r in report.results])]
    if report.comparisons:
        parts += [f"{h}# Side by side (first model = baseline)",
                  markdown_table(COMPARE_HEADERS, [_compare_row(c) for c in report.comparisons])]
    if notes:
        parts += [f"{h}# Notes", "\n".join(f"- {n}" for n in _notes(report))]
    return "\n\n".join(parts) + "\n"


def render_csv(report: BenchReport) -> str:
    """One CSV row per result (no raw samples; those are in the JSON)."""
    fields = ["model", "ep", "alias", "device", "precision", "batch", "status", "note", "threads",
              "session_create_ms", "first_inference_ms", "n", "mean_ms", "p50_ms", "p90_ms", "p99_ms",
              "p99_reliable", "min_ms", "max_ms", "std_ms", "throughput_items_s", "peak_rss_mb", "delta_rss_mb",
              "memory_method", "fallback", "nodes_on_ep", "nodes_total", "max_abs_diff", "rel_diff",
              "top1_agreement", "parity_inputs"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in report.results:
        row: dict[str, Any] = {k: getattr(r, k, None) for k in fields if hasattr(r, k)}
        if r.stats is not None:
            row.update({k: v for k, v in vars(r.stats).items() if k in fields})
        row.update({"peak_rss_mb": r.memory.get("peak_rss_mb"), "delta_rss_mb": r.memory.get("delta_mb"),
                    "memory_method": r.memory.get("method"), "fallback": r.fallback.get("status"),
                    "nodes_on_ep": r.fallback.get("nodes_on_requested"), "nodes_total": r.fallback.get("nodes_total")})
        if r.parity:
            row.update({"max_abs_diff": r.parity["max_abs_diff"], "rel_diff": r.parity["rel_diff"],
                        "top1_agreement": r.parity["top1_agreement"], "parity_inputs": r.parity["inputs"]})
        w.writerow(row)
    return buf.getvalue()


def write_plot(report: BenchReport, path: str | Path) -> None:
    """PNG: p50 latency per (EP, batch), one bar per model (log scale), speedups over the baseline annotated."""
    # matplotlib is heavy and needed only for the plot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no GUI backend

    ok = report.ok()
    groups = list(dict.fromkeys((r.alias, r.precision, r.batch) for r in ok))
    models = [m.name for m in report.models]
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * max(1, len(models)) / 2 + 2), 4.5))
    lat = {(r.model, r.alias, r.precision, r.batch): r.stats.p50_ms for r in ok}
    for i, name in enumerate(models):
        xs = [g + i * width for g in range(len(groups))]
        ys = [lat.get((name, *grp), 0) for grp in groups]
        bars = ax.bar(xs, ys, width, label=utf8(name))  # a name from a path may hold undecodable bytes
        for bar, grp in zip(bars, groups):
            base = lat.get((models[0], *grp))
            if i and base and bar.get_height():
                ax.annotate(f"{base / bar.get_height():.2f}x", (bar.get_x() + width / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks([g + width * (len(models) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{a} {p}\nbatch {b}" for a, p, b in groups], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("p50 latency per batch (ms, log)")
    ax.set_title("ONNX Runtime latency per EP and batch")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_outputs(report: BenchReport, *, json_path: str | None = None, csv_path: str | None = None,
                  markdown_path: str | None = None, plot_path: str | None = None, title: str = "Benchmark results",
                  preamble: str = "") -> list[str]:
    """Write each requested file atomically; returns the paths written.

    The Markdown file's first line is ``fsutil.REPORT_MARK`` (so a rerun knows it may replace it).
    """
    written = []
    if json_path:
        write_json(json_path, report.to_dict())
        written.append(json_path)
    if csv_path:
        write_text(csv_path, render_csv(report))
        written.append(csv_path)
    if markdown_path:
        write_text(markdown_path, f"{REPORT_MARK}\n" + render_markdown(report, title, preamble))
        written.append(markdown_path)
    if plot_path:
        write_plot(report, plot_path)
        written.append(plot_path)
    return written
