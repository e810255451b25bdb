"""The results file (``results.json``, schema ``lightkv.results/2``, fields in docs/results-schema.md):
its pydantic model, validate, load, write atomically. No torch: ``lightkv report`` and ``lightkv check
results.json`` read results through this module alone.

The model (:class:`ResultsFile`) is what a reader may rely on: ``schema`` names this format,
``runs`` is a list of runs with an ``id``, a ``method`` and a ``status``, and the ``thresholds``
section is a :class:`~lightkv_cli.scoring.thresholds.Thresholds`. Everything else may be missing
(older files) or null (a non-finite number, or not measured), and keys this version does not know
are kept (``extra="allow"``), so a file written by a later 1.x lightkv still reads. Version 1 files
(one blocked, unpaired timing per run; no ``quality_pass``, ``timing_pass`` or ``runs[].timing``) still
read: every field version 2 added is optional. Readers get
the plain dictionary back (:func:`load_results`), not the model.

Longer than most modules, and one cohesive thing: the schema of one file format (one pydantic model per
section), with the only code that reads, checks for resume and writes that format.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from lightkv_cli import __version__
from lightkv_cli.errors import UserError
from lightkv_cli.files import write_text_atomic
from lightkv_cli.schemas import explain
from lightkv_cli.scoring.thresholds import ThresholdsSection

SCHEMA_NAME = "lightkv.results"


SCHEMA_VERSION = 2


#: The ``schema`` value this version writes: ``lightkv.results/2``.
SCHEMA = f"{SCHEMA_NAME}/{SCHEMA_VERSION}"


# A number the writer may leave null: not measured, or non-finite (JSON has no infinity).
Num = float | None


Count = int | None


# A 95% interval: [low, high].
Interval = Annotated[list[Num], Field(min_length=2, max_length=2)]


class _Open(BaseModel):
    """A section of the results file: known keys typed, unknown keys kept (forward compatible)."""

    model_config = ConfigDict(extra="allow")


class EnvironmentNvml(_Open):
    """``environment.nvml``: what NVML reports about the GPU (``available`` false on CPU)."""

    available: bool | None = None
    note: str | None = None
    device_name: str | None = None
    driver: str | None = None


class Environment(_Open):
    """``environment``: software and hardware of the measurement; memory in bytes."""

    python: str | None = None
    torch: str | None = None
    transformers: str | None = None
    platform: str | None = None
    device: str | None = None
    device_name: str | None = None
    cpu_count: Count = None
    total_memory_bytes: Num = None
    cuda: bool | None = None
    dtype: str | None = None
    nvml: EnvironmentNvml | None = None


class ModelInfo(_Open):
    """``model``: the model measured (sizes in layers, heads, tokens, parameters, bytes)."""

    name: str | None = None
    source: str | None = None
    family: str | None = None
    architecture: str | None = None
    init: str | None = None
    weights_meaningful: bool | None = None
    layers: Count = None
    hidden_size: Count = None
    num_attention_heads: Count = None
    num_key_value_heads: Count = None
    head_dim: Count = None
    vision_tokens_per_image: Count = None
    image_grid: list[Count] | None = None
    dynamic_resolution: bool | None = None
    supports_video: bool | None = None
    parameters: Count = None
    weight_bytes: Num = None
    dtype: str | None = None
    device: str | None = None


class ScheduleRecord(_Open):
    """One entry of ``settings.schedules``: decoder layers, merge windows, ratios per stage."""

    layers: list[int] | None = None
    windows: list[int] | None = None
    ratios: list[Num] | None = None


class Settings(_Open):
    """``settings``: the sweep's grid and measurement knobs (``nvml_interval_ms`` in milliseconds)."""

    methods: list[str] | None = None
    retentions: list[Num] | None = None
    schedules: list[ScheduleRecord] | None = None
    positions: str | None = None
    max_new_tokens: Count = None
    followup: str | None = None
    system_prompt: str | None = None
    batch_size: Count = None
    timing_inputs: Count = None
    timing_batches: list[int] | None = None
    repeats: Count = None
    warmup: Count = None
    seed: Count = None
    nvml_interval_ms: Num = None


class Capacity(_Open):
    """``capacity``: the memory budget of capacity planning and the weights, bytes."""

    memory_bytes: Num = None
    source: str | None = None
    weight_bytes: Num = None


class InputRecord(_Open):
    """One entry of ``inputs``: an image or video, its question and answer, its token counts."""

    id: str | None = None
    image: str | None = None
    kind: str | None = None
    sha256: str | None = None
    width: Count = None
    height: Count = None
    question: str | None = None
    answer: str | None = None
    type: str | None = None
    tags: list[str] | None = None
    prompt_tokens: Count = None
    vision_tokens: Count = None
    preprocess_ms: Num = None


class SkippedInput(_Open):
    """One entry of ``skipped``: an input that could not be used, and why."""

    path: str | None = None
    reason: str | None = None


def _plain_number_as_median(v: object) -> object:
    """Older files stored some times as a plain number (the median); read it as ``{"median": v}``."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return {"median": v}
    return v


class TimeSpread(_Open):
    """A Spread of times over repeats × inputs, milliseconds (``n``: how many)."""

    median: Num = None
    p25: Num = None
    p75: Num = None
    min: Num = None
    max: Num = None
    n: Count = None


SpreadField = Annotated[TimeSpread | None, BeforeValidator(_plain_number_as_median)]


class RunNvml(_Open):
    """``run.nvml``: the NVML sampler of one run (bytes, percent, milliseconds)."""

    available: bool | None = None
    note: str | None = None
    interval_ms: Num = None
    samples: Count = None
    peak_used_bytes: Num = None
    baseline_used_bytes: Num = None
    peak_utilization_pct: Num = None
    mean_utilization_pct: Num = None
    timeline: dict[str, list[Num]] | None = None


class RunCapacity(_Open):
    """``run.capacity``: bytes per request and how many requests fit in the budget."""

    kv_bytes_per_request: Num = None
    activation_reserve_bytes: Num = None
    max_concurrent_requests: Count = None
    ratio_vs_uncompressed: Num = None


class Quality(_Open):
    """``run.quality``: fidelity to the uncompressed run, accuracy
    (fractions in [0, 1]; KL in nats), and 95% intervals ``ci`` (Wilson score intervals for the 0/1
    metrics, percentile bootstrap for token F1 and KL; older files: bootstrap for all)."""

    answer_match: Num = None
    token_f1: Num = None
    top1_agreement: Num = None
    first_token_kl_mean: Num = None
    first_token_kl_max: Num = None
    accuracy: Num = None
    n_inputs: Count = None
    n_with_answers: Count = None
    ci: dict[str, Interval | None] | None = None
    prefill_unchanged: bool | None = None
    token_agreement: Num = None
    continuation_kl_mean: Num = None
    continuation_kl_max: Num = None
    continuation_llr: Num = None
    continuation_tokens: Count = None
    followup_match: Num = None
    followup_accuracy: Num = None
    n_followups: Count = None


class InputQuality(_Open):
    """``run.per_input[].quality``: one input's scores against the uncompressed run (KL in nats)."""

    exact_match: Num = None
    token_f1: Num = None
    top1_agreement: Num = None
    first_token_kl: Num = None
    accuracy: Num = None
    continuation_kl: Num = None
    continuation_kl_max: Num = None
    token_agreement: Num = None
    continuation_llr: Num = None
    continuation_tokens: Count = None
    followup_match: Num = None
    followup_accuracy: Num = None


class PerInput(_Open):
    """One entry of ``run.per_input``: the answer and the measurements of one input (bytes, ms, FLOPs)."""

    input: str | None = None
    answer: str | None = None
    generated_tokens: Count = None
    vision_retention: Num = None
    kv_bytes: Num = None
    kv_bytes_vision: Num = None
    prefill_ms: Num = None
    decode_ms_per_token: Num = None
    flops_prefill: Num = None
    quality: InputQuality | None = None
    per_image_retention: list[Num] | None = None
    followup_answer: str | None = None


class PairedRatioRecord(_Open):
    """A paired timing ratio to the uncompressed run: the median of per-(input, round) ratios and its 95%
    bootstrap interval ``[low, high]`` over ``n`` pairs (unitless)."""

    median: Num = None
    low: Num = None
    high: Num = None
    n: Count = None


class TimingRatios(_Open):
    """``ratio`` of a timing batch: paired ratios of prefill, time to first token and decode ms/token."""

    prefill: PairedRatioRecord | None = None
    time_to_first_token: PairedRatioRecord | None = None
    decode_ms_per_token: PairedRatioRecord | None = None


class TimingBatch(_Open):
    """``runs[].timing.batches[]``: the timing pass of one run at one batch size (ms, bytes)."""

    batch_size: int
    status: str | None = None
    error: str | None = None
    units: list[list[str]] | None = None
    samples: dict[str, list[list[Num]]] | None = None
    prefill_ms: SpreadField = None
    time_to_first_token_ms: SpreadField = None
    decode_ms_per_token: SpreadField = None
    tokens_per_s: Num = None
    peak_memory_bytes: Num = None
    peak_memory_kind: str | None = None
    peak_memory_per_device: dict[str, Num] | None = None
    nvml: RunNvml | None = None
    ratio: TimingRatios | None = None


class RunTiming(_Open):
    """``runs[].timing``: the timing pass of one run, one entry per timing batch size."""

    batches: list[TimingBatch] | None = None


class Run(_Open):
    """One run: a method at a target retention or schedule, or the uncompressed reference.

    ``id``, ``method`` and ``status`` are required (``lightkv check`` finds runs by id); the
    measurements are present when ``status`` is ``ok``. Bytes, milliseconds, FLOPs; retentions are
    fractions.
    """

    id: str
    method: str
    status: str
    error: str | None = None
    params: dict[str, Any] | None = None
    target_retention: Num = None
    expected_retention: Num = None
    vision_retention: Num = None
    kv_bytes: Num = None
    kv_bytes_vision: Num = None
    kv_bytes_per_layer: list[Num] | None = None
    cached_tokens_per_layer: list[Num] | None = None
    vision_tokens_per_layer: list[Num] | None = None
    kv_ratio: Num = None
    kv_vision_ratio: Num = None
    flops_ratio: Num = None
    prefill_ms: SpreadField = None
    time_to_first_token_ms: SpreadField = None
    decode_ms_per_token: SpreadField = None
    tokens_per_s: Num = None
    timing_ratio: TimingRatios | None = None
    timing_batch_size: Count = None
    quality_batch_size: Count = None
    timing: RunTiming | None = None
    peak_memory_bytes: Num = None
    peak_memory_kind: str | None = None
    peak_memory_per_device: dict[str, Num] | None = None
    nvml: RunNvml | None = None
    flops_prefill: Num = None
    capacity: RunCapacity | None = None
    quality: Quality | None = None
    per_input: list[PerInput] | None = None

    @field_validator("id", "method", "status")
    @classmethod
    def _named(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("is empty")
        return v


class Failure(_Open):
    """One threshold the closest run missed: ``required``, ``measured`` (the value compared) and the shortfall
    ``short_by``; ``basis`` says which value was compared (``lower-bound``, ``upper-bound``, ``mean``,
    ``measured``) and ``estimate`` is the mean (absent in older files)."""

    run: str | None = None
    threshold: str | None = None
    required: Num = None
    measured: Num = None
    short_by: Num = None
    text: str | None = None
    basis: str | None = None
    estimate: Num = None


class Recommendation(_Open):
    """``recommendation``: the chosen run (or null) and why, with what the closest run missed."""

    run: str | None = None
    method: str | None = None
    reason: str | None = None
    failures: list[Failure] | None = None
    target_retention: Num = None
    vision_retention: Num = None
    kv_bytes: Num = None
    kv_bytes_vision: Num = None


def _schema_version(schema: object) -> int | None:
    """The version of a ``lightkv.results/N`` value; None when it is not one."""
    if not isinstance(schema, str) or not schema.startswith(SCHEMA_NAME + "/"):
        return None
    tail = schema.split("/", 1)[1]
    return int(tail) if tail.isdigit() else None


class QualityPass(_Open):
    """``quality_pass``: the batch size the quality pass used, how it was chosen, and its notes."""

    batch_size: Count = None
    batch_size_source: str | None = None
    notes: list[str] | None = None


class TimingPass(_Open):
    """``timing_pass``: the inputs, batch sizes and rounds of the timing pass, and each round's run order."""

    inputs: list[str] | None = None
    batch_sizes: list[int] | None = None
    rounds: Count = None
    rounds_done: Count = None
    warmup: Count = None
    seed: Count = None
    order: list[list[str]] | None = None


class ResultsFile(_Open):
    """A whole ``results.json`` (docs/results-schema.md) that this version reads.

    Strict where readers depend on it: ``schema`` is ``lightkv.results/N`` with ``N`` at most
    :data:`SCHEMA_VERSION`, ``runs`` is a list of :class:`Run`, ``thresholds`` a
    :class:`~lightkv_cli.scoring.thresholds.Thresholds` (keys left out are unset). Every other
    section may be missing.
    """

    schema_: str = Field(alias="schema")
    tool_version: str | None = None
    created: str | None = None
    command: str | None = None
    environment: Environment | None = None
    model: ModelInfo | None = None
    settings: Settings | None = None
    thresholds: ThresholdsSection | None = None
    capacity: Capacity | None = None
    inputs: list[InputRecord] | None = None
    inputs_fingerprint: str | None = None
    skipped: list[SkippedInput] | None = None
    quality_pass: QualityPass | None = None
    timing_pass: TimingPass | None = None
    runs: list[Run]
    recommendation: Recommendation | None = None
    complete: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _readable(cls, v: str) -> str:
        version = _schema_version(v)
        if version is None:
            raise ValueError(f"expected {SCHEMA}")
        if version > SCHEMA_VERSION:
            raise ValueError(f"newer than this lightkv {__version__} reads ({SCHEMA}); upgrade lightkv")
        return v


def check_schema(results: object, where: str) -> dict:
    """Validate that ``results`` is a results dictionary this version can read (:class:`ResultsFile`).

    Args:
        results: the parsed JSON.
        where: names the file in error messages (a path, or "the results file to resume").

    Returns:
        ``results`` itself, unchanged (a plain dict).

    Raises:
        UserError: not a lightkv results file, one written by a newer lightkv (newer schema), no list
            of runs, or a field of the wrong type (one line naming the field, e.g. ``runs.0.id``).
    """
    schema = results.get("schema") if isinstance(results, dict) else None
    if not isinstance(schema, str) or not schema.startswith(SCHEMA_NAME + "/"):
        raise UserError(
            f'{where} is not a lightkv results file (no "schema": "{SCHEMA}"); give the results.json a sweep wrote'
        )
    version = _schema_version(schema)
    if version is None:
        raise UserError(f"{where}: unknown schema '{schema}'; expected {SCHEMA}")
    if version > SCHEMA_VERSION:
        raise UserError(
            f"{where} uses schema {schema}, newer than this lightkv {__version__} reads ({SCHEMA}); "
            "upgrade lightkv (pip install -U lightkv) to read it"
        )
    if not isinstance(results.get("runs"), list):
        raise UserError(f"{where}: the results file has no list of runs; it is damaged or not from lightkv")
    fix = "the results file is damaged or not from lightkv; give the results.json a sweep wrote"
    try:
        ResultsFile.model_validate(results)
    except ValidationError as exc:
        raise explain(exc, ResultsFile, where, fix) from None
    except RecursionError:
        raise UserError(f"{where}: nested too deeply; {fix}") from None
    return results


def load_results(path: Path) -> dict:
    """Read and validate a results file (:func:`check_schema`).

    Returns:
        The results as a plain dict.

    Raises:
        UserError: missing or unreadable file, invalid JSON, not a results file, a newer schema, or a
            field of the wrong type.
    """
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"results file '{path}' does not exist; give the results.json a sweep wrote") from None
    except IsADirectoryError:
        raise UserError(f"results file '{path}' is a directory; give the results.json inside it") from None
    except OSError as exc:
        raise UserError(f"cannot read '{path}': {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(
            f"'{path}' is not a lightkv results file: line {line} is not UTF-8 text (a binary or damaged file); "
            "give the results.json a sweep wrote"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"'{path}' is not valid JSON (line {exc.lineno}: {exc.msg}); was the file cut short?") from None
    except RecursionError:
        raise UserError(f"'{path}' is not a lightkv results file (JSON nested too deeply); it is damaged") from None
    return check_schema(data, str(path))


#: The recorded settings a resumed sweep must share with the command that resumes it (changing any of
#: them would mix runs measured one way with runs measured another under one set of settings).
RESUME_SETTINGS = (
    "methods",
    "retentions",
    "schedules",
    "positions",
    "max_new_tokens",
    "timing_inputs",
    "timing_batches",
    "repeats",
    "warmup",
    "seed",
)


def _comparable(key: str, value: object) -> object:
    """A recorded setting in a form where order and float formatting do not matter."""
    if key == "retentions" and isinstance(value, list):
        return sorted({round(float(v), 6) for v in value if isinstance(v, (int, float))})
    if key == "methods" and isinstance(value, list):
        return sorted({str(v) for v in value})
    if key == "schedules" and isinstance(value, list):
        return sorted(json.dumps(v, sort_keys=True) for v in value)
    return value


def _shown(key: str, value: object) -> str:
    if value is None:
        return "not recorded"
    if isinstance(value, list) and key in ("retentions", "methods"):
        return ",".join(str(v) for v in value) or "none"
    if isinstance(value, list) and key == "schedules":
        return (
            "; ".join(
                "/".join(f"{k} {','.join(map(str, v))}" for k, v in d.items() if isinstance(v, list))
                if isinstance(d, dict)
                else str(d)
                for d in value
            )
            or "none"
        )
    return str(value)


def check_resume(previous: dict, settings: dict, where: object = None) -> None:
    """Refuse to resume ``previous`` (a validated results dictionary) with other settings.

    Args:
        previous: the results file being resumed.
        settings: the ``settings`` section the resuming command would record.
        where: the results file, for the message.

    Raises:
        UserError: the file has no ``model`` or ``settings`` section, or one of
            :data:`RESUME_SETTINGS` differs (the message names each, with the old and the new value).
    """
    name = f"{where}" if where is not None else "the results file"
    for section in ("model", "settings"):
        if not isinstance(previous.get(section), dict):
            raise UserError(
                f"cannot resume {name}: it has no {section} section; drop --resume to start a new sweep "
                "(the old file is kept as results.json.bak) or use another --output"
            )
    old = previous["settings"]
    changed = [
        f"{'schedules (--layers/--windows/--ratios)' if key == 'schedules' else '--' + key.replace('_', '-')} "
        f"was {_shown(key, old.get(key))}, now {_shown(key, settings.get(key))}"
        for key in RESUME_SETTINGS
        if _comparable(key, old.get(key)) != _comparable(key, settings.get(key))
    ]
    if changed:
        raise UserError(
            f"cannot resume {name} with other settings, it would mix runs measured differently: "
            + "; ".join(changed)
            + ". Resume with the settings it was started with, or drop --resume (the old file is kept as "
            "results.json.bak) or use another --output"
        )


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` as strict JSON to ``path`` atomically (temporary file + rename in the same folder).

    Non-finite numbers (an infinite KL divergence, say) are written as ``null``, since JSON has no
    representation for them.

    Raises:
        OSError: the folder cannot be written.
    """
    write_text_atomic(path, json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")
