"""Report files of a results dictionary (schema ``lightkv.results/1``): Markdown and one self-contained HTML.

Reads results only; never measures, never loads a model. Missing optional keys (older results files) are
shown as "–" or "not recorded", never errors. The HTML file has no external resources: CSS is inline,
plots are PNGs and input images JPEG thumbnails embedded as ``data:`` URIs, and there is no script. All
text that comes from the user or from files (prompts, answers, file names, paths, model names, the
command line, error messages) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from lightkv_cli.report import plots
from lightkv_cli.report.facts import (
    CONTROL_CHARS,
    DASH,
    as_number,
    device_label,
    eviction_note,
    failure_rows,
    fmt_bytes,
    fmt_size,
    recommendation_text,
    run_by_id,
    run_cells,
    runs_of,
    summary_line,
    table_columns,
    threshold_lines,
    uncompressed_run,
    weights_note,
)

THUMBNAIL_MAX_SIDE = 160


def _e(s) -> str:
    """HTML-escaped text (quotes too), control characters dropped."""
    return html.escape(CONTROL_CHARS.sub("", str(s)), quote=True)


def _thumbnail(path, image_root: Path | None = None) -> str | None:
    """A ``data:image/jpeg;base64,…`` thumbnail of the image at ``path``, or None when it cannot be read.

    ``path`` is tried as given (absolute, or relative to the working directory), then under ``image_root``.
    Never raises.
    """
    if not path or not isinstance(path, str):
        return None
    candidates = [Path(path)]
    if image_root is not None and not Path(path).is_absolute():
        candidates.append(Path(image_root) / path)
    try:
        from PIL import Image
    except ImportError:
        return None
    for p in candidates:
        try:
            if not p.is_file():
                continue
            with Image.open(p) as im:
                im.draft("RGB", (THUMBNAIL_MAX_SIDE * 2, THUMBNAIL_MAX_SIDE * 2))
                im = im.convert("RGB")
                im.thumbnail((THUMBNAIL_MAX_SIDE, THUMBNAIL_MAX_SIDE))
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=80)
            return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        except Exception:
            continue
    return None


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1200px;
padding:0 1rem;color:#222;line-height:1.4}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;
margin-top:2rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #ddd;padding:.25rem .5rem;vertical-align:top}
th{background:#f4f4f4;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.rec td{background:#fff8d6}tr.failed td{color:#a33}
code{background:#f4f4f4;padding:0 .2rem;border-radius:3px;word-break:break-all}
.box{border-left:4px solid #2e7d32;background:#eef7ee;padding:.5rem 1rem;margin:1rem 0}
.box.warn{border-color:#b26a00;background:#fff4e0}
.muted{color:#777}dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:.15rem 1rem;margin:.5rem 0}
dl.kv dt{color:#555}dl.kv dd{margin:0}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85rem;color:#555}
table.inputs td{white-space:pre-wrap;max-width:22rem}
.err{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.8rem}
.thumb{width:auto;height:auto;max-width:160px;max-height:160px}
.placeholder{display:inline-block;width:120px;padding:1rem .3rem;border:1px dashed #bbb;color:#888;
font-size:.75rem;text-align:center}
"""


_CAPTIONS = {
    "quality": (
        "Answer match and top-1 agreement with the uncompressed run (and accuracy when answers were "
        "given) against measured vision retention, one line per method; error bars are 95 % bootstrap "
        "intervals when recorded, the star is the recommended run and dashed lines are thresholds."
    ),
    "quality_cost": (
        "Accuracy (or answer match) against KV-cache bytes per request and against prefill time, every "
        "method on the same axes: this is the comparison at equal cost."
    ),
    "kv_bytes": (
        "KV-cache bytes held per request after prefill (MiB), all tokens (solid) and vision tokens "
        "only (dashed), against measured vision retention per method."
    ),
    "prefill": (
        "Prefill time (median, bars p25–p75 over repeats × inputs) against measured vision retention per method."
    ),
    "nvml": (
        "Device memory used as sampled by NVML during the recommended run and the uncompressed run "
        "(whole device, all processes)."
    ),
    "layer_tokens": (
        "Cached tokens per decoder layer after prefill (mean over inputs) for every finished run: "
        "each step down is a layer where vision tokens were merged."
    ),
}


_MISSING = {
    "quality": "No plot: no finished run has quality figures.",
    "quality_cost": "No plot: no finished compressed run has quality figures and KV bytes.",
    "kv_bytes": "No plot: no finished run has KV bytes.",
    "prefill": "No plot: no finished run has prefill times.",
    "layer_tokens": "No plot: no finished run has cached tokens per layer.",
}


def _nvml_note(results: dict) -> str:
    rec = run_by_id(results, (results.get("recommendation") or {}).get("run"))
    for src in (rec, uncompressed_run(results), results.get("environment")):
        nv = (src or {}).get("nvml") or {}
        if nv.get("note") and not nv.get("available"):
            return str(nv["note"])
    return "NVML not available: no NVML timeline was recorded for the recommended or uncompressed run."


def _dl(items: list[tuple[str, object]]) -> str:
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(DASH if v is None or v == '' else v)}</dd>" for k, v in items)
    return f'<dl class="kv">{rows}</dl>'


def _html_table(
    header: list[str],
    rows: list[list[str]],
    row_classes: list[str] | None = None,
    numeric: range | set[int] = frozenset(),
    table_class: str = "",
) -> str:
    """An HTML table; ``header`` is plain text, ``rows`` are pre-escaped HTML cells; ``numeric`` columns align right."""
    th = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        tds = "".join(f'<td class="n">{c}</td>' if j in numeric else f"<td>{c}</td>" for j, c in enumerate(row))
        body.append(f"<tr{cls}>{tds}</tr>")
    tcls = f' class="{table_class}"' if table_class else ""
    return f"<table{tcls}><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _section_summary(results: dict) -> str:
    rec_id, rec_text = recommendation_text(results)
    runs = runs_of(results)
    counts = {}
    for r in runs:
        counts[r.get("status", "?")] = counts.get(r.get("status", "?"), 0) + 1
    out = [f"<p>{_e(summary_line(results))}</p>"]
    out.append(
        _dl(
            [
                ("created", results.get("created")),
                ("lightkv", results.get("tool_version")),
                ("schema", results.get("schema")),
                ("runs", ", ".join(f"{n} {s}" for s, n in counts.items()) or "none"),
                ("complete", {True: "yes", False: "no (running or interrupted)"}.get(results.get("complete"))),
            ]
        )
    )
    if results.get("command"):
        out.append(f"<p>command: <code>{_e(results['command'])}</code></p>")
    for note in (weights_note(results), eviction_note(results)):
        if note:
            out.append(f'<div class="box warn"><strong>Note:</strong> {_e(note)}</div>')
    body = f"<strong>{_e(rec_text)}</strong>" if rec_id else _e(rec_text)
    fails = failure_rows(results)
    if not rec_id and fails:
        body += "<p>What the closest run missed:</p>" + _html_table(
            ["run", "threshold", "required", "measured", "short by"],
            [[_e(c) for c in f] for f in fails],
            numeric={2, 3, 4},
        )
    out.append(f'<div class="box{"" if rec_id else " warn"}">{body}</div>')
    return "".join(out)


def _section_environment(results: dict) -> str:
    env = results.get("environment") or {}
    nv = env.get("nvml") or {}
    if nv.get("available"):
        nv_text = "available" + "".join(f", {k} {nv[k]}" for k in ("device_name", "driver") if nv.get(k))
    elif nv:
        nv_text = str(nv.get("note") or "not available")
    else:
        nv_text = "not recorded"
    mem = as_number(env.get("total_memory_bytes"))
    return _dl(
        [
            ("device", env.get("device")),
            ("device name", env.get("device_name")),
            ("timings", f"{device_label(results)} times"),
            ("dtype", env.get("dtype")),
            ("torch", env.get("torch")),
            ("transformers", env.get("transformers")),
            ("python", env.get("python")),
            ("platform", env.get("platform")),
            ("CPU cores", env.get("cpu_count")),
            ("memory", fmt_bytes(mem) if mem is not None else None),
            ("NVML", nv_text),
        ]
    )


def _section_model(results: dict) -> str:
    m = results.get("model") or {}
    params = as_number(m.get("parameters"))
    grid = m.get("image_grid")
    items = [
        ("name", m.get("name")),
        ("source", m.get("source")),
        ("family", m.get("family")),
        ("architecture", m.get("architecture")),
        ("init", m.get("init")),
        ("weights meaningful", {True: "yes", False: "no (random weights)"}.get(m.get("weights_meaningful"))),
        ("decoder layers", m.get("layers")),
        ("hidden size", m.get("hidden_size")),
        ("attention heads / KV heads", f"{m.get('num_attention_heads', DASH)} / {m.get('num_key_value_heads', DASH)}"),
        ("head dim", m.get("head_dim")),
        ("vision tokens per image", m.get("vision_tokens_per_image")),
        ("image grid", "×".join(str(g) for g in grid) if isinstance(grid, list) else grid),
        ("parameters", f"{params / 1e6:.1f} M" if params is not None else None),
        ("weights", fmt_size(m.get("weight_bytes"))),
        ("dtype", m.get("dtype")),
        ("attention", m.get("attn_implementation")),
    ]
    out = _dl(items)
    notes = [n for n in m.get("notes") or [] if n]
    if notes:
        out += "<ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"
    return out


def _section_capacity(results: dict) -> str:
    cap = results.get("capacity") or {}
    if not cap:
        return '<p class="muted">No capacity budget recorded in this results file.</p>'
    budget, weights = as_number(cap.get("memory_bytes")), as_number(cap.get("weight_bytes"))
    items = [("memory budget", fmt_size(budget)), ("source", cap.get("source")), ("model weights", fmt_size(weights))]
    if budget is not None and weights is not None:
        items.append(("left for KV cache", fmt_bytes(max(0.0, budget - weights))))
    out = _dl(items)
    rows = []
    for r in runs_of(results):
        rc = r.get("capacity") or {}
        if r.get("status") != "ok" or not rc:
            continue
        mcr, ratio = as_number(rc.get("max_concurrent_requests")), as_number(rc.get("ratio_vs_uncompressed"))
        rows.append(
            [
                _e(r.get("id", "?")),
                _e(fmt_size(rc.get("kv_bytes_per_request"))),
                _e(DASH if mcr is None else int(mcr)),
                _e(DASH if ratio is None else f"{ratio:.2f}×"),
            ]
        )
    if rows:
        out += _html_table(
            ["run", "KV per request (prefill + generated)", "max concurrent requests", "vs. uncompressed"],
            rows,
            numeric={1, 2, 3},
        )
    return out


def _section_thresholds(results: dict) -> str:
    lines = threshold_lines(results)
    if not lines:
        return '<p class="muted">No thresholds set.</p>'
    return "<ul>" + "".join(f"<li>{_e(t)}</li>" for t in lines) + "</ul>"


def _section_runs(results: dict) -> str:
    rec_id = (results.get("recommendation") or {}).get("run")
    rows, classes = [], []
    for r in runs_of(results):
        cells = [_e(c) for c in run_cells(r)]
        if rec_id and r.get("id") == rec_id:
            cells[0] += " ★"
        err = r.get("error")
        cells.append(f'<span class="err">{_e(str(err)[:2000])}</span>' if err else "")
        rows.append(cells)
        classes.append("rec" if rec_id and r.get("id") == rec_id else "failed" if r.get("status") != "ok" else "")
    if not rows:
        return '<p class="muted">No runs.</p>'
    table = _html_table(
        table_columns(results) + ["error"], rows, classes, numeric=range(2, len(table_columns(results)))
    )
    return table + (
        '<p class="muted">R = measured vision retention; KV bytes per request after prefill; times are '
        "medians over repeats × inputs; quality is against the uncompressed run; ★ = recommended.</p>"
    )


def _section_plots(results: dict) -> str:
    out = []
    for name, fn in plots.ALL_PLOTS:
        try:
            png = fn(results)
        except Exception as exc:
            out.append(
                f'<p class="muted">Plot “{_e(name)}” could not be drawn: {_e(type(exc).__name__)}: {_e(exc)}</p>'
            )
            continue
        if png is None:
            note = _nvml_note(results) if name == "nvml" else _MISSING.get(name, "Nothing to plot.")
            out.append(f'<p class="muted">{_e(note)}</p>')
            continue
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        out.append(
            f'<figure><img src="{uri}" alt="{_e(name)} plot"><figcaption>{_e(_CAPTIONS[name])}</figcaption></figure>'
        )
    return "".join(out)


def _answers(run: dict | None) -> dict[str, str]:
    out = {}
    for p in (run or {}).get("per_input") or []:
        if isinstance(p, dict) and p.get("input") is not None:
            out[str(p["input"])] = p.get("answer")
    return out


def _section_inputs(results: dict, image_root: Path | None) -> str:
    inputs = [i for i in results.get("inputs") or [] if isinstance(i, dict)]
    if not inputs:
        return '<p class="muted">No inputs.</p>'
    base = uncompressed_run(results)
    rec_id = (results.get("recommendation") or {}).get("run")
    rec = run_by_id(results, rec_id) if rec_id and rec_id != (base or {}).get("id") else None
    base_ans, rec_ans = _answers(base), _answers(rec)
    header = ["image", "file", "question", "expected answer", "uncompressed answer"]
    if rec is not None:
        header.append(f"answer of {rec_id}")
    rows = []
    for inp in inputs:
        path = inp.get("image")
        uri = _thumbnail(path, image_root)
        thumb = (
            f'<img class="thumb" src="{uri}" alt="{_e(Path(str(path)).name)}">'
            if uri
            else '<span class="placeholder">image not available</span>'
        )
        name = Path(str(path)).name if path else str(inp.get("id", "?"))
        size = f"{inp['width']}×{inp['height']}" if inp.get("width") and inp.get("height") else ""
        file_cell = f"{_e(name)}" + (f'<br><span class="muted">{_e(size)}</span>' if size else "")
        key = str(inp.get("id"))
        row = [
            thumb,
            file_cell,
            _e(inp.get("question") or DASH),
            _e(inp["answer"]) if inp.get("answer") is not None else '<span class="muted">–</span>',
            _e(base_ans[key]) if base_ans.get(key) is not None else DASH,
        ]
        if rec is not None:
            row.append(_e(rec_ans[key]) if rec_ans.get(key) is not None else DASH)
        rows.append(row)
    return _html_table(header, rows, table_class="inputs")


def _section_skipped(results: dict) -> str:
    skipped = [s for s in results.get("skipped") or [] if isinstance(s, dict)]
    if not skipped:
        return '<p class="muted">None.</p>'
    return _html_table(["path", "reason"], [[_e(s.get("path", "?")), _e(s.get("reason", ""))] for s in skipped])


def render_html(results: dict, image_root: Path | None = None) -> str:
    """The results as one self-contained HTML document (UTF-8 text, no scripts, no external resources).

    Sections: summary and recommendation, environment (device, versions, dtype, NVML status), model,
    capacity (memory budget, its source, weights, concurrent requests per run), thresholds, runs table
    (the Markdown columns plus the error text of failed runs), plots from :mod:`lightkv_cli.report.plots` as
    inline PNGs, each with a caption (a note where a plot has nothing to show, e.g. why NVML was not
    available), inputs (JPEG thumbnail, file name, question, expected answer and the answers of the
    uncompressed and the recommended run), and skipped inputs.

    Input images are read from ``inputs[i]["image"]`` (absolute, or relative to the working directory,
    then to ``image_root`` when given); a missing or unreadable image becomes a text placeholder. All
    user- and file-derived text is HTML-escaped.

    Raises nothing for a well-formed results dictionary; a plot that fails to draw is replaced by a note.
    """
    model = results.get("model") or {}
    title = f"lightkv report — {model.get('name', '?')}"
    sections = [
        ("Summary", _section_summary(results)),
        ("Environment", _section_environment(results)),
        ("Model", _section_model(results)),
        ("Capacity", _section_capacity(results)),
        ("Thresholds", _section_thresholds(results)),
        ("Runs", _section_runs(results)),
        ("Plots", _section_plots(results)),
        ("Inputs", _section_inputs(results, image_root)),
        ("Skipped inputs", _section_skipped(results)),
    ]
    body = "".join(
        f'<section id="{name.lower().replace(" ", "-")}"><h2>{_e(name)}</h2>{content}</section>'
        for name, content in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{_e(title)}</h1>{body}</body></html>\n"
    )
