"""``lightkv profile`` and ``lightkv sweep``: load, run the sweep, print, report, save the profile."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from lightkv_cli.cli.common import (
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
    check_output_dir,
    command_line,
    console,
    demo_prompts,
    err_console,
    friendly,
    load_inputs,
    parse_retentions,
    parse_schedules,
    run_with_progress,
    threshold_overrides,
    write_reports_or_warn,
)
from lightkv_cli.demo_model import DEMO_NAME
from lightkv_cli.errors import UserError


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


def _execute_sweep(ctx, req: _SweepRequest) -> None:
    """Shared body of ``profile`` and ``sweep``: validate, load, run, report, save the profile."""
    from lightkv_cli.engine.plan import SweepSettings
    from lightkv_cli.engine.prepare import prepare_inputs
    from lightkv_cli.engine.sweep import Sweep
    from lightkv_cli.profiles import check_profile_name, profile_from_results, save_profile
    from lightkv_cli.report.console import cost_table, quality_table, recommendation_line
    from lightkv_cli.results import load_results
    from lightkv_cli.units import parse_memory_size

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
    prompts = demo_prompts(req.model, req.images, req.prompt, req.prompts, req.videos)
    loaded_images, items, skipped = load_inputs(req.images, req.prompt, prompts, req.limit, req.videos)
    if not items:
        raise UserError("nothing could be processed: no readable image among the inputs (see the skipped lines above)")
    check_output_dir(req.output)

    from lightkv_cli.models.loader import load_model

    with console.status(f"loading model '{req.model}'…"):
        lm = load_model(req.model, init=req.init, device=req.device, dtype=req.dtype)
    for note in lm.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    from lightkv_cli.methods.registry import METHODS

    no_schedule = [m for m in req.methods if not METHODS[m].schedules]
    if req.schedules and no_schedule:
        console.print(
            f"[yellow]note:[/] {', '.join(no_schedule)} take(s) no LightKV schedule: the explicit "
            "--layers/--windows/--ratios schedules run for the other methods only",
            highlight=False,
        )
    settings = SweepSettings(
        methods=req.methods,
        retentions=req.retentions,
        schedules=req.schedules,
        positions=req.positions,
        max_new_tokens=req.max_new_tokens,
        repeats=req.repeats,
        warmup=req.warmup,
        nvml_interval_ms=req.nvml_interval_ms,
        thresholds=req.thresholds,
        memory_budget=memory_budget,
        memory_source=memory_source,
    )
    inputs = prepare_inputs(lm, loaded_images, items)
    sweep = Sweep(
        lm,
        inputs,
        settings,
        command=command_line(ctx),
        skipped=[{"path": str(s.path), "reason": s.reason} for s in skipped],
        results_path=results_path,
        previous=previous,
    )
    if sweep.resumed:
        console.print(
            f"resuming: {len(sweep.resumed)} run(s) already in {results_path}, {len(sweep.pending)} to go",
            highlight=False,
        )
    elif results_path.exists() and not req.resume:
        backup = results_path.with_name("results.json.bak")
        os.replace(results_path, backup)
        console.print(
            f"[yellow]note:[/] the previous results were moved to {backup} (use --resume to continue a sweep)",
            highlight=False,
        )
    try:
        results = run_with_progress(sweep)
    except KeyboardInterrupt:
        done = len(sweep.results["runs"])
        write_reports_or_warn(sweep.results, req.output)
        err_console.print(
            f"[yellow]interrupted: {done} finished run(s) are in {results_path}; "
            f"continue with the same command and --resume[/]",
            highlight=False,
        )
        raise typer.Exit(130) from None
    console.print(cost_table(results))
    console.print(quality_table(results))
    for r in results["runs"]:
        if r.get("status") != "ok":
            err_console.print(f"[red]{r['id']}: {r['status']}: {r.get('error', '')}[/]", highlight=False)
    console.print(recommendation_line(results), highlight=False)
    reports = write_reports_or_warn(results, req.output)
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
@friendly
def profile(
    ctx: typer.Context,
    images: ImagesOpt = None,
    model: Annotated[str, typer.Option("--model", "-m", help=ModelHelp)] = DEMO_NAME,
    init: Annotated[str, typer.Option(help=InitHelp)] = "pretrained",
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    video: Annotated[
        list[Path] | None,
        typer.Option(
            "--video",
            help="A video for the Qwen families: a folder of frame images, or a video file (needs the video extra: "
            'pip install "lightkv[video]"). Repeat for several.',
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
    repeats: RepeatsOpt = 3,
    warmup: WarmupOpt = 1,
    min_fidelity: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Recommend the lowest retention whose answer match and top-1 agreement are at least this.",
        ),
    ] = 0.95,
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
    from lightkv_cli.methods.registry import METHOD_FOR_GUIDANCE, parse_methods
    from lightkv_cli.scoring.thresholds import Thresholds

    targets = parse_retentions(retentions)
    if guidance not in GUIDANCE_MODES:
        raise UserError(f"--guidance must be one of {', '.join(GUIDANCE_MODES)}, got '{guidance}'")
    if methods is not None and ctx.get_parameter_source("guidance").name != "DEFAULT":
        raise UserError("give either --guidance or --methods, not both (--methods lightkv-prompt is --guidance prompt)")
    req = _SweepRequest(
        images=list(images or []),
        model=model,
        init=init,
        prompt=prompt,
        prompts=prompts,
        methods=parse_methods(methods) if methods is not None else [METHOD_FOR_GUIDANCE[guidance]],
        retentions=targets,
        schedules=[],
        positions=positions,
        max_new_tokens=max_new_tokens,
        repeats=repeats,
        warmup=warmup,
        thresholds=Thresholds(min_answer_match=min_fidelity, min_top1_agreement=min_fidelity),
        gpu_memory=gpu_memory,
        nvml_interval_ms=20.0,
        device=device,
        dtype=dtype,
        limit=limit,
        output=output,
        resume=resume,
        save_profile=save_profile,
        profiles_dir=profiles_dir,
        videos=list(video or []),
    )
    _execute_sweep(ctx, req)


@app.command()
@friendly
def sweep(
    ctx: typer.Context,
    images: ImagesOpt = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="TOML file with any of these options (keys with _ for -); options given on the command line win."
        ),
    ] = None,
    model: Annotated[str, typer.Option("--model", "-m", help=ModelHelp)] = DEMO_NAME,
    init: Annotated[str, typer.Option(help=InitHelp)] = "pretrained",
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
    from lightkv_cli.scoring.thresholds import Thresholds

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
    thresholds = thresholds.merged(
        **threshold_overrides(
            min_answer_match, min_top1, min_accuracy, max_kl, max_retention, max_kv_bytes, max_prefill_ms
        )
    )
    schedules = config_schedules or parse_schedules(layers or [], windows or [], ratios or [])
    # Explicit schedules alone sweep only those; targets run too when given.
    targets = parse_retentions(opts["retentions"]) if (retentions_given or not schedules) else []
    req = _SweepRequest(
        images=list(opts.get("images") or []),
        model=opts["model"],
        init=opts["init"],
        prompt=opts.get("prompt"),
        prompts=opts.get("prompts"),
        methods=parse_methods(opts["methods"]),
        retentions=targets,
        schedules=schedules,
        positions=opts["positions"],
        max_new_tokens=opts["max_new_tokens"],
        repeats=opts["repeats"],
        warmup=opts["warmup"],
        thresholds=thresholds,
        gpu_memory=opts.get("gpu_memory"),
        nvml_interval_ms=opts["nvml_interval_ms"],
        device=opts["device"],
        dtype=opts["dtype"],
        limit=opts.get("limit"),
        output=Path(opts["output"]),
        resume=resume,
        save_profile=opts.get("save_profile"),
        profiles_dir=profiles_dir,
    )
    _execute_sweep(ctx, req)
