"""Figures of a results dictionary (schema ``lightkv.results/1``), as PNG bytes.

Built with :class:`matplotlib.figure.Figure` on an Agg canvas, without ``pyplot`` and without
``matplotlib.use``: no global backend state is touched, so these functions work headless and may run
in several threads at once. Reads results only; never measures, never loads a model.

Every function takes the results dictionary and returns PNG bytes, or ``None`` when there is nothing to
plot. Only runs with ``status == "ok"`` are drawn; missing optional keys (older results files) are
skipped, not errors. Methods get the same colour in every figure (see :func:`method_colour`).
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Iterable

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lightkv_cli.report.facts import as_number, device_label, spread_iqr, spread_median

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
_GIB = 2**30
_MIB = 2**20


def method_colour(method: str) -> str:
    """The colour of ``method`` in every figure: fixed for known methods, a stable hash pick otherwise."""
    if method in _METHOD_COLOURS:
        return _METHOD_COLOURS[method]
    return _EXTRA_COLOURS[zlib.crc32(method.encode("utf-8")) % len(_EXTRA_COLOURS)]


# ----------------------------------------------------------------------------------------------- helpers


def _text(s) -> str:
    """User text safe for matplotlib: ``$`` escaped so it is never parsed as mathtext."""
    return str(s).replace("$", r"\$")


def ok_runs(results: dict) -> list[dict]:
    """Runs with status ``ok`` (the only ones plotted), in file order."""
    return [r for r in results.get("runs") or [] if isinstance(r, dict) and r.get("status") == "ok"]


def _uncompressed(runs: Iterable[dict]) -> dict | None:
    return next((r for r in runs if r.get("method") == "uncompressed"), None)


def _retention(run: dict) -> float | None:
    r = as_number(run.get("vision_retention"))
    if r is None and run.get("method") == "uncompressed":
        return 1.0
    return r


def _series(results: dict) -> dict[str, list[dict]]:
    """Ok runs per method, sorted by measured retention, each compressed method anchored at the uncompressed run.

    The uncompressed run gets a series of its own only when no other method has an ok run.
    """
    runs = ok_runs(results)
    base = _uncompressed(runs)
    out: dict[str, list[dict]] = {}
    for r in runs:
        if r.get("method") == "uncompressed" or _retention(r) is None:
            continue
        out.setdefault(str(r.get("method") or "?"), []).append(r)
    for method, rs in out.items():
        if base is not None and _retention(base) is not None:
            rs.append(base)
        out[method] = sorted(rs, key=lambda r: _retention(r))
    if not out and base is not None:
        out["uncompressed"] = [base]
    return out


def _recommended(results: dict) -> dict | None:
    rec = (results.get("recommendation") or {}).get("run")
    if not rec:
        return None
    return next((r for r in ok_runs(results) if r.get("id") == rec), None)


def _thresholds(results: dict) -> dict:
    t = results.get("thresholds")
    return t if isinstance(t, dict) else {}


def _new_figure(figsize=FIGSIZE) -> Figure:
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _retention_axis(ax, results: dict) -> None:
    ax.set_xlabel("measured vision retention (fraction kept)")
    ax.set_xlim(right=1.05)
    ax.grid(True, alpha=0.3)
    cap = as_number(_thresholds(results).get("max_vision_retention"))
    if cap is not None:
        ax.axvline(cap, ls="--", lw=1, color="#888888")


def _mark_recommended(ax, x: float | None, y: float | None) -> None:
    if x is not None and y is not None:
        ax.plot([x], [y], marker="*", ms=15, color="gold", mec="black", mew=0.8, ls="none", zorder=5)


def _mark_uncompressed(ax, series: dict, x: float | None, y: float | None, legend: bool = True) -> None:
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


def _recommended_handle(rec: dict | None) -> list[Line2D]:
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
            label=f"recommended ({_text(rec.get('id'))})",
        )
    ]


# ----------------------------------------------------------------------------------------------- figures

_QUALITY_METRICS = (
    ("answer_match", "answer match", "min_answer_match"),
    ("top1_agreement", "top-1 agreement", "min_top1_agreement"),
    ("accuracy", "accuracy", "min_accuracy"),
)


def quality_vs_retention(results: dict) -> bytes | None:
    """Quality vs. measured vision retention, one panel per metric, one line per method.

    Panels: answer match and top-1 agreement with the uncompressed run (fractions of inputs), plus accuracy
    against the expected answers when any run has it. Each method's line is sorted by retention and
    includes the uncompressed run (retention 1.0) as its anchor. Error bars are the 95 % bootstrap
    intervals ``quality.ci`` when present; the recommended run is a gold star; quality thresholds that
    are set are dashed horizontal lines, ``max_vision_retention`` a dashed vertical one.

    Returns PNG bytes, or None when no ok run has quality figures. Raises nothing for a well-formed
    results dictionary.
    """
    series = _series(results)
    if not any(isinstance(r.get("quality"), dict) for rs in series.values() for r in rs):
        return None
    metrics = list(_QUALITY_METRICS[:2])
    if any(as_number((r.get("quality") or {}).get("accuracy")) is not None for rs in series.values() for r in rs):
        metrics.append(_QUALITY_METRICS[2])
    fig = _new_figure((FIGSIZE[0] + 1.6 * (len(metrics) - 2), FIGSIZE[1]))
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    rec = _recommended(results)
    thresholds = _thresholds(results)
    for ax, (key, label, tkey) in zip(axes, metrics):
        for method, rs in series.items():
            xs, ys, lo, hi = [], [], [], []
            for r in rs:
                q = r.get("quality") or {}
                y = as_number(q.get(key))
                if y is None:
                    continue
                ci = (q.get("ci") or {}).get(key)
                c = [as_number(v) for v in ci] if isinstance(ci, (list, tuple)) and len(ci) == 2 else [None, None]
                xs.append(_retention(r))
                ys.append(y)
                lo.append(max(0.0, y - c[0]) if c[0] is not None else 0.0)
                hi.append(max(0.0, c[1] - y) if c[1] is not None else 0.0)
            if not xs:
                continue
            ax.errorbar(
                xs,
                ys,
                yerr=[lo, hi] if any(lo) or any(hi) else None,
                marker="o",
                ms=4,
                capsize=3,
                lw=1.5,
                color=method_colour(method),
                label=_text(method),
            )
        t = as_number(thresholds.get(tkey))
        if t is not None:
            ax.axhline(t, ls="--", lw=1, color="#c0392b", label="threshold (min)")
            ax.annotate(
                f"≥ {t:g}",
                xy=(0.02, t),
                xycoords=("axes fraction", "data"),
                xytext=(0, 2),
                textcoords="offset points",
                fontsize=7,
                color="#c0392b",
                va="bottom",
            )
        base = _uncompressed(ok_runs(results))
        if base is not None:
            _mark_uncompressed(ax, series, _retention(base), as_number((base.get("quality") or {}).get(key)))
        if rec is not None:
            _mark_recommended(ax, _retention(rec), as_number((rec.get("quality") or {}).get(key)))
        ax.set_title(label, fontsize=10)
        _retention_axis(ax, results)
        ax.set_xlabel("vision retention (fraction)", fontsize=9)
    axes[0].set_ylabel("score (fraction of inputs, 0–1)")
    axes[0].set_ylim(-0.03, 1.05)
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    handles += _recommended_handle(rec)
    labels += [h.get_label() for h in _recommended_handle(rec)]
    fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncol=min(len(labels), 4), frameon=False)
    fig.suptitle("Quality vs. measured vision retention (fraction of vision tokens kept)", fontsize=11)
    return _png(fig)


def quality_vs_cost(results: dict) -> bytes | None:
    """Quality against what it costs, every method on the same axes: KV bytes and prefill time.

    Left panel: the quality metric (accuracy against the expected answers when any run has it, else
    answer match with the uncompressed run) vs. KV-cache bytes per request after prefill (MiB);
    right panel: the same metric vs. median prefill time (ms). Retention is not the x axis here
    because eviction methods also drop text entries: KV bytes and time are what every method pays.
    Each method's points are joined in order of KV bytes; the uncompressed run is a diamond and the
    recommended run a gold star.

    Returns PNG bytes, or None when no ok compressed run has the metric and KV bytes.
    """
    runs = ok_runs(results)
    use_acc = any(as_number((r.get("quality") or {}).get("accuracy")) is not None for r in runs)
    key, label = ("accuracy", "accuracy") if use_acc else ("answer_match", "answer match")
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        if as_number((r.get("quality") or {}).get(key)) is None or as_number(r.get("kv_bytes")) is None:
            continue
        by_method.setdefault(str(r.get("method") or "?"), []).append(r)
    if not any(m != "uncompressed" for m in by_method):
        return None
    fig = _new_figure((FIGSIZE[0] + 1.6, FIGSIZE[1]))
    axes = fig.subplots(1, 2, sharey=True, squeeze=False)[0]
    rec = _recommended(results)
    xs_of = (
        ("KV cache per request after prefill (MiB)", lambda r: as_number(r.get("kv_bytes")) / _MIB),
        (f"prefill time, median ({device_label(results)} ms)", lambda r: spread_median(r.get("prefill_ms"))),
    )
    for ax, (xlabel, xf) in zip(axes, xs_of):
        for method, rs in by_method.items():
            # joined in order of KV bytes (the method's compression order) in both panels
            ordered = sorted(rs, key=lambda r: as_number(r.get("kv_bytes")))
            pts = [(x, as_number(r["quality"][key])) for r in ordered if (x := xf(r)) is not None]
            if not pts:
                continue
            if method == "uncompressed":
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker="D",
                    ms=6,
                    ls="none",
                    color=method_colour(method),
                    label=method,
                    zorder=4,
                )
            else:
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker="o",
                    ms=4,
                    lw=1.3,
                    color=method_colour(method),
                    label=_text(method),
                )
        if rec is not None:
            _mark_recommended(ax, xf(rec), as_number((rec.get("quality") or {}).get(key)))
        ax.set_xlabel(xlabel, fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"{label} (fraction of inputs, 0–1)")
    axes[0].set_ylim(-0.03, 1.05)
    handles, labels = axes[0].get_legend_handles_labels()
    handles += _recommended_handle(rec)
    labels += [h.get_label() for h in _recommended_handle(rec)]
    fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncol=min(len(labels), 5), frameon=False)
    fig.suptitle(f"{label.capitalize()} vs. KV bytes and prefill time, every method", fontsize=11)
    return _png(fig)


def kv_bytes_vs_retention(results: dict) -> bytes | None:
    """KV-cache bytes per request after prefill (MiB) vs. measured vision retention, per method.

    Solid lines are all cached tokens (``kv_bytes``), dashed lines vision tokens only (``kv_bytes_vision``),
    both means over inputs; each method's line includes the uncompressed run as its anchor. A set
    ``max_kv_bytes`` threshold is a dashed horizontal line; the recommended run is a gold star.

    Returns PNG bytes, or None when no ok run has KV bytes.
    """
    series = _series(results)
    if not any(as_number(r.get("kv_bytes")) is not None for rs in series.values() for r in rs):
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    for method, rs in series.items():
        colour = method_colour(method)
        for key, style, what in (("kv_bytes", "-", "total"), ("kv_bytes_vision", "--", "vision")):
            pts = [(_retention(r), as_number(r.get(key))) for r in rs]
            pts = [(x, y / _MIB) for x, y in pts if y is not None]
            if pts:
                ax.plot(
                    *zip(*pts),
                    ls=style,
                    marker="o" if what == "total" else "s",
                    ms=4,
                    color=colour,
                    label=f"{_text(method)} {what}",
                )
    base = _uncompressed(ok_runs(results))
    if base is not None:
        for key, legend in (("kv_bytes", True), ("kv_bytes_vision", False)):
            y = as_number(base.get(key))
            _mark_uncompressed(ax, series, _retention(base), None if y is None else y / _MIB, legend)
    cap = as_number(_thresholds(results).get("max_kv_bytes"))
    if cap is not None:
        ax.axhline(cap / _MIB, ls="--", lw=1, color="#c0392b", label=f"max KV {cap / _MIB:.1f} MiB")
    rec = _recommended(results)
    if rec is not None and as_number(rec.get("kv_bytes")) is not None:
        _mark_recommended(ax, _retention(rec), as_number(rec.get("kv_bytes")) / _MIB)
    _retention_axis(ax, results)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("KV cache per request (MiB)")
    ax.set_title("KV-cache bytes per request vs. vision retention", fontsize=11)
    ax.legend(handles=ax.get_legend_handles_labels()[0] + _recommended_handle(rec), fontsize=7, loc="upper left")
    return _png(fig)


def prefill_vs_retention(results: dict) -> bytes | None:
    """Prefill time (median over repeats × inputs, ms) vs. measured vision retention, per method.

    Error bars span the 25th–75th percentiles when the run stored a Spread; the axis says whether these are
    CPU or GPU times (``environment.cuda``). A set ``max_prefill_ms`` threshold is a dashed horizontal line;
    the recommended run is a gold star.

    Returns PNG bytes, or None when no ok run has a prefill time.
    """
    series = _series(results)
    if not any(spread_median(r.get("prefill_ms")) is not None for rs in series.values() for r in rs):
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    for method, rs in series.items():
        xs, ys, lo, hi = [], [], [], []
        for r in rs:
            med = spread_median(r.get("prefill_ms"))
            if med is None:
                continue
            iqr = spread_iqr(r.get("prefill_ms"))
            xs.append(_retention(r))
            ys.append(med)
            lo.append(max(0.0, med - iqr[0]) if iqr else 0.0)
            hi.append(max(0.0, iqr[1] - med) if iqr else 0.0)
        if xs:
            ax.errorbar(
                xs,
                ys,
                yerr=[lo, hi] if any(lo) or any(hi) else None,
                marker="o",
                ms=4,
                capsize=3,
                lw=1.5,
                color=method_colour(method),
                label=_text(method),
            )
    base = _uncompressed(ok_runs(results))
    if base is not None:
        _mark_uncompressed(ax, series, _retention(base), spread_median(base.get("prefill_ms")))
    cap = as_number(_thresholds(results).get("max_prefill_ms"))
    if cap is not None:
        ax.axhline(cap, ls="--", lw=1, color="#c0392b", label=f"max prefill {cap:g} ms")
    rec = _recommended(results)
    if rec is not None:
        _mark_recommended(ax, _retention(rec), spread_median(rec.get("prefill_ms")))
    _retention_axis(ax, results)
    ax.set_ylim(bottom=0)
    ax.set_ylabel(f"prefill ms ({device_label(results)})")
    ax.set_title("Prefill time (median, p25–p75) vs. vision retention", fontsize=11)
    ax.legend(handles=ax.get_legend_handles_labels()[0] + _recommended_handle(rec), fontsize=7, loc="upper left")
    return _png(fig)


def _timeline(run: dict | None) -> tuple[list[float], list[float]] | None:
    """(seconds, GiB) of a run's NVML timeline, or None when it has none."""
    nv = (run or {}).get("nvml") or {}
    if not nv.get("available"):
        return None
    tl = nv.get("timeline") or {}
    pts = [(as_number(t), as_number(u)) for t, u in zip(tl.get("t_ms") or [], tl.get("used_bytes") or [])]
    pts = [(t / 1000.0, u / _GIB) for t, u in pts if t is not None and u is not None]
    if not pts:
        return None
    return [t for t, _ in pts], [u for _, u in pts]


def nvml_timeline(results: dict) -> bytes | None:
    """Device memory used (GiB, NVML) over time (s) during the recommended run and the uncompressed run.

    Time is from the start of each run's sampling, so the two runs overlay. NVML reports memory used on the
    whole device (all processes), not only this run's allocations.

    Returns PNG bytes, or None when neither run has an available NVML timeline (CPU runs, no driver, older
    results files).
    """
    runs = ok_runs(results)
    base = _uncompressed(runs)
    rec = _recommended(results)
    lines = []
    if rec is not None and rec is not base:
        lines.append((rec, f"recommended: {_text(rec.get('id'))}", "-"))
    if base is not None:
        lines.append((base, "uncompressed", "--" if lines else "-"))
    data = [(run, label, style, _timeline(run)) for run, label, style in lines]
    data = [d for d in data if d[3] is not None]
    if not data:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    for run, label, style, (t, used) in data:
        ax.plot(t, used, ls=style, lw=1.3, color=method_colour(str(run.get("method"))), label=label)
    ax.set_xlabel("time since the run started (s)")
    ax.set_ylabel("device memory used (GiB)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title("NVML device memory during the run", fontsize=11)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


_LINESTYLES = ("-", "--", "-.", ":")


def layer_tokens(results: dict) -> bytes | None:
    """Cached tokens per decoder layer after prefill (mean over inputs), one step line per ok run.

    Shows where in the depth of the decoder each schedule merges vision tokens: the uncompressed run is
    flat, a LightKV run steps down at each merge layer. Colour is the method, line style tells runs of one
    method apart; the legend names runs by id.

    Returns PNG bytes, or None when no ok run has ``cached_tokens_per_layer``.
    """
    runs = [r for r in ok_runs(results) if r.get("cached_tokens_per_layer")]
    if not runs:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    seen: dict[str, int] = {}
    n_layers = 0
    for r in runs:
        ys = [as_number(v) for v in r["cached_tokens_per_layer"]]
        ys = [math.nan if v is None else v for v in ys]
        method = str(r.get("method") or "?")
        k = seen.get(method, 0)
        seen[method] = k + 1
        ax.step(
            range(len(ys)),
            ys,
            where="mid",
            lw=1.5,
            ls=_LINESTYLES[k % len(_LINESTYLES)],
            color=method_colour(method),
            label=_text(r.get("id")),
        )
        n_layers = max(n_layers, len(ys))
    ax.set_xlabel("decoder layer index")
    ax.set_ylabel("cached tokens (mean over inputs)")
    ax.set_ylim(bottom=0)
    ax.set_xlim(-0.5, n_layers - 0.5)
    if n_layers <= 40:
        ax.set_xticks(range(0, n_layers, max(1, n_layers // 16)))
    ax.grid(True, alpha=0.3)
    ax.set_title("Cached tokens per decoder layer", fontsize=11)
    ax.legend(fontsize=7, loc="lower left", ncol=2 if len(runs) > 5 else 1)
    return _png(fig)


ALL_PLOTS = (
    ("quality", quality_vs_retention),
    ("quality_cost", quality_vs_cost),
    ("kv_bytes", kv_bytes_vs_retention),
    ("prefill", prefill_vs_retention),
    ("nvml", nvml_timeline),
    ("layer_tokens", layer_tokens),
)
"""(name, function) of every figure, in report order."""
