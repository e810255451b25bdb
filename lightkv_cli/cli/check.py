"""``lightkv check``: the CI gate on an existing results file or a re-run of a saved profile.

Two kinds of gate: thresholds (:func:`~lightkv_cli.scoring.thresholds.evaluate`; quality compared on the
lower 95% bound or the mean, as ``decide_on`` says) and, with ``--max-drop``, a paired test against the
uncompressed run on the same inputs (:func:`~lightkv_cli.scoring.paired.paired_tests`): it fails when a
0/1 metric dropped *significantly* more than the margin (one-sided, 95%).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lightkv_cli.cli.common import (
    ConsoleEvents,
    DecideOnOpt,
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
    MinTokenOpt,
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
    min_token_agreement: MinTokenOpt = None,
    min_accuracy: MinAccOpt = None,
    max_kl: MaxKlOpt = None,
    max_retention: MaxRetOpt = None,
    max_kv_bytes: MaxKvOpt = None,
    max_prefill_ms: MaxPrefillOpt = None,
    decide_on: DecideOnOpt = None,
    max_drop: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Paired test against the uncompressed run on the same inputs: fail when answer match, top-1 "
            "agreement or accuracy dropped significantly more than this (a fraction of inputs; one-sided 95%: exact "
            "binomial, Tango score test for accuracy, with the McNemar p-value).",
        ),
    ] = None,
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

    if max_drop is not None and max_drop >= 1.0:
        raise UserError(f"--max-drop must be below 1 (a fraction of inputs), got {max_drop:g}")
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
    if not thresholds.set_items() and max_drop is None:
        raise UserError(
            "no thresholds to check: give e.g. --min-answer-match 0.95, --max-drop 0.02 or a profile with a "
            "[thresholds] table"
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
    paired = _paired(data, target, max_drop, source) if max_drop is not None and checks is not None else []
    _print_check(run_id, source, target, thresholds, checks, paired)
    if junit is not None:
        _write_junit(junit, run_id, target, thresholds, checks, paired)
        console.print(f"junit: {shown(junit)}", highlight=False)
    failed = checks is None or any(not c.passed for c in checks) or any(not p.passed for p in paired)
    raise typer.Exit(1 if failed else 0)


def _paired(data: dict, target: dict, max_drop: float, source: str) -> list:
    """The paired tests of ``target`` against the uncompressed run of ``data`` (empty when ``target`` is it).

    Raises:
        UserError: no finished uncompressed run, or no per-input scores to pair.
    """
    from lightkv_cli.scoring.paired import paired_tests

    base = next((r for r in data["runs"] if r.get("method") == "uncompressed" and r.get("status") == "ok"), None)
    if base is None:
        raise UserError(f"--max-drop compares with the uncompressed run, but {source} has none that finished")
    if base is target:
        console.print("[dim]--max-drop: the checked run is the uncompressed run itself; nothing dropped[/]")
        return []
    paired = paired_tests(target, base, max_drop)
    if not paired:
        raise UserError(
            f"--max-drop needs per-input scores (runs[].per_input[].quality) of {target.get('id')} and the "
            f"uncompressed run on the same inputs; {source} has none: re-run the sweep with this lightkv"
        )
    return paired


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


def _basis(c) -> str:
    """What the check table's ``compared`` column says about a threshold check."""
    if c.basis in ("lower-bound", "upper-bound"):
        side = "lower" if c.basis == "lower-bound" else "upper"
        n = f", {c.n_inputs} inputs" if c.n_inputs else ""
        return f"{side} 95% bound (mean {c.estimate:.4g}{n})"
    if c.basis == "mean":
        return "mean" + (" (no interval recorded)" if c.note and "no interval" in c.note else "")
    return "measured"


def _p(v) -> str:
    return "–" if v is None else f"{v:.3g}"


def _print_paired(paired: list, run_id: str) -> None:
    from rich.table import Table

    table = Table(title=f"paired test · {shown(run_id)} vs uncompressed · one-sided 95%")
    cols = ("metric", "test", "inputs", "uncompressed", "this run", "drop", "95% lower bound", "p", "McNemar p")
    for col in (*cols, "result"):
        table.add_column(col, justify="left" if col in ("metric", "test") else "right")
    for p in paired:
        result = ("[green]pass[/]" if p.passed else "[red]FAIL[/]") if p.gated else "[dim]info[/]"
        bound = f"{p.lower:.4g}" + (f" {'≤' if p.passed else '>'} {p.margin:g}" if p.gated else "")
        table.add_row(
            p.label,
            p.test,
            str(p.n),
            f"{p.reference:.4g}",
            f"{p.value:.4g}",
            f"{p.drop:+.4g}",
            bound,
            _p(p.p_value),
            _p(p.mcnemar_p),
            result,
        )
    console.print(table)


def _print_check(run_id: str, source: str, run: dict, thresholds, checks, paired=()) -> None:
    from rich.table import Table

    table = Table(title=f"lightkv check · {shown(run_id)} · {shown(source)}")
    for col in ("threshold", "compared", "required", "measured", "margin", "result"):
        table.add_column(col, justify="left" if col in ("threshold", "compared") else "right")
    if checks is None:
        table.add_row("run status", "", "ok", shown(run.get("status", "?")), "", "[red]FAIL[/]")
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
            c.label,
            _basis(c),
            f"{op} {c.required:.4g}",
            measured,
            margin,
            "[green]pass[/]" if c.passed else "[red]FAIL[/]",
        )
    if checks:
        console.print(table)
    if paired:
        _print_paired(paired, run_id)
    failed = [c.describe() for c in checks if not c.passed]
    gated = [p for p in paired if p.gated]
    failed += [p.describe() for p in gated if not p.passed]
    total = len(checks) + len(gated)
    what = "thresholds" if not gated else ("paired tests" if not checks else "thresholds and paired tests")
    if failed:
        console.print(
            f"[bold red]FAIL[/]: {len(failed)} of {total} {what} failed: " + "; ".join(shown(f) for f in failed),
            highlight=False,
        )
    else:
        console.print(f"[bold green]PASS[/]: {shown(run_id)} meets all {total} {what}", highlight=False)


def _junit_number(v) -> str:
    return "" if v is None else repr(float(v))


def _write_junit(path: Path, run_id: str, run: dict, thresholds, checks, paired=()) -> None:
    """JUnit XML: one test suite, one test case per threshold (or one for a run that did not finish) and per
    metric of the paired test (``max_drop.<metric>``); each case carries ``<properties>``: for a threshold
    ``compared`` (lower-bound, upper-bound, mean, measured), ``value``, ``estimate``; for the paired test
    ``p_value`` (one-sided, at the margin), ``mcnemar_p``, ``drop``, ``lower_bound``, ``margin``, ``test``, ``n``.
    The paired test's message holds its p-value too."""
    import xml.etree.ElementTree as ET

    cases = []  # (name, failure text or None, properties)
    if checks is None:
        cases.append(("run status", f"{run_id} did not finish: {run.get('status')}: {run.get('error', '')}", {}))
    else:
        cases += [
            (
                c.threshold,
                None if c.passed else c.describe(),
                {"compared": c.basis, "value": _junit_number(c.measured), "estimate": _junit_number(c.estimate)},
            )
            for c in checks
        ]
    for p in paired:
        props = {
            "test": p.test,
            "n": str(p.n),
            "drop": _junit_number(p.drop),
            "lower_bound": _junit_number(p.lower),
            "margin": _junit_number(p.margin) if p.gated else "",
            "p_value": _junit_number(p.p_value),
            "mcnemar_p": _junit_number(p.mcnemar_p),
        }
        cases.append((f"max_drop.{p.metric}", None if p.passed else p.describe(), props))
    suite = ET.Element(
        "testsuite",
        name="lightkv check",
        tests=str(len(cases)),
        failures=str(sum(1 for _, f, _ in cases if f)),
        errors="0",
    )
    for name, failure, props in cases:
        case = ET.SubElement(suite, "testcase", classname=f"lightkv.check.{run_id}", name=name)
        if props:
            properties = ET.SubElement(case, "properties")
            for key, value in props.items():
                ET.SubElement(properties, "property", name=key, value=value)
        if failure:
            kind = "paired-test" if name.startswith("max_drop.") else "threshold"
            ET.SubElement(case, "failure", message=failure, type=kind).text = failure
        elif name.startswith("max_drop."):
            text = next(p.describe() for p in paired if name == f"max_drop.{p.metric}")
            ET.SubElement(case, "system-out").text = text
    root = ET.Element("testsuites")
    root.append(suite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
    except OSError as exc:
        raise UserError(f"--junit '{path}': cannot write ({exc.strerror or exc}); give a writable path") from None
