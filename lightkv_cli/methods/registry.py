"""The methods a sweep can run, by name, and how a (method, schedule or target) becomes a press.

Names are what users type (``--methods lightkv,lightkv-uniform``) and what results files record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

from lightkv_cli.errors import UserError
from lightkv_cli.methods.lightkv import LightKV


@dataclass(frozen=True)
class MethodInfo:
    """One named method.

    Attributes:
        name: the name users type and results record.
        summary: one line for ``--help`` and reports.
        guidance: LightKV guidance mode of this entry.
    """

    name: str
    summary: str
    guidance: str


METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo("lightkv", "LightKV (TMLR 2026): prompt-guided vision-token merging in prefill, cross guidance (published)", "cross"),
        MethodInfo("lightkv-prompt", "LightKV with guidance from the attention the prompt pays to each vision token", "prompt"),
        MethodInfo("lightkv-uniform", "LightKV without prompt guidance (plain mean merge): the paper's ablation", "uniform"),
    )
}
#: The method name for each LightKV guidance mode (``lightkv profile --guidance``).
METHOD_FOR_GUIDANCE = {m.guidance: m.name for m in METHODS.values()}


@dataclass(frozen=True)
class Schedule:
    """An explicit LightKV schedule: stages after ``layers`` with ``windows`` per axis and ``ratios``.

    Attributes:
        layers: decoder layers after which a stage runs (strictly increasing).
        windows: windows per grid axis at each stage.
        ratios: fraction of each window's tokens merged away at each stage.
    """

    layers: tuple[int, ...]
    windows: tuple[int, ...]
    ratios: tuple[float, ...]

    def label(self) -> str:
        """Compact, stable text used in run ids: ``L12-18-24/W4-2-1/r0.5-0.5-0.5``."""
        return (
            f"L{'-'.join(map(str, self.layers))}/W{'-'.join(map(str, self.windows))}"
            f"/r{'-'.join(f'{r:g}' for r in self.ratios)}"
        )

    def to_dict(self) -> dict:
        """``{"layers", "windows", "ratios"}`` as lists."""
        return {"layers": list(self.layers), "windows": list(self.windows), "ratios": list(self.ratios)}

    @classmethod
    def build(cls, layers: Sequence[int], windows: Sequence[int], ratios: Sequence[float]) -> "Schedule":
        """A schedule with single windows/ratios values broadcast to every stage.

        Raises:
            UserError: lengths that do not match the number of layers, or invalid values.
        """
        layers = [int(x) for x in layers]
        windows = [int(x) for x in windows] * (len(layers) if len(windows) == 1 else 1)
        ratios = [float(x) for x in ratios] * (len(layers) if len(ratios) == 1 else 1)
        if not layers:
            raise UserError("a schedule needs at least one stage layer, e.g. --layers 12,18,24")
        if len(windows) != len(layers) or len(ratios) != len(layers):
            raise UserError(
                f"schedule with layers {layers}: give one window count and one ratio per layer "
                f"(or a single value for all), got windows {windows} and ratios {ratios}"
            )
        LightKV(layers=layers, windows=windows, ratios=ratios)  # validates the values
        return cls(tuple(layers), tuple(windows), tuple(ratios))


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """Split ``"lightkv,lightkv-uniform"`` (or a list) into known method names, order kept, no repeats.

    Raises:
        UserError: an unknown name (the message lists the known ones).
    """
    parts = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if part not in METHODS:
            raise UserError(f"unknown method '{part}'; known methods: {', '.join(METHODS)}")
        if part not in out:
            out.append(part)
    if not out:
        raise UserError(f"no method given; known methods: {', '.join(METHODS)}")
    return out


def make_press(
    method: str,
    model: nn.Module,
    *,
    target: float | None = None,
    schedule: Schedule | None = None,
    positions: str = "keep",
) -> LightKV:
    """The press of ``method`` for a target average vision retention or an explicit schedule.

    Args:
        method: a name in :data:`METHODS`.
        model: the model (schedules are generated for its depth and vision grid).
        target: target average vision retention in ``(0, 1)``; exclusive with ``schedule``.
        schedule: an explicit schedule.
        positions: ``keep`` or ``renumber``.

    Raises:
        UserError: an unknown method, a target the model cannot reach, or a schedule that does not
            fit the model's depth.
    """
    info = METHODS.get(method)
    if info is None:
        raise UserError(f"unknown method '{method}'; known methods: {', '.join(METHODS)}")
    if (target is None) == (schedule is None):
        raise ValueError("give exactly one of target and schedule")
    if schedule is not None:
        press = LightKV(layers=list(schedule.layers), windows=list(schedule.windows), ratios=list(schedule.ratios),
                        guidance=info.guidance, positions=positions)
        press.predict(model)
        press.schedule_note = f"explicit schedule {schedule.label()}"
        return press
    return LightKV.for_retention(target, model, guidance=info.guidance, positions=positions)
