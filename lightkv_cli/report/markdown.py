"""``report.md``: the recommendation, the table of runs and what compression changed, for a pull request.
Reads results only; no torch.
"""

from __future__ import annotations

from lightkv_cli.report.changes import breakdowns, changed_inputs
from lightkv_cli.report.facts import (
    CONTROL_CHARS,
    DASH,
    as_number,
    eviction_note,
    failure_rows,
    fmt_num,
    recommendation_text,
    run_cells,
    run_settings,
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


def _quoted(s) -> str:
    return DASH if s is None else f"“{_md(s)}”"


def _changes_lines(results: dict) -> list[str]:
    """The "What changed" list (:func:`changed_inputs`), one item per changed answer; [] when nothing changed."""
    try:
        data = changed_inputs(results)
    except Exception:
        return []
    entries = data.get("entries") or []
    if not entries:
        return []
    out = ["## What changed", ""]
    for e in entries:
        item = f"- **{_md(e.get('run', '?'))}** on {_md(e.get('input', '?'))}"
        if e.get("question"):
            item += f" — {_md(e['question'])}"
        item += f": uncompressed {_quoted(e.get('uncompressed_answer'))} → compressed {_quoted(e.get('answer'))}"
        if e.get("expected") is not None:
            item += f" (ground truth {_quoted(e['expected'])})"
        kl = as_number(e.get("kl"))
        if kl is not None:
            item += f", KL {kl:.3g} nats"
        out.append(item)
    more = int(data.get("more") or 0)
    if more:
        out.append(f"- and {more} more")
    return out + [""]


def _breakdown_lines(results: dict) -> list[str]:
    """Quality per prompt ``type`` / tag (:func:`breakdowns`), one table per group kind; [] when none."""
    try:
        items = breakdowns(results)
    except Exception:
        return []
    groups: dict[str, list[list[str]]] = {}
    for b in items or []:
        for row in b.get("rows") or []:
            n = as_number(row.get("n"))
            groups.setdefault(str(b.get("group", "?")), []).append(
                [
                    str(b.get("value", "?")),
                    str(row.get("run", "?")),
                    DASH if n is None else str(int(n)),
                    fmt_num(row.get("accuracy"), ".2f"),
                    fmt_num(row.get("answer_match"), ".2f"),
                ]
            )
    if not groups:
        return []
    out = ["## Breakdowns", ""]
    for group, rows in groups.items():
        out += [f"By {_md(group)}:", ""] + _md_table([group, "run", "inputs", "accuracy", "answer match"], rows) + [""]
    return out


def render_markdown(results: dict) -> str:
    """The results as GitHub-flavoured Markdown, decision first: heading, model/device/inputs line, notes,
    recommendation (and what the closest run missed when none), runs table, what changed (the answers
    compression changed most, :func:`lightkv_cli.report.changes.changed_inputs`, without images),
    breakdowns by prompt type or tag (when any), thresholds.

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
    out += ["## Recommendation", "", _md(rec_text), ""]
    fails = failure_rows(results)
    if not rec_id and fails:
        out += ["What the closest run missed:", ""]
        out += _md_table(["run", "threshold", "required", "measured", "short by"], fails) + [""]
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
    settings = run_settings(results)
    if settings:
        out += ["How each run was set for its target:", ""]
        out += [f"- {_md(run_id)}: {_md(note)}" for run_id, note in settings] + [""]
    failed = [r for r in runs_of(results) if r.get("status") not in ("ok", None)]
    if failed:
        out += ["Failed runs:", ""]
        out += [
            f"- {_md(r.get('id', '?'))}: {_md(r.get('status'))}"
            + (f" — {_md(str(r['error'])[:500])}" if r.get("error") else "")
            for r in failed
        ]
        out.append("")
    out += _changes_lines(results)
    out += _breakdown_lines(results)
    out += ["## Thresholds", ""]
    lines = threshold_lines(results)
    out += [f"- {_md(t)}" for t in lines] if lines else ["No thresholds set."]
    out.append("")
    return "\n".join(out)
