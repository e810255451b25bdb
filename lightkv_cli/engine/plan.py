"""The plan of a sweep: its settings and the runs (uncompressed reference, each method at each target
retention and explicit schedule) with their ids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from lightkv_cli.engine.ids import UNCOMPRESSED, run_id
from lightkv_cli.errors import UserError
from lightkv_cli.methods.base import Press
from lightkv_cli.methods.registry import METHODS, make_press
from lightkv_cli.methods.schedule import Schedule
from lightkv_cli.models.loader import LoadedModel
from lightkv_cli.scoring.thresholds import Thresholds

#: Target retentions of ``lightkv profile`` (1.0 = the uncompressed reference).
DEFAULT_RETENTIONS = (1.0, 0.9, 0.75, 0.55, 0.4)

#: Inputs the timing pass measures by default (``--timing-inputs``).
DEFAULT_TIMING_INPUTS = 8


@dataclass
class SweepSettings:
    """Knobs of a sweep (the ``settings`` and ``thresholds`` sections of the results file).

    Attributes:
        methods: method names (:data:`~lightkv_cli.methods.registry.METHODS`) run at every target
            retention and explicit schedule.
        retentions: target average vision retentions; values of 1.0 are the uncompressed reference,
            which always runs first, once.
        schedules: explicit LightKV schedules, run for every method besides the targets.
        positions: position ids of merged tokens (``keep`` or ``renumber``).
        max_new_tokens: greedy decode length bound (the answer's, and a follow-up answer's).
        followup: a follow-up question for every input whose prompts line gives none (``--followup``),
            answered from the same compressed cache after the first answer; None: none.
        system_prompt: the system prompt of every conversation (``--system-prompt``); None: the chat
            template's or the family's own.
        batch_size: rows per batch of the quality pass (None: chosen per device, see
            :class:`~lightkv_cli.engine.sweep.Sweep`); 1 runs every input alone.
        timing_inputs: inputs the timing pass measures (None: all of them), spread over the
            vision-token groups (:func:`~lightkv_cli.engine.batching.timing_sample`).
        timing_batches: batch sizes the timing pass measures (the first one gives the headline times).
        repeats: rounds of the timing pass (every run visited once per round, in a shuffled order).
        warmup: untimed generations per run and timing batch size before the timing rounds.
        seed: seed of the timing pass's run order and of its bootstrap intervals.
        nvml_interval_ms: NVML sampling interval, milliseconds.
        thresholds: what the recommended operating point must meet.
        memory_budget: memory for capacity planning, bytes (default: the detected device's).
        memory_source: where ``memory_budget`` came from (for the report).

    Raises:
        UserError: ``positions`` other than ``keep`` or ``renumber``; a batch size, timing inputs or timing
            batch size below 1.
    """

    methods: Sequence[str] = ("lightkv",)
    retentions: Sequence[float] = DEFAULT_RETENTIONS
    schedules: Sequence[Schedule] = ()
    positions: str = "keep"
    max_new_tokens: int = 32
    followup: str | None = None
    system_prompt: str | None = None
    batch_size: int | None = None
    timing_inputs: int | None = DEFAULT_TIMING_INPUTS
    timing_batches: Sequence[int] = (1,)
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    nvml_interval_ms: float = 20.0
    thresholds: Thresholds = field(default_factory=Thresholds)
    memory_budget: int | None = None
    memory_source: str | None = None

    def __post_init__(self) -> None:
        if self.positions not in ("keep", "renumber"):
            raise UserError(f"--positions must be keep or renumber, got '{self.positions}'")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.timing_inputs is not None and self.timing_inputs < 1:
            raise UserError(f"--timing-inputs must be at least 1 or 'all', got {self.timing_inputs}")
        if not self.timing_batches or any(b < 1 for b in self.timing_batches):
            raise UserError(
                f"--timing-batch takes batch sizes of at least 1, e.g. 1,8; got {list(self.timing_batches)}"
            )
        self.timing_batches = list(dict.fromkeys(int(b) for b in self.timing_batches))

    def to_dict(self) -> dict:
        """The ``settings`` section of the results file."""
        return {
            "methods": list(self.methods),
            "retentions": [float(r) for r in self.retentions],
            "schedules": [s.to_dict() for s in self.schedules],
            "positions": self.positions,
            "max_new_tokens": self.max_new_tokens,
            "followup": self.followup,
            "system_prompt": self.system_prompt,
            "batch_size": self.batch_size,
            "timing_inputs": self.timing_inputs,
            "timing_batches": list(self.timing_batches),
            "repeats": self.repeats,
            "warmup": self.warmup,
            "seed": self.seed,
            "nvml_interval_ms": self.nvml_interval_ms,
        }


@dataclass
class RunSpec:
    """One run: a method at a target retention or with an explicit schedule (or the reference).

    Attributes:
        id: stable id (:func:`~lightkv_cli.engine.ids.run_id`: ``uncompressed``, ``lightkv@0.55``,
            ``lightkv[L12-18-24/W4-2-1/r0.5-0.5-0.5]``).
        method: method name, ``uncompressed`` for the reference.
        target_retention: the target the schedule was generated for (1.0 for the reference,
            None for an explicit schedule).
        press: the compression method, None for the reference.
    """

    id: str
    method: str
    target_retention: float | None
    press: Press | None = None

    def params(self) -> dict:
        """The method's parameters as recorded in the results file (empty when uncompressed)."""
        if self.press is None:
            return {}
        return self.press.describe()


def plan_runs(loaded: LoadedModel, settings: SweepSettings) -> list[RunSpec]:
    """The grid: the uncompressed reference first, then for each method its target retentions
    (highest first), then its explicit schedules.

    Raises:
        UserError: a target outside ``(0, 1]`` or below what the model can reach, an unknown
            method, or a schedule that does not fit the model.
    """
    targets = []
    for r in settings.retentions:
        r = float(r)
        if math.isnan(r) or not (0.0 < r <= 1.0):
            raise UserError(f"retention {r:g} is outside (0, 1]; give targets like 0.9,0.75,0.55")
        if r < 1.0 and r not in targets:
            targets.append(r)
    targets.sort(reverse=True)
    check_windows(loaded, settings.schedules)
    runs = [RunSpec(id=run_id(UNCOMPRESSED), method=UNCOMPRESSED, target_retention=1.0)]
    for method in settings.methods:
        for r in targets:
            press = make_press(method, loaded.model, target=r, positions=settings.positions)
            runs.append(RunSpec(id=run_id(method, target=r), method=method, target_retention=r, press=press))
        for sched in settings.schedules if METHODS[method].schedules else ():
            press = make_press(method, loaded.model, schedule=sched, positions=settings.positions)
            runs.append(RunSpec(id=run_id(method, schedule=sched), method=method, target_retention=None, press=press))
    return runs


def check_windows(loaded: LoadedModel, schedules: Sequence[Schedule]) -> None:
    """Refuse an explicit schedule with more windows per axis than the model's vision-token grid has
    rows and columns: each window would hold at most one token and the stage would merge nothing.

    Only for fixed-grid families (LLaVA-1.5); a dynamic-resolution image's grid is known per input.

    Raises:
        UserError: naming the schedule, the window count and the grid.
    """
    adapter = loaded.adapter
    if adapter.dynamic_resolution or not schedules:
        return
    rows, cols = adapter.image_grid()
    for sched in schedules:
        for stage, w in enumerate(sched.windows):
            if w > max(rows, cols):
                raise UserError(
                    f"--windows {','.join(map(str, sched.windows))}: {w} windows per side at stage {stage + 1} "
                    f"(after layer {sched.layers[stage]}) is more than the {rows}×{cols} vision-token grid of "
                    f"'{loaded.name}' has rows, so that stage would merge nothing; give at most {max(rows, cols)} "
                    "(e.g. --windows 4,2,1)"
                )
