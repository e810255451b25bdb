"""Console views of a results dictionary (rich tables, the recommendation line) and the Markdown of
a benchmark. Reads results only; never measures, never loads a model; no torch.
"""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from lightkv_cli.report.facts import decision_basis, eviction_note, first_token_cell, fmt_bytes, ratio_text
from lightkv_cli.text import printable


def _num(x) -> float | None:
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _fmt(x: float | None, spec: str) -> str:
    x = _num(x)
    return "–" if x is None else format(x, spec)


def _spread(s: dict | None, digits: int) -> str:
    if not isinstance(s, dict) or _num(s.get("median")) is None:
        return "–"
    p25, p75 = _num(s.get("p25")), _num(s.get("p75"))
    if p25 is None or p75 is None:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ±{(p75 - p25) / 2:.{digits}f}"


def _with_ratio(spread: dict | None, digits: int, run: dict, metric: str) -> str:
    """The median ± half-IQR, and below it the paired ratio to uncompressed with its 95% interval."""
    text = _spread(spread, digits)
    ratio = ratio_text(run, metric)
    return text if ratio == "–" else f"{text}\n{ratio}"


def _ci(interval) -> str:
    if not isinstance(interval, list) or len(interval) != 2 or any(_num(v) is None for v in interval):
        return "–"
    return f"[{interval[0]:.2f}, {interval[1]:.2f}]"


def _title(results: dict, what: str) -> str:
    """The table title (rich markup; the model name, user text, escaped)."""
    on = "GPU" if (results.get("environment") or {}).get("cuda") else "CPU"
    name = printable((results.get("model") or {}).get("name") or "?")
    return f"lightkv · {escape(name)} · {len(results.get('inputs') or [])} inputs · {on} · {what}"


def _run_column(table: Table, runs: list[dict]) -> None:
    width = max([len(str(r.get("id"))) for r in runs] + [3])
    table.add_column("run", no_wrap=True, min_width=width)


def cost_table(results: dict) -> Table:
    """One row per run: target and measured vision retention, KV bytes, latency, FLOPs, peak memory.

    Times are medians ± half the interquartile range over the timing pass's rounds and inputs, labelled CPU
    or GPU; below each, the paired ratio to the uncompressed run (same input, same round) with its 95%
    bootstrap interval.
    """
    runs = results.get("runs") or []
    on = "GPU" if (results.get("environment") or {}).get("cuda") else "CPU"
    peak_kind = next((r.get("peak_memory_kind") for r in runs if r.get("peak_memory_kind")), "")
    table = Table(title=_title(results, "cost"))
    _run_column(table, runs)
    for col in (
        "target R",
        "measured R",
        "KV total",
        "KV vision",
        f"prefill ms {on}",
        f"TTFT ms {on}",
        f"decode ms/tok {on}",
        "tok/s",
        "prefill FLOPs",
        "peak GPU alloc" if peak_kind == "cuda_allocator" else "peak RSS",
        "max concurrent",
    ):
        table.add_column(col, justify="right")
    rec = (results.get("recommendation") or {}).get("run")
    for r in runs:
        name = Text(printable(r["id"]), style="bold green" if r["id"] == rec else "")
        if r.get("status") != "ok":
            table.add_row(
                name,
                _fmt(r.get("target_retention"), ".2f"),
                Text(printable(r.get("status", "?")), style="red"),
                *[""] * 9,
            )
            continue
        cap = r.get("capacity") or {}
        fits = cap.get("max_concurrent_requests")
        ratio = cap.get("ratio_vs_uncompressed")
        table.add_row(
            name,
            _fmt(r.get("target_retention"), ".2f"),
            _fmt(r.get("vision_retention"), ".3f"),
            fmt_bytes(r.get("kv_bytes")),
            fmt_bytes(r.get("kv_bytes_vision")),
            _with_ratio(r.get("prefill_ms"), 1, r, "prefill"),
            _with_ratio(
                r.get("time_to_first_token_ms") if isinstance(r.get("time_to_first_token_ms"), dict) else None,
                1,
                r,
                "time_to_first_token",
            ),
            _with_ratio(r.get("decode_ms_per_token"), 2, r, "decode_ms_per_token"),
            _fmt(r.get("tokens_per_s"), ".1f"),
            _fmt(r.get("flops_ratio"), ".0%"),
            fmt_bytes(r.get("peak_memory_bytes")),
            "–" if _num(fits) is None else (f"{fits} ({ratio:.2f}×)" if _num(ratio) is not None else f"{fits}"),
        )
    return table


def quality_table(results: dict) -> Table:
    """One row per run: quality against the uncompressed run of the same inputs (means over inputs)."""
    runs = results.get("runs") or []
    table = Table(title=_title(results, "quality vs. uncompressed"))
    _run_column(table, runs)
    columns = (
        "answer match",
        "token F1",
        "top-1 agree",
        "KL mean",
        "KL max",
        "token agree",
        "cont. KL",
        "accuracy",
        "answer match 95% CI",
    )
    for col in columns:
        table.add_column(col, justify="right")
    for r in runs:
        if r.get("status") != "ok":
            status = Text(printable(r.get("status", "?")), style="red")
            table.add_row(Text(printable(r["id"])), status, *[""] * (len(columns) - 1))
            continue
        q = r.get("quality") or {}
        table.add_row(
            Text(printable(r["id"])),
            _fmt(q.get("answer_match"), ".2f"),
            _fmt(q.get("token_f1"), ".2f"),
            first_token_cell(q, "top1_agreement", ".2f"),
            first_token_cell(q, "first_token_kl_mean", ".2e"),
            first_token_cell(q, "first_token_kl_max", ".2e"),
            _fmt(q.get("token_agreement"), ".2f"),
            _fmt(q.get("continuation_kl_mean"), ".2e"),
            _fmt(q.get("accuracy"), ".2f"),
            _ci((q.get("ci") or {}).get("answer_match")),
        )
    return table


def recommendation_line(results: dict) -> str:
    """The recommended operating point and why, or which threshold failed and by how much (rich markup)."""
    rec = results.get("recommendation") or {}
    runs = results.get("runs") or []
    run = next((r for r in runs if r.get("id") == rec.get("run")), None) if rec.get("run") else None
    if run is None:
        lines = [f"[yellow]no recommendation: {escape(printable(rec.get('reason') or 'no run finished'))}[/]"]
    else:
        base = next((r for r in runs if r.get("method") == "uncompressed" and r.get("status") == "ok"), run)
        kv, base_kv = _num(run.get("kv_bytes")), _num(base.get("kv_bytes"))
        saved = 1 - kv / base_kv if kv is not None and base_kv else 0.0
        lines = [
            f"[bold]recommended:[/] {escape(printable(rec['run']))} — measured vision retention "
            f"{_fmt(run.get('vision_retention'), '.3f')}, "
            f"KV cache {fmt_bytes(kv)} per request ({saved:.0%} less than uncompressed); "
            f"{escape(printable(rec.get('reason') or ''))}"
        ]
    basis = decision_basis(results)
    if basis:
        lines.append(f"[dim]{escape(basis)}[/]")
    env = (results.get("environment") or {}).get("nvml") or {}
    if env and not env.get("available") and env.get("note"):
        lines.append(f"[dim]{escape(printable(env['note']))}[/]")
    if not (results.get("model") or {}).get("weights_meaningful", True):
        lines.append("[yellow]note: random weights — quality figures and this recommendation are not meaningful[/]")

    note = eviction_note(results)
    if note:
        lines.append(f"[dim]note: {escape(printable(note))}[/]")
    return "\n".join(lines)


def bench_markdown(bench: dict) -> str:
    """A benchmark result (``lightkv bench``) as Markdown: environment, the cell table, largest
    batches and the compression-step breakdown. Ratios are to the uncompressed run of the same cell,
    measured in the same process; absolute times are for the named device only."""
    env = bench.get("environment", {})
    on = "GPU" if env.get("cuda") else "CPU"
    s = bench.get("settings", {})
    peak = "peak alloc" if env.get("cuda") else "peak RSS"
    lines = [
        f"**{bench.get('architecture')}** ({bench.get('description', '')}) · {env.get('device_name')} ({on}) · "
        f"{env.get('dtype')} · torch {env.get('torch')} · transformers {env.get('transformers')}"
        + (f" · driver {env['nvml_driver']}" if env.get("nvml_driver") else ""),
        "",
        f"{s.get('prompt_tokens')} text tokens per prompt, {s.get('new_tokens')} new tokens (EOS disabled), "
        f"medians of {s.get('repeats')} repeats after {s.get('warmup')} warm-up; KV bytes for the whole batch after "
        "prefill.",
        "",
        f"| method | batch | images | measured R | KV total | KV vision (×) | prefill ms {on} (×) | decode ms/tok "
        f"{on} (×) | {peak} (×) | NVML peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def x(v):
        return "" if v is None else f" ({v:.2f}×)"

    for c in bench.get("cells", []):
        if c.get("status") != "ok":
            lines.append(f"| {c['method']} | {c['batch']} | {c['images']} | {c.get('status')} | | | | | | |")
            continue
        dec = c.get("decode_ms_per_token") or {}
        lines.append(
            f"| {c['method']} | {c['batch']} | {c['images']} | {c['vision_retention']:.3f} | "
            f"{fmt_bytes(c['kv_bytes'])} | "
            f"{fmt_bytes(c['kv_bytes_vision'])}{x(c.get('kv_vision_ratio'))} | "
            f"{c['prefill_ms']['median']:.1f}{x(c.get('prefill_ratio'))} | "
            f"{_fmt(dec.get('median'), '.2f')}{x(c.get('decode_ratio'))} | "
            f"{fmt_bytes(c.get('peak_memory_bytes'))}{x(c.get('peak_ratio'))} | "
            f"{fmt_bytes(c.get('nvml_peak_used_bytes'))} |"
        )
    if bench.get("largest_batch"):
        lines += ["", "| method | images | largest batch that fits |", "|---|---:|---:|"]
        lines += [f"| {m['method']} | {m['images']} | {m['largest_batch']} |" for m in bench["largest_batch"]]
    elif bench.get("largest_batch_note"):
        lines += ["", f"Largest batch: {bench['largest_batch_note']}."]
    br = bench.get("compression_breakdown")
    if br:
        parts = ", ".join(
            f"{k.split('::')[1]} {(v['device_ms'] if br.get('clock') == 'device' else v['cpu_ms']):.1f} ms"
            for k, v in br["ranges"].items()
        )
        share = br.get("share_of_uncompressed_prefill")
        lines += [
            "",
            f"Compression step ({br['method']}, batch {br['batch']}, {br['clock']} time, torch.profiler): "
            f"{br['stage_ms']:.1f} ms"
            + (
                f" = {share:.1%} of the uncompressed prefill ({br['uncompressed_prefill_ms']:.1f} ms)"
                if share is not None
                else ""
            )
            + f"; by range: {parts} (match, guidance and merge are inside stage).",
        ]
    return "\n".join(lines) + "\n"
