"""The report as a person sees it: rendered by a real headless browser (Chromium), the screenshot is not blank.

The page is written from the synthetic results of ``test_render`` (several methods and retentions, so the
lead figure has content) and screenshotted at 1280 × 1600; the first screen must show the lead figure's
axes, and the same check on the page with its figures cut out must fail. Skipped only when neither
``chromium`` nor ``chromium-browser`` is installed (``.ci/run`` installs one when it can).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from test_render import _rich_results

from lightkv_cli.report.write import write_reports

WINDOW = (1280, 1600)


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no chromium: apt-get install chromium")
    return exe


def _screenshot(exe: str, page: Path, out: Path) -> Image.Image:
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={out.parent / 'profile'}",
        f"--screenshot={out}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        page.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.is_file(), f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    with Image.open(out) as im:
        return im.convert("RGB")


def _axis_lines(im: Image.Image, box: tuple[int, int, int, int], min_run: int = 300) -> int:
    """How many pixel columns of ``box`` hold an unbroken vertical run of at least ``min_run`` dark grey pixels.

    Those are the spines of a plot's axes (the lead figure has two panels, four spines). Text, table borders
    (light grey) and the page's coloured boxes (saturated) never make such runs.
    """
    region = im.crop(box)
    w, h = region.size
    grey = region.convert("L").tobytes()
    sat = region.convert("HSV").tobytes()[1::3]
    found = 0
    for x in range(w):
        run = best = 0
        for y in range(h):
            i = y * w + x
            run = run + 1 if grey[i] < 170 and sat[i] < 60 else 0
            best = max(best, run)
        found += best >= min_run
    return found


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    exe = _chromium()
    tmp = tmp_path_factory.mktemp("browser")
    images = tmp / "images"
    images.mkdir()
    html_path, _ = write_reports(_rich_results(images), tmp / "report")
    page = _screenshot(exe, html_path, tmp / "page.png")
    # the same page with its figures taken out: what the assertion must reject
    text = html_path.read_text(encoding="utf-8")
    bare = re.sub(r"<figure\b.*?</figure>", "", text, flags=re.DOTALL)
    assert bare.count("data:image/png") == 0 and len(bare) < len(text)
    bare_path = tmp / "bare" / "report.html"
    bare_path.parent.mkdir()
    bare_path.write_text(bare, encoding="utf-8")
    return page, _screenshot(exe, bare_path, tmp / "bare.png")


# the first screen: the recommendation, then the lead figure
FIRST_SCREEN = (0, 0, WINDOW[0], 1100)


def test_report_renders_the_lead_figure_in_a_real_browser(shots):
    page, _ = shots
    assert page.size == WINDOW
    assert len(page.crop(FIRST_SCREEN).getcolors(maxcolors=1 << 20) or []) > 500  # not a flat page
    assert _axis_lines(page, FIRST_SCREEN) >= 4  # both panels of the lead figure are drawn


def test_the_check_rejects_a_page_without_the_figure(shots):
    _, bare = shots
    assert _axis_lines(bare, FIRST_SCREEN) == 0
