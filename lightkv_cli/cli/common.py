"""What every ``lightkv`` command shares: the typer app, the consoles, one-line errors, option
definitions, list parsers, progress bars. Thin: parse and print; the work is in the library.
"""

from __future__ import annotations

import functools
import math
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from lightkv_cli import __version__
from lightkv_cli.demo_model import DEMO_NAME
from lightkv_cli.engine.job import SweepEvents
from lightkv_cli.engine.job import check_output_dir as check_output_dir  # for the commands
from lightkv_cli.errors import LightKVError, UserError
from lightkv_cli.text import printable

app = typer.Typer(
    name="lightkv",
    help="Profile how much of a vision-language model's KV cache you can safely throw away, on your images and your "
    "GPU.",
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
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """lightkv: KV-cache compression profiler for vision-language models."""


def shown(text: object) -> str:
    """User text (a path, a file name, a question, a message quoting one) ready for rich markup: printed
    literally, with bytes that are not UTF-8 escaped (:func:`~lightkv_cli.text.printable`)."""
    return escape(printable(text))


def print_error(message: object) -> None:
    """Print one red ``error:`` line on standard error, the message (plain text, one line) printed literally."""
    text = " ".join(printable(message).split("\n"))
    err_console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)


def friendly(fn):
    """Turn lightkv's own errors into one red line and exit status 2 (the message printed literally)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LightKVError as exc:
            print_error(exc)
            raise typer.Exit(2) from None

    return wrapper


def command_line(ctx) -> str:
    """The command as it could be re-run: the subcommand and every option that differs from its default
    (values taken from a ``--config`` file stay in the file: ``--config`` names it)."""
    parts = ["lightkv", ctx.info_name or ""]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value == param.default or not param.opts:
            continue
        if getattr(ctx.get_parameter_source(param.name), "name", None) == "DEFAULT_MAP":
            continue  # typer ships its own click: compare the source by name
        values = value if isinstance(value, (list, tuple)) else [value]
        if getattr(param, "param_type_name", None) == "argument":  # positional: the values alone
            parts += [shlex.quote(str(v)) for v in values]
        elif getattr(param, "is_flag", False) and isinstance(value, bool):  # --resume, --search-batch/--no-…
            off = getattr(param, "secondary_opts", None) or []
            parts += [param.opts[0]] if value else off[:1]
        else:
            for v in values:
                parts += [param.opts[0], shlex.quote(str(v))]
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
            raise UserError(
                f"--retentions: '{part}' is not a number; give a comma-separated list like 0.9,0.75,0.55"
            ) from None
        if not (0.0 < r <= 1.0) or math.isnan(r):
            raise UserError(
                f"--retentions: {part} is outside (0, 1]; a retention is the fraction of vision tokens kept"
            )
        values.append(r)
    if not values:
        raise UserError("--retentions is empty; give a comma-separated list like 0.9,0.75,0.55")
    return values


def demo_prompts(model: str | None, images, prompt, prompts, videos=()) -> Path | None:
    """The shipped easy-VQA test subset when the demo model is asked to run with no inputs at all
    (so `lightkv profile` works out of the box); else ``prompts`` unchanged."""
    if images or prompt or prompts is not None or videos or model != DEMO_NAME:
        return prompts
    from lightkv_cli.demo_model import TESTSET_PROMPTS

    console.print(
        f"[dim]no --images or --prompts: using the {DEMO_NAME} model's easy-VQA test subset "
        f"({shown(TESTSET_PROMPTS)})[/]",
        highlight=False,
    )
    return TESTSET_PROMPTS


# --------------------------------------------------------------------------------------------------
# Options shared by several commands (one definition, one help text).
# --------------------------------------------------------------------------------------------------
ImagesOpt = Annotated[
    list[Path] | None,
    typer.Option("--images", "-i", help="Image directory or image files (repeat the option for several)."),
]


ModelHelp = (
    "easyvqa (default: embedded demo model trained on easy-VQA; with no --images/--prompts it runs on its "
    "shipped test questions), tiny (embedded random weights; also tiny-llava-next, tiny-qwen2-vl, tiny-qwen2.5-vl), "
    "an alias "
    "(llava, llava-next, llava-next-mistral, qwen2-vl, qwen2.5-vl; see `lightkv models`), a Hugging Face id "
    "in the local cache, or a checkpoint path."
)


InitHelp = (
    "pretrained: the checkpoint's weights; random: its architecture with random weights (memory/latency "
    "planning; quality not meaningful)."
)


PromptOpt = Annotated[
    str | None, typer.Option(help="Question asked about every image (default: a describe-the-image prompt).")
]


PromptsOpt = Annotated[Path | None, typer.Option(help='JSON-lines file of {"image", "question", "answer"?} per line.')]


PositionsOpt = Annotated[str, typer.Option(help="Position ids of merged tokens: keep (default) or renumber.")]


MaxNewOpt = Annotated[int, typer.Option(min=1, help="Greedy decode length bound.")]


RepeatsOpt = Annotated[
    int,
    typer.Option(
        min=1,
        help="Rounds of the timing pass: every run is visited once per round, in a seeded shuffled order, so drift "
        "hits every run alike (medians and paired ratios to uncompressed over rounds × timing inputs).",
    ),
]


WarmupOpt = Annotated[
    int, typer.Option(min=0, help="Untimed generations per run and timing batch size before the timing rounds.")
]


DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda.")]


DtypeOpt = Annotated[str, typer.Option(help="auto (bf16/fp16 on GPU, fp32 on CPU), float16, bfloat16 or float32.")]


LimitOpt = Annotated[int | None, typer.Option(min=1, help="Use at most this many inputs.")]


OutputOpt = Annotated[
    Path,
    typer.Option(
        "--output", "-o", help="Directory for results.json (written after every run), report.html and report.md."
    ),
]


GpuMemoryOpt = Annotated[
    str | None,
    typer.Option(
        help="Memory budget for capacity planning, e.g. 80GB (GB = GiB, as GPUs are sold); default: the detected "
        "device."
    ),
]


NvmlOpt = Annotated[
    float, typer.Option(min=1.0, help="NVML sampling interval in ms (GPU memory and utilisation timeline).")
]


ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue the sweep in --output: skip runs already in its results.json.")
]


SaveProfileOpt = Annotated[
    str | None, typer.Option(help="Save the recommended operating point as PROFILES_DIR/NAME.toml.")
]


ProfilesDirOpt = Annotated[Path, typer.Option(help="Where --save-profile writes.")]


MinAnswerOpt = Annotated[
    float | None,
    typer.Option(min=0.0, max=1.0, help="Threshold: answer match vs. uncompressed at least this (default 0.95)."),
]


MinTop1Opt = Annotated[
    float | None,
    typer.Option(
        "--min-top1", min=0.0, max=1.0, help="Threshold: first-token top-1 agreement at least this (default 0.95)."
    ),
]


MinTokenOpt = Annotated[
    float | None,
    typer.Option(
        "--min-token-agreement",
        min=0.0,
        max=1.0,
        help="Threshold: top-1 agreement over the uncompressed answer fed through the compressed cache (teacher "
        "forcing) at least this (default 0.95).",
    ),
]


MinAccOpt = Annotated[
    float | None,
    typer.Option(min=0.0, max=1.0, help="Threshold: accuracy against the prompts file's answers at least this."),
]


MaxKlOpt = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        help="Threshold: worst per-token KL vs. uncompressed over the teacher-forced continuation (nats) at most this.",
    ),
]


MaxRetOpt = Annotated[
    float | None,
    typer.Option("--max-retention", min=0.0, max=1.0, help="Threshold: measured vision retention at most this."),
]


MaxKvOpt = Annotated[str | None, typer.Option(help="Threshold: KV bytes per request at most this (e.g. 200MiB).")]


MaxPrefillOpt = Annotated[float | None, typer.Option(min=0.0, help="Threshold: median prefill time (ms) at most this.")]


DecideOnOpt = Annotated[
    str | None,
    typer.Option(
        metavar="lower-bound|mean",
        help="Compare quality thresholds with the lower 95% bound over inputs (Wilson score; default of profile and "
        "sweep) or the mean. check: default the file's or profile's (mean when not recorded).",
    ),
]


def threshold_overrides(
    min_answer_match,
    min_top1,
    min_accuracy,
    max_kl,
    max_retention,
    max_kv_bytes,
    max_prefill_ms,
    decide_on=None,
    min_token=None,
) -> dict:
    """Threshold values given on the command line (``None`` = not given), and ``decide_on``; a ``UserError``
    for a ``--max-kv-bytes`` that is not a size or a ``--decide-on`` other than ``lower-bound`` or ``mean``."""
    from lightkv_cli.scoring.thresholds import DECIDE_ON
    from lightkv_cli.units import parse_memory_size

    if decide_on is not None and decide_on not in DECIDE_ON:
        raise UserError(f"--decide-on must be {' or '.join(DECIDE_ON)}, got '{decide_on}'")
    kv = float(parse_memory_size(max_kv_bytes, option="--max-kv-bytes")) if max_kv_bytes is not None else None
    return {
        "decide_on": decide_on,
        "min_answer_match": min_answer_match,
        "min_top1_agreement": min_top1,
        "min_token_agreement": min_token,
        "min_accuracy": min_accuracy,
        "max_kl": max_kl,
        "max_vision_retention": max_retention,
        "max_kv_bytes": kv,
        "max_prefill_ms": max_prefill_ms,
    }


def parse_int_list(text: str, option: str) -> list[int]:
    """Parse ``"12,18,24"`` into integers.

    Raises:
        UserError: a part that is not an integer (the message names ``option``).
    """
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{option}: '{text}' is not a comma-separated list of integers, e.g. 12,18,24") from None


def parse_float_list(text: str, option: str) -> list[float]:
    """Parse ``"0.5,0.5,0.25"`` into floats.

    Raises:
        UserError: a part that is not a number (the message names ``option``).
    """
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(
            f"{option}: '{text}' is not a comma-separated list of numbers, e.g. 0.5 or 0.5,0.5,0.25"
        ) from None


def parse_schedules(layers: list[str], windows: list[str], ratios: list[str]):
    """The grid of explicit schedules: every combination of the repeated --layers/--windows/--ratios.

    Each option value is one comma-separated list (one value per stage, or one value for all stages).

    Raises:
        UserError: a malformed list, or --windows/--ratios without --layers (or the reverse).
    """
    from lightkv_cli.methods.schedule import Schedule

    if not (layers or windows or ratios):
        return []
    if not layers:
        raise UserError("--windows/--ratios need --layers (e.g. --layers 12,18,24 --windows 4,2,1 --ratios 0.5)")
    layer_lists = [parse_int_list(v, "--layers") for v in layers]
    window_lists = [parse_int_list(v, "--windows") for v in windows] or [None]
    ratio_lists = [parse_float_list(v, "--ratios") for v in ratios] or [[0.5]]
    out = []
    for ls in layer_lists:
        for ws in window_lists:
            for rs in ratio_lists:
                w = ws if ws is not None else ([4, 2, 1] + [1] * len(ls))[: len(ls)]  # default 4-2-1, then 1
                sched = Schedule.build(ls, w, rs)
                if sched not in out:
                    out.append(sched)
    return out


class InputsPerSecond(ProgressColumn):
    """The rate of a progress task in inputs per second (blank until rich has measured one)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:.1f} inputs/s", style="progress.data.speed")


def progress_bar() -> Progress:
    """A progress bar on the console: spinner, description, bar, done/total, inputs/s, elapsed time, eta."""
    columns = [
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        InputsPerSecond(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    return Progress(*columns, console=console, transient=False)


class ConsoleEvents(SweepEvents):
    """Shows a sweep (:func:`~lightkv_cli.engine.job.run_sweep`) on the console: ignored and skipped
    inputs, a spinner while the model loads, notes, the resume or ``results.json.bak`` line, the
    progress bar.

    Args:
        show_notes: print the model's and the planner's notes.
        model_label: the model name shown while loading (default: the name loaded).
    """

    def __init__(self, show_notes: bool = True, model_label: str | None = None):
        self.show_notes = show_notes
        self.model_label = model_label
        self._bar: Progress | None = None
        self._tasks: dict[str, int] = {}

    def inputs_read(self, inputs) -> None:
        from lightkv_cli.inputs import describe_skipped

        if inputs.ignored:
            names = ", ".join(p.name for p in inputs.ignored[:6]) + (" …" if len(inputs.ignored) > 6 else "")
            console.print(f"[dim]ignored {len(inputs.ignored)} non-image file(s): {shown(names)}[/]", highlight=False)
        for s in inputs.skipped:
            err_console.print(f"[yellow]{shown(describe_skipped(s))}[/]", highlight=False, soft_wrap=True)

    def loading_model(self, name: str):
        return console.status(f"loading model '{shown(self.model_label or name)}'…")

    def note(self, text: str) -> None:
        if self.show_notes:
            console.print(f"[yellow]note:[/] {shown(text)}", highlight=False)

    def input_skipped(self, reason: str) -> None:
        err_console.print(f"[yellow]{shown(reason)}[/]", highlight=False, soft_wrap=True)

    def ready(self, sweep, moved_aside: Path | None) -> None:
        if sweep.resumed:
            console.print(
                f"resuming: {len(sweep.resumed)} run(s) already in {shown(sweep.results_path)}, "
                f"{len(sweep.pending)} to go",
                highlight=False,
            )
        elif moved_aside is not None:
            console.print(
                f"[yellow]note:[/] the previous results were moved to {shown(moved_aside)} "
                "(use --resume to continue a sweep)",
                highlight=False,
            )

    @contextmanager
    def running(self) -> Iterator[None]:
        with progress_bar() as progress:
            self._bar = progress
            try:
                yield
            finally:
                self._bar = None
                self._tasks = {}

    def phase(self, name: str, total: int) -> None:
        if self._bar is None or total <= 0:
            return
        label = PHASE_LABELS.get(name, name)
        self._tasks[name] = self._bar.add_task(label, total=total, label=label)

    def progress(self, phase: str, run_id: str, inputs: int) -> None:
        task = self._tasks.get(phase)
        if self._bar is not None and task is not None:
            label = PHASE_LABELS.get(phase, phase)
            self._bar.update(task, advance=inputs, description=shown(f"{label} · {run_id}"))


#: How the two passes of a sweep are named on the progress bars.
PHASE_LABELS = {"quality": "quality pass", "timing": "timing pass"}


def write_reports_or_warn(results: dict, output: Path) -> tuple[Path, Path] | None:
    """Write report.html and report.md into ``output``; on failure print a warning (results.json is
    already complete) and return None."""
    from lightkv_cli.report.write import write_reports

    try:
        return write_reports(results, output)
    except Exception as exc:  # a report problem must not lose the measured results
        err_console.print(
            f"[yellow]could not write the reports ({type(exc).__name__}: {shown(exc)}); results.json is complete[/]",
            highlight=False,
        )
        return None


def resolve_model_name(name: str) -> str:
    """The model name an alias stands for (``llava`` → its Hugging Face id), without a trailing ``/``."""
    from lightkv_cli.models.loader import ALIASES

    return ALIASES.get(name, name).rstrip("/")
