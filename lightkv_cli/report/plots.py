"""Figures of a results dictionary (schema ``lightkv.results/1``), as PNG bytes.

Built with :class:`matplotlib.figure.Figure` on an Agg canvas, without ``pyplot`` and without
``matplotlib.use``: no global backend state is touched, so these functions work headless and may run
in several threads at once. Reads results only; never measures, never loads a model.

Every function takes the results dictionary and returns PNG bytes, or ``None`` when there is nothing to
plot. Only runs with ``status == "ok"`` are drawn; missing optional keys (older results files) are
skipped, not errors. Methods get the same colour in every figure (see :func:`method_colour`).
"""

from __future__ import annotations

import math

from lightkv_cli.report.facts import as_number, device_label, spread_iqr, spread_median
from lightkv_cli.report.lead_figure import LEAD_FIGSIZE, lead_metric, pareto_frontier, quality_vs_cost
from lightkv_cli.report.plot_base import (
    DPI,
    FIGSIZE,
    GIB,
    MIB,
    fit_limits,
    mark_recommended,
    mark_uncompressed,
    method_colour,
    new_figure,
    ok_runs,
    plot_text,
    png_bytes,
    recommended_handle,
    recommended_run,
    retention_of,
    thresholds_of,
    uncompressed_of,
)

__all__ = [
    "ALL_PLOTS",
    "DPI",
    "FIGSIZE",
    "LEAD_FIGSIZE",
    "kv_bytes_vs_retention",
    "layer_tokens",
    "lead_metric",
    "method_colour",
    "nvml_timeline",
    "ok_runs",
    "pareto_frontier",
    "prefill_vs_retention",
    "quality_vs_cost",
    "quality_vs_retention",
]


# ----------------------------------------------------------------------------------------------- helpers


def _series(results: dict) -> dict[str, list[dict]]:
    """Ok runs per method, sorted by measured retention, each compressed method anchored at the uncompressed run.

    The uncompressed run gets a series of its own only when no other method has an ok run.
    """
    runs = ok_runs(results)
    base = uncompressed_of(runs)
    out: dict[str, list[dict]] = {}
    for r in runs:
        if r.get("method") == "uncompressed" or retention_of(r) is None:
            continue
        out.setdefault(str(r.get("method") or "?"), []).append(r)
    for method, rs in out.items():
        if base is not None and retention_of(base) is not None:
            rs.append(base)
        out[method] = sorted(rs, key=lambda r: retention_of(r))
    if not out and base is not None:
        out["uncompressed"] = [base]
    return out


def _retention_axis(ax, results: dict) -> None:
    ax.set_xlabel("measured vision retention (fraction kept)")
    ax.set_xlim(right=1.05)
    ax.grid(True, alpha=0.3)
    cap = as_number(thresholds_of(results).get("max_vision_retention"))
    if cap is not None:
        ax.axvline(cap, ls="--", lw=1, color="#888888")


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
    includes the uncompressed run (retention 1.0) as its anchor. Error bars are the 95 % intervals
    ``quality.ci`` when present (Wilson score for 0/1 metrics, bootstrap otherwise); the recommended run is
    a gold star; quality thresholds that are set are dashed horizontal lines, ``max_vision_retention`` a
    dashed vertical one.

    Returns PNG bytes, or None when no ok run has quality figures. Raises nothing for a well-formed
    results dictionary.
    """
    series = _series(results)
    if not any(isinstance(r.get("quality"), dict) for rs in series.values() for r in rs):
        return None
    metrics = list(_QUALITY_METRICS[:2])
    if any(as_number((r.get("quality") or {}).get("accuracy")) is not None for rs in series.values() for r in rs):
        metrics.append(_QUALITY_METRICS[2])
    fig = new_figure((FIGSIZE[0] + 1.6 * (len(metrics) - 2), FIGSIZE[1]))
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    rec = recommended_run(results)
    thresholds = thresholds_of(results)
    y_values: list[float] = []
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
                xs.append(retention_of(r))
                ys.append(y)
                lo.append(max(0.0, y - c[0]) if c[0] is not None else 0.0)
                hi.append(max(0.0, c[1] - y) if c[1] is not None else 0.0)
                y_values += [y - lo[-1], y + hi[-1]]
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
                label=plot_text(method),
            )
        t = as_number(thresholds.get(tkey))
        if t is not None:
            y_values.append(t)
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
        base = uncompressed_of(ok_runs(results))
        if base is not None:
            mark_uncompressed(ax, series, retention_of(base), as_number((base.get("quality") or {}).get(key)))
        if rec is not None:
            mark_recommended(ax, retention_of(rec), as_number((rec.get("quality") or {}).get(key)))
        ax.set_title(label, fontsize=10)
        _retention_axis(ax, results)
        ax.set_xlabel("vision retention (fraction)", fontsize=9)
    axes[0].set_ylabel("score (fraction of inputs)")
    ylim = fit_limits(y_values, pad=0.1, min_span=0.04, bounds=(0.0, 1.0))
    if ylim is not None:
        axes[0].set_ylim(*ylim)
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    handles += recommended_handle(rec)
    labels += [h.get_label() for h in recommended_handle(rec)]
    fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncol=min(len(labels), 4), frameon=False)
    fig.suptitle("Quality vs. measured vision retention (fraction of vision tokens kept)", fontsize=11)
    return png_bytes(fig)


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
    fig = new_figure()
    ax = fig.add_subplot()
    for method, rs in series.items():
        colour = method_colour(method)
        for key, style, what in (("kv_bytes", "-", "total"), ("kv_bytes_vision", "--", "vision")):
            pts = [(retention_of(r), as_number(r.get(key))) for r in rs]
            pts = [(x, y / MIB) for x, y in pts if y is not None]
            if pts:
                ax.plot(
                    *zip(*pts),
                    ls=style,
                    marker="o" if what == "total" else "s",
                    ms=4,
                    color=colour,
                    label=f"{plot_text(method)} {what}",
                )
    base = uncompressed_of(ok_runs(results))
    if base is not None:
        for key, legend in (("kv_bytes", True), ("kv_bytes_vision", False)):
            y = as_number(base.get(key))
            mark_uncompressed(ax, series, retention_of(base), None if y is None else y / MIB, legend)
    cap = as_number(thresholds_of(results).get("max_kv_bytes"))
    if cap is not None:
        ax.axhline(cap / MIB, ls="--", lw=1, color="#c0392b", label=f"max KV {cap / MIB:.1f} MiB")
    rec = recommended_run(results)
    if rec is not None and as_number(rec.get("kv_bytes")) is not None:
        mark_recommended(ax, retention_of(rec), as_number(rec.get("kv_bytes")) / MIB)
    _retention_axis(ax, results)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("KV cache per request (MiB)")
    ax.set_title("KV-cache bytes per request vs. vision retention", fontsize=11)
    ax.legend(handles=ax.get_legend_handles_labels()[0] + recommended_handle(rec), fontsize=7, loc="upper left")
    return png_bytes(fig)


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
    fig = new_figure()
    ax = fig.add_subplot()
    for method, rs in series.items():
        xs, ys, lo, hi = [], [], [], []
        for r in rs:
            med = spread_median(r.get("prefill_ms"))
            if med is None:
                continue
            iqr = spread_iqr(r.get("prefill_ms"))
            xs.append(retention_of(r))
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
                label=plot_text(method),
            )
    base = uncompressed_of(ok_runs(results))
    if base is not None:
        mark_uncompressed(ax, series, retention_of(base), spread_median(base.get("prefill_ms")))
    cap = as_number(thresholds_of(results).get("max_prefill_ms"))
    if cap is not None:
        ax.axhline(cap, ls="--", lw=1, color="#c0392b", label=f"max prefill {cap:g} ms")
    rec = recommended_run(results)
    if rec is not None:
        mark_recommended(ax, retention_of(rec), spread_median(rec.get("prefill_ms")))
    _retention_axis(ax, results)
    ax.set_ylim(bottom=0)
    ax.set_ylabel(f"prefill ms ({device_label(results)})")
    ax.set_title("Prefill time (median, p25–p75) vs. vision retention", fontsize=11)
    ax.legend(handles=ax.get_legend_handles_labels()[0] + recommended_handle(rec), fontsize=7, loc="upper left")
    return png_bytes(fig)


def _timeline(run: dict | None) -> tuple[list[float], list[float]] | None:
    """(seconds, GiB) of a run's NVML timeline, or None when it has none."""
    nv = (run or {}).get("nvml") or {}
    if not nv.get("available"):
        return None
    tl = nv.get("timeline") or {}
    pts = [(as_number(t), as_number(u)) for t, u in zip(tl.get("t_ms") or [], tl.get("used_bytes") or [])]
    pts = [(t / 1000.0, u / GIB) for t, u in pts if t is not None and u is not None]
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
    base = uncompressed_of(runs)
    rec = recommended_run(results)
    lines = []
    if rec is not None and rec is not base:
        lines.append((rec, f"recommended: {plot_text(rec.get('id'))}", "-"))
    if base is not None:
        lines.append((base, "uncompressed", "--" if lines else "-"))
    data = [(run, label, style, _timeline(run)) for run, label, style in lines]
    data = [d for d in data if d[3] is not None]
    if not data:
        return None
    fig = new_figure()
    ax = fig.add_subplot()
    for run, label, style, (t, used) in data:
        ax.plot(t, used, ls=style, lw=1.3, color=method_colour(str(run.get("method"))), label=label)
    ax.set_xlabel("time since the run started (s)")
    ax.set_ylabel("device memory used (GiB)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title("NVML device memory during the run", fontsize=11)
    ax.legend(fontsize=7, loc="lower right")
    return png_bytes(fig)


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
    fig = new_figure()
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
            label=plot_text(r.get("id")),
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
    return png_bytes(fig)


ALL_PLOTS = (
    ("quality_cost", quality_vs_cost),
    ("quality", quality_vs_retention),
    ("kv_bytes", kv_bytes_vs_retention),
    ("prefill", prefill_vs_retention),
    ("nvml", nvml_timeline),
    ("layer_tokens", layer_tokens),
)
"""(name, function) of every figure, in report order; the first is the lead figure."""
