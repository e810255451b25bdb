"""``lightkv check``: the CI gate on an existing results file or a re-run of a saved profile."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lightkv_cli.cli.common import (
    ConsoleEvents,
    DeviceOpt,
    DtypeOpt,
    ImagesOpt,
    LimitOpt,
    MaxKlOpt,
    MaxKvOpt,
    MaxPrefillOpt,
    MaxRetOpt,
    MinAccOpt,
    MinAnswerOpt,
    MinTop1Opt,
    PromptOpt,
    PromptsOpt,
    RepeatsOpt,
    WarmupOpt,
    app,
    command_line,
    console,
    demo_prompts,
    err_console,
    friendly,
    resolve_model_name,
    shown,
    threshold_overrides,
    write_reports_or_warn,
)
from lightkv_cli.errors import UserError


@app.command()
@friendly
def check(
    ctx: typer.Context,
    results: Annotated[
        Path | None, typer.Argument(help="Check an existing results.json instead of re-running.")
    ] = None,
    profile_path: Annotated[
        Path | None,
        typer.Option("--profile", help="Operating point to check (profiles/NAME.toml): its schedule and thresholds."),
    ] = None,
    images: ImagesOpt = None,
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model (default: the profile's). Must be the profile's model."),
    ] = None,
    init: Annotated[str | None, typer.Option(help="pretrained or random (default: the profile's).")] = None,
    run: Annotated[
        str | None,
        typer.Option(
            "--run",
            help="With a results file: the run to check (default: the run with the --profile's schedule, else the "
            "recommended run).",
        ),
    ] = None,
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
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Also write the re-run's results.json and reports here.")
    ] = None,
    junit: Annotated[
        Path | None, typer.Option(help="Write a JUnit XML report (one test case per threshold) for CI systems.")
    ] = None,
) -> None:
    """CI gate: exit 0 when the operating point meets every threshold, 1 when one fails, 2 on a usage error."""
    from lightkv_cli.scoring.thresholds import Thresholds, evaluate

    if results is None and profile_path is None:
        raise UserError(
            "give a results file (lightkv check results.json) or --profile profiles/NAME.toml with --images or "
            "--prompts"
        )
    if results is not None and (images or prompts is not None):
        raise UserError("give either a results file to check or --images/--prompts to re-run the profile, not both")
    prof = None
    if profile_path is not None:
        from lightkv_cli.profiles import load_profile

        prof = load_profile(profile_path)
    overrides = threshold_overrides(
        min_answer_match, min_top1, min_accuracy, max_kl, max_retention, max_kv_bytes, max_prefill_ms
    )
    if results is not None:
        from lightkv_cli.results import load_results

        data = load_results(results)
        base = prof.thresholds if prof else Thresholds.from_dict(data.get("thresholds") or {}, f"{results}: thresholds")
        ids = [r.get("id") for r in data["runs"]]
        run_id = (
            run or (_profile_run(prof, data["runs"]) if prof else None) or (data.get("recommendation") or {}).get("run")
        )
        if run_id is None:
            raise UserError(
                f"{results} has no recommended run; name the run to check with --run (runs: {', '.join(ids)})"
            )
        if run_id not in ids:
            raise UserError(f"{results} has no run '{run_id}'; runs: {', '.join(ids)}")
        source = str(results)
    else:
        prompts = demo_prompts(resolve_model_name(model or prof.model.name), images, prompt, prompts)
        if not images and prompts is None:
            raise UserError(f"--profile {profile_path}: give --images or --prompts to re-run the operating point on")
        data, run_id = _rerun_profile(
            ctx, prof, profile_path, images, prompt, prompts, model, init, repeats, warmup, device, dtype, limit, output
        )
        base = prof.thresholds
        source = str(profile_path)
    thresholds = base.merged(**overrides)
    if not thresholds.set_items():
        raise UserError(
            "no thresholds to check: give e.g. --min-answer-match 0.95 or a profile with a [thresholds] table"
        )
    target = next(r for r in data["runs"] if r["id"] == run_id)
    if target.get("status") == "ok":
        checks = evaluate(target, thresholds)
        unmeasured = [c for c in checks if c.measured is None]
        if unmeasured:
            raise UserError(
                f"{unmeasured[0].threshold} is set but {run_id} has no {unmeasured[0].label}: give --prompts with "
                "answers, "
                "or drop the threshold"
            )
    else:
        checks = None
    _print_check(run_id, source, target, thresholds, checks)
    if junit is not None:
        _write_junit(junit, run_id, target, thresholds, checks)
        console.print(f"junit: {shown(junit)}", highlight=False)
    failed = checks is None or any(not c.passed for c in checks)
    raise typer.Exit(1 if failed else 0)


def _profile_run(prof, runs: list[dict]) -> str | None:
    """The id of the run in ``runs`` with the profile's method and schedule, if there is one."""
    m = prof.method

    def rounded(values) -> list | None:
        ok = isinstance(values, list) and all(isinstance(x, (int, float)) for x in values)
        return [round(x, 6) for x in values] if ok else None

    for r in runs:
        p = r.get("params") if isinstance(r.get("params"), dict) else {}
        if not m.uses_schedule:
            if r.get("method") == m.name and r.get("target_retention") == m.target_retention:
                return r.get("id")
            continue
        if (
            r.get("method") == m.name
            and p.get("layers") == m.layers
            and p.get("windows") == m.windows
            and rounded(p.get("ratios")) == rounded(m.ratios)
        ):
            return r.get("id")
    return None


class _ProfileEvents(ConsoleEvents):
    """The console of a profile's re-run: the model must have the profile's depth; say when the inputs
    differ from those the profile was chosen on."""

    def __init__(self, prof, profile_path: Path):
        super().__init__(show_notes=False, model_label=prof.model.name)
        self.prof, self.profile_path = prof, profile_path

    def model_loaded(self, loaded) -> None:
        layers = self.prof.model.layers
        if layers is not None and loaded.adapter.num_layers != layers:
            raise UserError(
                f"profile '{self.profile_path}' is for a {layers}-layer model; '{loaded.name}' has "
                f"{loaded.adapter.num_layers} decoder layers: save a profile for this model with lightkv sweep "
                "--save-profile"
            )

    def ready(self, sweep, moved_aside: Path | None) -> None:
        super().ready(sweep, moved_aside)
        chosen_on = self.prof.inputs
        if chosen_on is not None and chosen_on.fingerprint != sweep.results["inputs_fingerprint"]:
            console.print(
                f"[dim]note: checking on other inputs than the profile was chosen on ({len(sweep.inputs)} here, "
                f"{chosen_on.count} there)[/]",
                highlight=False,
            )


def _rerun_profile(
    ctx, prof, profile_path, images, prompt, prompts, model, init, repeats, warmup, device, dtype, limit, output
):
    """Re-run a profile's operating point and the uncompressed reference; return (results, run id)."""
    from lightkv_cli.engine.ids import run_id
    from lightkv_cli.engine.job import SweepInterrupted, SweepRequest, run_sweep
    from lightkv_cli.engine.plan import SweepSettings
    from lightkv_cli.methods.schedule import Schedule

    want = resolve_model_name(prof.model.name)
    if model is not None and resolve_model_name(model) != want:
        raise UserError(
            f"profile '{profile_path}' is for model '{prof.model.name}', not '{model}'; "
            f"drop --model, or save a profile for '{model}' with lightkv sweep --model {model} --save-profile NAME"
        )
    m = prof.method
    sched = Schedule.build(m.layers, m.windows, m.ratios) if m.uses_schedule else None
    settings = SweepSettings(
        methods=[m.name],
        retentions=[1.0] if sched else [1.0, m.target_retention],
        schedules=[sched] if sched else [],
        positions=m.positions,
        max_new_tokens=prof.settings.max_new_tokens,
        repeats=repeats,
        warmup=warmup,
        thresholds=prof.thresholds,
    )
    request = SweepRequest(
        settings,
        model=model or prof.model.name,
        init=init or prof.model.init,
        device=device,
        dtype=dtype,
        images=list(images or []),
        prompt=prompt,
        prompts=prompts,
        limit=limit,
        output=output,
        backup=False,
        command=command_line(ctx),
    )
    try:
        data = run_sweep(request, _ProfileEvents(prof, profile_path))
    except SweepInterrupted:
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    if output is not None:
        write_reports_or_warn(data, output)
    return data, (run_id(m.name, schedule=sched) if sched else run_id(m.name, target=m.target_retention))


def _print_check(run_id: str, source: str, run: dict, thresholds, checks) -> None:
    from rich.table import Table

    table = Table(title=f"lightkv check · {shown(run_id)} · {shown(source)}")
    for col in ("threshold", "required", "measured", "margin", "result"):
        table.add_column(col, justify="left" if col == "threshold" else "right")
    if checks is None:
        table.add_row("run status", "ok", shown(run.get("status", "?")), "", "[red]FAIL[/]")
        console.print(table)
        console.print(
            f"[bold red]FAIL[/]: {shown(run_id)} did not finish ({shown(run.get('status'))}: "
            f"{shown(run.get('error') or '')})",
            highlight=False,
        )
        return
    for c in checks:
        op = "≥" if c.kind == "min" else "≤"
        measured = "–" if c.measured is None else f"{c.measured:.4g}"
        margin = (
            ""
            if c.measured is None
            else f"{(c.measured - c.required) if c.kind == 'min' else (c.required - c.measured):+.4g}"
        )
        table.add_row(
            c.label, f"{op} {c.required:.4g}", measured, margin, "[green]pass[/]" if c.passed else "[red]FAIL[/]"
        )
    console.print(table)
    failed = [c for c in checks if not c.passed]
    if failed:
        console.print(
            f"[bold red]FAIL[/]: {len(failed)} of {len(checks)} thresholds failed: "
            + "; ".join(shown(c.describe()) for c in failed),
            highlight=False,
        )
    else:
        console.print(f"[bold green]PASS[/]: {shown(run_id)} meets all {len(checks)} thresholds", highlight=False)


def _write_junit(path: Path, run_id: str, run: dict, thresholds, checks) -> None:
    """JUnit XML: one test suite, one test case per threshold (or one for a run that did not finish)."""
    import xml.etree.ElementTree as ET

    cases = []
    if checks is None:
        cases.append(("run status", f"{run_id} did not finish: {run.get('status')}: {run.get('error', '')}"))
    else:
        cases += [(c.threshold, None if c.passed else c.describe()) for c in checks]
    suite = ET.Element(
        "testsuite",
        name="lightkv check",
        tests=str(len(cases)),
        failures=str(sum(1 for _, f in cases if f)),
        errors="0",
    )
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
