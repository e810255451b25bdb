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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lightkv_cli import __version__
from lightkv_cli.demo_model import DEMO_NAME
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


def _demo_prompts(model: str | None, images, prompt, prompts, videos=()) -> Path | None:
    """The shipped easy-VQA test subset when the demo model is asked to run with no inputs at all
    (so `lightkv profile` works out of the box); else ``prompts`` unchanged."""
    if images or prompt or prompts is not None or videos or model != DEMO_NAME:
        return prompts
    from lightkv_cli.demo_model import TESTSET_PROMPTS

    console.print(
        f"[dim]no --images or --prompts: using the {DEMO_NAME} model's easy-VQA test subset ({TESTSET_PROMPTS})[/]",
        highlight=False,
    )
    return TESTSET_PROMPTS


def _gather_inputs(images: list[Path], prompt: str | None, prompts: Path | None, limit: int | None, videos: list[Path] = ()):
    """Load the inputs; print what was ignored or skipped (one line per skipped file)."""
    from lightkv_cli.inputs import describe_skipped, gather_inputs

    got = gather_inputs(images, prompt=prompt, prompts=prompts, limit=limit, videos=videos)
    if not got.images and not got.skipped:
        from lightkv_cli.inputs import IMAGE_EXTENSIONS

        where = ", ".join(str(p) for p in images) or "the prompts file's images"
        raise UserError(
            f"no image files in {where}"
            + (f" (ignored {len(got.ignored)} non-image file(s))" if got.ignored else "")
            + f"; give a folder with {', '.join(sorted(IMAGE_EXTENSIONS))} images"
        )
    if got.ignored:
        names = ", ".join(p.name for p in got.ignored[:6]) + (" …" if len(got.ignored) > 6 else "")
        console.print(f"[dim]ignored {len(got.ignored)} non-image file(s): {names}[/]", highlight=False)
    for s in got.skipped:
        err_console.print(f"[yellow]{describe_skipped(s)}[/]", highlight=False, soft_wrap=True)
    return got.images, got.items, got.skipped


# --------------------------------------------------------------------------------------------------
# Options shared by several commands (one definition, one help text).
# --------------------------------------------------------------------------------------------------
ImagesOpt = Annotated[
    Optional[list[Path]], typer.Option("--images", "-i", help="Image directory or image files (repeat the option for several).")
]
ModelHelp = ("easyvqa (default: embedded demo model trained on easy-VQA; with no --images/--prompts it runs on its "
             "shipped test questions), tiny (embedded random weights; also tiny-llava-next, tiny-qwen2-vl, tiny-qwen2.5-vl), an alias "
             "(llava, llava-next, llava-next-mistral, qwen2-vl, qwen2.5-vl; see `lightkv models`), a Hugging Face id "
             "in the local cache, or a checkpoint path.")
InitHelp = "pretrained: the checkpoint's weights; random: its architecture with random weights (memory/latency planning; quality not meaningful)."
PromptOpt = Annotated[Optional[str], typer.Option(help="Question asked about every image (default: a describe-the-image prompt).")]
PromptsOpt = Annotated[Optional[Path], typer.Option(help='JSON-lines file of {"image", "question", "answer"?} per line.')]
PositionsOpt = Annotated[str, typer.Option(help="Position ids of merged tokens: keep (default) or renumber.")]
MaxNewOpt = Annotated[int, typer.Option(min=1, help="Greedy decode length bound.")]
RepeatsOpt = Annotated[int, typer.Option(min=1, help="Timed generations per run and input (median reported).")]
WarmupOpt = Annotated[int, typer.Option(min=0, help="Untimed generations per run before timing.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bf16/fp16 on GPU, fp32 on CPU), float16, bfloat16 or float32.")]
LimitOpt = Annotated[Optional[int], typer.Option(min=1, help="Use at most this many inputs.")]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Directory for results.json (written after every run), report.html and report.md.")]
GpuMemoryOpt = Annotated[Optional[str], typer.Option(help="Memory budget for capacity planning, e.g. 80GB (GB = GiB, as GPUs are sold); default: the detected device.")]
NvmlOpt = Annotated[float, typer.Option(min=1.0, help="NVML sampling interval in ms (GPU memory and utilisation timeline).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the sweep in --output: skip runs already in its results.json.")]
SaveProfileOpt = Annotated[Optional[str], typer.Option(help="Save the recommended operating point as PROFILES_DIR/NAME.toml.")]
ProfilesDirOpt = Annotated[Path, typer.Option(help="Where --save-profile writes.")]
MinAnswerOpt = Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Threshold: answer match vs. uncompressed at least this (default 0.95).")]
MinTop1Opt = Annotated[Optional[float], typer.Option("--min-top1", min=0.0, max=1.0, help="Threshold: first-token top-1 agreement at least this (default 0.95).")]
MinAccOpt = Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Threshold: accuracy against the prompts file's answers at least this.")]
MaxKlOpt = Annotated[Optional[float], typer.Option(min=0.0, help="Threshold: worst first-token KL vs. uncompressed (nats) at most this.")]
MaxRetOpt = Annotated[Optional[float], typer.Option("--max-retention", min=0.0, max=1.0, help="Threshold: measured vision retention at most this.")]
MaxKvOpt = Annotated[Optional[str], typer.Option(help="Threshold: KV bytes per request at most this (e.g. 200MiB).")]
MaxPrefillOpt = Annotated[Optional[float], typer.Option(min=0.0, help="Threshold: median prefill time (ms) at most this.")]


def _threshold_overrides(min_answer_match, min_top1, min_accuracy, max_kl, max_retention, max_kv_bytes, max_prefill_ms) -> dict:
    """Threshold values given on the command line (``None`` = not given)."""
    from lightkv_cli.telemetry import parse_memory_size

    kv = float(parse_memory_size(max_kv_bytes, option="--max-kv-bytes")) if max_kv_bytes is not None else None
    return {
        "min_answer_match": min_answer_match, "min_top1_agreement": min_top1, "min_accuracy": min_accuracy,
        "max_kl": max_kl, "max_vision_retention": max_retention, "max_kv_bytes": kv, "max_prefill_ms": max_prefill_ms,
    }


def _parse_int_list(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{option}: '{text}' is not a comma-separated list of integers, e.g. 12,18,24") from None


def _parse_float_list(text: str, option: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{option}: '{text}' is not a comma-separated list of numbers, e.g. 0.5 or 0.5,0.5,0.25") from None


def parse_schedules(layers: list[str], windows: list[str], ratios: list[str]):
    """The grid of explicit schedules: every combination of the repeated --layers/--windows/--ratios.

    Each option value is one comma-separated list (one value per stage, or one value for all stages).

    Raises:
        UserError: a malformed list, or --windows/--ratios without --layers (or the reverse).
    """
    from lightkv_cli.methods.registry import Schedule

    if not (layers or windows or ratios):
        return []
    if not layers:
        raise UserError("--windows/--ratios need --layers (e.g. --layers 12,18,24 --windows 4,2,1 --ratios 0.5)")
    layer_lists = [_parse_int_list(v, "--layers") for v in layers]
    window_lists = [_parse_int_list(v, "--windows") for v in windows] or [None]
    ratio_lists = [_parse_float_list(v, "--ratios") for v in ratios] or [[0.5]]
    out = []
    for ls in layer_lists:
        for ws in window_lists:
            for rs in ratio_lists:
                w = ws if ws is not None else ([4, 2, 1] + [1] * len(ls))[: len(ls)]  # default 4-2-1, then 1
                sched = Schedule.build(ls, w, rs)
                if sched not in out:
                    out.append(sched)
    return out


@dataclass
class _SweepRequest:
    """Everything a sweep needs, resolved from the command line (and --config)."""

    images: list[Path]
    model: str
    init: str
    prompt: str | None
    prompts: Path | None
    methods: list[str]
    retentions: list[float]
    schedules: list
    positions: str
    max_new_tokens: int
    repeats: int
    warmup: int
    thresholds: object
    gpu_memory: str | None
    nvml_interval_ms: float
    device: str
    dtype: str
    limit: int | None
    output: Path
    resume: bool
    save_profile: str | None
    profiles_dir: Path
    videos: list[Path] = field(default_factory=list)


def _check_output_dir(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise UserError(f"--output '{output}' exists and is not a directory; give a directory for results.json")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--output '{output}': cannot create the directory ({exc.strerror or exc}); give a writable directory") from None
    if not os.access(output, os.W_OK):
        raise UserError(f"--output '{output}' is not writable; give a writable directory")


def _progress() -> Progress:
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    return Progress(*columns, console=console, transient=False)


def _run_with_progress(sweep) -> dict:
    """Run ``sweep`` under a progress bar; Ctrl-C keeps what finished and exits 130."""
    with _progress() as progress:
        task = progress.add_task("planning", total=sweep.total_steps)

        def on_progress(run_id: str, input_id: str) -> None:
            progress.update(task, advance=1, description=f"{run_id} · {input_id}")

        sweep.on_progress = on_progress
        try:
            return sweep.run()
        except KeyboardInterrupt:
            progress.stop()
            raise


def _write_reports(results: dict, output: Path) -> tuple[Path, Path] | None:
    from lightkv_cli.render import write_reports

    try:
        return write_reports(results, output)
    except Exception as exc:  # a report problem must not lose the measured results
        err_console.print(f"[yellow]could not write the reports ({type(exc).__name__}: {exc}); results.json is complete[/]")
        return None


def _execute_sweep(ctx, req: _SweepRequest) -> None:
    """Shared body of ``profile`` and ``sweep``: validate, load, run, report, save the profile."""
    from lightkv_cli.profiler import SweepSettings, Sweep, load_results, prepare_inputs
    from lightkv_cli.profiles import check_profile_name, profile_from_results, save_profile
    from lightkv_cli.report import cost_table, quality_table, recommendation_line
    from lightkv_cli.telemetry import parse_memory_size

    if req.positions not in ("keep", "renumber"):
        raise UserError(f"--positions must be keep or renumber, got '{req.positions}'")
    if req.save_profile is not None:
        check_profile_name(req.save_profile)
    memory_budget = memory_source = None
    if req.gpu_memory:
        memory_budget, memory_source = parse_memory_size(req.gpu_memory), f"--gpu-memory {req.gpu_memory}"
    if req.output.exists() and not req.output.is_dir():
        raise UserError(f"--output '{req.output}' exists and is not a directory; give a directory for results.json")
    results_path = req.output / "results.json"
    previous = None
    if req.resume and results_path.exists():
        previous = load_results(results_path)
    elif req.resume:
        console.print(f"[yellow]note:[/] nothing to resume in {req.output}; starting a new sweep", highlight=False)
    prompts = _demo_prompts(req.model, req.images, req.prompt, req.prompts, req.videos)
    loaded_images, items, skipped = _gather_inputs(req.images, req.prompt, prompts, req.limit, req.videos)
    if not items:
        raise UserError("nothing could be processed: no readable image among the inputs (see the skipped lines above)")
    _check_output_dir(req.output)

    from lightkv_cli.models.loader import load_model

    with console.status(f"loading model '{req.model}'…"):
        lm = load_model(req.model, init=req.init, device=req.device, dtype=req.dtype)
    for note in lm.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    from lightkv_cli.methods.registry import METHODS

    no_schedule = [m for m in req.methods if not METHODS[m].schedules]
    if req.schedules and no_schedule:
        console.print(f"[yellow]note:[/] {', '.join(no_schedule)} take(s) no LightKV schedule: the explicit "
                      "--layers/--windows/--ratios schedules run for the other methods only", highlight=False)
    settings = SweepSettings(
        methods=req.methods, retentions=req.retentions, schedules=req.schedules, positions=req.positions,
        max_new_tokens=req.max_new_tokens, repeats=req.repeats, warmup=req.warmup,
        nvml_interval_ms=req.nvml_interval_ms, thresholds=req.thresholds,
        memory_budget=memory_budget, memory_source=memory_source,
    )
    inputs = prepare_inputs(lm, loaded_images, items)
    sweep = Sweep(
        lm, inputs, settings, command=_command_line(ctx),
        skipped=[{"path": str(s.path), "reason": s.reason} for s in skipped],
        results_path=results_path, previous=previous,
    )
    if sweep.resumed:
        console.print(f"resuming: {len(sweep.resumed)} run(s) already in {results_path}, {len(sweep.pending)} to go", highlight=False)
    elif results_path.exists() and not req.resume:
        backup = results_path.with_name("results.json.bak")
        os.replace(results_path, backup)
        console.print(f"[yellow]note:[/] the previous results were moved to {backup} (use --resume to continue a sweep)", highlight=False)
    try:
        results = _run_with_progress(sweep)
    except KeyboardInterrupt:
        done = len(sweep.results["runs"])
        _write_reports(sweep.results, req.output)
        err_console.print(
            f"[yellow]interrupted: {done} finished run(s) are in {results_path}; "
            f"continue with the same command and --resume[/]", highlight=False,
        )
        raise typer.Exit(130) from None
    console.print(cost_table(results))
    console.print(quality_table(results))
    for r in results["runs"]:
        if r.get("status") != "ok":
            err_console.print(f"[red]{r['id']}: {r['status']}: {r.get('error', '')}[/]", highlight=False)
    console.print(recommendation_line(results), highlight=False)
    reports = _write_reports(results, req.output)
    console.print(f"results: {results_path}", highlight=False)
    if reports:
        console.print(f"reports: {reports[0]}, {reports[1]}", highlight=False)
    if req.save_profile is not None:
        rec = (results.get("recommendation") or {}).get("run")
        if rec is None:
            raise UserError(f"no profile saved: {results['recommendation'].get('reason', 'no recommendation')}")
        data = profile_from_results(results, rec, req.save_profile)
        path = save_profile(data, req.profiles_dir / f"{req.save_profile}.toml")
        console.print(f"profile: {path} (check it with: lightkv check --profile {path} --images …)", highlight=False)


@app.command()
@_friendly
def profile(
    ctx: typer.Context,
    images: ImagesOpt = None,
    model: Annotated[str, typer.Option("--model", "-m", help=ModelHelp)] = DEMO_NAME,
    init: Annotated[str, typer.Option(help=InitHelp)] = "pretrained",
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    video: Annotated[Optional[list[Path]], typer.Option("--video", help="A video for the Qwen families: a folder of frame images, or a video file (needs the video extra: pip install \"lightkv[video]\"). Repeat for several.")] = None,
    retentions: Annotated[str, typer.Option(help="Target average vision retentions, comma-separated; 1.0 is the uncompressed reference, which always runs.")] = "1.0,0.9,0.75,0.55,0.4",
    guidance: Annotated[str, typer.Option(help="LightKV merge guidance: cross (published), prompt or uniform.")] = "cross",
    methods: Annotated[Optional[str], typer.Option(help="Instead of one LightKV guidance: methods to compare, comma-separated (see `lightkv methods`), e.g. lightkv,lightkv-prompt,lightkv-uniform,random.")] = None,
    positions: PositionsOpt = "keep",
    max_new_tokens: MaxNewOpt = 32,
    repeats: RepeatsOpt = 3,
    warmup: WarmupOpt = 1,
    min_fidelity: Annotated[float, typer.Option(min=0.0, max=1.0, help="Recommend the lowest retention whose answer match and top-1 agreement are at least this.")] = 0.95,
    gpu_memory: GpuMemoryOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    limit: LimitOpt = None,
    output: OutputOpt = Path("lightkv-out"),
    resume: ResumeOpt = False,
    save_profile: SaveProfileOpt = None,
    profiles_dir: ProfilesDirOpt = Path("profiles"),
) -> None:
    """Profile LightKV on your images: retention, KV bytes, latency, memory and quality per target retention."""
    from lightkv_cli.methods.guidance import GUIDANCE_MODES
    from lightkv_cli.methods.registry import METHOD_FOR_GUIDANCE
    from lightkv_cli.thresholds import Thresholds

    from lightkv_cli.methods.registry import parse_methods

    targets = parse_retentions(retentions)
    if guidance not in GUIDANCE_MODES:
        raise UserError(f"--guidance must be one of {', '.join(GUIDANCE_MODES)}, got '{guidance}'")
    if methods is not None and ctx.get_parameter_source("guidance").name != "DEFAULT":
        raise UserError("give either --guidance or --methods, not both (--methods lightkv-prompt is --guidance prompt)")
    req = _SweepRequest(
        images=list(images or []), model=model, init=init, prompt=prompt, prompts=prompts,
        methods=parse_methods(methods) if methods is not None else [METHOD_FOR_GUIDANCE[guidance]], retentions=targets, schedules=[], positions=positions,
        max_new_tokens=max_new_tokens, repeats=repeats, warmup=warmup,
        thresholds=Thresholds(min_answer_match=min_fidelity, min_top1_agreement=min_fidelity),
        gpu_memory=gpu_memory, nvml_interval_ms=20.0, device=device, dtype=dtype, limit=limit, output=output,
        resume=resume, save_profile=save_profile, profiles_dir=profiles_dir, videos=list(video or []),
    )
    _execute_sweep(ctx, req)


@app.command()
@_friendly
def sweep(
    ctx: typer.Context,
    images: ImagesOpt = None,
    config: Annotated[Optional[Path], typer.Option(help="TOML file with any of these options (keys with _ for -); options given on the command line win.")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help=ModelHelp)] = DEMO_NAME,
    init: Annotated[str, typer.Option(help=InitHelp)] = "pretrained",
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    methods: Annotated[str, typer.Option(help="Methods, comma-separated (see `lightkv methods`): lightkv, lightkv-prompt, lightkv-uniform, vlcache, fastv, snapkv, random. Eviction methods (vlcache, snapkv) get the KV budget of each target retention.")] = "lightkv",
    retentions: Annotated[str, typer.Option(help="Target average vision retentions (schedules generated per target), comma-separated. Default 0.9,0.75,0.55,0.4 unless explicit schedules are given.")] = "0.9,0.75,0.55,0.4",
    layers: Annotated[Optional[list[str]], typer.Option("--layers", help="Explicit schedule: stage layers, e.g. 12,18,24 (repeat for a grid).")] = None,
    windows: Annotated[Optional[list[str]], typer.Option("--windows", help="Explicit schedule: windows per grid axis per stage, e.g. 4,2,1 (default 4,2,1; repeat for a grid).")] = None,
    ratios: Annotated[Optional[list[str]], typer.Option("--ratios", help="Explicit schedule: merge ratio per stage or one for all, e.g. 0.5 (repeat for a grid).")] = None,
    positions: PositionsOpt = "keep",
    max_new_tokens: MaxNewOpt = 32,
    repeats: RepeatsOpt = 3,
    warmup: WarmupOpt = 1,
    min_answer_match: MinAnswerOpt = None,
    min_top1: MinTop1Opt = None,
    min_accuracy: MinAccOpt = None,
    max_kl: MaxKlOpt = None,
    max_retention: MaxRetOpt = None,
    max_kv_bytes: MaxKvOpt = None,
    max_prefill_ms: MaxPrefillOpt = None,
    gpu_memory: GpuMemoryOpt = None,
    nvml_interval_ms: NvmlOpt = 20.0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    limit: LimitOpt = None,
    output: OutputOpt = Path("lightkv-sweep"),
    resume: ResumeOpt = False,
    save_profile: SaveProfileOpt = None,
    profiles_dir: ProfilesDirOpt = Path("profiles"),
) -> None:
    """Sweep methods × schedules × target retentions; report, recommend and optionally save an operating point."""
    from lightkv_cli.methods.registry import Schedule, parse_methods
    from lightkv_cli.thresholds import Thresholds

    opts = dict(ctx.params)
    thresholds = Thresholds()
    config_schedules: list[Schedule] = []
    retentions_given = ctx.get_parameter_source("retentions").name != "DEFAULT"
    if config is not None:
        from lightkv_cli.profiles import load_sweep_config

        cfg = load_sweep_config(config)
        values = cfg.model_dump(exclude_none=True, exclude={"thresholds", "schedules"})
        for key, value in values.items():
            if ctx.get_parameter_source(key).name != "DEFAULT":
                continue  # the command line wins
            if key in ("methods", "retentions"):
                value = ",".join(str(v) for v in value)
            elif key == "images":
                value = [Path(v) for v in value]
            elif key in ("prompts", "output"):
                value = Path(value)
            opts[key] = value
        retentions_given = retentions_given or "retentions" in values
        if cfg.thresholds is not None:
            thresholds = Thresholds(**{**thresholds.to_dict(), **cfg.thresholds.model_dump(exclude_none=True)})
        if cfg.schedules and not layers:
            config_schedules = [Schedule.build(s.layers, s.windows, s.ratios) for s in cfg.schedules]
    thresholds = thresholds.merged(**_threshold_overrides(
        min_answer_match, min_top1, min_accuracy, max_kl, max_retention, max_kv_bytes, max_prefill_ms))
    schedules = config_schedules or parse_schedules(layers or [], windows or [], ratios or [])
    # Explicit schedules alone sweep only those; targets run too when given.
    targets = parse_retentions(opts["retentions"]) if (retentions_given or not schedules) else []
    req = _SweepRequest(
        images=list(opts.get("images") or []), model=opts["model"], init=opts["init"], prompt=opts.get("prompt"),
        prompts=opts.get("prompts"), methods=parse_methods(opts["methods"]), retentions=targets, schedules=schedules,
        positions=opts["positions"], max_new_tokens=opts["max_new_tokens"], repeats=opts["repeats"],
        warmup=opts["warmup"], thresholds=thresholds, gpu_memory=opts.get("gpu_memory"),
        nvml_interval_ms=opts["nvml_interval_ms"], device=opts["device"], dtype=opts["dtype"], limit=opts.get("limit"),
        output=Path(opts["output"]), resume=resume, save_profile=opts.get("save_profile"), profiles_dir=profiles_dir,
    )
    _execute_sweep(ctx, req)


@app.command("models")
@_friendly
def models_command() -> None:
    """List the model names lightkv knows: family, decoder layers, whether the weights are here, published schedule."""
    from rich.table import Table

    from lightkv_cli.models.loader import list_models

    table = Table(title="models (lightkv profile --model NAME)", title_justify="left")
    for col in ("name", "checkpoint", "family", "layers", "weights", "published schedule"):
        table.add_column(col, style="bold" if col == "name" else None)
    for m in list_models():
        sched = m["published_schedule"]
        text = (f"layers {','.join(map(str, sched['layers']))} · windows {','.join(map(str, sched['windows']))} · "
                f"ratios {','.join(f'{r:g}' for r in sched['ratios'])}") if sched else "—"
        table.add_row(m["name"], m["source"], m["family"], str(m["layers"]), m["weights"], text)
    console.print(table)
    console.print(
        "weights: 'embedded' = shipped with lightkv (easyvqa: trained, the default; tiny*: random weights, built on first use); "
        "'local' = in the Hugging Face cache; "
        "'missing' = run `hf download <checkpoint>` on a machine with internet, or use --init random. "
        "Published schedules are starting points from the LightKV paper (profiles/*.published.toml), not tuned for your domain.",
        highlight=False,
    )


@app.command("methods")
@_friendly
def methods_command() -> None:
    """List the compression methods a sweep can run, with what each does and what its target means."""
    from rich.table import Table

    from lightkv_cli.methods.registry import METHODS

    table = Table(title="methods (lightkv sweep --methods a,b,...)", title_justify="left")
    table.add_column("name", style="bold")
    table.add_column("kind")
    table.add_column("schedules")
    table.add_column("what it does")
    for m in METHODS.values():
        table.add_row(m.name, m.kind, "yes" if m.schedules else "no", m.summary)
    console.print(table)
    console.print(
        "Target retention R: in-prefill methods keep an average share R of the vision tokens over the layers; "
        "eviction methods keep the same number of KV entries (vision and text) as R does in-prefill, so every "
        "method is compared at equal KV bytes. Explicit --layers/--windows/--ratios schedules apply to the "
        "methods with schedules.",
        highlight=False,
    )


@app.command()
@_friendly
def report(
    results: Annotated[Path, typer.Argument(help="A results.json written by lightkv profile, sweep or check.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Directory for report.html and report.md (default: next to the results file).")] = None,
) -> None:
    """Re-render report.html and report.md from a results file (no model is loaded)."""
    from lightkv_cli.profiler import load_results
    from lightkv_cli.render import write_reports
    from lightkv_cli.report import cost_table, quality_table, recommendation_line

    data = load_results(results)
    out = output or results.parent
    _check_output_dir(out)
    if data.get("runs"):
        console.print(cost_table(data))
        console.print(quality_table(data))
    console.print(recommendation_line(data), highlight=False)
    html_path, md_path = write_reports(data, out)
    console.print(f"reports: {html_path}, {md_path}", highlight=False)


@app.command()
@_friendly
def bench(
    arch: Annotated[str, typer.Option(help="Architecture, built with random weights: llava-1.5-7b, or cpu-small (32-layer LLaVA at CPU scale).")] = "llava-1.5-7b",
    batches: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,8,32",
    images_per_prompt: Annotated[str, typer.Option(help="Images per prompt, comma-separated.")] = "1,4",
    retentions: Annotated[str, typer.Option(help="Target retentions besides the published schedule, comma-separated.")] = "0.75,0.4",
    new_tokens: Annotated[int, typer.Option(min=1, help="Greedy tokens decoded per prompt (EOS disabled).")] = 128,
    repeats: RepeatsOpt = 3,
    warmup: WarmupOpt = 1,
    search_batch: Annotated[Optional[bool], typer.Option("--search-batch/--no-search-batch", help="Search the largest batch that fits (default: on GPU only).")] = None,
    profile_batch: Annotated[int, typer.Option(min=0, help="Batch size of the torch.profiler breakdown of the compression step (0: skip).")] = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for <arch>-<device>.json (written after every cell) and .md.")] = Path("lightkv-bench"),
) -> None:
    """Benchmark LightKV against the uncompressed model on this device: time, KV bytes, peak memory, largest batch."""
    from rich.markdown import Markdown

    from lightkv_cli.bench import build_model, run_benchmark
    from lightkv_cli.report import bench_markdown

    b_list = _parse_int_list(batches, "--batches")
    i_list = _parse_int_list(images_per_prompt, "--images-per-prompt")
    if not b_list or min(b_list) < 1 or not i_list or min(i_list) < 1:
        raise UserError("--batches and --images-per-prompt need positive integers, e.g. 1,8,32")
    r_list = [r for r in parse_retentions(retentions) if r < 1.0] if retentions.strip() else []
    _check_output_dir(output)
    with console.status(f"building {arch} (random weights)…"):
        bm = build_model(arch, device=device, dtype=dtype)
    path = output / f"{arch}-{bm.device.type}.json"
    with _progress() as progress:
        task = progress.add_task("benchmark", total=None)
        try:
            res = run_benchmark(bm, b_list, i_list, r_list, new_tokens=new_tokens, repeats=repeats, warmup=warmup,
                                search_batch=search_batch, profile_batch=profile_batch or None, results_path=path,
                                on_progress=lambda msg: progress.update(task, description=msg))
        except KeyboardInterrupt:
            progress.stop()
            err_console.print(f"[yellow]interrupted: the finished cells are in {path}[/]")
            raise typer.Exit(130) from None
    md = bench_markdown(res)
    from lightkv_cli.files import write_text_atomic

    md_path = write_text_atomic(path.with_suffix(".md"), md)
    console.print(Markdown(md))
    console.print(f"results: {path}, {md_path}", highlight=False)


def _resolve_model_name(name: str) -> str:
    from lightkv_cli.models.loader import ALIASES

    return ALIASES.get(name, name).rstrip("/")


@app.command()
@_friendly
def check(
    ctx: typer.Context,
    results: Annotated[Optional[Path], typer.Argument(help="Check an existing results.json instead of re-running.")] = None,
    profile_path: Annotated[Optional[Path], typer.Option("--profile", help="Operating point to check (profiles/NAME.toml): its schedule and thresholds.")] = None,
    images: ImagesOpt = None,
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model (default: the profile's). Must be the profile's model.")] = None,
    init: Annotated[Optional[str], typer.Option(help="pretrained or random (default: the profile's).")] = None,
    run: Annotated[Optional[str], typer.Option("--run", help="With a results file: the run to check (default: the run with the --profile's schedule, else the recommended run).")] = None,
    min_answer_match: MinAnswerOpt = None,
    min_top1: MinTop1Opt = None,
    min_accuracy: MinAccOpt = None,
    max_kl: MaxKlOpt = None,
    max_retention: MaxRetOpt = None,
    max_kv_bytes: MaxKvOpt = None,
    max_prefill_ms: MaxPrefillOpt = None,
    repeats: RepeatsOpt = 1,
    warmup: WarmupOpt = 1,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    limit: LimitOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Also write the re-run's results.json and reports here.")] = None,
    junit: Annotated[Optional[Path], typer.Option(help="Write a JUnit XML report (one test case per threshold) for CI systems.")] = None,
) -> None:
    """CI gate: exit 0 when the operating point meets every threshold, 1 when one fails, 2 on a usage error."""
    from lightkv_cli.thresholds import Thresholds, evaluate

    if results is None and profile_path is None:
        raise UserError("give a results file (lightkv check results.json) or --profile profiles/NAME.toml with --images or --prompts")
    if results is not None and (images or prompts is not None):
        raise UserError("give either a results file to check or --images/--prompts to re-run the profile, not both")
    prof = None
    if profile_path is not None:
        from lightkv_cli.profiles import load_profile

        prof = load_profile(profile_path)
    overrides = _threshold_overrides(min_answer_match, min_top1, min_accuracy, max_kl, max_retention, max_kv_bytes, max_prefill_ms)
    if results is not None:
        from lightkv_cli.profiler import load_results

        data = load_results(results)
        base = prof.thresholds.to_thresholds() if prof else Thresholds.from_dict(data.get("thresholds") or {}, f"{results}: thresholds")
        ids = [r.get("id") for r in data["runs"]]
        run_id = run or (_profile_run(prof, data["runs"]) if prof else None) or (data.get("recommendation") or {}).get("run")
        if run_id is None:
            raise UserError(f"{results} has no recommended run; name the run to check with --run (runs: {', '.join(ids)})")
        if run_id not in ids:
            raise UserError(f"{results} has no run '{run_id}'; runs: {', '.join(ids)}")
        source = str(results)
    else:
        prompts = _demo_prompts(_resolve_model_name(model or prof.model.name), images, prompt, prompts)
        if not images and prompts is None:
            raise UserError(f"--profile {profile_path}: give --images or --prompts to re-run the operating point on")
        data, run_id = _rerun_profile(ctx, prof, profile_path, images, prompt, prompts, model, init, repeats, warmup,
                                      device, dtype, limit, output)
        base = prof.thresholds.to_thresholds()
        source = str(profile_path)
    thresholds = base.merged(**overrides)
    if not thresholds.set_items():
        raise UserError("no thresholds to check: give e.g. --min-answer-match 0.95 or a profile with a [thresholds] table")
    target = next(r for r in data["runs"] if r["id"] == run_id)
    if target.get("status") == "ok":
        checks = evaluate(target, thresholds)
        unmeasured = [c for c in checks if c.measured is None]
        if unmeasured:
            raise UserError(
                f"{unmeasured[0].threshold} is set but {run_id} has no {unmeasured[0].label}: give --prompts with answers, "
                "or drop the threshold"
            )
    else:
        checks = None
    _print_check(run_id, source, target, thresholds, checks)
    if junit is not None:
        _write_junit(junit, run_id, target, thresholds, checks)
        console.print(f"junit: {junit}", highlight=False)
    failed = checks is None or any(not c.passed for c in checks)
    raise typer.Exit(1 if failed else 0)


def _profile_run(prof, runs: list[dict]) -> str | None:
    """The id of the run in ``runs`` with the profile's method and schedule, if there is one."""
    m = prof.method
    for r in runs:
        p = r.get("params") or {}
        if not m.uses_schedule:
            if r.get("method") == m.name and r.get("target_retention") == m.target_retention:
                return r.get("id")
            continue
        if (r.get("method") == m.name and p.get("layers") == m.layers and p.get("windows") == m.windows
                and [round(x, 6) for x in p.get("ratios", [])] == [round(x, 6) for x in m.ratios]):
            return r.get("id")
    return None


def _rerun_profile(ctx, prof, profile_path, images, prompt, prompts, model, init, repeats, warmup, device, dtype, limit, output):
    """Re-run a profile's operating point and the uncompressed reference; return (results, run id)."""
    from lightkv_cli.methods.registry import Schedule
    from lightkv_cli.models.loader import load_model
    from lightkv_cli.profiler import Sweep, SweepSettings, prepare_inputs

    want = _resolve_model_name(prof.model.name)
    if model is not None and _resolve_model_name(model) != want:
        raise UserError(
            f"profile '{profile_path}' is for model '{prof.model.name}', not '{model}'; "
            f"drop --model, or save a profile for '{model}' with lightkv sweep --model {model} --save-profile NAME"
        )
    if output is not None:
        _check_output_dir(output)
    loaded_images, items, skipped = _gather_inputs(list(images or []), prompt, prompts, limit)
    if not items:
        raise UserError("nothing could be processed: no readable image among the inputs (see the skipped lines above)")
    with console.status(f"loading model '{prof.model.name}'…"):
        lm = load_model(model or prof.model.name, init=init or prof.model.init, device=device, dtype=dtype)
    if prof.model.layers is not None and lm.adapter.num_layers != prof.model.layers:
        raise UserError(
            f"profile '{profile_path}' is for a {prof.model.layers}-layer model; '{lm.name}' has "
            f"{lm.adapter.num_layers} decoder layers: save a profile for this model with lightkv sweep --save-profile"
        )
    m = prof.method
    sched = Schedule.build(m.layers, m.windows, m.ratios) if m.uses_schedule else None
    settings = SweepSettings(
        methods=[m.name], retentions=[1.0] if sched else [1.0, m.target_retention],
        schedules=[sched] if sched else [], positions=m.positions,
        max_new_tokens=prof.settings.max_new_tokens, repeats=repeats, warmup=warmup,
        thresholds=prof.thresholds.to_thresholds(),
    )
    inputs = prepare_inputs(lm, loaded_images, items)
    sweep = Sweep(lm, inputs, settings, command=_command_line(ctx),
                  skipped=[{"path": str(s.path), "reason": s.reason} for s in skipped],
                  results_path=(output / "results.json") if output else None)
    if prof.inputs is not None and prof.inputs.fingerprint != sweep.results["inputs_fingerprint"]:
        console.print(
            f"[dim]note: checking on other inputs than the profile was chosen on ({len(inputs)} here, {prof.inputs.count} there)[/]",
            highlight=False,
        )
    try:
        data = _run_with_progress(sweep)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    if output is not None:
        _write_reports(data, output)
    return data, (f"{m.name}[{sched.label()}]" if sched else f"{m.name}@{m.target_retention:g}")


def _print_check(run_id: str, source: str, run: dict, thresholds, checks) -> None:
    from rich.table import Table

    table = Table(title=f"lightkv check · {run_id} · {source}")
    for col in ("threshold", "required", "measured", "margin", "result"):
        table.add_column(col, justify="left" if col == "threshold" else "right")
    if checks is None:
        table.add_row("run status", "ok", run.get("status", "?"), "", "[red]FAIL[/]")
        console.print(table)
        console.print(f"[bold red]FAIL[/]: {run_id} did not finish ({run.get('status')}: {run.get('error', '')})", highlight=False)
        return
    for c in checks:
        op = "≥" if c.kind == "min" else "≤"
        measured = "–" if c.measured is None else f"{c.measured:.4g}"
        margin = "" if c.measured is None else f"{(c.measured - c.required) if c.kind == 'min' else (c.required - c.measured):+.4g}"
        table.add_row(c.label, f"{op} {c.required:.4g}", measured, margin, "[green]pass[/]" if c.passed else "[red]FAIL[/]")
    console.print(table)
    failed = [c for c in checks if not c.passed]
    if failed:
        console.print(f"[bold red]FAIL[/]: {len(failed)} of {len(checks)} thresholds failed: "
                      + "; ".join(c.describe() for c in failed), highlight=False)
    else:
        console.print(f"[bold green]PASS[/]: {run_id} meets all {len(checks)} thresholds", highlight=False)


def _write_junit(path: Path, run_id: str, run: dict, thresholds, checks) -> None:
    """JUnit XML: one test suite, one test case per threshold (or one for a run that did not finish)."""
    import xml.etree.ElementTree as ET

    cases = []
    if checks is None:
        cases.append(("run status", f"{run_id} did not finish: {run.get('status')}: {run.get('error', '')}"))
    else:
        cases += [(c.threshold, None if c.passed else c.describe()) for c in checks]
    suite = ET.Element("testsuite", name="lightkv check", tests=str(len(cases)),
                       failures=str(sum(1 for _, f in cases if f)), errors="0")
    for name, failure in cases:
        case = ET.SubElement(suite, "testcase", classname=f"lightkv.check.{run_id}", name=name)
        if failure:
            ET.SubElement(case, "failure", message=failure, type="threshold").text = failure
    root = ET.Element("testsuites")
    root.append(suite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
    except OSError as exc:
        raise UserError(f"--junit '{path}': cannot write ({exc.strerror or exc}); give a writable path") from None


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
