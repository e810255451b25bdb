"""``lightkv report``: re-render the reports of a results file (no model, no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lightkv_cli.cli.common import app, check_output_dir, console, friendly


@app.command()
@friendly
def report(
    results: Annotated[Path, typer.Argument(help="A results.json written by lightkv profile, sweep or check.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Directory for report.html and report.md (default: next to the results file)."
        ),
    ] = None,
) -> None:
    """Re-render report.html and report.md from a results file (no model is loaded)."""
    from lightkv_cli.report.console import cost_table, quality_table, recommendation_line
    from lightkv_cli.report.write import write_reports
    from lightkv_cli.results import load_results

    data = load_results(results)
    out = output or results.parent
    check_output_dir(out)
    if data.get("runs"):
        console.print(cost_table(data))
        console.print(quality_table(data))
    console.print(recommendation_line(data), highlight=False)
    html_path, md_path = write_reports(data, out)
    console.print(f"reports: {html_path}, {md_path}", highlight=False)
