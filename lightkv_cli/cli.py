"""The ``lightkv`` command line. Thin: parse, call the library, print.

User mistakes (bad paths, unknown model, invalid values) print one red line naming the problem and
the fix, and exit with status 2; an interrupted profile keeps every finished run on disk and exits
with status 130.
"""

from __future__ import annotations

import functools
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lightkv_cli import __version__
from lightkv_cli.errors import LightKVError, UserError

app = typer.Typer(
    name="lightkv",
    help="Profile how much of a vision-language model's KV cache you can safely throw away, on your images and your GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Wide enough for the results table when output goes to a file or a CI log (rich assumes 80).
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)


def _version(value: bool) -> None:
    if value:
        console.print(f"lightkv {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """lightkv: KV-cache compression profiler for vision-language models."""


def _friendly(fn):
    """Turn lightkv's own errors into one red line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LightKVError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _command_line(ctx) -> str:
    """The command as it could be re-run: the subcommand and every option that differs from its default."""
    parts = ["lightkv", ctx.info_name or ""]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value == param.default or not param.opts:
            continue
        flag = param.opts[0]
        for v in value if isinstance(value, (list, tuple)) else [value]:
            parts += [flag, shlex.quote(str(v))]
    return " ".join(parts)


def parse_retentions(text: str) -> list[float]:
    """Parse ``"1.0,0.9,0.75"`` into floats in ``(0, 1]``.

    Raises:
        UserError: a value that is not a number or lies outside ``(0, 1]``.
    """
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            r = float(part)
        except ValueError:
            raise UserError(f"--retentions: '{part}' is not a number; give a comma-separated list like 0.9,0.75,0.55") from None
        if not (0.0 < r <= 1.0) or math.isnan(r):
            raise UserError(f"--retentions: {part} is outside (0, 1]; a retention is the fraction of vision tokens kept")
        values.append(r)
    if not values:
        raise UserError("--retentions is empty; give a comma-separated list like 0.9,0.75,0.55")
    return values


def _gather_inputs(images: list[Path], prompt: str | None, prompts: Path | None, limit: int | None):
    """Load the inputs; print what was ignored or skipped (one line per skipped file)."""
    from lightkv_cli.inputs import describe_skipped, gather_inputs

    got = gather_inputs(images, prompt=prompt, prompts=prompts, limit=limit)
    if got.ignored:
        names = ", ".join(p.name for p in got.ignored[:6]) + (" …" if len(got.ignored) > 6 else "")
        console.print(f"[dim]ignored {len(got.ignored)} non-image file(s): {names}[/]", highlight=False)
    for s in got.skipped:
        err_console.print(f"[yellow]{describe_skipped(s)}[/]", highlight=False, soft_wrap=True)
    return got.images, got.items, got.skipped


@app.command()
@_friendly
def profile(
    ctx: typer.Context,
    images: Annotated[
        Optional[list[Path]],
        typer.Option("--images", "-i", help="Image directory or image files (repeat the option for several)."),
    ] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="tiny (embedded, no download), llava, a Hugging Face id in the local cache, or a checkpoint path.")] = "tiny",
    init: Annotated[str, typer.Option(help="pretrained: the checkpoint's weights; random: its architecture with random weights (memory/latency planning; quality not meaningful).")] = "pretrained",
    prompt: Annotated[Optional[str], typer.Option(help="Question asked about every image (default: a describe-the-image prompt).")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help='JSON-lines file of {"image", "question", "answer"?} per line.')] = None,
    retentions: Annotated[str, typer.Option(help="Target average vision retentions, comma-separated; 1.0 is the uncompressed reference, which always runs.")] = "1.0,0.9,0.75,0.55,0.4",
    guidance: Annotated[str, typer.Option(help="LightKV merge guidance: cross (published), prompt or uniform.")] = "cross",
    positions: Annotated[str, typer.Option(help="Position ids of merged tokens: keep (default) or renumber.")] = "keep",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Greedy decode length bound.")] = 32,
    repeats: Annotated[int, typer.Option(min=1, help="Timed generations per run and input (median reported).")] = 3,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed generations per run before timing.")] = 1,
    min_fidelity: Annotated[float, typer.Option(min=0.0, max=1.0, help="Recommend the lowest retention whose answer match and top-1 agreement are at least this.")] = 0.95,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16/fp16 on GPU, fp32 on CPU), float16, bfloat16 or float32.")] = "auto",
    limit: Annotated[Optional[int], typer.Option(min=1, help="Use at most this many inputs.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for results.json (written after every run).")] = Path("lightkv-out"),
) -> None:
    """Profile LightKV on your images: retention, KV bytes, latency, memory and quality per target retention."""
    from lightkv_cli.methods.guidance import GUIDANCE_MODES
    from lightkv_cli.methods.base import POSITION_MODES

    targets = parse_retentions(retentions)
    if guidance not in GUIDANCE_MODES:
        raise UserError(f"--guidance must be one of {', '.join(GUIDANCE_MODES)}, got '{guidance}'")
    if positions not in POSITION_MODES:
        raise UserError(f"--positions must be one of {', '.join(POSITION_MODES)}, got '{positions}'")
    images = list(images or [])
    if output.exists() and not output.is_dir():
        raise UserError(f"--output '{output}' exists and is not a directory; give a directory for results.json")
    loaded_images, items, skipped = _gather_inputs(images, prompt, prompts, limit)
    if not items:
        raise UserError("nothing could be processed: no readable image among the inputs (see the skipped lines above)")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--output '{output}': cannot create the directory ({exc.strerror or exc}); give a writable directory") from None
    if not os.access(output, os.W_OK):
        raise UserError(f"--output '{output}' is not writable; give a writable directory")

    from lightkv_cli.models.loader import load_model
    from lightkv_cli.profiler import ProfileSettings, Profiler, prepare_inputs
    from lightkv_cli.report import cost_table, quality_table, recommendation_line

    with console.status(f"loading model '{model}'…"):
        lm = load_model(model, init=init, device=device, dtype=dtype)
    for note in lm.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    settings = ProfileSettings(
        retentions=targets, guidance=guidance, positions=positions, max_new_tokens=max_new_tokens,
        repeats=repeats, warmup=warmup, min_fidelity=min_fidelity,
    )
    inputs = prepare_inputs(lm, loaded_images, items)
    results_path = output / "results.json"
    command = _command_line(ctx)
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("planning", total=None)

        def on_progress(run_id: str, input_id: str) -> None:
            progress.update(task, advance=1, description=f"{run_id} · {input_id}")

        profiler = Profiler(
            lm, inputs, settings, command=command,
            skipped=[{"path": str(s.path), "reason": s.reason} for s in skipped],
            results_path=results_path, on_progress=on_progress,
        )
        progress.update(task, total=profiler.total_steps, description=f"{profiler.runs[0].id}")
        try:
            results = profiler.run()
        except KeyboardInterrupt:
            progress.stop()
            done = len(profiler.results["runs"])
            err_console.print(f"[yellow]interrupted: {done} finished run(s) are in {results_path}[/]")
            raise typer.Exit(130) from None
    console.print(cost_table(results))
    console.print(quality_table(results))
    for r in results["runs"]:
        if r.get("status") != "ok":
            err_console.print(f"[red]{r['id']}: {r['status']}: {r.get('error', '')}[/]", highlight=False)
    console.print(recommendation_line(results), highlight=False)
    console.print(f"results: {results_path}", highlight=False)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
