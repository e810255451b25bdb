"""``lightkv report``: re-render the reports of a results file, or compare two (no model, no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lightkv_cli.cli.common import app, check_output_dir, console, friendly, shown
from lightkv_cli.errors import UserError
from lightkv_cli.text import printable


@app.command()
@friendly
def report(
    results: Annotated[
        list[Path],
        typer.Argument(
            help="A results.json written by lightkv profile, sweep or check; give two (A B) to compare them."
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Directory for report.html and report.md, or compare.html and compare.md with two files "
            "(default: next to the (first) results file).",
        ),
    ] = None,
) -> None:
    """Re-render report.html and report.md from a results file, or compare two sweeps run by run
    (compare.html, compare.md); no model is loaded."""
    from lightkv_cli.results import load_results

    if len(results) > 2:
        raise UserError(
            f"lightkv report takes one results file, or two to compare, not {len(results)}; "
            "usage: lightkv report A/results.json [B/results.json]"
        )
    loaded = [load_results(path) for path in results]
    out = output or results[0].parent
    check_output_dir(out)
    if len(loaded) == 2:
        _compare(loaded[0], loaded[1], str(results[0]), str(results[1]), out)
        return

    from lightkv_cli.report.console import cost_table, quality_table, recommendation_line
    from lightkv_cli.report.write import write_reports

    data = loaded[0]
    if data.get("runs"):
        console.print(cost_table(data))
        console.print(quality_table(data))
    console.print(recommendation_line(data), highlight=False)
    html_path, md_path = write_reports(data, out)
    console.print(f"reports: {shown(html_path)}, {shown(md_path)}", highlight=False)


def _compare(a: dict, b: dict, label_a: str, label_b: str, out: Path) -> None:
    """Print the comparison of two results as a table and write compare.html and compare.md into ``out``."""
    from rich.table import Table
    from rich.text import Text

    from lightkv_cli.files import write_text_atomic
    from lightkv_cli.report.compare import (
        compare,
        compare_cells,
        compare_columns,
        header_sentence,
        render_compare_html,
        render_compare_markdown,
    )

    cmp = compare(a, b, label_a, label_b)
    console.print(f"A = {shown(label_a)}\nB = {shown(label_b)}\n{shown(header_sentence(cmp))}", highlight=False)
    head = Table(show_header=True, header_style="bold")
    for col in ("", "A", "B"):
        head.add_column(col)
    for h in cmp["header"]:
        style = "bold yellow" if h["differs"] else None
        head.add_row(*(Text(printable(v or "–")) for v in (h["label"], h["a"], h["b"])), style=style)
    console.print(head)
    if cmp["runs"]:
        table = Table(title="Shared runs (A → B, difference B − A)", show_header=True, header_style="bold")
        for col in compare_columns():
            table.add_column(col, overflow="fold")
        for row in compare_cells(cmp):
            table.add_row(*(Text(printable(c)) for c in row))
        console.print(table)
    else:
        console.print("The two files share no run.")
    for key, name in (("only_a", "A"), ("only_b", "B")):
        if cmp[key]:
            console.print(f"only in {name}: " + shown(", ".join(map(str, cmp[key]))), highlight=False)
    html_path, md_path = out / "compare.html", out / "compare.md"
    write_text_atomic(html_path, printable(render_compare_html(cmp)))
    write_text_atomic(md_path, printable(render_compare_markdown(cmp)))
    console.print(f"comparison: {shown(html_path)}, {shown(md_path)}", highlight=False)
