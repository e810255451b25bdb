"""The methods a sweep can run, by name, and how a (method, schedule or target) becomes a press.

Names are what users type (``--methods lightkv,lightkv-uniform``) and what results files record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lightkv_cli.errors import UserError
from lightkv_cli.methods.lightkv import LightKV

#: How a method compresses (shown by ``lightkv methods`` and in reports).
KIND_MERGE, KIND_DROP, KIND_EVICT = "in-prefill merge", "in-prefill drop", "post-prefill eviction"


@dataclass(frozen=True)
class MethodInfo:
    """One named method.

    Attributes:
        name: the name users type and results record.
        summary: one line for ``lightkv methods``, ``--help`` and reports.
        kind: :data:`KIND_MERGE`, :data:`KIND_DROP` or :data:`KIND_EVICT`.
        guidance: LightKV guidance mode of this entry (None for other methods).
        schedules: whether the method runs explicit LightKV schedules (``--layers/--windows/--ratios``).
    """

    name: str
    summary: str
    kind: str
    guidance: str | None = None
    schedules: bool = False

    @property
    def target(self) -> str:
        """What a sweep's target retention ``R`` means for this method."""
        if self.kind == KIND_EVICT:
            return "KV budget equal to an in-prefill method's at vision retention R (α = 1 − (1 − R)·vision/prompt)"
        return "average vision retention R over layers"


METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo(
            "lightkv",
            "LightKV (TMLR 2026): prompt-guided vision-token merging in prefill, cross guidance (published)",
            KIND_MERGE,
            "cross",
            True,
        ),
        MethodInfo(
            "lightkv-prompt",
            "LightKV with guidance from the attention the prompt pays to each vision token",
            KIND_MERGE,
            "prompt",
            True,
        ),
        MethodInfo(
            "lightkv-uniform",
            "LightKV without prompt guidance (plain mean merge): the paper's ablation",
            KIND_MERGE,
            "uniform",
            True,
        ),
        MethodInfo(
            "vlcache",
            "VL-Cache (ICLR 2025): post-prefill eviction of vision and text, sparsity-aware layer budgets",
            KIND_EVICT,
        ),
        MethodInfo("fastv", "FastV (ECCV 2024): drop the least-attended vision tokens before layer 2", KIND_DROP),
        MethodInfo(
            "snapkv", "SnapKV (NeurIPS 2024): post-prefill eviction by an observation window's attention", KIND_EVICT
        ),
        MethodInfo(
            "random",
            "Random drop on LightKV's stages (seeded): the floor every method must beat",
            KIND_DROP,
            None,
            True,
        ),
    )
}
#: The method name for each LightKV guidance mode (``lightkv profile --guidance``).
METHOD_FOR_GUIDANCE = {m.guidance: m.name for m in METHODS.values() if m.guidance}


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
    def build(cls, layers: Sequence[int], windows: Sequence[int], ratios: Sequence[float]) -> Schedule:
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
):
    """The press of ``method`` for a target retention or an explicit schedule.

    Args:
        method: a name in :data:`METHODS`.
        model: the model (schedules are generated for its depth and vision grid).
        target: target ``R`` in ``(0, 1)``: average vision retention for in-prefill methods; for
            eviction methods the KV budget that keeps as many entries as ``R`` does in-prefill
            (see :attr:`MethodInfo.target`). Exclusive with ``schedule``.
        schedule: an explicit LightKV schedule (methods with ``schedules=True`` only).
        positions: ``keep`` or ``renumber`` (in-prefill methods; eviction never moves positions).

    Returns:
        A press (:class:`LightKV`, :class:`RandomDrop`, :class:`FastV`, :class:`VLCache` or
        :class:`SnapKV`) with ``expected_retention`` set where it can be predicted.

    Raises:
        UserError: an unknown method, a target the model cannot reach, a schedule given to a method
            that takes none, or a schedule that does not fit the model's depth.
    """
    from lightkv_cli.methods.fastv import FastV
    from lightkv_cli.methods.random_drop import RandomDrop
    from lightkv_cli.methods.snapkv import SnapKV
    from lightkv_cli.methods.vlcache import VLCache

    info = METHODS.get(method)
    if info is None:
        raise UserError(f"unknown method '{method}'; known methods: {', '.join(METHODS)}")
    if (target is None) == (schedule is None):
        raise ValueError("give exactly one of target and schedule")
    if schedule is not None and not info.schedules:
        raise UserError(
            f"method '{method}' does not take a LightKV schedule (--layers/--windows/--ratios); "
            f"give it target retentions instead (methods with schedules: "
            f"{', '.join(m.name for m in METHODS.values() if m.schedules)})"
        )
    if info.kind == KIND_EVICT:
        cls = VLCache if method == "vlcache" else SnapKV
        press = cls(match_retention=target)
        press.schedule_note = f"KV budget matched to vision retention {target:g}"
        return press
    if method == "fastv":
        return FastV.for_retention(target, model, positions=positions)
    cls = RandomDrop if method == "random" else LightKV
    kwargs = {} if method == "random" else {"guidance": info.guidance}
    if schedule is not None:
        press = cls(
            layers=list(schedule.layers),
            windows=list(schedule.windows),
            ratios=list(schedule.ratios),
            positions=positions,
            **kwargs,
        )
        press.predict(model)
        press.schedule_note = f"explicit schedule {schedule.label()}"
        return press
    return cls.for_retention(target, model, positions=positions, **kwargs)
