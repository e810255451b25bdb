"""Write ``report.html`` and ``report.md`` next to a results file, atomically. No torch."""

from __future__ import annotations

from pathlib import Path

from lightkv_cli.files import write_text_atomic
from lightkv_cli.report.html import render_html
from lightkv_cli.report.markdown import render_markdown
from lightkv_cli.text import printable


def write_reports(results: dict, out_dir: Path, image_root: Path | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` into ``out_dir`` (created if missing); return their paths.

    Both documents are rendered first, then each is written to a temporary file in ``out_dir`` and renamed
    over the target (``os.replace``), so a reader never sees a half-written report and no temporary file is
    left behind. ``image_root`` is passed to :func:`render_html`.

    Raises OSError when ``out_dir`` cannot be created or written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A file name that is not UTF-8 (read with surrogateescape) is shown escaped, never stops a report.
    html_text = printable(render_html(results, image_root=image_root))
    md_text = printable(render_markdown(results))
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    write_text_atomic(html_path, html_text)
    write_text_atomic(md_path, md_text)
    return html_path, md_path
