"""What every report view shows, as text: formatted numbers and bytes, the runs' table cells,
thresholds, the recommendation and its failures, notes on eviction and weights. Shared by the
console, Markdown and HTML views. Reads results only; no torch.
"""

from __future__ import annotations

import math
import re

from lightkv_cli.scoring.thresholds import THRESHOLDS

CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


DASH = "–"


def fmt_bytes(n: float | None) -> str:
    """Bytes as MiB / GiB text (binary units)."""
    if n is None:
        return "–"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


def as_number(x) -> float | None:
    """A finite float, or None (null, missing, non-numeric, NaN/inf)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def spread_median(v) -> float | None:
    """Median of a Spread ``{median, p25, p75, ...}``, or the value itself when an older file stored a float."""
    if isinstance(v, dict):
        return as_number(v.get("median"))
    return as_number(v)


def spread_iqr(v) -> tuple[float, float] | None:
    """``(p25, p75)`` of a Spread; None for a plain float or when either quartile is missing."""
    if not isinstance(v, dict):
        return None
    lo, hi = as_number(v.get("p25")), as_number(v.get("p75"))
    return None if lo is None or hi is None else (lo, hi)


def fmt_num(x, spec: str) -> str:
    x = as_number(x)
    return DASH if x is None else format(x, spec)


#: Shown for a first-token metric of a method that leaves prefill unchanged (post-prefill eviction).
NOT_APPLICABLE = "n/a"


def first_token_cell(quality: dict, key: str, spec: str) -> str:
    """A first-token metric of ``run.quality``: "n/a" when the run's prefill is the uncompressed one
    (``prefill_unchanged``), else the number (a dash when missing)."""
    if quality.get("prefill_unchanged"):
        return NOT_APPLICABLE
    return fmt_num(quality.get(key), spec)


def fmt_size(x) -> str:
    x = as_number(x)
    return DASH if x is None else fmt_bytes(x)


def device_label(results: dict) -> str:
    return "GPU" if (results.get("environment") or {}).get("cuda") else "CPU"


def runs_of(results: dict) -> list[dict]:
    return [r for r in results.get("runs") or [] if isinstance(r, dict)]


def run_by_id(results: dict, run_id) -> dict | None:
    return next((r for r in runs_of(results) if r.get("id") == run_id), None) if run_id else None


def uncompressed_run(results: dict) -> dict | None:
    return next((r for r in runs_of(results) if r.get("method") == "uncompressed" and r.get("status") == "ok"), None)


def table_columns(results: dict) -> list[str]:
    on = device_label(results)
    return [
        "run",
        "method",
        "measured R",
        "KV total",
        "KV vision",
        f"prefill ms ({on})",
        f"TTFT ms ({on})",
        f"decode ms/token ({on})",
        "prefill × uncompressed (95% CI)",
        "tokens/s",
        "FLOPs ratio",
        "max concurrent",
        "answer match",
        "top-1",
        "KL max",
        "token agreement",
        "continuation KL",
        "accuracy",
    ]


def run_cells(run: dict) -> list[str]:
    """Plain-text cells of one run in the order of :func:`table_columns` (unescaped)."""
    head = [str(run.get("id", "?")), str(run.get("method", "?"))]
    n_rest = 16
    status = run.get("status", "?")
    if status != "ok":
        return head + [str(status)] + [DASH] * (n_rest - 1)
    q = run.get("quality") or {}
    cap = run.get("capacity") or {}
    mcr = cap.get("max_concurrent_requests")
    return head + [
        fmt_num(run.get("vision_retention"), ".3f"),
        fmt_size(run.get("kv_bytes")),
        fmt_size(run.get("kv_bytes_vision")),
        fmt_num(spread_median(run.get("prefill_ms")), ".1f"),
        fmt_num(spread_median(run.get("time_to_first_token_ms")), ".1f"),
        fmt_num(spread_median(run.get("decode_ms_per_token")), ".2f"),
        ratio_text(run, "prefill"),
        fmt_num(run.get("tokens_per_s"), ".1f"),
        fmt_num(run.get("flops_ratio"), ".0%"),
        DASH if as_number(mcr) is None else str(int(mcr)),
        fmt_num(q.get("answer_match"), ".2f"),
        first_token_cell(q, "top1_agreement", ".2f"),
        first_token_cell(q, "first_token_kl_max", ".2e"),
        fmt_num(q.get("token_agreement"), ".2f"),
        fmt_num(q.get("continuation_kl_mean"), ".2e"),
        fmt_num(q.get("accuracy"), ".2f"),
    ]


def run_settings(results: dict) -> list[tuple[str, str]]:
    """``(run id, how it was set)`` for every run whose method recorded how it chose its parameters for the
    target (``params.schedule_note``: the schedule solved, a published split, a count that cannot meet the
    target exactly and why, a family the method refuses), in file order."""
    out = []
    for r in runs_of(results):
        note = (r.get("params") or {}).get("schedule_note")
        if note:
            out.append((str(r.get("id", "?")), str(note)))
    return out


def paired_ratio_of(run: dict, metric: str) -> dict | None:
    """The run's paired timing ratio to uncompressed for ``metric`` (``prefill``, ``time_to_first_token``,
    ``decode_ms_per_token``): ``{"median", "low", "high", "n"}`` from ``timing_ratio`` (results version 2),
    else None (version 1 files have no paired ratios)."""
    got = (run.get("timing_ratio") or {}).get(metric) if isinstance(run.get("timing_ratio"), dict) else None
    return got if isinstance(got, dict) and as_number(got.get("median")) is not None else None


def ratio_text(run: dict, metric: str) -> str:
    """``"0.93× [0.90–0.97]"``: the paired ratio and its 95% bootstrap interval, or a dash."""
    got = paired_ratio_of(run, metric)
    if got is None:
        return DASH
    low, high = as_number(got.get("low")), as_number(got.get("high"))
    if low is None or high is None:
        return f"{got['median']:.2f}×"
    return f"{got['median']:.2f}× [{low:.2f}–{high:.2f}]"


def threshold_value(name: str, v) -> str:
    x = as_number(v)
    if x is None:
        return DASH if v is None else str(v)
    if "bytes" in str(name):
        return fmt_bytes(x)
    if str(name).endswith("_ms"):
        return f"{x:g} ms"
    if str(name) == "max_kl":
        return f"{x:.3g} nats"
    return f"{x:.3g}"


def decision_basis(results: dict) -> str | None:
    """Which value the quality thresholds were compared with (``thresholds.decide_on``; not recorded: the mean);
    None when no threshold with an interval (answer match, top-1 agreement, accuracy) was set."""
    t = results.get("thresholds") if isinstance(results.get("thresholds"), dict) else {}
    if not any(THRESHOLDS[n].per_input for n, v in t.items() if n in THRESHOLDS and v is not None):
        return None
    if t.get("decide_on") == "lower-bound":
        return (
            "quality thresholds compared with the lower 95% bound over inputs (Wilson score interval for 0/1 "
            "metrics), not the mean"
        )
    return "quality thresholds compared with the mean over inputs"


def threshold_lines(results: dict) -> list[str]:
    """One plain-text line per threshold that was set, then which value quality thresholds were compared with."""
    out = []
    for name, v in (results.get("thresholds") or {}).items():
        if v is None or name == "decide_on":
            continue
        info = THRESHOLDS.get(name)
        label, op = (info.report_label, "≥" if info.kind == "min" else "≤") if info else (name, "=")
        out.append(f"{label} {op} {threshold_value(name, v)}")
    basis = decision_basis(results)
    if basis:
        out.append(basis)
    fid = (results.get("settings") or {}).get("min_fidelity")
    if not out and as_number(fid) is not None:
        out.append(f"answer match and top-1 agreement ≥ {fid:.2f} (min fidelity, older results file)")
    return out


def recommendation_text(results: dict) -> tuple[str | None, str]:
    """(run id or None, plain-text sentence about the recommendation)."""
    rec = results.get("recommendation") or {}
    run_id = rec.get("run")
    reason = str(rec.get("reason") or "")
    if not run_id:
        return None, f"No run meets every threshold. {reason}".strip()
    run = run_by_id(results, run_id) or {}
    base = uncompressed_run(results)
    parts = [f"measured vision retention {fmt_num(run.get('vision_retention', rec.get('vision_retention')), '.3f')}"]
    kv = as_number(run.get("kv_bytes", rec.get("kv_bytes")))
    if kv is not None:
        s = f"KV cache {fmt_bytes(kv)} per request"
        b = as_number((base or {}).get("kv_bytes"))
        if b:
            s += f" ({1 - kv / b:.0%} less than uncompressed)"
        parts.append(s)
    mcr = as_number((run.get("capacity") or {}).get("max_concurrent_requests"))
    if mcr is not None:
        parts.append(f"{int(mcr)} concurrent requests fit")
    text = f"Recommended: {run_id} — " + ", ".join(parts) + "."
    if reason:
        text += f" Reason: {reason}"
    return str(run_id), text


def failure_rows(results: dict) -> list[list[str]]:
    rows = []
    for f in (results.get("recommendation") or {}).get("failures") or []:
        if not isinstance(f, dict):
            continue
        name = str(f.get("threshold", "?"))
        rows.append(
            [
                str(f.get("run", "?")),
                name,
                threshold_value(name, f.get("required")),
                threshold_value(name, f.get("measured")),
                threshold_value(name, f.get("short_by")),
            ]
        )
    return rows


def weights_note(results: dict) -> str | None:
    if (results.get("model") or {}).get("weights_meaningful", True) is False:
        return (
            "Random weights: answers, quality figures and the recommendation are not meaningful; "
            "token counts, bytes and timings are real."
        )
    return None


def eviction_note(results: dict) -> str | None:
    """A caveat when post-prefill eviction methods are compared on first-token metrics."""
    from lightkv_cli.methods.registry import KIND_EVICT, METHODS

    names = sorted(
        {
            r.get("method")
            for r in results.get("runs") or []
            if r.get("method") in METHODS and METHODS[r["method"]].kind == KIND_EVICT
        }
    )
    if not names:
        return None
    return (
        f"{', '.join(names)} evict after prefill: the first generated token comes from the unchanged prefill, "
        "so their first-token agreement and KL are n/a; judge them by token agreement and continuation KL "
        "(the uncompressed answer fed through their cache), answer match and accuracy."
    )


def summary_line(results: dict) -> str:
    model = results.get("model") or {}
    env = results.get("environment") or {}
    inputs = results.get("inputs") or []
    skipped = results.get("skipped") or []
    arch = " · ".join(str(x) for x in (model.get("family"), model.get("architecture")) if x)
    dev = str(env.get("device") or model.get("device") or "?")
    extra = ", ".join(str(x) for x in (env.get("device_name"), env.get("dtype") or model.get("dtype")) if x)
    s = f"Model {model.get('name', '?')}" + (f" ({arch})" if arch else "")
    s += f" · device {dev}" + (f" ({extra})" if extra else "")
    s += f" · {len(inputs)} inputs" + (f" ({len(skipped)} skipped)" if skipped else "")
    s += f" · timings are {device_label(results)} times"
    return s
