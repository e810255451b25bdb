"""``report.html``: one self-contained HTML file of a results dictionary (schema ``lightkv.results/1``).

Reads results only; never measures, never loads a model. The page is rendered from the Jinja2 templates in
``report/templates/`` with autoescaping on; this module only gathers plain values (text, numbers, ``data:``
URIs) for them. Missing optional keys (older results files) are shown as "–" or "not recorded", never
errors. The file has no external resources: CSS (``templates/style.css``) is inline, plots are PNGs and
input images JPEG thumbnails embedded as ``data:`` URIs, and there is no script. All text that comes from
the user or from files (prompts, answers, file names, paths, model names, the command line, error messages)
is HTML-escaped, quotes included, with control characters dropped (:func:`_finalize`, applied to every
``{{ … }}`` of the templates).
"""

from __future__ import annotations

import base64
import html
import io
from functools import lru_cache
from pathlib import Path

from jinja2 import Environment, PackageLoader
from markupsafe import Markup

from lightkv_cli.report import plots
from lightkv_cli.report.changes import breakdowns, changed_inputs
from lightkv_cli.report.facts import (
    CONTROL_CHARS,
    DASH,
    as_number,
    device_label,
    eviction_note,
    failure_rows,
    first_token_cell,
    fmt_bytes,
    fmt_num,
    fmt_size,
    paired_ratio_of,
    ratio_text,
    recommendation_text,
    run_by_id,
    run_cells,
    run_settings,
    runs_of,
    spread_median,
    summary_line,
    table_columns,
    threshold_lines,
    uncompressed_run,
    weights_note,
)
from lightkv_cli.report.token_maps import token_map_figures

THUMBNAIL_MAX_SIDE = 160


def _finalize(value) -> Markup:
    """Every ``{{ … }}`` of the templates: HTML-escaped text (quotes too), control characters dropped.

    ``None`` renders as empty text; a :class:`markupsafe.Markup` value (only the inlined style sheet) is
    kept as it is.
    """
    if isinstance(value, Markup):
        return value
    if value is None:
        return Markup("")
    return Markup(html.escape(CONTROL_CHARS.sub("", str(value)), quote=True))


@lru_cache(maxsize=1)
def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("lightkv_cli.report", "templates"),
        autoescape=True,
        finalize=_finalize,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["clean"] = lambda s: CONTROL_CHARS.sub("", str(s))
    env.globals["dash"] = DASH
    return env


def _style_sheet() -> Markup:
    env = _environment()
    return Markup(env.loader.get_source(env, "style.css")[0])


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


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


_CAPTIONS = {
    "quality_cost": (
        "Quality against what it costs, every method on the same axes: KV-cache bytes per request after "
        "prefill (left) and median prefill time (right, bars p25–p75). The staircase is the Pareto frontier "
        "(ringed runs: no other run has both better quality and lower cost); vertical bars are 95 % intervals "
        "(Wilson score for 0/1 metrics in newer results files, else bootstrap); dashed red lines are "
        "thresholds, the tinted side fails them; the star is the recommended run and the diamond the "
        "uncompressed one. Axes are fitted to the data."
    ),
    "quality": (
        "Answer match and top-1 agreement with the uncompressed run (and accuracy when answers were "
        "given) against measured vision retention, one line per method; error bars are 95 % intervals "
        "(Wilson score for 0/1 metrics in newer results files, else bootstrap) when recorded, the star is "
        "the recommended run and dashed lines are thresholds."
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


def _figure(name: str, fn, results: dict) -> dict:
    """``{name, uri, caption, note}`` of one plot: ``uri`` None and a ``note`` when there is nothing to show."""
    out = {"name": name, "uri": None, "caption": _CAPTIONS.get(name, ""), "note": None}
    try:
        png = fn(results)
    except Exception as exc:
        out["note"] = f"Plot “{name}” could not be drawn: {type(exc).__name__}: {exc}"
        return out
    if png is None:
        out["note"] = _nvml_note(results) if name == "nvml" else _MISSING.get(name, "Nothing to plot.")
    else:
        out["uri"] = _png_uri(png)
    return out


def _prefill_note(run: dict, base: dict, bprefill: float | None) -> str | None:
    """Under the prefill tile: the paired ratio to uncompressed with its interval (results version 2), else
    the uncompressed median."""
    if run is base:
        return None
    if paired_ratio_of(run, "prefill") is not None:
        return f"{ratio_text(run, 'prefill')} uncompressed (paired)"
    return f"uncompressed {bprefill:.1f} ms" if bprefill is not None else None


def _recommendation(results: dict) -> dict:
    """The decision box: sentence, headline numbers of the recommended run, or what the closest run missed."""
    rec_id, text = recommendation_text(results)
    run = run_by_id(results, rec_id) or {}
    base = uncompressed_run(results) or {}
    tiles = []
    if rec_id and run.get("status") == "ok":
        kv, b = as_number(run.get("kv_bytes")), as_number(base.get("kv_bytes"))
        less = f"{1 - kv / b:.0%} less than uncompressed" if kv is not None and b else None
        q = run.get("quality") or {}
        mcr = as_number((run.get("capacity") or {}).get("max_concurrent_requests"))
        prefill, bprefill = spread_median(run.get("prefill_ms")), spread_median(base.get("prefill_ms"))
        tiles = [
            ("KV cache per request", fmt_size(kv), less),
            ("measured vision retention", fmt_num(run.get("vision_retention"), ".3f"), None),
            ("answer match", fmt_num(q.get("answer_match"), ".2f"), "vs. uncompressed"),
            ("top-1 agreement", first_token_cell(q, "top1_agreement", ".2f"), "first token"),
            ("token agreement", fmt_num(q.get("token_agreement"), ".2f"), "uncompressed answer, teacher-forced"),
            ("accuracy", fmt_num(q.get("accuracy"), ".2f"), "vs. expected answers"),
            (
                f"prefill ({device_label(results)})",
                DASH if prefill is None else f"{prefill:.1f} ms",
                _prefill_note(run, base, bprefill),
            ),
            ("concurrent requests", DASH if mcr is None else str(int(mcr)), "fit in the memory budget"),
        ]
        tiles = [t for t in tiles if t[1] != DASH]
    notes = [n for n in (weights_note(results), eviction_note(results)) if n]
    if results.get("complete") is False:
        notes.append("Incomplete: the sweep was still running or was interrupted when this file was written.")
    return {
        "id": rec_id,
        "text": text,
        "tiles": tiles,
        "failures": [] if rec_id else failure_rows(results),
        "notes": notes,
    }


def _changes(results: dict, image_root: Path | None) -> dict:
    """The "What changed" gallery: :func:`changed_inputs` entries with thumbnails (or the error that stopped it)."""
    try:
        data = changed_inputs(results)
    except Exception as exc:
        return {"entries": [], "more": 0, "error": f"{type(exc).__name__}: {exc}"}
    entries = []
    for e in data.get("entries") or []:
        kl = as_number(e.get("kl"))
        entries.append(
            {**e, "thumb": _thumbnail(e.get("image"), image_root), "kl": None if kl is None else f"{kl:.3g}"}
        )
    return {"entries": entries, "more": int(data.get("more") or 0), "error": None}


def _breakdowns(results: dict) -> list[dict]:
    """Breakdown tables, one per group kind (``type``, ``tag``): rows ``[value, run, n, accuracy, answer match]``."""
    try:
        items = breakdowns(results)
    except Exception:
        return []
    groups: dict[str, list[list[str]]] = {}
    for b in items or []:
        for row in b.get("rows") or []:
            groups.setdefault(str(b.get("group", "?")), []).append(
                [
                    str(b.get("value", "?")),
                    str(row.get("run", "?")),
                    DASH if as_number(row.get("n")) is None else str(int(row["n"])),
                    fmt_num(row.get("accuracy"), ".2f"),
                    fmt_num(row.get("answer_match"), ".2f"),
                ]
            )
    return [{"group": g, "rows": rows} for g, rows in groups.items()]


def _token_maps(results: dict, image_root: Path | None) -> list[dict]:
    try:
        figs = token_map_figures(results, image_root=image_root)
    except Exception:
        return []
    return [
        {"uri": _png_uri(f["png"]), "caption": f.get("caption") or "", "run": f.get("run"), "input": f.get("input")}
        for f in figs or []
        if isinstance(f.get("png"), (bytes, bytearray))
    ]


def _runs(results: dict) -> dict:
    rec_id = (results.get("recommendation") or {}).get("run")
    rows = []
    for r in runs_of(results):
        cells = run_cells(r)
        is_rec = bool(rec_id) and r.get("id") == rec_id
        if is_rec:
            cells[0] += " ★"
        err = r.get("error")
        cls = "rec" if is_rec else "failed" if r.get("status") != "ok" else ""
        rows.append({"cells": cells, "cls": cls, "error": str(err)[:2000] if err else None})
    header = table_columns(results)
    errors = any(r["error"] for r in rows)  # the error column only when some run failed with a message
    return {
        "header": header + ["error"] * errors,
        "rows": rows,
        "numeric": list(range(2, len(header))),
        "errors": errors,
        "settings": run_settings(results),
    }


def _capacity(results: dict) -> dict | None:
    cap = results.get("capacity") or {}
    if not cap:
        return None
    budget, weights = as_number(cap.get("memory_bytes")), as_number(cap.get("weight_bytes"))
    items = [("memory budget", fmt_size(budget)), ("source", cap.get("source")), ("model weights", fmt_size(weights))]
    if budget is not None and weights is not None:
        items.append(("left for KV cache", fmt_bytes(max(0.0, budget - weights))))
    rows = []
    for r in runs_of(results):
        rc = r.get("capacity") or {}
        if r.get("status") != "ok" or not rc:
            continue
        mcr, ratio = as_number(rc.get("max_concurrent_requests")), as_number(rc.get("ratio_vs_uncompressed"))
        rows.append(
            [
                str(r.get("id", "?")),
                fmt_size(rc.get("kv_bytes_per_request")),
                DASH if mcr is None else str(int(mcr)),
                DASH if ratio is None else f"{ratio:.2f}×",
            ]
        )
    return {"facts": items, "rows": rows}


def _environment_items(results: dict) -> list[tuple[str, object]]:
    env = results.get("environment") or {}
    nv = env.get("nvml") or {}
    if nv.get("available"):
        nv_text = "available" + "".join(f", {k} {nv[k]}" for k in ("device_name", "driver") if nv.get(k))
    elif nv:
        nv_text = str(nv.get("note") or "not available")
    else:
        nv_text = "not recorded"
    mem = as_number(env.get("total_memory_bytes"))
    return [
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


def _model_items(results: dict) -> list[tuple[str, object]]:
    m = results.get("model") or {}
    params = as_number(m.get("parameters"))
    grid = m.get("image_grid")
    return [
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


def _about_items(results: dict) -> list[tuple[str, object]]:
    counts: dict[str, int] = {}
    for r in runs_of(results):
        counts[r.get("status", "?")] = counts.get(r.get("status", "?"), 0) + 1
    return [
        ("created", results.get("created")),
        ("lightkv", results.get("tool_version")),
        ("schema", results.get("schema")),
        ("runs", ", ".join(f"{n} {s}" for s, n in counts.items()) or "none"),
        ("complete", {True: "yes", False: "no (running or interrupted)"}.get(results.get("complete"))),
    ]


def _answers(run: dict | None) -> dict[str, str]:
    out = {}
    for p in (run or {}).get("per_input") or []:
        if isinstance(p, dict) and p.get("input") is not None:
            out[str(p["input"])] = p.get("answer")
    return out


def _inputs(results: dict, image_root: Path | None) -> dict:
    inputs = [i for i in results.get("inputs") or [] if isinstance(i, dict)]
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
        key = str(inp.get("id"))
        row = {
            "thumb": _thumbnail(path, image_root),
            "name": Path(str(path)).name if path else str(inp.get("id", "?")),
            "size": f"{inp['width']}×{inp['height']}" if inp.get("width") and inp.get("height") else "",
            "question": inp.get("question") or DASH,
            "expected": inp.get("answer"),
            "answers": [base_ans.get(key)] + ([rec_ans.get(key)] if rec is not None else []),
        }
        rows.append(row)
    return {"header": header, "rows": rows}


def render_html(results: dict, image_root: Path | None = None) -> str:
    """The results as one self-contained HTML document (UTF-8 text, no scripts, no external resources).

    Order, decision first: the recommendation (sentence, headline numbers of the recommended run, notes, or
    what the closest run missed); the lead figure, full width (quality against KV bytes per request and
    against prefill time for every method, with the Pareto frontier, thresholds, intervals and the
    recommended run, :func:`lightkv_cli.report.plots.quality_vs_cost`); the other plots of
    :data:`lightkv_cli.report.plots.ALL_PLOTS`, each with a caption (a note where a plot has nothing to
    show, e.g. why NVML was not available); "What changed" (the inputs whose answer changed most under
    compression, with thumbnails, from :func:`lightkv_cli.report.changes.changed_inputs`); "Where the tokens
    went" (:func:`lightkv_cli.report.token_maps.token_map_figures`, omitted when empty); breakdowns by
    prompt type or tag (omitted when none); then the tables: runs (the Markdown columns plus the error
    text of failed runs), capacity, thresholds, inputs (JPEG thumbnail, file name, question, expected
    answer and the answers of the uncompressed and the recommended run), skipped inputs, environment,
    model, and the file's own facts (created, version, schema, command).

    Input images are read from their paths (absolute, or relative to the working directory, then to
    ``image_root`` when given); a missing or unreadable image becomes a text placeholder. All user- and
    file-derived text is HTML-escaped.

    Raises nothing for a well-formed results dictionary; a plot or section that fails to draw is replaced
    by a note or left out.
    """
    figures = [_figure(name, fn, results) for name, fn in plots.ALL_PLOTS]
    model = results.get("model") or {}
    context = {
        "title": f"lightkv report — {model.get('name', '?')}",
        "summary": summary_line(results),
        "css": _style_sheet(),
        "rec": _recommendation(results),
        "lead": figures[0],
        "figures": figures[1:],
        "changes": _changes(results, image_root),
        "token_maps": _token_maps(results, image_root),
        "breakdowns": _breakdowns(results),
        "runs": _runs(results),
        "capacity": _capacity(results),
        "thresholds": threshold_lines(results),
        "inputs": _inputs(results, image_root),
        "skipped": [
            [s.get("path", "?"), s.get("reason", "")] for s in results.get("skipped") or [] if isinstance(s, dict)
        ],
        "environment": _environment_items(results),
        "model_items": _model_items(results),
        "model_notes": [n for n in model.get("notes") or [] if n],
        "about": _about_items(results),
        "command": results.get("command"),
    }
    return _environment().get_template("report.html.j2").render(context)
