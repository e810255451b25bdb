"""Thresholds on quality and cost, checked against runs of a results file; the recommendation.

A threshold is either a floor (``min_*``: the measured value must be at least the threshold) or a
ceiling (``max_*``: at most). Quality thresholds compare a compressed run with the uncompressed run
of the same inputs; cost thresholds bound what the operating point may spend.

:class:`Thresholds` is the one definition of the thresholds: the command line's options, a profile's
and a sweep configuration's ``[thresholds]`` table and the results file's ``thresholds`` section are
all validated by it, and what each threshold reads from a run, its labels and its number format are
declared on its field (:data:`THRESHOLDS`).

The recommendation (:func:`lightkv_cli.scoring.recommend.recommend`) is the cheapest run that meets every
threshold that is set. No torch.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from lightkv_cli.errors import UserError


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
    """

    name: str
    kind: Literal["min", "max"]
    group: Literal["quality", "cost"]
    reads: str
    label: str
    report_label: str
    fmt: str


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
) -> Any:
    """A field of :class:`Thresholds`: a number ≥ 0 (≤ 1 for a fraction) or None, with its :class:`ThresholdInfo`."""
    extra = {"kind": kind, "group": group, "reads": reads, "label": label, "report_label": report_label, "fmt": fmt}
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
            in [0, 1]; default 0.95.
        min_accuracy: floor on task accuracy against the prompts file's answers, in [0, 1].
        max_kl: ceiling on the worst first-token KL divergence from the uncompressed model, nats.
        max_vision_retention: ceiling on the measured fraction of vision tokens cached, in [0, 1].
        max_kv_bytes: ceiling on the K+V bytes held after prefill per request, bytes.
        max_prefill_ms: ceiling on the median prefill time, milliseconds (device-specific).

    Raises:
        UserError: (on construction) an unknown threshold (with the closest known name), a value that
            is not a number, a negative value, or a fraction above 1.
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
    )
    max_kl: float | None = _threshold(
        None,
        "Ceiling on the worst first-token KL divergence from the uncompressed model, nats.",
        kind="max",
        group="quality",
        reads="quality.first_token_kl_max",
        label="max first-token KL (nats)",
        report_label="first-token KL max",
        fmt=".3g",
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

    @field_validator("*", mode="before")
    @classmethod
    def _a_number(cls, v: object) -> object:
        """Numbers only: not a bool, a string or NaN (pydantic would turn ``"0.9"`` and ``True`` into floats)."""
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise ValueError("must be a number")
        return float(v)

    def to_dict(self) -> dict[str, float | None]:
        """Every threshold, ``None`` where unset (the ``thresholds`` section of the results file)."""
        return self.model_dump()

    def set_items(self) -> dict[str, float]:
        """Only the thresholds that are set."""
        return {k: v for k, v in self.model_dump().items() if v is not None}

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
        """A copy with the given thresholds replaced (``None`` values leave the threshold as it is).

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


#: name → what the threshold bounds and how it is shown, in declaration order (from the fields' metadata).
THRESHOLDS: dict[str, ThresholdInfo] = {
    name: ThresholdInfo(name=name, **field.json_schema_extra) for name, field in Thresholds.model_fields.items()
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


@dataclass
class CheckResult:
    """One threshold checked against one run.

    Attributes:
        threshold: the threshold's name (``min_answer_match``, ...).
        label: human-readable name of the measured quantity.
        kind: ``"min"`` or ``"max"``.
        required: the threshold value.
        measured: the run's value; ``None`` when the run does not measure it (accuracy without
            answers); an infinite KL is ``inf``.
        passed: whether the run meets the threshold (an unmeasured value never does).
        short_by: how far the measured value is on the wrong side (0 when passed; ``inf`` when unmeasured).
    """

    threshold: str
    label: str
    kind: str
    required: float
    measured: float | None
    passed: bool
    short_by: float

    def describe(self) -> str:
        """e.g. ``top-1 agreement 0.875 < 0.95 (short by 0.075)``."""
        fmt = THRESHOLDS[self.threshold].fmt
        if self.measured is None:
            return (
                f"{self.label} not measured (needs answers in the prompts file) but {self.threshold} = "
                f"{self.required:{fmt}}"
            )
        op = ("≥" if self.kind == "min" else "≤") if self.passed else ("<" if self.kind == "min" else ">")
        text = f"{self.label} {self.measured:{fmt}} {op} {self.required:{fmt}}"
        if not self.passed:
            text += f" (short by {self.short_by:{fmt}})" if self.kind == "min" else f" (over by {self.short_by:{fmt}})"
        return text

    def to_dict(self) -> dict:
        """Plain dict for the results file."""
        return asdict(self)


def measured_value(run: dict, threshold: str) -> float | None:
    """The value of ``run`` that ``threshold`` bounds (``None`` when the run does not have it).

    A KL written as ``null`` (infinite, since JSON has no infinity) reads as ``inf``.
    """
    path = THRESHOLDS[threshold].reads
    value = run
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None and threshold == "max_kl" and isinstance(run.get("quality"), dict):
        return math.inf
    return None if value is None else float(value)


def evaluate(run: dict, thresholds: Thresholds) -> list[CheckResult]:
    """Check every threshold that is set against ``run`` (a run of a results file with status ``ok``).

    Returns:
        One :class:`CheckResult` per set threshold, in declaration order.
    """
    out = []
    for name, required in thresholds.set_items().items():
        kind, label = THRESHOLDS[name].kind, THRESHOLDS[name].label
        measured = measured_value(run, name)
        if measured is None:
            out.append(CheckResult(name, label, kind, required, None, False, math.inf))
            continue
        gap = (required - measured) if kind == "min" else (measured - required)
        passed = gap <= 1e-12
        out.append(CheckResult(name, label, kind, required, measured, passed, 0.0 if passed else gap))
    return out
