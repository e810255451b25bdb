"""Thresholds on quality and cost, checked against runs of a results file; the recommendation.

A threshold is either a floor (``min_*``: the measured value must be at least the threshold) or a
ceiling (``max_*``: at most). Quality thresholds compare a compressed run with the uncompressed run
of the same inputs; cost thresholds bound what the operating point may spend.

:class:`Thresholds` is the one definition of the thresholds: the command line's options, a profile's
and a sweep configuration's ``[thresholds]`` table and the results file's ``thresholds`` section are
all validated by it, and what each threshold reads from a run, its labels and its number format are
declared on its field (:data:`THRESHOLDS`).

**Which value is compared** (``decide_on``): a quality threshold on a mean over inputs (answer match, top-1
agreement, accuracy) is compared with the lower end of its 95% interval by default (``lower-bound``: a Wilson
score interval for 0/1 metrics, :func:`~lightkv_cli.scoring.stats.mean_interval`), so 8 agreeing inputs of 8
(lower bound 0.68) do not pass a 0.95 floor by luck; a ceiling with an interval would use the upper end.
``mean`` compares the point estimate, as lightkv did before the setting existed; a results file or profile
that does not record ``decide_on`` is read that way, so its recommendation keeps its meaning. Thresholds
without an interval are compared with the measured value in either mode: the cost thresholds (bytes and
retentions are counted, not estimated; the prefill median is a device measurement) and ``max_kl``, which
bounds the worst input's KL, already a worst case rather than an estimate of a mean. The uncompressed
run's fidelity to itself (answer match, top-1 agreement) is 1 by definition, not an estimate, so it is
compared as measured.

The recommendation (:func:`lightkv_cli.scoring.recommend.recommend`) is the cheapest run that meets every
threshold that is set. No torch.

Cohesive by design (over the layout's line budget): each threshold's declaration (what it reads, its
interval, whether it applies to a run) and the code that checks and describes it are one contract, and
splitting them would put half of each threshold's meaning in another file.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from lightkv_cli.errors import UserError
from lightkv_cli.scoring.stats import is_binary, mean_interval, wilson_inputs_needed

#: The values of ``decide_on``: compare quality thresholds with the 95% bound (default) or the mean.
DECIDE_ON = ("lower-bound", "mean")


DecideOn = Literal["lower-bound", "mean"]


#: Confidence level of the intervals a ``lower-bound`` decision compares (the ``ci`` of the results file).
DECISION_LEVEL = 0.95


@dataclass(frozen=True)
class ThresholdInfo:
    """What one threshold bounds and how it is shown (declared on the fields of :class:`Thresholds`).

    Attributes:
        name: the field name (``min_answer_match``, ...), as in profiles, sweep configurations and results.
        kind: ``"min"`` (a floor) or ``"max"`` (a ceiling).
        group: ``"quality"`` (against the uncompressed run) or ``"cost"``.
        reads: dotted path of the value it bounds in a run of the results file (``quality.answer_match``).
        label: the measured quantity in ``lightkv check`` and the recommendation's reason.
        report_label: the same in the reports' Thresholds section.
        fmt: format spec of its values in ``lightkv check`` and the recommendation's reason (``.3f``).
        per_input: the key of ``per_input[].quality`` whose mean over inputs the threshold bounds (its
            interval is computed from those values); ``None`` for a threshold without an interval.
        ci: the key of ``quality.ci`` holding the recorded 95% interval (used when a run has no per-input
            values); ``None`` without an interval.
        vs_reference: whether the quantity compares a run with the uncompressed run (fidelity), so the
            uncompressed run itself meets it exactly, by definition.
        first_token: whether it bounds a first-token metric, not applicable (n/a) to a run whose prefill
            is the uncompressed one (``quality.prefill_unchanged``: post-prefill eviction).
    """

    name: str
    kind: Literal["min", "max"]
    group: Literal["quality", "cost"]
    reads: str
    label: str
    report_label: str
    fmt: str
    per_input: str | None = None
    ci: str | None = None
    vs_reference: bool = False
    first_token: bool = False


def _threshold(
    default: float | None,
    description: str,
    *,
    kind: str,
    group: str,
    reads: str,
    label: str,
    report_label: str,
    fmt: str,
    fraction: bool = False,
    per_input: str | None = None,
    ci: str | None = None,
    vs_reference: bool = False,
    first_token: bool = False,
) -> Any:
    """A field of :class:`Thresholds`: a number ≥ 0 (≤ 1 for a fraction) or None, with its :class:`ThresholdInfo`."""
    extra = {
        "kind": kind,
        "group": group,
        "reads": reads,
        "label": label,
        "report_label": report_label,
        "fmt": fmt,
        "per_input": per_input,
        "ci": ci,
        "vs_reference": vs_reference,
        "first_token": first_token,
    }
    return Field(default, ge=0, le=1 if fraction else None, description=description, json_schema_extra=extra)


class _RaisesUserError(type(BaseModel)):
    """Metaclass of :class:`Thresholds`: building one in code (``Thresholds(max_kl=0.1)``, the command line)
    raises :class:`UserError`, one line. Validation inside another model (a profile's ``[thresholds]``)
    does not call the class, so there pydantic's errors keep the field's path (``thresholds.max_kl``)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as exc:
            raise _user_error(exc, "thresholds") from None


class Thresholds(BaseModel, metaclass=_RaisesUserError):
    """What an operating point must achieve. ``None`` = not checked.

    Built from keyword arguments (the command line; unset keys take the defaults below) or with
    :meth:`from_dict` / :data:`ThresholdsSection` from a file's table (keys left out are unset).

    Attributes:
        min_answer_match: floor on the fraction of inputs whose greedy answer equals the
            uncompressed model's (after SQuAD normalisation), in [0, 1]; default 0.95.
        min_top1_agreement: floor on the fraction of inputs whose first generated token agrees,
            in [0, 1]; default 0.95. Not applicable (met, shown n/a) to a run whose prefill is unchanged.
        min_token_agreement: floor on the continuation's top-1 agreement (the uncompressed answer fed
            through the compressed cache, mean over inputs of the fraction of positions that agree), in
            [0, 1]; default 0.95.
        min_accuracy: floor on task accuracy against the prompts file's answers, in [0, 1].
        max_kl: ceiling on the worst per-token KL divergence from the uncompressed model over the
            teacher-forced continuations of every input, nats (results files written before continuation
            fidelity: the worst first-token KL).
        max_vision_retention: ceiling on the measured fraction of vision tokens cached, in [0, 1].
        max_kv_bytes: ceiling on the K+V bytes held after prefill per request, bytes.
        max_prefill_ms: ceiling on the median prefill time, milliseconds (device-specific).
        decide_on: which value the quality thresholds with an interval are compared with:
            ``"lower-bound"`` (default: the lower end of the 95% interval for a floor, the upper end for
            a ceiling) or ``"mean"`` (the point estimate). ``None`` (a table or results file that does
            not record it: written before the setting existed) reads as ``"mean"``. Not a threshold:
            :meth:`set_items` leaves it out.

    Raises:
        UserError: (on construction) an unknown threshold (with the closest known name), a value that
            is not a number, a negative value, a fraction above 1, or a ``decide_on`` other than
            ``lower-bound`` or ``mean``.
    """

    model_config = ConfigDict(extra="forbid")

    min_answer_match: float | None = _threshold(
        0.95,
        "Floor on the fraction of inputs whose answer equals the uncompressed model's.",
        kind="min",
        group="quality",
        reads="quality.answer_match",
        label="answer match",
        report_label="answer match",
        fmt=".3f",
        fraction=True,
        per_input="exact_match",
        ci="answer_match",
        vs_reference=True,
    )
    min_top1_agreement: float | None = _threshold(
        0.95,
        "Floor on the fraction of inputs whose first generated token agrees with the uncompressed model's.",
        kind="min",
        group="quality",
        reads="quality.top1_agreement",
        label="top-1 agreement",
        report_label="top-1 agreement",
        fmt=".3f",
        fraction=True,
        per_input="top1_agreement",
        ci="top1_agreement",
        vs_reference=True,
        first_token=True,
    )
    min_token_agreement: float | None = _threshold(
        0.95,
        "Floor on the top-1 agreement over the uncompressed answer fed through the compressed cache.",
        kind="min",
        group="quality",
        reads="quality.token_agreement",
        label="token agreement",
        report_label="token agreement (continuation)",
        fmt=".3f",
        fraction=True,
        per_input="token_agreement",
        ci="token_agreement",
        vs_reference=True,
    )
    min_accuracy: float | None = _threshold(
        None,
        "Floor on task accuracy against the prompts file's answers.",
        kind="min",
        group="quality",
        reads="quality.accuracy",
        label="accuracy",
        report_label="accuracy",
        fmt=".3f",
        fraction=True,
        per_input="accuracy",
        ci="accuracy",
    )
    max_kl: float | None = _threshold(
        None,
        "Ceiling on the worst per-token KL divergence from the uncompressed model over the continuation, nats.",
        kind="max",
        group="quality",
        reads="quality.continuation_kl_max",
        label="max continuation KL (nats)",
        report_label="continuation KL max",
        fmt=".3g",
        vs_reference=True,
    )
    max_vision_retention: float | None = _threshold(
        None,
        "Ceiling on the measured fraction of vision tokens cached.",
        kind="max",
        group="cost",
        reads="vision_retention",
        label="vision retention",
        report_label="measured vision retention",
        fmt=".3f",
        fraction=True,
    )
    max_kv_bytes: float | None = _threshold(
        None,
        "Ceiling on the K+V bytes held after prefill per request, bytes.",
        kind="max",
        group="cost",
        reads="kv_bytes",
        label="KV bytes per request",
        report_label="KV bytes per request",
        fmt=".0f",
    )
    max_prefill_ms: float | None = _threshold(
        None,
        "Ceiling on the median prefill time, milliseconds.",
        kind="max",
        group="cost",
        reads="prefill_ms.median",
        label="prefill ms (median)",
        report_label="prefill median",
        fmt=".1f",
    )
    decide_on: DecideOn | None = Field(
        "lower-bound",
        description="Compare quality thresholds with the 95% bound (lower-bound) or the point estimate (mean); "
        "unrecorded (null) reads as mean.",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _a_number(cls, v: object, info: ValidationInfo) -> object:
        """Numbers only: not a bool, a string or NaN (pydantic would turn ``"0.9"`` and ``True`` into floats)."""
        if v is None or info.field_name == "decide_on":
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise ValueError("must be a number")
        return float(v)

    def to_dict(self) -> dict[str, float | str | None]:
        """Every threshold, ``None`` where unset, and ``decide_on`` (the ``thresholds`` section of the results
        file)."""
        return self.model_dump()

    def set_items(self) -> dict[str, float]:
        """Only the thresholds that are set (not ``decide_on``)."""
        return {k: v for k, v in self.model_dump().items() if v is not None and k in THRESHOLDS}

    @property
    def on_bound(self) -> bool:
        """Whether quality thresholds are compared with their 95% bound (``decide_on`` is ``lower-bound``);
        False for ``mean`` and for an unrecorded ``decide_on``."""
        return self.decide_on == "lower-bound"

    @classmethod
    def unset(cls) -> Thresholds:
        """No threshold set (what an empty ``[thresholds]`` table means)."""
        return cls(**dict.fromkeys(cls.model_fields))

    @classmethod
    def from_dict(cls, data: dict, where: str = "thresholds") -> Thresholds:
        """Build from a mapping (a TOML table or a results file's section); missing keys are unset.

        Raises:
            UserError: an unknown key (with the closest known name) or a value that is not a number,
                negative, or a fraction above 1.
        """
        try:
            return cls.model_validate(_missing_is_unset(data))
        except ValidationError as exc:
            raise _user_error(exc, where) from None

    def merged(self, **overrides: float | None) -> Thresholds:
        """A copy with the given thresholds (and ``decide_on``) replaced (``None`` values leave it as it is).

        Raises:
            UserError: an unknown threshold or an invalid value among ``overrides``.
        """
        values = self.to_dict()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return Thresholds(**values)


def _missing_is_unset(data: object) -> object:
    """A file's thresholds table with every key it leaves out set to None (not checked), not the defaults."""
    if isinstance(data, dict):
        return {**dict.fromkeys(Thresholds.model_fields), **data}
    return data


#: The ``[thresholds]`` table of a profile or sweep configuration and the ``thresholds`` section of a
#: results file, as a pydantic field type: a :class:`Thresholds` whose keys left out are unset.
ThresholdsSection = Annotated[Thresholds, BeforeValidator(_missing_is_unset)]


#: name → what the threshold bounds and how it is shown, in declaration order (from the fields' metadata;
#: ``decide_on`` is a setting, not a threshold).
THRESHOLDS: dict[str, ThresholdInfo] = {
    name: ThresholdInfo(name=name, **field.json_schema_extra)
    for name, field in Thresholds.model_fields.items()
    if isinstance(field.json_schema_extra, dict)
}


QUALITY_THRESHOLDS = tuple(name for name, info in THRESHOLDS.items() if info.group == "quality")


COST_THRESHOLDS = tuple(name for name, info in THRESHOLDS.items() if info.group == "cost")


def _user_error(exc: ValidationError, where: str) -> UserError:
    """One line for the first problem of a :class:`Thresholds` built from keywords or a mapping."""
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    err = errors[0]
    value = err.get("input")
    if not err["loc"]:
        return UserError(f"{where}: give a table of thresholds, got {value!r}")
    name = str(err["loc"][0])
    if name == "decide_on":
        return UserError(f"{where}: decide_on must be {' or '.join(DECIDE_ON)}, got {value!r}")
    if err["type"] == "extra_forbidden":
        known = list(Thresholds.model_fields)
        near = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        return UserError(f"{where}: unknown threshold '{name}'; {hint}known: {', '.join(known)}")
    if err["type"] == "greater_than_equal":
        return UserError(f"threshold {name} must be ≥ {err['ctx']['ge']:g}, got {value:g}")
    if err["type"] == "less_than_equal":
        return UserError(f"threshold {name} must be ≤ {err['ctx']['le']:g}, got {value:g}")
    return UserError(f"threshold {name} {err['msg'].removeprefix('Value error, ')}, got {value!r}")


#: How :class:`CheckResult` names the value it compared, by ``basis``.
_BASIS_TEXT = {"lower-bound": "lower 95% bound", "upper-bound": "upper 95% bound", "mean": "mean", "measured": ""}


@dataclass
class CheckResult:
    """One threshold checked against one run.

    Attributes:
        threshold: the threshold's name (``min_answer_match``, ...).
        label: human-readable name of the measured quantity.
        kind: ``"min"`` or ``"max"``.
        required: the threshold value.
        measured: the value compared with ``required`` (see ``basis``); ``None`` when the run does not
            measure it (accuracy without answers); an infinite KL is ``inf``.
        passed: whether the run meets the threshold (an unmeasured value never does).
        short_by: how far the compared value is on the wrong side (0 when passed; ``inf`` when unmeasured).
        basis: which value was compared: ``"lower-bound"`` / ``"upper-bound"`` (the end of the 95% interval
            of a mean over inputs), ``"mean"`` (the point estimate), ``"measured"`` (a value without an
            interval: cost, the worst-input KL, the uncompressed run's fidelity to itself) or ``"n/a"``
            (the threshold does not apply to the run, :func:`not_applicable`; met, ``measured`` None).
        estimate: the point estimate (the mean over inputs, or the measured value); equals ``measured``
            unless ``basis`` is a bound.
        n_inputs: how many inputs the mean is over (``None`` when not a mean).
        note: a remark for :meth:`describe`: why a ``lower-bound`` decision compared the mean (no interval
            recorded), or that the mean passes where the bound fails (and how many inputs a 0/1 metric
            needs to pass even if every input agrees); else ``None``.
    """

    threshold: str
    label: str
    kind: str
    required: float
    measured: float | None
    passed: bool
    short_by: float
    basis: str = "measured"
    estimate: float | None = None
    n_inputs: int | None = None
    note: str | None = None

    def describe(self) -> str:
        """e.g. ``top-1 agreement 0.875 < 0.95 (short by 0.075)``, or on a bound
        ``answer match lower 95% bound 0.676 < 0.950 (mean 1.000 of 8 inputs; short by 0.274; ...)``."""
        fmt = THRESHOLDS[self.threshold].fmt
        if self.basis == "n/a":
            return f"{self.label} n/a ({self.note})"
        if self.measured is None:
            return (
                f"{self.label} not measured (needs answers in the prompts file) but {self.threshold} = "
                f"{self.required:{fmt}}"
            )
        op = ("≥" if self.kind == "min" else "≤") if self.passed else ("<" if self.kind == "min" else ">")
        what = _BASIS_TEXT.get(self.basis, "") if self.basis != "mean" else ""
        text = f"{self.label} {what + ' ' if what else ''}{self.measured:{fmt}} {op} {self.required:{fmt}}"
        extras = []
        bounded = self.basis in ("lower-bound", "upper-bound")
        if bounded and self.estimate is not None:
            extras.append(f"mean {self.estimate:{fmt}}" + (f" of {self.n_inputs} inputs" if self.n_inputs else ""))
        if not self.passed:
            extras.append(f"short by {self.short_by:{fmt}}" if self.kind == "min" else f"over by {self.short_by:{fmt}}")
        if self.note:
            extras.append(self.note)
        return text + (f" ({'; '.join(extras)})" if extras else "")

    def to_dict(self) -> dict:
        """Plain dict for the results file."""
        return asdict(self)


def measured_value(run: dict, threshold: str) -> float | None:
    """The value of ``run`` that ``threshold`` bounds (``None`` when the run does not have it): the mean
    over inputs for the quality thresholds, as recorded in ``run.quality``.

    A KL written as ``null`` (infinite, since JSON has no infinity) reads as ``inf``.
    """
    path = THRESHOLDS[threshold].reads
    quality = run.get("quality")
    if threshold == "max_kl" and isinstance(quality, dict) and "continuation_kl_max" not in quality:
        path = "quality.first_token_kl_max"  # a file written before continuation fidelity
    value = run
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None and threshold == "max_kl" and isinstance(quality, dict) and not quality.get("prefill_unchanged"):
        return math.inf
    return None if value is None else float(value)


def not_applicable(run: dict, threshold: str) -> str | None:
    """Why ``threshold`` does not apply to ``run`` (so it is met, and shown n/a), or None when it applies: a
    first-token threshold on a run whose prefill is unchanged, or a continuation threshold on a results
    file written before continuation fidelity was measured."""
    info = THRESHOLDS[threshold]
    quality = run.get("quality") if isinstance(run.get("quality"), dict) else {}
    if info.first_token and quality.get("prefill_unchanged"):
        return "the method leaves prefill unchanged"
    if threshold == "min_token_agreement" and quality and "token_agreement" not in quality:
        return "not recorded: results written before continuation fidelity"
    return None


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def quality_interval(run: dict, threshold: str, level: float = DECISION_LEVEL) -> tuple[float, float, int, str] | None:
    """The ``level`` confidence interval of the mean that ``threshold`` bounds, with its number of inputs.

    Computed from the run's per-input values (``per_input[].quality[<key>]``, inputs without a value
    left out) with :func:`~lightkv_cli.scoring.stats.mean_interval`: a Wilson score interval when every
    value is 0 or 1, else a percentile bootstrap (fixed seed). Without per-input values, the interval
    recorded in ``quality.ci`` (its ``n`` is ``quality.n_inputs``, or ``n_with_answers`` for accuracy).

    Returns:
        ``(low, high, n, how)`` in the metric's unit, ``how`` one of ``"wilson"``, ``"bootstrap"``,
        ``"recorded"``; ``None`` when the threshold has no interval (cost thresholds, ``max_kl``) or
        the run records none.
    """
    info = THRESHOLDS[threshold]
    if info.per_input is None:
        return None
    values = []
    for entry in run.get("per_input") or []:
        q = entry.get("quality") if isinstance(entry, dict) else None
        v = q.get(info.per_input) if isinstance(q, dict) else None
        if _number(v):
            values.append(float(v))
    if values:
        low, high = mean_interval(values, level)
        return (low, high, len(values), "wilson" if is_binary(values) else "bootstrap")
    quality = run.get("quality") if isinstance(run.get("quality"), dict) else {}
    ci = quality.get("ci") if isinstance(quality.get("ci"), dict) else {}
    recorded = ci.get(info.ci)
    if isinstance(recorded, (list, tuple)) and len(recorded) == 2 and all(_number(b) for b in recorded):
        n = quality.get("n_with_answers" if threshold == "min_accuracy" else "n_inputs")
        return (float(recorded[0]), float(recorded[1]), int(n) if _number(n) else 0, "recorded")
    return None


def _bound_note(kind: str, required: float, estimate: float, how: str) -> str | None:
    """When the bound fails but the mean would pass: say so, and when every input agrees on a 0/1 floor, how
    many inputs it takes to pass."""
    if (estimate < required) if kind == "min" else (estimate > required):
        return None
    note = "the mean passes; more inputs narrow the interval"
    if how == "wilson" and kind == "min" and estimate == 1.0 and required < 1.0:
        note += f" (≥ {wilson_inputs_needed(required, DECISION_LEVEL):.0f} inputs even if every one agrees)"
    return note


def evaluate(run: dict, thresholds: Thresholds) -> list[CheckResult]:
    """Check every threshold that is set against ``run`` (a run of a results file with status ``ok``).

    With ``thresholds.decide_on == "lower-bound"`` a quality threshold with an interval
    (:func:`quality_interval`) compares the interval's lower end (a floor) or upper end (a ceiling);
    with ``"mean"`` or an unrecorded ``decide_on`` the point estimate. A run without an interval is
    compared on its mean, and the result says so (``note``). See the module docstring for which
    thresholds have no interval.

    Returns:
        One :class:`CheckResult` per set threshold, in declaration order.
    """
    out = []
    reference = run.get("method") == "uncompressed"
    for name, required in thresholds.set_items().items():
        info = THRESHOLDS[name]
        kind, label = info.kind, info.label
        why = not_applicable(run, name)
        if why is not None:
            out.append(CheckResult(name, label, kind, required, None, True, 0.0, basis="n/a", note=why))
            continue
        estimate = measured_value(run, name)
        if estimate is None:
            out.append(CheckResult(name, label, kind, required, None, False, math.inf, basis="mean"))
            continue
        basis, compared, n, note = "measured", estimate, None, None
        if info.per_input is not None and not (reference and info.vs_reference):
            interval = quality_interval(run, name)
            n = interval[2] if interval else None
            if not thresholds.on_bound:
                basis = "mean"
            elif interval is None:
                basis, note = "mean", "no interval recorded: compared the mean"
            else:
                basis = "lower-bound" if kind == "min" else "upper-bound"
                compared = interval[0] if kind == "min" else interval[1]
        gap = (required - compared) if kind == "min" else (compared - required)
        passed = gap <= 1e-12
        if not passed and basis in ("lower-bound", "upper-bound"):
            note = _bound_note(kind, required, estimate, interval[3])
        out.append(
            CheckResult(
                name,
                label,
                kind,
                required,
                compared,
                passed,
                0.0 if passed else gap,
                basis=basis,
                estimate=estimate,
                n_inputs=n,
                note=note,
            )
        )
    return out
