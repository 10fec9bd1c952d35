"""The run report: report.md, report.html and PNG plots from the pipeline's stage records.

``write_report(records, recipe, out, folder)`` renders one list of blocks (headings,
paragraphs, tables, images) both as Markdown and as a self-contained HTML page, and
draws the plots with matplotlib's Agg backend. ``summarize(records)`` is the
before/after summary that ``dsdeploy run``/``demo`` print (``summary_rows`` for a table).
Every file is written atomically through :mod:`dsdeploy.fsutil`.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from dsdeploy.fsutil import atomic_path, write_json, write_text
from dsdeploy.tables import human, markdown_table

Block = tuple  # ("h", level, text) | ("p", text) | ("table", headers, rows) | ("img", file, alt)


def _res(records: dict[str, dict[str, Any]], stage: str) -> dict[str, Any] | None:
    rec = records.get(stage)
    return rec["result"] if rec and rec.get("status") in ("done", "cached") else None


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f} ms"


# ----------------------------------------------------------------------------------------------
# the summary (what the CLI prints)
# ----------------------------------------------------------------------------------------------

def accuracy_stages(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Top-1 (and more) after each recovery stage: from evaluate, else from calibrate/finetune's own figures."""
    ev = _res(records, "evaluate")
    dep = (_res(records, "deploy") or {}).get("accuracy")
    bundle = [{"name": f"bundle ({_res(records, 'deploy').get('quantize')})", "top1": dep["bundle_top1"] / 100}] \
        if dep and dep.get("bundle_top1") is not None else []
    if ev:
        return list(ev["models"]) + bundle
    out: list[dict[str, Any]] = []
    cal = (_res(records, "convert") or {}).get("calibration")
    ft = _res(records, "finetune")
    if ft and ft.get("teacher_accuracy") is not None:
        out.append({"name": "original", "top1": ft["teacher_accuracy"]})
    if cal and cal.get("accuracy_before") is not None:
        out += [{"name": "converted", "top1": cal["accuracy_before"]}, {"name": "calibrated", "top1": cal["accuracy_after"]}]
    if ft and ft.get("best_accuracy") is not None:
        out.append({"name": "finetuned", "top1": ft["best_accuracy"]})
    return out + bundle


def latency_rows(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (provider, batch): original and converted latency, speedup, precision, status."""
    bench = _res(records, "bench")
    if not bench:
        return []
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for r in bench["rows"]:
        key = (r["provider"], r["batch"])
        row = rows.setdefault(key, {"provider": r["provider"], "batch": r["batch"], "original_ms": None,
                                    "converted_ms": None, "bundle_ms": None, "speedup": None, "precision": r.get("precision"),
                                    "status": r.get("status", "ok"), "parity_max_abs": None,
                                    "top1_agreement": None})
        row[f"{r['model']}_ms"] = r.get("latency_ms")
        if r["model"] == "converted":
            row["parity_max_abs"], row["top1_agreement"] = r.get("parity_max_abs"), r.get("top1_agreement")
        if r.get("status", "ok") != "ok":
            row["status"] = r["status"]
    for row in rows.values():
        if row["original_ms"] and row["converted_ms"]:
            row["speedup"] = round(row["original_ms"] / row["converted_ms"], 3)
    return list(rows.values())


def summarize(records: dict[str, dict[str, Any]], out: str | Path | None = None) -> dict[str, Any]:
    """The before/after summary: params, MACs, accuracy, latency per EP and batch, bundle path."""
    conv = (_res(records, "convert") or {}).get("summary") or (_res(records, "inspect") or {}).get("summary") or {}
    acc = accuracy_stages(records)
    deploy = _res(records, "deploy")
    bundle = str(Path(out) / "deploy" / deploy["bundle"]) if deploy and out is not None and deploy.get("bundle") else None
    return {"params": [conv.get("params"), conv.get("params_after")],
            "macs": [conv.get("macs"), conv.get("macs_after")],
            "conv_macs": [conv.get("conv_macs"), conv.get("conv_macs_after")],
            "converted_layers": conv.get("converted"), "convs": conv.get("convs"),
            "accuracy": [acc[0]["top1"], acc[-1]["top1"]] if len(acc) >= 2 else None,
            "accuracy_stages": acc, "latency": latency_rows(records), "bundle": bundle,
            "report": str(Path(out) / "report" / "report.md") if out is not None else None,
            "stages": {n: r.get("status") for n, r in records.items()}, "split": data_split(records)}


def data_split(records: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The run's one data split (counts, val_split, limit, digest) as the data stages recorded it."""
    found = [(_res(records, "evaluate") or {}).get("data_split"), (_res(records, "finetune") or {}).get("split"),
             ((_res(records, "convert") or {}).get("calibration") or {}).get("split")]
    return next((s for s in found if s), None)


def _ratio(a: float | None, b: float | None) -> str:
    return f"x{b / a:.3f}" if a and b is not None else "-"


def summary_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of the before/after table."""
    p, m, c = summary["params"], summary["macs"], summary["conv_macs"]
    rows: list[list[Any]] = [["params", human(p[0]), human(p[1]), _ratio(p[0], p[1])],
                             ["MACs", human(m[0]), human(m[1]), _ratio(m[0], m[1])],
                             ["conv MACs", human(c[0]), human(c[1]), _ratio(c[0], c[1])]]
    if summary["accuracy"]:
        a, b = summary["accuracy"]
        rows.append(["top-1 accuracy", _pct(a), _pct(b), f"{100 * (b - a):+.2f} pts"])
    for r in summary["latency"]:
        label = f"latency {r['provider']} b{r['batch']}" + (f" ({r['precision']})" if r.get("precision") else "")
        if r["status"] != "ok" and not r["converted_ms"]:
            rows.append([label, "-", "-", r["status"]])
        else:
            rows.append([label, _ms(r["original_ms"]), _ms(r["converted_ms"]),
                         f"{r['speedup']:.2f}x faster" if r["speedup"] else "-"])
    return ["", "original", "converted", "change"], rows


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------

def _save(fig: Any, path: Path) -> None:
    # matplotlib is heavy and needed only for the plots
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def _plots(records: dict[str, dict[str, Any]], history: list[dict[str, Any]], folder: Path) -> dict[str, str]:
    # matplotlib is heavy and needed only for the plots
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no GUI backend

    made: dict[str, str] = {}
    layers = [d for d in (_res(records, "convert") or {}).get("layers", []) if d.get("convert")]
    if layers:
        fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(layers) + 2), 3.5))
        xs = range(len(layers))
        ax.bar([x - 0.2 for x in xs], [d["macs"] or 0 for d in layers], 0.4, label="dense conv")
        ax.bar([x + 0.2 for x in xs], [d["macs_after"] or 0 for d in layers], 0.4, label="DS block")
        ax.set_xticks(list(xs), [d["name"] for d in layers], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("MACs")
        ax.set_title("MACs per converted layer")
        ax.legend()
        _save(fig, folder / "layers.png")
        made["layers"] = "layers.png"
    acc = [a for a in accuracy_stages(records) if a.get("top1") is not None]
    if acc:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar([a["name"] for a in acc], [100 * a["top1"] for a in acc], color="tab:green")
        ax.set_ylabel("top-1 (%)")
        ax.set_title("accuracy after each stage")
        _save(fig, folder / "accuracy.png")
        made["accuracy"] = "accuracy.png"
    if history:
        ep = [h["epoch"] for h in history]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
        a1.plot(ep, [h.get("train_loss") for h in history], marker="o")
        a1.set_xlabel("epoch")
        a1.set_ylabel("train loss")
        for key in ("train_acc", "val_acc"):
            vals = [h.get(key) for h in history]
            if any(v is not None for v in vals):
                a2.plot(ep, [100 * v if v is not None else float("nan") for v in vals], marker="o", label=key)
        a2.set_xlabel("epoch")
        a2.set_ylabel("accuracy (%)")
        # matplotlib is heavy and needed only for the plots
        from matplotlib.ticker import MaxNLocator

        for ax in (a1, a2):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        a2.legend()
        fig.suptitle("fine-tuning")
        _save(fig, folder / "finetune.png")
        made["finetune"] = "finetune.png"
    lat = [r for r in latency_rows(records) if r["original_ms"] or r["converted_ms"]]
    if lat:
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(lat) + 2), 3.2))
        xs = range(len(lat))
        ax.bar([x - 0.2 for x in xs], [r["original_ms"] or 0 for r in lat], 0.4, label="original")
        ax.bar([x + 0.2 for x in xs], [r["converted_ms"] or 0 for r in lat], 0.4, label="converted")
        ax.set_xticks(list(xs), [f"{r['provider']}\nb{r['batch']}" for r in lat])
        ax.set_yscale("log")
        ax.set_ylabel("median latency (ms, log scale)")
        ax.set_title("latency per execution provider and batch")
        for x, r in zip(xs, lat):
            if r["speedup"]:
                ax.annotate(f"{r['speedup']:.2f}x", (x + 0.2, r["converted_ms"]), ha="center", va="bottom", fontsize=8)
        ax.legend()
        _save(fig, folder / "latency.png")
        made["latency"] = "latency.png"
    return made


# ----------------------------------------------------------------------------------------------
# content and rendering
# ----------------------------------------------------------------------------------------------

def _layer_rows(records: dict[str, dict[str, Any]]) -> list[list[Any]]:
    conv = _res(records, "convert") or {}
    cal = {c["name"]: c for c in ((conv.get("calibration") or {}).get("layers") or [])}
    rows = []
    for d in conv.get("layers", []):
        c = cal.get(d["name"])
        rows.append([d["name"], f"{d['in_channels']}->{d['out_channels']}", "x".join(map(str, d["kernel_size"])),
                     d["rank"] if d["convert"] else "-", human(d["macs"]), human(d["macs_after"]) if d["convert"] else "-",
                     f"{d['error']:.3f}" if d.get("error") is not None else "-",
                     f"{c['error_before']:.3f} -> {c['error_after']:.3f}" if c else "-", d["reason"]])
    return rows


def _scalars(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _parity_rows(records: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    exp = _res(records, "export") or {}
    entries = [(name, (exp.get(name) or {}).get("parity")) for name in ("original", "converted")]
    entries = [(n, _scalars(p)) for n, p in entries if isinstance(p, dict)]
    keys = sorted({k for _, p in entries for k in p})
    return ["model", *keys], [[n, *(p.get(k) for k in keys)] for n, p in entries]


def report_blocks(records: dict[str, dict[str, Any]], recipe: Any, out: Path, summary: dict[str, Any],
                  plots: dict[str, str], history: list[dict[str, Any]]) -> list[Block]:
    """Everything the report says, as renderer-neutral blocks."""
    b: list[Block] = [("h", 1, f"dsdeploy report: {recipe.name or recipe.model.spec}")]
    b.append(("p", f"Model `{recipe.model.spec}`; recipe `{recipe.path or '-'}`; output `{out}`."))
    if recipe.description:
        b.append(("p", recipe.description))
    b += [("h", 2, "Summary"), ("table", *summary_rows(summary))]
    if summary.get("bundle"):
        b.append(("p", f"Deployment bundle: `{summary['bundle']}`"))
    if summary.get("split"):
        s = summary["split"]
        b.append(("p", f"Data split (one for every stage): {s.get('train')} train / {s.get('val')} val images, "
                       f"val_split {s.get('val_split')}, limit {s.get('limit')}, seed {s.get('seed')}, "
                       f"digest {s.get('digest')}."))
    b += [("h", 2, "Stages"), ("table", ["stage", "status", "seconds", "note"],
                               [[n, r["status"], r.get("seconds"), r.get("reason", "")] for n, r in records.items()])]
    layers = _layer_rows(records)
    if layers:
        b += [("h", 2, "Layers"), ("p", "rank K per converted conv, MACs per image before/after, the SVD's relative "
                                         "approximation error, and the output error before -> after calibration."),
              ("table", ["layer", "channels", "kernel", "rank", "MACs", "MACs after", "SVD rel.err", "calib rel.err",
                         "decision"], layers)]
        if "layers" in plots:
            b.append(("img", plots["layers"], "MACs per converted layer"))
    acc = summary["accuracy_stages"]
    if acc:
        keys = [k for k in ("top1", "top5", "precision", "recall", "f1") if any(a.get(k) is not None for a in acc)]
        b += [("h", 2, "Accuracy after each recovery stage"),
              ("table", ["model", *keys], [[a["name"], *(_pct(a.get(k)) for k in keys)] for a in acc])]
        if "accuracy" in plots:
            b.append(("img", plots["accuracy"], "accuracy after each stage"))
    ft = _res(records, "finetune")
    if ft or history:
        b.append(("h", 2, "Fine-tuning"))
    if ft and ft.get("train_seconds") is not None:
        b.append(("p", f"Time: data {ft.get('decode_seconds')} s, training {ft.get('train_seconds')} s, "
                       f"evaluation {ft.get('eval_seconds')} s."))
    if ft and ft.get("warning"):
        b.append(("p", f"Warning: {ft['warning']}"))
    if history:
        b.append(("table", ["epoch", "train loss", "train acc", "val acc", "lr", "seconds"],
                  [[h["epoch"], h.get("train_loss"), _pct(h.get("train_acc")), _pct(h.get("val_acc")), h.get("lr"),
                    h.get("seconds")] for h in history]))
        if "finetune" in plots:
            b.append(("img", plots["finetune"], "fine-tuning curve"))
    lat = summary["latency"]
    if lat:
        b += [("h", 2, "Latency per execution provider"),
              ("p", "median (p50) latency per batch; parity of the converted model's outputs on this EP against "
                    "the CPU EP (max abs difference, top-1 agreement). Full figures: bench/bench.md."),
              ("table", ["provider", "batch", "precision", "original", "converted", "speedup", "max abs diff vs CPU",
                         "top-1 agree", "status"],
               [[r["provider"], r["batch"], r.get("precision") or "-", _ms(r["original_ms"]), _ms(r["converted_ms"]),
                 f"{r['speedup']:.2f}x" if r["speedup"] else "-",
                 f"{r['parity_max_abs']:.2e}" if r.get("parity_max_abs") is not None else "-",
                 r.get("top1_agreement"), r["status"]] for r in lat])]
        if any(r.get("bundle_ms") for r in lat):
            b += [("p", "the deployment bundle (quantized):"),
                  ("table", ["provider", "batch", "bundle", "speedup vs original"],
                   [[r["provider"], r["batch"], _ms(r["bundle_ms"]),
                     f"{r['original_ms'] / r['bundle_ms']:.2f}x" if r["original_ms"] and r["bundle_ms"] else "-"]
                    for r in lat])]
        if "latency" in plots:
            b.append(("img", plots["latency"], "latency"))
    dep = _res(records, "deploy")
    if dep:
        acc_d = dep.get("accuracy") or {}
        measured = (f"top-1 of the fp32 ONNX model {acc_d.get('fp32_top1')}% -> bundle {acc_d.get('bundle_top1')}% "
                    f"(drop {acc_d.get('drop_pts')} points, agreement {acc_d.get('agreement')}%)."
                    if acc_d else "no accuracy measured.")
        b += [("h", 2, "Deployment bundle"),
              ("p", f"`{summary.get('bundle')}`: quantize {dep.get('quantize')}; {measured}"
                    + "".join(f" {n}." for n in dep.get("notes", []) + dep.get("warnings", []))),
              ("table", ["file", "sha256"], [[n, h] for n, h in (dep.get("files") or {}).items()])]
    headers, rows = _parity_rows(records)
    if rows:
        b += [("h", 2, "Parity (ONNX Runtime vs PyTorch)"), ("table", headers, rows)]
    return b


def render_markdown(blocks: list[Block]) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind == "h":
            out.append("#" * blk[1] + " " + blk[2])
        elif kind == "p":
            out.append(blk[1])
        elif kind == "table":
            out.append(markdown_table(blk[1], blk[2]))
        elif kind == "img":
            out.append(f"![{blk[2]}]({blk[1]})")
    return "\n\n".join(out) + "\n"


def _html_cell(v: Any) -> str:
    return "-" if v is None else html.escape(f"{v:.4g}" if isinstance(v, float) else str(v))


def render_html(blocks: list[Block], title: str) -> str:
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;font-size:90%}th{background:#eee}</style></head><body>"]
    for blk in blocks:
        kind = blk[0]
        if kind == "h":
            parts.append(f"<h{blk[1]}>{html.escape(blk[2])}</h{blk[1]}>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(blk[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in blk[1])
            body = "".join("<tr>" + "".join(f"<td>{_html_cell(v)}</td>" for v in r) + "</tr>" for r in blk[2])
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        elif kind == "img":
            parts.append(f"<p><img src='{html.escape(blk[1])}' alt='{html.escape(blk[2])}'></p>")
    return "\n".join(parts) + "\n</body></html>\n"


def _history(records: dict[str, dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    rec = records.get("finetune")
    if not rec or rec.get("status") not in ("done", "cached") or "history" not in rec.get("outputs", {}):
        return list((_res(records, "finetune") or {}).get("history") or [])
    return json.loads((out / "finetune" / rec["outputs"]["history"]).read_text(encoding="utf-8"))


def write_report(records: dict[str, dict[str, Any]], recipe: Any, out: str | Path, folder: str | Path
                 ) -> tuple[list[str], dict[str, Any]]:
    """Write report.md, report.html, summary.json and the PNG plots into ``folder``.

    Returns (names of the files written, the summary dict).
    """
    out, folder = Path(out), Path(folder)
    summary = summarize(records, out)
    history = _history(records, out)
    plots = _plots(records, history, folder)
    blocks = report_blocks(records, recipe, out, summary, plots, history)
    write_text(folder / "report.md", render_markdown(blocks))
    write_text(folder / "report.html", render_html(blocks, f"dsdeploy report: {recipe.name or recipe.model.spec}"))
    write_json(folder / "summary.json", summary)
    return ["report.md", "report.html", "summary.json", *plots.values()], summary
