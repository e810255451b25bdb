"""The lead figure of the report: quality against KV bytes per request and against prefill time, every method,
with the Pareto frontier, thresholds, 95 % intervals and the recommended run. Reads results only; no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from lightkv_cli.report.facts import as_number, device_label, spread_iqr, spread_median
from lightkv_cli.report.plot_base import (
    MIB,
    fit_limits,
    mark_recommended,
    method_colour,
    new_figure,
    ok_runs,
    plot_text,
    png_bytes,
    quality_ci,
    recommended_handle,
    recommended_run,
    thresholds_of,
)

__all__ = ["LEAD_FIGSIZE", "lead_metric", "pareto_frontier", "quality_vs_cost"]


def pareto_frontier(points: Iterable[tuple[float, float, object]]) -> list[tuple[float, float, object]]:
    """The points no other point beats on both axes: lower cost ``x`` and higher quality ``y``.

    ``points`` are ``(cost, quality, tag)``; a point is dropped when another has cost ≤ and quality ≥ with at
    least one strict (of identical points the first is kept). Returns the frontier sorted by cost, quality
    strictly increasing along it.
    """
    out: list[tuple[float, float, object]] = []
    best = -math.inf
    for x, y, tag in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            out.append((x, y, tag))
            best = y
    return out


def lead_metric(results: dict) -> tuple[str, str, str]:
    """(quality key, label, threshold key) of the lead figure: the metric the recommendation was gated on.

    Accuracy when ``min_accuracy`` is set, else answer match when ``min_answer_match`` is set, else accuracy
    when any ok run has it, else answer match.
    """
    t = thresholds_of(results)
    acc = ("accuracy", "accuracy", "min_accuracy")
    am = ("answer_match", "answer match", "min_answer_match")
    if as_number(t.get("min_accuracy")) is not None:
        return acc
    if as_number(t.get("min_answer_match")) is not None:
        return am
    has_acc = any(as_number((r.get("quality") or {}).get("accuracy")) is not None for r in ok_runs(results))
    return acc if has_acc else am


LEAD_FIGSIZE = (11.6, 4.9)
"""Size of the lead figure (quality against KV bytes and prefill time), inches; drawn full width."""


def quality_vs_cost(results: dict) -> bytes | None:
    """The lead figure: quality against what it costs, every method on the same axes, with the Pareto frontier.

    Left panel: the quality metric of :func:`lead_metric` (accuracy against the expected answers, or
    answer match with the uncompressed run) vs. KV-cache bytes per request after prefill (MiB); right panel: the
    same metric vs. median prefill time (ms, p25–p75 as horizontal bars). Retention is not the x axis here
    because eviction methods also drop text entries: KV bytes and time are what every method pays. Each
    method's points are joined in order of KV bytes; vertical bars are the 95 % intervals ``quality.ci``;
    the uncompressed run is a diamond and the recommended run a gold star. The Pareto frontier (runs no
    other run beats on both quality and that panel's cost, see :func:`pareto_frontier`) is a staircase
    through ringed, labelled points. Set thresholds (the metric's minimum, ``max_kv_bytes``,
    ``max_prefill_ms``) are dashed lines with the failing side tinted. Axes are fitted to the plotted values,
    interval ends and thresholds (not 0–1).

    Returns PNG bytes (:data:`LEAD_FIGSIZE` at :data:`lightkv_cli.report.plot_base.DPI`), or None when no
    ok compressed run has the metric and KV bytes.
    """
    runs = ok_runs(results)
    key, label, tkey = lead_metric(results)
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        if as_number((r.get("quality") or {}).get(key)) is None or as_number(r.get("kv_bytes")) is None:
            continue
        by_method.setdefault(str(r.get("method") or "?"), []).append(r)
    if not any(m != "uncompressed" for m in by_method):
        return None
    thresholds = thresholds_of(results)
    t_min = as_number(thresholds.get(tkey))
    rec = recommended_run(results)
    fig = new_figure(LEAD_FIGSIZE)
    axes = fig.subplots(1, 2, sharey=True, squeeze=False)[0]
    on = device_label(results)
    panels = (
        (
            "KV cache per request after prefill (MiB)",
            lambda r: as_number(r.get("kv_bytes")) / MIB,
            None,
            "max_kv_bytes",
            MIB,
            "MiB",
        ),
        (
            f"prefill time, median ({on} ms)",
            lambda r: spread_median(r.get("prefill_ms")),
            lambda r: spread_iqr(r.get("prefill_ms")),
            "max_prefill_ms",
            1.0,
            "ms",
        ),
    )
    y_values: list[float] = [] if t_min is None else [t_min]
    for ax, (xlabel, xf, xspread, xkey, xunit, xname) in zip(axes, panels):
        x_values: list[float] = []
        frontier_in: list[tuple[float, float, object]] = []
        for method, rs in by_method.items():
            ordered = sorted(rs, key=lambda r: as_number(r.get("kv_bytes")))
            xs, ys, ylo, yhi, xlo, xhi = [], [], [], [], [], []
            for r in ordered:
                x = xf(r)
                if x is None:
                    continue
                q = r["quality"]
                y = as_number(q[key])
                ci = quality_ci(q, key)
                iqr = xspread(r) if xspread else None
                xs.append(x)
                ys.append(y)
                ylo.append(max(0.0, y - ci[0]) if ci else 0.0)
                yhi.append(max(0.0, ci[1] - y) if ci else 0.0)
                xlo.append(max(0.0, x - iqr[0]) if iqr else 0.0)
                xhi.append(max(0.0, iqr[1] - x) if iqr else 0.0)
                x_values += [x - xlo[-1], x + xhi[-1]]
                y_values += [y - ylo[-1], y + yhi[-1]]
                frontier_in.append((x, y, r))
            if not xs:
                continue
            unc = method == "uncompressed"
            ax.errorbar(
                xs,
                ys,
                yerr=[ylo, yhi] if any(ylo) or any(yhi) else None,
                xerr=[xlo, xhi] if any(xlo) or any(xhi) else None,
                marker="D" if unc else "o",
                ms=7 if unc else 5.5,
                ls="none" if unc else "-",
                lw=1.6,
                elinewidth=0.9,
                capsize=2.5,
                alpha=0.95,
                color=method_colour(method),
                label=plot_text(method),
                zorder=4,
            )
        t_x = as_number(thresholds.get(xkey))
        if t_x is not None:
            x_values.append(t_x / xunit)
        frontier = pareto_frontier(frontier_in)
        xlim = fit_limits(x_values, pad=0.07)
        ylim = fit_limits(y_values, pad=0.1, min_span=0.04, bounds=(0.0, 1.0))
        if frontier and xlim is not None:
            fx = [p[0] for p in frontier] + [xlim[1]]
            fy = [p[1] for p in frontier] + [frontier[-1][1]]
            ax.step(fx, fy, where="post", color="#222222", lw=1.3, alpha=0.55, zorder=2, label="Pareto frontier")
            ax.plot(fx[:-1], fy[:-1], marker="o", ms=12, mfc="none", mec="#222222", mew=1.0, ls="none", zorder=3)
            for x, y, r in frontier:
                if r is not rec:
                    right = x > (xlim[0] + xlim[1]) / 2
                    ax.annotate(
                        plot_text(r.get("id")),
                        (x, y),
                        xytext=(-8 if right else 8, -12),
                        textcoords="offset points",
                        ha="right" if right else "left",
                        fontsize=7.5,
                        color="#333333",
                    )
        if t_min is not None:
            ax.axhline(t_min, ls="--", lw=1.1, color="#c0392b", zorder=1, label="threshold")
            ax.axhspan(-1.0, t_min, color="#c0392b", alpha=0.06, lw=0, zorder=0)
            ax.annotate(
                f"{label} ≥ {t_min:g}",
                xy=(0.01, t_min),
                xycoords=("axes fraction", "data"),
                xytext=(0, 3),
                textcoords="offset points",
                fontsize=8,
                color="#c0392b",
                va="bottom",
            )
        if t_x is not None:
            ax.axvline(t_x / xunit, ls="--", lw=1.1, color="#c0392b", zorder=1)
            ax.axvspan(
                t_x / xunit,
                max(xlim[1], t_x / xunit) if xlim else t_x / xunit,
                color="#c0392b",
                alpha=0.06,
                lw=0,
                zorder=0,
            )
            ax.annotate(
                f"≤ {t_x / xunit:.3g} {xname}",
                xy=(t_x / xunit, 0.01),
                xycoords=("data", "axes fraction"),
                xytext=(3, 0),
                textcoords="offset points",
                fontsize=8,
                color="#c0392b",
                rotation=90,
                va="bottom",
            )
        if rec is not None and xf(rec) is not None and as_number((rec.get("quality") or {}).get(key)) is not None:
            rx, ry = xf(rec), as_number(rec["quality"][key])
            mark_recommended(ax, rx, ry, ms=20)
            ax.annotate(
                f"recommended: {plot_text(rec.get('id'))}",
                (rx, ry),
                xytext=(10, 10),
                textcoords="offset points",
                fontsize=8.5,
                fontweight="bold",
                bbox={"boxstyle": "round,pad=0.25", "fc": "#fff8d6", "ec": "#b8a000", "lw": 0.6},
                zorder=7,
            )
        if xlim is not None:
            ax.set_xlim(*xlim)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_xlabel(xlabel, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].set_title(f"{label} vs. KV cache per request", fontsize=11)
    axes[1].set_title(f"{label} vs. prefill time", fontsize=11)
    axes[0].set_ylabel(f"{label} (fraction of inputs)", fontsize=10)
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    handles += recommended_handle(rec)
    labels += [h.get_label() for h in recommended_handle(rec)]
    fig.legend(handles, labels, fontsize=8.5, loc="outside lower center", ncol=min(len(labels), 7), frameon=False)
    return png_bytes(fig)
