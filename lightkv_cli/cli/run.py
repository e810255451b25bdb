"""``lightkv profile`` and ``lightkv sweep``: load, run the sweep, print, report, save the profile."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lightkv_cli.cli.common import (
    ConsoleEvents,
    DecideOnOpt,
    DeviceOpt,
    DtypeOpt,
    GpuMemoryOpt,
    ImagesOpt,
    InitHelp,
    LimitOpt,
    MaxKlOpt,
    MaxKvOpt,
    MaxNewOpt,
    MaxPrefillOpt,
    MaxRetOpt,
    MinAccOpt,
    MinAnswerOpt,
    MinTokenOpt,
    MinTop1Opt,
    ModelHelp,
    NvmlOpt,
    OutputOpt,
    PositionsOpt,
    ProfilesDirOpt,
    PromptOpt,
    PromptsOpt,
    RepeatsOpt,
    ResumeOpt,
    SaveProfileOpt,
    WarmupOpt,
    app,
    command_line,
    console,
    demo_prompts,
    err_console,
    friendly,
    parse_retentions,
    parse_schedules,
    print_error,
    shown,
    threshold_overrides,
    write_reports_or_warn,
)
from lightkv_cli.cli.model_options import DeviceMapOpt, FollowupOpt, OfflineOpt, RevisionOpt, SystemPromptOpt
from lightkv_cli.cli.passes import BatchSizeOpt, TimingBatchOpt, TimingInputsOpt, pass_settings
from lightkv_cli.cli.ray_options import RayAddressOpt, RayOpt, WorkersOpt, ray_options
from lightkv_cli.demo_model import DEMO_NAME
from lightkv_cli.errors import UserError
from lightkv_cli.models.placement import DEVICE_MAPS

if TYPE_CHECKING:  # pragma: no cover
    from lightkv_cli.engine.job import SweepRequest

#: Where ``--config`` leaves the loaded sweep configuration for the command (``ctx.meta``).
_CONFIG_KEY = "lightkv.sweep_config"


def _memory_budget(gpu_memory: str | None) -> dict:
    """``memory_budget`` (bytes) and ``memory_source`` of the settings from ``--gpu-memory``."""
    from lightkv_cli.units import parse_memory_size

    if not gpu_memory:
        return {"memory_budget": None, "memory_source": None}
    return {"memory_budget": parse_memory_size(gpu_memory), "memory_source": f"--gpu-memory {gpu_memory}"}


def _execute_sweep(request: SweepRequest, *, resume: bool, save_profile: str | None, profiles_dir: Path) -> None:
    """Shared body of ``profile`` and ``sweep``: check the options, then, with the output folder locked,
    SIGTERM handled like Ctrl-C and a standard output that may go away (:mod:`lightkv_cli.cli.guard`),
    run ``request``, write the reports, print, save the profile. Exits 1 when the sweep failed (one
    line), 128 + the signal when interrupted, 0 otherwise (also when the reader of stdout went away)."""
    from lightkv_cli.cli.guard import guarded_stdout, stop_signals
    from lightkv_cli.files import OutputLock
    from lightkv_cli.profiles import check_profile_name

    if save_profile is not None:
        check_profile_name(save_profile)
    output = request.output
    if output.exists() and not output.is_dir():
        raise UserError(f"--output '{output}' exists and is not a directory; give a directory for results.json")
    with guarded_stdout() as stdout, stop_signals(), OutputLock(output, command=request.command) as lock:
        code = _sweep_and_report(replace(request, lock=lock), resume, save_profile, profiles_dir)
    if stdout.error is not None and not stdout.closed_by_reader:
        from lightkv_cli.files import describe_os_error

        where = stdout.target or "standard output"
        print_error(
            f"{describe_os_error(stdout.error, 'write the console output to', where)}; "
            f"the console output stopped there, the files in {output} were written"
        )
        code = code or 1
    if code:
        raise typer.Exit(code)


def _sweep_and_report(request: SweepRequest, resume: bool, save_profile: str | None, profiles_dir: Path) -> int:
    """Run the sweep, write the reports, print; return the exit status."""
    from lightkv_cli.engine.job import SweepFailed, SweepInterrupted, run_sweep
    from lightkv_cli.files import describe_os_error
    from lightkv_cli.results import load_results

    output, results_path = request.output, request.results_path
    try:
        previous = None
        if resume and results_path.exists():
            previous = load_results(results_path)
        elif resume:
            console.print(
                f"[yellow]note:[/] nothing to resume in {shown(output)}; starting a new sweep", highlight=False
            )
        prompts = demo_prompts(request.model, request.images, request.prompt, request.prompts, request.videos)
        results = run_sweep(replace(request, prompts=prompts, previous=previous), ConsoleEvents())
    except SweepInterrupted as stop:
        return _interrupted(stop, output, results_path)
    except KeyboardInterrupt as exc:  # before the sweep was planned
        signum = getattr(exc, "signum", 2)
        err_console.print(
            f"[yellow]interrupted{_signal_name(signum)} before any run started: nothing was written to "
            f"{shown(output)}[/]",
            highlight=False,
            soft_wrap=True,
        )
        return 128 + signum
    except SweepFailed as exc:
        print_error(exc)
        return 1
    except OSError as exc:
        print_error(describe_os_error(exc))
        return 1
    try:
        _report(results, output, results_path, save_profile, profiles_dir)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", 2)
        err_console.print(
            f"[yellow]interrupted{_signal_name(signum)} after the sweep: {shown(results_path)} is complete; "
            f"write the reports with: lightkv report {shown(results_path)}[/]",
            highlight=False,
            soft_wrap=True,
        )
        return 128 + signum
    except OSError as exc:
        print_error(f"{describe_os_error(exc)}; {results_path} is complete")
        return 1
    return 0


def _report(results: dict, output: Path, results_path: Path, save_profile: str | None, profiles_dir: Path) -> None:
    """Write the reports (first: a console that goes away loses nothing), print the tables and the
    recommendation, save the profile."""
    from lightkv_cli.profiles import profile_from_results
    from lightkv_cli.profiles import save_profile as write_profile
    from lightkv_cli.report.console import cost_table, quality_table, recommendation_line

    reports = write_reports_or_warn(results, output)
    console.print(cost_table(results))
    console.print(quality_table(results))
    for r in results["runs"]:
        if r.get("status") != "ok":
            err_console.print(f"[red]{shown(r['id'])}: {r['status']}: {shown(r.get('error', ''))}[/]", highlight=False)
    console.print(recommendation_line(results), highlight=False)
    console.print(f"results: {shown(results_path)}", highlight=False)
    if reports:
        console.print(f"reports: {shown(reports[0])}, {shown(reports[1])}", highlight=False)
    if save_profile is not None:
        rec = (results.get("recommendation") or {}).get("run")
        if rec is None:
            raise UserError(f"no profile saved: {results['recommendation'].get('reason', 'no recommendation')}")
        data = profile_from_results(results, rec, save_profile)
        path = write_profile(data, profiles_dir / f"{save_profile}.toml")
        console.print(
            f"profile: {shown(path)} (check it with: lightkv check --profile {shown(path)} --images …)", highlight=False
        )


def _signal_name(signum: int) -> str:
    """`` (SIGTERM)`` for a signal other than Ctrl-C's SIGINT, else ``""``."""
    import signal

    if signum == signal.SIGINT:
        return ""
    try:
        return f" ({signal.Signals(signum).name})"
    except ValueError:
        return f" (signal {signum})"


def _interrupted(stop, output: Path, results_path: Path) -> int:
    """After Ctrl-C or SIGTERM: make the results file match the runs that finished, write their
    reports, say in one line what is where; return 128 + the signal."""
    from lightkv_cli.results import write_json_atomic

    name = _signal_name(stop.signum)
    runs = (stop.results or {}).get("runs") or []
    if not runs:
        earlier = f" (the earlier results are in {shown(stop.moved_aside[0])})" if stop.moved_aside else ""
        during = "during the uncompressed reference run" if stop.results is not None else "while the model loaded"
        err_console.print(
            f"[yellow]interrupted{name} {during}: no run finished, nothing was written to {shown(output)}{earlier}[/]",
            highlight=False,
            soft_wrap=True,
        )
        return 128 + stop.signum
    reports = None
    try:
        write_json_atomic(results_path, stop.results)  # a run may have finished as the signal came
        reports = write_reports_or_warn(stop.results, output)
    except (KeyboardInterrupt, OSError):  # interrupted again, or the disk is full: the last write stands
        pass
    with_reports = " (reports written)" if reports else ""
    err_console.print(
        f"[yellow]interrupted{name}: {len(runs)} finished run(s) are in {shown(results_path)}{with_reports}; "
        "continue with the same command and --resume[/]",
        highlight=False,
        soft_wrap=True,
    )
    return 128 + stop.signum


@app.command()
@friendly
def profile(
    ctx: typer.Context,
    images: ImagesOpt = None,
    model: Annotated[str, typer.Option("--model", "-m", help=ModelHelp)] = DEMO_NAME,
    init: Annotated[str, typer.Option(help=InitHelp)] = "pretrained",
    revision: RevisionOpt = None,
    offline: OfflineOpt = False,
    device_map: DeviceMapOpt = None,
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    video: Annotated[
        list[Path] | None,
        typer.Option(
            "--video",
            help="A video for the Qwen families: a folder of frame images, or a video file (needs the video extra: "
            'pip install "lightkv\\[video]"). Repeat for several.',
        ),
    ] = None,
    retentions: Annotated[
        str,
        typer.Option(
            help="Target average vision retentions, comma-separated; 1.0 is the uncompressed reference, which always "
            "runs."
        ),
    ] = "1.0,0.9,0.75,0.55,0.4",
    guidance: Annotated[
        str, typer.Option(help="LightKV merge guidance: cross (published), prompt or uniform.")
    ] = "cross",
    methods: Annotated[
        str | None,
        typer.Option(
            help="Instead of one LightKV guidance: methods to compare, comma-separated (see `lightkv methods`), e.g. "
            "lightkv,lightkv-prompt,lightkv-uniform,random."
        ),
    ] = None,
    positions: PositionsOpt = "keep",
    max_new_tokens: MaxNewOpt = 32,
    followup: FollowupOpt = None,
    system_prompt: SystemPromptOpt = None,
    batch_size: BatchSizeOpt = "auto",
    timing_inputs: TimingInputsOpt = "8",
    timing_batch: TimingBatchOpt = "1",
    repeats: RepeatsOpt = 3,
    warmup: WarmupOpt = 1,
    min_fidelity: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Recommend the lowest retention whose answer match, top-1 agreement and token agreement are at "
            "least this.",
        ),
    ] = 0.95,
    decide_on: DecideOnOpt = None,
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
    from lightkv_cli.engine.job import SweepRequest
    from lightkv_cli.engine.plan import SweepSettings
    from lightkv_cli.methods.guidance import GUIDANCE_MODES
    from lightkv_cli.methods.registry import METHOD_FOR_GUIDANCE, parse_methods
    from lightkv_cli.scoring.thresholds import Thresholds

    targets = parse_retentions(retentions)
    if guidance not in GUIDANCE_MODES:
        raise UserError(f"--guidance must be one of {', '.join(GUIDANCE_MODES)}, got '{guidance}'")
    if methods is not None and ctx.get_parameter_source("guidance").name != "DEFAULT":
        raise UserError("give either --guidance or --methods, not both (--methods lightkv-prompt is --guidance prompt)")
    settings = SweepSettings(
        methods=parse_methods(methods) if methods is not None else [METHOD_FOR_GUIDANCE[guidance]],
        retentions=targets,
        positions=positions,
        max_new_tokens=max_new_tokens,
        followup=followup,
        system_prompt=system_prompt,
        repeats=repeats,
        warmup=warmup,
        **pass_settings(batch_size, timing_inputs, timing_batch),
        thresholds=Thresholds(
            min_answer_match=min_fidelity, min_top1_agreement=min_fidelity, min_token_agreement=min_fidelity
        ).merged(**threshold_overrides(None, None, None, None, None, None, None, decide_on)),
        **_memory_budget(gpu_memory),
    )
    request = SweepRequest(
        settings,
        model=model,
        init=init,
        revision=revision,
        offline=offline,
        device_map=_device_map(device_map),
        device=device,
        dtype=dtype,
        images=list(images or []),
        videos=list(video or []),
        prompt=prompt,
        prompts=prompts,
        limit=limit,
        output=output,
        command=command_line(ctx),
    )
    _execute_sweep(request, resume=resume, save_profile=save_profile, profiles_dir=profiles_dir)


@friendly
def _load_config(ctx: typer.Context, value: Path | None) -> Path | None:
    """``--config`` (eager): the file's options become the command's defaults (``ctx.default_map``), so
    options given on the command line win; the file is kept in ``ctx.meta`` for its ``[thresholds]`` and
    ``[[schedules]]`` tables, which are not options."""
    if value is not None:
        from lightkv_cli.profiles import load_sweep_config

        cfg = load_sweep_config(value)
        ctx.default_map = {**(ctx.default_map or {}), **cfg.option_defaults()}
        ctx.meta[_CONFIG_KEY] = cfg
    return value


@app.command()
@friendly
def sweep(
    ctx: typer.Context,
    images: ImagesOpt = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="TOML file with any of these options (keys with _ for -); options given on the command line win.",
            is_eager=True,
            callback=_load_config,
        ),
    ] = None,
    model: Annotated[str, typer.Option("--model", "-m", help=ModelHelp)] = DEMO_NAME,
    init: Annotated[str, typer.Option(help=InitHelp)] = "pretrained",
    revision: RevisionOpt = None,
    offline: OfflineOpt = False,
    device_map: DeviceMapOpt = None,
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    methods: Annotated[
        str,
        typer.Option(
            help="Methods, comma-separated (see `lightkv methods`): lightkv, lightkv-prompt, lightkv-uniform, "
            "vlcache, fastv, snapkv, random. Eviction methods (vlcache, snapkv) get the KV budget of each target "
            "retention."
        ),
    ] = "lightkv",
    retentions: Annotated[
        str,
        typer.Option(
            help="Target average vision retentions (schedules generated per target), comma-separated. Default "
            "0.9,0.75,0.55,0.4 unless explicit schedules are given."
        ),
    ] = "0.9,0.75,0.55,0.4",
    layers: Annotated[
        list[str] | None,
        typer.Option("--layers", help="Explicit schedule: stage layers, e.g. 12,18,24 (repeat for a grid)."),
    ] = None,
    windows: Annotated[
        list[str] | None,
        typer.Option(
            "--windows",
            help="Explicit schedule: windows per grid axis per stage, e.g. 4,2,1 (default 4,2,1; repeat for a grid).",
        ),
    ] = None,
    ratios: Annotated[
        list[str] | None,
        typer.Option(
            "--ratios", help="Explicit schedule: merge ratio per stage or one for all, e.g. 0.5 (repeat for a grid)."
        ),
    ] = None,
    positions: PositionsOpt = "keep",
    max_new_tokens: MaxNewOpt = 32,
    followup: FollowupOpt = None,
    system_prompt: SystemPromptOpt = None,
    batch_size: BatchSizeOpt = "auto",
    timing_inputs: TimingInputsOpt = "8",
    timing_batch: TimingBatchOpt = "1",
    repeats: RepeatsOpt = 3,
    warmup: WarmupOpt = 1,
    min_answer_match: MinAnswerOpt = None,
    min_top1: MinTop1Opt = None,
    min_token_agreement: MinTokenOpt = None,
    min_accuracy: MinAccOpt = None,
    max_kl: MaxKlOpt = None,
    max_retention: MaxRetOpt = None,
    max_kv_bytes: MaxKvOpt = None,
    max_prefill_ms: MaxPrefillOpt = None,
    decide_on: DecideOnOpt = None,
    gpu_memory: GpuMemoryOpt = None,
    nvml_interval_ms: NvmlOpt = 20.0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    limit: LimitOpt = None,
    output: OutputOpt = Path("lightkv-sweep"),
    resume: ResumeOpt = False,
    save_profile: SaveProfileOpt = None,
    profiles_dir: ProfilesDirOpt = Path("profiles"),
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Sweep methods × schedules × target retentions; report, recommend and optionally save an operating point."""
    from lightkv_cli.engine.job import SweepRequest
    from lightkv_cli.engine.plan import SweepSettings
    from lightkv_cli.methods.registry import parse_methods
    from lightkv_cli.methods.schedule import Schedule
    from lightkv_cli.scoring.thresholds import Thresholds

    on_ray = ray_options(ray, ray_address, workers, device_map)
    cfg = ctx.meta.get(_CONFIG_KEY)  # the --config file's tables; its options are in the defaults already
    thresholds = Thresholds()
    if cfg is not None and cfg.thresholds is not None:  # decide_on left out of the table keeps the default
        thresholds = thresholds.merged(**cfg.thresholds.set_items(), decide_on=cfg.thresholds.decide_on)
    thresholds = thresholds.merged(
        **threshold_overrides(
            min_answer_match,
            min_top1,
            min_accuracy,
            max_kl,
            max_retention,
            max_kv_bytes,
            max_prefill_ms,
            decide_on,
            min_token=min_token_agreement,
        )
    )
    config_schedules = []
    if cfg is not None and cfg.schedules and not layers:
        config_schedules = [Schedule.build(s.layers, s.windows, s.ratios) for s in cfg.schedules]
    schedules = config_schedules or parse_schedules(layers or [], windows or [], ratios or [])
    # Explicit schedules alone sweep only those; targets run too when given (on the command line or in --config).
    retentions_given = ctx.get_parameter_source("retentions").name != "DEFAULT"
    targets = parse_retentions(retentions) if (retentions_given or not schedules) else []
    settings = SweepSettings(
        methods=parse_methods(methods),
        retentions=targets,
        schedules=schedules,
        positions=positions,
        max_new_tokens=max_new_tokens,
        followup=followup,
        system_prompt=system_prompt,
        repeats=repeats,
        warmup=warmup,
        **pass_settings(batch_size, timing_inputs, timing_batch),
        nvml_interval_ms=nvml_interval_ms,
        thresholds=thresholds,
        **_memory_budget(gpu_memory),
    )
    request = SweepRequest(
        settings,
        model=model,
        init=init,
        revision=revision,
        offline=offline,
        device_map=_device_map(device_map),
        device=device,
        dtype=dtype,
        images=list(images or []),
        prompt=prompt,
        prompts=prompts,
        limit=limit,
        output=output,
        command=command_line(ctx),
        ray=on_ray,
    )
    _execute_sweep(request, resume=resume, save_profile=save_profile, profiles_dir=profiles_dir)


def _device_map(value: str | None) -> str | None:
    """``--device-map``, checked: one of accelerate's strategies.

    Raises:
        UserError: another value.
    """
    if value is not None and value not in DEVICE_MAPS:
        raise UserError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, got '{value}'")
    return value
