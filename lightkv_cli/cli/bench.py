"""``lightkv bench``: LightKV against the uncompressed model at scale on this device."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lightkv_cli.cli.common import (
    DeviceOpt,
    DtypeOpt,
    RepeatsOpt,
    WarmupOpt,
    app,
    check_output_dir,
    console,
    err_console,
    friendly,
    parse_int_list,
    parse_retentions,
    progress_bar,
)
from lightkv_cli.errors import UserError


@app.command()
@friendly
def bench(
    arch: Annotated[
        str,
        typer.Option(
            help="Architecture, built with random weights: llava-1.5-7b, or cpu-small (32-layer LLaVA at CPU scale)."
        ),
    ] = "llava-1.5-7b",
    batches: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,8,32",
    images_per_prompt: Annotated[str, typer.Option(help="Images per prompt, comma-separated.")] = "1,4",
    retentions: Annotated[
        str, typer.Option(help="Target retentions besides the published schedule, comma-separated.")
    ] = "0.75,0.4",
    new_tokens: Annotated[int, typer.Option(min=1, help="Greedy tokens decoded per prompt (EOS disabled).")] = 128,
    repeats: RepeatsOpt = 3,
    warmup: WarmupOpt = 1,
    search_batch: Annotated[
        bool | None,
        typer.Option(
            "--search-batch/--no-search-batch", help="Search the largest batch that fits (default: on GPU only)."
        ),
    ] = None,
    profile_batch: Annotated[
        int, typer.Option(min=0, help="Batch size of the torch.profiler breakdown of the compression step (0: skip).")
    ] = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Directory for <arch>-<device>.json (written after every cell) and .md."),
    ] = Path("lightkv-bench"),
) -> None:
    """Benchmark LightKV against the uncompressed model on this device: time, KV bytes, peak memory, largest batch."""
    from rich.markdown import Markdown

    from lightkv_cli.engine.bench import build_model, run_benchmark, time_vs_flops
    from lightkv_cli.report.console import bench_markdown

    b_list = parse_int_list(batches, "--batches")
    i_list = parse_int_list(images_per_prompt, "--images-per-prompt")
    if not b_list or min(b_list) < 1 or not i_list or min(i_list) < 1:
        raise UserError("--batches and --images-per-prompt need positive integers, e.g. 1,8,32")
    r_list = [r for r in parse_retentions(retentions) if r < 1.0] if retentions.strip() else []
    check_output_dir(output)
    with console.status(f"building {arch} (random weights)…"):
        bm = build_model(arch, device=device, dtype=dtype)
    path = output / f"{arch}-{bm.device.type}.json"
    with progress_bar() as progress:
        task = progress.add_task("benchmark", total=None)
        try:
            res = run_benchmark(
                bm,
                b_list,
                i_list,
                r_list,
                new_tokens=new_tokens,
                repeats=repeats,
                warmup=warmup,
                search_batch=search_batch,
                profile_batch=profile_batch or None,
                results_path=path,
                on_progress=lambda msg: progress.update(task, description=msg),
            )
        except KeyboardInterrupt:
            progress.stop()
            err_console.print(f"[yellow]interrupted: the finished cells are in {path}[/]")
            raise typer.Exit(130) from None
    md = bench_markdown(res)
    from lightkv_cli.files import write_text_atomic

    md_path = write_text_atomic(path.with_suffix(".md"), md)
    console.print(Markdown(md))
    _print_time_vs_flops(time_vs_flops(res))
    console.print(f"results: {path}, {md_path}", highlight=False)


def _print_time_vs_flops(rows: list[dict]) -> None:
    """The published schedule's prefill time ratio beside its FLOPs ratio, one line per cell."""
    if not rows:
        return
    from rich.table import Table

    table = Table(
        title="lightkv-published: prefill time ratio (paired median [95% interval]) vs FLOPs ratio "
        "(× uncompressed, same cell)"
    )
    for col in ("batch", "images", "prefill time ratio", "FLOPs ratio", "time − FLOPs"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["batch"]),
            str(r["images"]),
            f"{r['prefill_ratio']:.3f}" + (" [{:.3f}, {:.3f}]".format(*r["interval"]) if r.get("interval") else ""),
            f"{r['flops_ratio']:.3f}",
            f"{r['difference']:+.3f}",
        )
    console.print(table)
