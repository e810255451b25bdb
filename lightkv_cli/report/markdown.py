"""``report.md``: the table of runs and the recommendation, for a pull request. Reads results only;
no torch.
"""

from __future__ import annotations

from lightkv_cli.report.facts import (
    CONTROL_CHARS,
    eviction_note,
    failure_rows,
    recommendation_text,
    run_cells,
    runs_of,
    summary_line,
    table_columns,
    threshold_lines,
    weights_note,
)


def _md(s) -> str:
    """Text safe in a GitHub-flavoured Markdown table cell: one line, ``|`` and angle brackets escaped."""
    s = CONTROL_CHARS.sub("", str(s)).replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    return s.replace("|", r"\|").replace("<", r"\<").replace(">", r"\>")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(_md(h) for h in header) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(results: dict) -> str:
    """The results as GitHub-flavoured Markdown: heading, model/device/inputs line, runs table, thresholds,
    recommendation.

    One table row per run in file order (columns as in :func:`render_html`); runs that ended ``oom`` or
    ``error`` show their status in the retention column, and their messages are listed below the table.
    The recommended run's id is followed by ``★``. ``|`` and angle brackets in any cell are escaped.
    Times are medians over repeats × inputs, labelled CPU or GPU (``environment.cuda``).

    Raises nothing for a well-formed results dictionary; missing optional keys render as "–".
    """
    model = results.get("model") or {}
    rec_id, rec_text = recommendation_text(results)
    out = [f"# lightkv report — {_md(model.get('name', '?'))}", "", _md(summary_line(results)), ""]
    for note in (weights_note(results), eviction_note(results)):
        if note:
            out += [f"> **Note:** {note}", ""]
    if results.get("complete") is False:
        out += ["> **Incomplete:** the sweep was still running or was interrupted when this file was written.", ""]
    rows = []
    for r in runs_of(results):
        cells = run_cells(r)
        if rec_id and r.get("id") == rec_id:
            cells[0] += " ★"
        rows.append(cells)
    out += ["## Runs", ""] + _md_table(table_columns(results), rows) + [""]
    out += [
        (
            "R = measured vision retention; KV bytes per request after prefill; times are medians; "
            "quality is against the uncompressed run; ★ = recommended."
        ),
        "",
    ]
    failed = [r for r in runs_of(results) if r.get("status") not in ("ok", None)]
    if failed:
        out += ["Failed runs:", ""]
        out += [
            f"- {_md(r.get('id', '?'))}: {_md(r.get('status'))}"
            + (f" — {_md(str(r['error'])[:500])}" if r.get("error") else "")
            for r in failed
        ]
        out.append("")
    out += ["## Thresholds", ""]
    lines = threshold_lines(results)
    out += [f"- {_md(t)}" for t in lines] if lines else ["No thresholds set."]
    out += ["", "## Recommendation", "", _md(rec_text), ""]
    fails = failure_rows(results)
    if not rec_id and fails:
        out += ["What the closest run missed:", ""]
        out += _md_table(["run", "threshold", "required", "measured", "short by"], fails) + [""]
    return "\n".join(out)
