"""Thresholds on quality and cost, checked against runs of a results file; the recommendation.

A threshold is either a floor (``min_*``: the measured value must be at least the threshold) or a
ceiling (``max_*``: at most). Quality thresholds compare a compressed run with the uncompressed run
of the same inputs; cost thresholds bound what the operating point may spend.

The recommendation (:func:`lightkv_cli.scoring.recommend.recommend`) is the cheapest run that meets every
threshold that is set.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, fields

from lightkv_cli.errors import UserError

#: name → (kind, what it reads from a run, label, format)
_SPEC: dict[str, tuple[str, str, str, str]] = {
    "min_answer_match": ("min", "quality.answer_match", "answer match", ".3f"),
    "min_top1_agreement": ("min", "quality.top1_agreement", "top-1 agreement", ".3f"),
    "min_accuracy": ("min", "quality.accuracy", "accuracy", ".3f"),
    "max_kl": ("max", "quality.first_token_kl_max", "max first-token KL (nats)", ".3g"),
    "max_vision_retention": ("max", "vision_retention", "vision retention", ".3f"),
    "max_kv_bytes": ("max", "kv_bytes", "KV bytes per request", ".0f"),
    "max_prefill_ms": ("max", "prefill_ms.median", "prefill ms (median)", ".1f"),
}


QUALITY_THRESHOLDS = ("min_answer_match", "min_top1_agreement", "min_accuracy", "max_kl")


COST_THRESHOLDS = ("max_vision_retention", "max_kv_bytes", "max_prefill_ms")


@dataclass
class Thresholds:
    """What an operating point must achieve. ``None`` = not checked.

    Attributes:
        min_answer_match: floor on the fraction of inputs whose greedy answer equals the
            uncompressed model's (after SQuAD normalisation).
        min_top1_agreement: floor on the fraction of inputs whose first generated token agrees.
        min_accuracy: floor on task accuracy against the prompts file's answers.
        max_kl: ceiling on the worst first-token KL divergence from the uncompressed model, nats.
        max_vision_retention: ceiling on the measured fraction of vision tokens cached.
        max_kv_bytes: ceiling on the K+V bytes held after prefill per request, bytes.
        max_prefill_ms: ceiling on the median prefill time, milliseconds (device-specific).
    """

    min_answer_match: float | None = 0.95
    min_top1_agreement: float | None = 0.95
    min_accuracy: float | None = None
    max_kl: float | None = None
    max_vision_retention: float | None = None
    max_kv_bytes: float | None = None
    max_prefill_ms: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise UserError(f"threshold {f.name} must be a number, got {v!r}")
            if v < 0:
                raise UserError(f"threshold {f.name} must be ≥ 0, got {v:g}")
            setattr(self, f.name, float(v))

    def to_dict(self) -> dict[str, float | None]:
        """Every threshold, ``None`` where unset (the ``thresholds`` section of the results file)."""
        return asdict(self)

    def set_items(self) -> dict[str, float]:
        """Only the thresholds that are set."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict, where: str = "thresholds") -> Thresholds:
        """Build from a mapping (a TOML table or a results file's section); missing keys are unset.

        Raises:
            UserError: an unknown key (with the closest known name) or a value that is not a number.
        """
        known = [f.name for f in fields(cls)]
        for key in data:
            if key not in known:
                near = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean '{near[0]}'? " if near else ""
                raise UserError(f"{where}: unknown threshold '{key}'; {hint}known: {', '.join(known)}")
        return cls(**{k: data.get(k) for k in known})

    def merged(self, **overrides: float | None) -> Thresholds:
        """A copy with the given thresholds replaced (``None`` values leave the threshold as it is)."""
        values = self.to_dict()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return Thresholds(**values)


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
        fmt = _SPEC[self.threshold][3]
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
    path = _SPEC[threshold][1]
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
        kind, _, label, _ = _SPEC[name]
        measured = measured_value(run, name)
        if measured is None:
            out.append(CheckResult(name, label, kind, required, None, False, math.inf))
            continue
        gap = (required - measured) if kind == "min" else (measured - required)
        passed = gap <= 1e-12
        out.append(CheckResult(name, label, kind, required, measured, passed, 0.0 if passed else gap))
    return out
