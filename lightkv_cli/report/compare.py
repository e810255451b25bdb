"""Two sweeps side by side (``lightkv report A/results.json B/results.json``): the runs they share (same run
id) with each cost and quality figure of A and B and the difference B − A, the runs only one of them has,
and what differs between the two files (model, dtype, device, inputs, lightkv version, time). Reads
results dictionaries (schema ``lightkv.results/1``, docs/results-schema.md) only; no torch.

The HTML is one self-contained page (Jinja2, autoescaped, no script); the shared report stylesheet
``templates/style.css`` is inlined when it exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lightkv_cli.report.facts import DASH, as_number, fmt_bytes, fmt_num, runs_of, spread_median

TEMPLATES = Path(__file__).resolve().parent / "templates"


@dataclass(frozen=True)
class Metric:
    """One compared figure of a run.

    Attributes:
        key: name in :func:`compare`'s ``metrics``.
        label: column heading.
        unit: ``"fraction"`` (in [0, 1]), ``"bytes"`` or ``"ms"`` (milliseconds).
        better: ``"higher"``, ``"lower"`` or None (neither: a setting more than an outcome).
    """

    key: str
    label: str
    unit: str
    better: str | None


#: The figures compared, in column order.
METRICS = (
    Metric("vision_retention", "measured R", "fraction", None),
    Metric("kv_bytes", "KV total", "bytes", "lower"),
    Metric("prefill_ms", "prefill ms", "ms", "lower"),
    Metric("decode_ms_per_token", "decode ms/token", "ms", "lower"),
    Metric("answer_match", "answer match", "fraction", "higher"),
    Metric("accuracy", "accuracy", "fraction", "higher"),
    Metric("top1_agreement", "top-1", "fraction", "higher"),
)


def _value(run: dict, key: str) -> float | None:
    if run.get("status") != "ok":
        return None
    if key in ("prefill_ms", "decode_ms_per_token"):
        return spread_median(run.get(key))
    if key in ("answer_match", "accuracy", "top1_agreement"):
        return as_number((run.get("quality") or {}).get(key))
    return as_number(run.get(key))


def _device(results: dict) -> str | None:
    env = results.get("environment") or {}
    model = results.get("model") or {}
    parts = [str(x) for x in (env.get("device") or model.get("device"), env.get("device_name")) if x]
    return " · ".join(parts) or None


#: ``(field, heading, getter)`` of the header: what may differ between two sweeps.
_HEADER = (
    ("model", "model", lambda r: (r.get("model") or {}).get("name")),
    ("dtype", "dtype", lambda r: (r.get("environment") or {}).get("dtype") or (r.get("model") or {}).get("dtype")),
    ("device", "device", _device),
    ("inputs_fingerprint", "inputs", lambda r: r.get("inputs_fingerprint")),
    ("tool_version", "lightkv version", lambda r: r.get("tool_version")),
    ("created", "created", lambda r: r.get("created")),
)


def compare(a: dict, b: dict, label_a: str, label_b: str) -> dict:
    """Compare two results dictionaries run by run.

    Args:
        a, b: results dictionaries (A is the baseline: differences are B − A).
        label_a, label_b: how the two are named in the views (e.g. their paths).

    Returns:
        ``{"label_a", "label_b", "header": [{"field", "label", "a", "b", "differs"}], "differs": [field, ...],
        "runs": [{"id", "method", "status_a", "status_b", "metrics": {key: {"a", "b", "delta"}}}],
        "only_a": [id, ...], "only_b": [id, ...]}``. ``runs`` are the run ids both have, in A's order;
        metric keys are those of :data:`METRICS` (``vision_retention`` a fraction, ``kv_bytes`` bytes per
        request, ``prefill_ms`` and ``decode_ms_per_token`` medians in milliseconds, ``answer_match``,
        ``accuracy``, ``top1_agreement`` fractions); a value is None when not measured (or the run is not ok),
        ``delta`` None unless both are numbers. ``header`` fields: model name, dtype, device,
        ``inputs_fingerprint``, ``tool_version``, ``created`` (as strings or None).
    """
    runs_a = {r.get("id"): r for r in runs_of(a)}
    runs_b = {r.get("id"): r for r in runs_of(b)}
    shared = []
    for run_id, ra in runs_a.items():
        rb = runs_b.get(run_id)
        if rb is None:
            continue
        metrics = {}
        for m in METRICS:
            va, vb = _value(ra, m.key), _value(rb, m.key)
            metrics[m.key] = {"a": va, "b": vb, "delta": None if va is None or vb is None else vb - va}
        shared.append(
            {
                "id": run_id,
                "method": ra.get("method"),
                "status_a": ra.get("status"),
                "status_b": rb.get("status"),
                "metrics": metrics,
            }
        )
    header = []
    for field, label, get in _HEADER:
        va, vb = get(a), get(b)
        va, vb = (None if v is None else str(v) for v in (va, vb))
        header.append({"field": field, "label": label, "a": va, "b": vb, "differs": va != vb})
    return {
        "label_a": label_a,
        "label_b": label_b,
        "header": header,
        "differs": [h["field"] for h in header if h["differs"]],
        "runs": shared,
        "only_a": [i for i in runs_a if i not in runs_b],
        "only_b": [i for i in runs_b if i not in runs_a],
    }


def _fmt(unit: str, x: float | None) -> str:
    if x is None:
        return DASH
    if unit == "bytes":
        return fmt_bytes(x)
    if unit == "ms":
        return fmt_num(x, ".1f")
    return fmt_num(x, ".3f")


def _fmt_delta(unit: str, a: float | None, d: float | None) -> str:
    if d is None:
        return DASH
    if unit == "bytes":
        text = ("−" if d < 0 else "+") + fmt_bytes(abs(d))
    elif unit == "ms":
        text = f"{d:+.1f}".replace("-", "−")
    else:
        text = f"{d:+.3f}".replace("-", "−")
    if unit != "fraction" and a:
        text += f", {d / a:+.0%}".replace("-", "−")
    return text


def verdict(metric: Metric, delta: float | None) -> str:
    """``"better"``, ``"worse"`` or ``"same"`` for B vs. A on one figure; ``""`` when not judged."""
    if delta is None or metric.better is None:
        return ""
    if delta == 0:
        return "same"
    return "better" if (delta > 0) == (metric.better == "higher") else "worse"


def header_sentence(cmp: dict) -> str:
    """One plain-text sentence on what differs between the two sweeps (the creation time aside)."""
    labels = {h["field"]: h["label"] for h in cmp["header"]}
    differs = [labels[f] for f in cmp["differs"] if f != "created"]
    if not differs:
        return "Same model, dtype, device, inputs and lightkv version."
    return "Differs: " + ", ".join(differs) + "."


def compare_columns() -> list[str]:
    """Headings of :func:`compare_cells`' rows."""
    return ["run", "method"] + [m.label for m in METRICS]


def _side(run: dict, side: str, metric: Metric) -> str:
    """One side's value as text; the run's status (``oom``, ``error``) when it did not finish."""
    value = run["metrics"][metric.key][side]
    status = run[f"status_{side}"]
    if value is None and status != "ok":
        return str(status)
    return _fmt(metric.unit, value)


def compare_cells(cmp: dict) -> list[list[str]]:
    """Plain-text cells of the shared runs, one row per run: ``"A → B (Δ)"`` per figure (unescaped)."""
    rows = []
    for run in cmp["runs"]:
        row = [str(run["id"]), str(run.get("method") or "?")]
        for m in METRICS:
            v = run["metrics"][m.key]
            cell = f"{_side(run, 'a', m)} → {_side(run, 'b', m)}"
            if v["delta"] is not None:
                cell += f" ({_fmt_delta(m.unit, v['a'], v['delta'])})"
            row.append(cell)
        rows.append(row)
    return rows


def _md(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_compare_markdown(cmp: dict) -> str:
    """The comparison (:func:`compare`) as Markdown: header table, shared runs, runs only in one file."""
    a, b = cmp["label_a"], cmp["label_b"]
    lines = [f"# lightkv comparison: {_md(a)} → {_md(b)}", "", f"A = `{a}`, B = `{b}`. {header_sentence(cmp)}", ""]
    lines += ["| | A | B |", "|---|---|---|"]
    for h in cmp["header"]:
        mark = " ≠" if h["differs"] else ""
        lines.append(f"| {h['label']}{mark} | {_md(h['a'] or DASH)} | {_md(h['b'] or DASH)} |")
    lines += ["", "## Shared runs (A → B, difference B − A)", ""]
    if cmp["runs"]:
        cols = compare_columns()
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in compare_cells(cmp)]
    else:
        lines.append("The two files share no run.")
    for key, label in (("only_a", "A"), ("only_b", "B")):
        if cmp[key]:
            lines += ["", f"Only in {label}: " + ", ".join(f"`{_md(i)}`" for i in cmp[key])]
    return "\n".join(lines) + "\n"


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>lightkv comparison: {{ cmp.label_a }} → {{ cmp.label_b }}</title>
<style>
{% if shared_css %}{% include "style.css" %}{% else %}
body { font-family: system-ui, sans-serif; margin: 2rem; color: #1f2328; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #d0d7de; padding: 0.3rem 0.6rem; text-align: left; white-space: nowrap; }
th { background: #f6f8fa; }
{% endif %}
.compare-runs td.better { color: #1a7f37; }
.compare-runs td.worse { color: #cf222e; }
.compare-header tr.differs { font-weight: bold; }
</style>
</head>
<body>
<h1>lightkv comparison</h1>
<p>A = <code>{{ cmp.label_a }}</code>, B = <code>{{ cmp.label_b }}</code>. {{ sentence }}</p>
<table class="compare-header">
<tr><th></th><th>A</th><th>B</th></tr>
{% for h in cmp.header %}<tr{% if h.differs %} class="differs"{% endif %}>
<th>{{ h.label }}{% if h.differs %} ≠{% endif %}</th><td>{{ h.a or dash }}</td><td>{{ h.b or dash }}</td></tr>
{% endfor %}</table>
<h2>Shared runs</h2>
{% if rows %}<table class="compare-runs">
<tr><th rowspan="2">run</th><th rowspan="2">method</th>
{% for m in metrics %}<th colspan="3">{{ m.label }}</th>{% endfor %}</tr>
<tr>{% for m in metrics %}<th>A</th><th>B</th><th>B − A</th>{% endfor %}</tr>
{% for row in rows %}<tr><td>{{ row.id }}</td><td>{{ row.method }}</td>
{% for c in row.cells %}<td>{{ c.a }}</td><td>{{ c.b }}</td><td class="{{ c.verdict }}">{{ c.delta }}</td>{% endfor %}
</tr>
{% endfor %}</table>
{% else %}<p>The two files share no run.</p>{% endif %}
{% if cmp.only_a %}<p>Only in A:
{% for i in cmp.only_a %}<code>{{ i }}</code>{% if not loop.last %}, {% endif %}
{% endfor %}</p>{% endif %}
{% if cmp.only_b %}<p>Only in B:
{% for i in cmp.only_b %}<code>{{ i }}</code>{% if not loop.last %}, {% endif %}
{% endfor %}</p>{% endif %}
</body>
</html>
"""


def render_compare_html(cmp: dict) -> str:
    """The comparison (:func:`compare`) as one self-contained HTML page (no script, no external resource).

    Every value is autoescaped (Jinja2 ``autoescape=True``); B − A cells carry the class ``better`` or
    ``worse`` by each figure's direction (:data:`METRICS`). Includes ``templates/style.css`` when present.
    """
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader(
            [jinja2.DictLoader({"compare.html": _TEMPLATE}), jinja2.FileSystemLoader(str(TEMPLATES))]
        ),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    rows = []
    for run in cmp["runs"]:
        cells = []
        for m in METRICS:
            v = run["metrics"][m.key]
            cells.append(
                {
                    "a": _side(run, "a", m),
                    "b": _side(run, "b", m),
                    "delta": _fmt_delta(m.unit, v["a"], v["delta"]),
                    "verdict": verdict(m, v["delta"]),
                }
            )
        rows.append({"id": run["id"], "method": run.get("method") or "?", "cells": cells})
    return env.get_template("compare.html").render(
        cmp=cmp,
        rows=rows,
        metrics=METRICS,
        sentence=header_sentence(cmp),
        dash=DASH,
        shared_css=(TEMPLATES / "style.css").is_file(),
    )
