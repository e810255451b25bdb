"""Shared pieces of the report's figures: method colours, the Agg figure and PNG encoding, fitted axis limits,
the run lookups every figure needs and the markers for the uncompressed and the recommended run.

Built on :class:`matplotlib.figure.Figure` with an Agg canvas, without ``pyplot``: no global backend state.
Reads results only; no torch.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterable

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lightkv_cli.report.facts import as_number

FIGSIZE = (6.4, 3.6)
"""Figure size in inches (width, height)."""
DPI = 110
"""Resolution of the PNGs, dots per inch."""

_METHOD_COLOURS = {
    "uncompressed": "#444444",
    "lightkv": "#1f77b4",
    "lightkv-prompt": "#2ca02c",
    "lightkv-uniform": "#ff7f0e",
    "vlcache": "#9467bd",
    "fastv": "#8c564b",
    "snapkv": "#17becf",
    "random": "#7f7f7f",
}
_EXTRA_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#d62728")
GIB = 2**30
MIB = 2**20


def method_colour(method: str) -> str:
    """The colour of ``method`` in every figure: fixed for known methods, a stable hash pick otherwise."""
    if method in _METHOD_COLOURS:
        return _METHOD_COLOURS[method]
    return _EXTRA_COLOURS[zlib.crc32(method.encode("utf-8")) % len(_EXTRA_COLOURS)]


def plot_text(s) -> str:
    """User text safe for matplotlib: ``$`` escaped so it is never parsed as mathtext."""
    return str(s).replace("$", r"\$")


def ok_runs(results: dict) -> list[dict]:
    """Runs with status ``ok`` (the only ones plotted), in file order."""
    return [r for r in results.get("runs") or [] if isinstance(r, dict) and r.get("status") == "ok"]


def uncompressed_of(runs: Iterable[dict]) -> dict | None:
    """The first run of ``runs`` whose method is ``uncompressed``, or None."""
    return next((r for r in runs if r.get("method") == "uncompressed"), None)


def retention_of(run: dict) -> float | None:
    """Measured vision retention (fraction kept) of ``run``; 1.0 for an uncompressed run that did not record it."""
    r = as_number(run.get("vision_retention"))
    if r is None and run.get("method") == "uncompressed":
        return 1.0
    return r


def recommended_run(results: dict) -> dict | None:
    """The ok run named by ``recommendation.run``, or None."""
    rec = (results.get("recommendation") or {}).get("run")
    if not rec:
        return None
    return next((r for r in ok_runs(results) if r.get("id") == rec), None)


def thresholds_of(results: dict) -> dict:
    """The ``thresholds`` mapping (empty when missing or malformed)."""
    t = results.get("thresholds")
    return t if isinstance(t, dict) else {}


def new_figure(figsize=FIGSIZE) -> Figure:
    """A constrained-layout figure of ``figsize`` inches at :data:`DPI` on its own Agg canvas."""
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure) -> bytes:
    """``fig`` encoded as PNG bytes at :data:`DPI`, without a software tag (reproducible bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def fit_limits(
    values: Iterable[float | None],
    pad: float = 0.08,
    min_span: float | None = None,
    bounds: tuple[float, float] | None = None,
) -> tuple[float, float] | None:
    """Axis limits fitted to ``values`` (points, interval ends, thresholds): their min and max, padded.

    ``pad`` is the fraction of the span added on each side; a span under ``min_span`` (default 5 % of the
    largest magnitude) is widened to it, inside ``bounds`` when given (e.g. a fraction's 0–1, so a column of
    1.0 scores widens downwards). Returns ``(low, high)``, or None when no value is finite.
    """
    vs = [v for v in (as_number(v) for v in values) if v is not None]
    if not vs:
        return None
    lo, hi = min(vs), max(vs)
    floor = min_span if min_span is not None else max(abs(lo), abs(hi), 1e-9) * 0.05
    if hi - lo < floor:
        mid = (lo + hi) / 2
        lo, hi = mid - floor / 2, mid + floor / 2
        if bounds is not None and hi > bounds[1]:
            lo, hi = lo - (hi - bounds[1]), bounds[1]
        if bounds is not None and lo < bounds[0]:
            lo, hi = bounds[0], bounds[0] + floor
    span = hi - lo
    return lo - pad * span, hi + pad * span


def mark_recommended(ax, x: float | None, y: float | None, ms: float = 15) -> None:
    """A gold star at the recommended run (nothing when either coordinate is missing)."""
    if x is not None and y is not None:
        ax.plot([x], [y], marker="*", ms=ms, color="gold", mec="black", mew=0.8, ls="none", zorder=5)


def mark_uncompressed(ax, series: dict, x: float | None, y: float | None, legend: bool = True) -> None:
    """A diamond at the uncompressed run (the shared anchor of every method's line)."""
    if "uncompressed" in series or x is None or y is None:
        return
    ax.plot(
        [x],
        [y],
        marker="D",
        ms=6,
        color=method_colour("uncompressed"),
        ls="none",
        zorder=4,
        label="uncompressed" if legend else "_nolegend_",
    )


def recommended_handle(rec: dict | None) -> list[Line2D]:
    if rec is None:
        return []
    return [
        Line2D(
            [],
            [],
            marker="*",
            ms=12,
            color="gold",
            mec="black",
            ls="none",
            label=f"recommended ({plot_text(rec.get('id'))})",
        )
    ]


def quality_ci(q: dict, key: str) -> tuple[float, float] | None:
    """The 95 % interval ``quality.ci[key]`` as ``(low, high)``, or None when not recorded."""
    ci = (q.get("ci") or {}).get(key) if isinstance(q, dict) else None
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return None
    lo, hi = (as_number(v) for v in ci)
    return None if lo is None or hi is None else (lo, hi)
