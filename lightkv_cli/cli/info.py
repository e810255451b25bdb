"""``lightkv models`` and ``lightkv methods``: what lightkv knows."""

from __future__ import annotations

from lightkv_cli.cli.common import app, console, friendly


@app.command("models")
@friendly
def models_command() -> None:
    """List the model names lightkv knows: family, decoder layers, whether the weights are here, published schedule."""
    from rich.table import Table

    from lightkv_cli.models.loader import list_models

    table = Table(title="models (lightkv profile --model NAME)", title_justify="left")
    for col in ("name", "checkpoint", "family", "layers", "weights", "published schedule"):
        table.add_column(col, style="bold" if col == "name" else None)
    for m in list_models():
        sched = m["published_schedule"]
        text = (
            (
                f"layers {','.join(map(str, sched['layers']))} · windows {','.join(map(str, sched['windows']))} · "
                f"ratios {','.join(f'{r:g}' for r in sched['ratios'])}"
            )
            if sched
            else "—"
        )
        table.add_row(m["name"], m["source"], m["family"], str(m["layers"]), m["weights"], text)
    console.print(table)
    console.print(
        "weights: 'embedded' = shipped with lightkv (easyvqa: trained, the default; tiny*: random weights, built on "
        "first use); "
        "'local' = in the Hugging Face cache; "
        "'missing' = run `hf download <checkpoint>` on a machine with internet, or use --init random. "
        "Published schedules are starting points from the LightKV paper (profiles/*.published.toml), not tuned for "
        "your domain.",
        highlight=False,
    )


@app.command("methods")
@friendly
def methods_command() -> None:
    """List the compression methods a sweep can run, with what each does and what its target means."""
    from rich.table import Table

    from lightkv_cli.methods.registry import METHODS

    table = Table(title="methods (lightkv sweep --methods a,b,...)", title_justify="left")
    table.add_column("name", style="bold")
    table.add_column("kind")
    table.add_column("schedules")
    table.add_column("what it does")
    table.add_column("published setting (LLaVA-1.5-7B): actual R")
    for m in METHODS.values():
        table.add_row(m.name, m.kind, "yes" if m.schedules else "no", m.summary, m.published or "—")
    console.print(table)
    console.print(
        "Target retention R: in-prefill methods keep an average share R of the vision tokens over the layers; "
        "eviction methods keep the same number of KV entries (vision and text) as R does in-prefill, so every "
        "method is compared at equal KV bytes. Explicit --layers/--windows/--ratios schedules apply to the "
        "methods with schedules.",
        highlight=False,
    )
