"""Human-readable views of a results dictionary (console table, recommendation line).

Reads results only; never measures, never loads a model.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text


def fmt_bytes(n: float | None) -> str:
    """Bytes as MiB / GiB text (binary units)."""
    if n is None:
        return "–"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def runs_table(results: dict) -> Table:
    """A rich table with one row per run: retention, KV bytes, times, FLOPs, memory, quality."""
    env = results.get("environment", {})
    on = "GPU" if env.get("cuda") else "CPU"
    runs = results.get("runs", [])
    peak_kind = next((r.get("peak_memory_kind") for r in runs if r.get("peak_memory_kind")), "")
    peak_label = "peak GPU alloc" if peak_kind == "cuda_allocator" else "peak RSS"
    table = Table(title=f"lightkv profile · {results['model']['name']} · {len(results.get('inputs', []))} inputs · {on}")
    for col, justify in [
        ("run", "left"), ("target R", "right"), ("measured R", "right"), ("KV total", "right"),
        ("KV vision", "right"), (f"prefill ms ({on})", "right"), (f"decode ms/tok ({on})", "right"),
        ("FLOPs", "right"), (peak_label, "right"), ("answer match", "right"), ("token F1", "right"),
        ("top-1", "right"), ("KL mean", "right"), ("accuracy", "right"),
    ]:
        table.add_column(col, justify=justify)
    rec = (results.get("recommendation") or {}).get("run")
    for r in runs:
        name = Text(r["id"], style="bold green" if r["id"] == rec else "")
        if r.get("status") != "ok":
            table.add_row(name, _fmt(r.get("target_retention"), ".2f"), Text(r.get("status", "?"), style="red"),
                          *[""] * 11)
            continue
        q = r["quality"]
        pre = r["prefill_ms"]
        dec = r.get("decode_ms_per_token")
        table.add_row(
            name,
            f"{r['target_retention']:.2f}",
            f"{r['vision_retention']:.3f}",
            fmt_bytes(r["kv_bytes"]),
            fmt_bytes(r["kv_bytes_vision"]),
            f"{pre['median']:.1f} ±{(pre['p75'] - pre['p25']) / 2:.1f}",
            "–" if dec is None else f"{dec['median']:.2f} ±{(dec['p75'] - dec['p25']) / 2:.2f}",
            _fmt(r.get("flops_ratio"), ".0%"),
            fmt_bytes(r.get("peak_memory_bytes")),
            f"{q['answer_match']:.2f}",
            f"{q['token_f1']:.2f}",
            f"{q['top1_agreement']:.2f}",
            f"{q['first_token_kl_mean']:.2e}",
            _fmt(q.get("accuracy"), ".2f"),
        )
    return table


def recommendation_line(results: dict) -> str:
    """One line: the recommended operating point and why (rich markup)."""
    rec = results.get("recommendation") or {}
    if not rec.get("run"):
        return f"[yellow]no recommendation: {rec.get('reason', 'no run finished')}[/]"
    run = next(r for r in results["runs"] if r["id"] == rec["run"])
    base = next((r for r in results["runs"] if r["method"] == "uncompressed"), run)
    saved = 1 - run["kv_bytes"] / base["kv_bytes"] if base.get("kv_bytes") else 0.0
    line = (
        f"[bold]recommended:[/] {rec['run']} — measured vision retention {rec['vision_retention']:.3f}, "
        f"KV cache {fmt_bytes(run['kv_bytes'])} per request ({saved:.0%} less than uncompressed); {rec['reason']}"
    )
    if not results.get("model", {}).get("weights_meaningful", True):
        line += "\n[yellow]note: random weights — quality figures and this recommendation are not meaningful[/]"
    return line
